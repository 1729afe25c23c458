// The parity checks, included by tests/parity.rs (on the CPU, or the device
// FINETUNE_TEST_DEVICE names) and by tests/metal.rs (on the Mac's GPU): see tests/parity.rs.

#[test]
fn base_logits_match_transformers() {
    let dirs = reference_dirs();
    assert!(
        !dirs.is_empty(),
        "no fixture folders with reference.safetensors"
    );
    for dir in dirs {
        let r = reference(&dir);
        let model = load(&dir);
        let diff = max_abs_diff(&logits(&model, &r.input_ids), &r.base_logits);
        println!("{:<14} base logits max|diff| = {diff:.2e}", name(&dir));
        assert!(diff <= 1e-4, "{}: base logits differ by {diff}", name(&dir));
    }
}

#[test]
fn peft_adapter_logits_match() {
    for dir in reference_dirs() {
        let r = reference(&dir);
        let mut model = load(&dir);
        adapter::load(&dir.join("peft-adapter"), &mut model).unwrap();
        let diff = max_abs_diff(&logits(&model, &r.input_ids), &r.lora_logits);
        println!("{:<14} LoRA logits max|diff| = {diff:.2e}", name(&dir));
        assert!(diff <= 1e-4, "{}: LoRA logits differ by {diff}", name(&dir));
    }
}

#[test]
fn masked_loss_and_every_lora_gradient_match() {
    for dir in reference_dirs() {
        let r = reference(&dir);
        let mut model = load(&dir);
        let state = adapter::load(&dir.join("peft-adapter"), &mut model).unwrap();
        let ids = r.input_ids.to_device(model.device()).unwrap();
        let (loss, n) = model
            .loss(&ModelInput::causal(ids), &r.labels, false)
            .unwrap();
        let ours = loss.to_scalar::<f32>().unwrap() as f64;
        println!(
            "{:<14} loss ours {ours:.7} ref {:.7} (|diff| {:.1e}, {n} positions)",
            name(&dir),
            r.loss,
            (ours - r.loss).abs()
        );
        assert!((ours - r.loss).abs() <= 1e-5, "{}: loss", name(&dir));
        let grads = loss.backward().unwrap();
        let vars = state.named_vars();
        assert_eq!(
            vars.len(),
            r.grads.len(),
            "{}: LoRA tensor count",
            name(&dir)
        );
        let mut worst = 0f64;
        for (key, want) in &r.grads {
            let var = &vars
                .iter()
                .find(|(k, _)| k == key)
                .unwrap_or_else(|| panic!("{}: no LoRA tensor {key}", name(&dir)))
                .1;
            let got = grads
                .get(var)
                .unwrap_or_else(|| panic!("{}: no gradient reached {key}", name(&dir)));
            let rel = rel_err(got, want);
            worst = worst.max(rel);
            assert!(
                rel <= 1e-3,
                "{}: {key} relative error {rel:.2e}",
                name(&dir)
            );
        }
        println!(
            "{:<14} {} LoRA gradients, worst relative error {worst:.2e}",
            name(&dir),
            r.grads.len()
        );
    }
}

#[test]
fn sharded_checkpoint_gives_the_same_logits() {
    let mut checked = 0;
    for dir in fixture_dirs() {
        let n = name(&dir);
        let Some(base) = n.strip_suffix("-sharded") else {
            continue;
        };
        let single = dir.with_file_name(base);
        let r = reference(&single);
        let a = logits(&load(&dir), &r.input_ids);
        let b = logits(&load(&single), &r.input_ids);
        let diff = max_abs_diff(&a, &b);
        println!("{n:<22} vs single file: max|diff| = {diff:.2e}");
        assert_eq!(diff, 0.0, "{n}: sharded logits differ from {base}");
        checked += 1;
    }
    if std::env::var("FINETUNE_FIXTURES").is_err() {
        assert!(checked >= 4, "expected the four sharded fixtures");
    }
}

#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    // keep = 0: every layer recomputed; 2: layers 0, 2, … keep their activations.
    for keep in [0, 2] {
        for dir in reference_dirs() {
            let r = reference(&dir);
            let mut model = load(&dir);
            let state = adapter::load(&dir.join("peft-adapter"), &mut model).unwrap();
            if !model.set_gradient_checkpointing(true, keep) {
                println!(
                    "{:<14} (no gradient checkpointing for this architecture)",
                    name(&dir)
                );
                continue;
            }
            let ids = r.input_ids.to_device(model.device()).unwrap();
            let (loss, _) = model
                .loss(&ModelInput::causal(ids), &r.labels, true)
                .unwrap();
            assert!((loss.to_scalar::<f32>().unwrap() as f64 - r.loss).abs() <= 1e-5);
            let opt =
                finetune::train::optim::AdamW::new(state.named_vars(), Default::default()).unwrap();
            let grads = opt.collect(&model.backward(&loss).unwrap()).unwrap();
            let mut worst = 0f64;
            for ((key, _), got) in opt.params().iter().zip(&grads) {
                let want = &r.grads.iter().find(|(k, _)| k == key).unwrap().1;
                let got = got
                    .as_ref()
                    .unwrap_or_else(|| panic!("{}: no gradient for {key}", name(&dir)));
                let rel = rel_err(got, want);
                worst = worst.max(rel);
                assert!(
                    rel <= 1e-3,
                    "{} keep={keep}: {key} relative error {rel:.2e}",
                    name(&dir)
                );
            }
            println!(
                "{:<14} checkpointed (keep every {keep}): worst relative gradient error {worst:.2e}",
                name(&dir)
            );
        }
    }
}

/// bf16 base weights (CPU: bf16 weights × f32 activations through the AVX512-BF16 kernel; CUDA:
/// bf16 weights and activations) against the float32 reference. bf16 keeps 8 significant bits
/// (relative rounding 2⁻⁹ ≈ 2e-3 per value), so the stated tolerances are relative norms: logits
/// 2e-2, loss 1e-2, every LoRA gradient 5e-2 (gradients pass through every layer twice).
#[test]
fn bf16_weights_match_within_bf16_tolerances() {
    for dir in reference_dirs() {
        let r = reference(&dir);
        let mut model = load_as(&dir, candle_core::DType::BF16);
        let base = rel_err(&logits(&model, &r.input_ids), &r.base_logits);
        let state = adapter::load(&dir.join("peft-adapter"), &mut model).unwrap();
        let lora = rel_err(&logits(&model, &r.input_ids), &r.lora_logits);
        let ids = r.input_ids.to_device(model.device()).unwrap();
        let (loss, _) = model
            .loss(&ModelInput::causal(ids), &r.labels, false)
            .unwrap();
        let ours = loss.to_scalar::<f32>().unwrap() as f64;
        let loss_rel = (ours - r.loss).abs() / r.loss.abs();
        let grads = loss.backward().unwrap();
        let mut worst = 0f64;
        for (key, var) in state.named_vars() {
            let want = &r.grads.iter().find(|(k, _)| *k == key).unwrap().1;
            let got = grads
                .get(&var)
                .unwrap_or_else(|| panic!("{}: no gradient reached {key}", name(&dir)));
            worst = worst.max(rel_err(got, want));
        }
        println!(
            "{:<14} bf16: base logits {base:.1e}, LoRA logits {lora:.1e}, loss {loss_rel:.1e}, worst gradient {worst:.1e} (relative)",
            name(&dir)
        );
        assert!(base <= 2e-2 && lora <= 2e-2, "{}: logits", name(&dir));
        assert!(
            loss_rel <= 1e-2,
            "{}: loss {ours} vs {}",
            name(&dir),
            r.loss
        );
        assert!(worst <= 5e-2, "{}: gradient {worst:.2e}", name(&dir));
    }
}

/// The loss taken a few rows at a time (`model::loss`: no whole logits) gives the whole loss's
/// value and every LoRA gradient: chunks of 3 rows and of 1 against all rows at once.
#[test]
fn loss_in_chunks_equals_the_whole_loss() {
    for dir in reference_dirs() {
        let r = reference(&dir);
        let mut model = load(&dir);
        let state = adapter::load(&dir.join("peft-adapter"), &mut model).unwrap();
        let ids = r.input_ids.to_device(model.device()).unwrap();
        let input = ModelInput::causal(ids);
        let run = |rows: Option<usize>| {
            let (loss, n) = model
                .loss_in_chunks(&input, &r.labels, true, rows)
                .unwrap();
            let grads = loss.backward().unwrap();
            let mut grads: Vec<_> = state
                .named_vars()
                .into_iter()
                .map(|(k, v)| (k, grads.get(&v).unwrap().clone()))
                .collect();
            grads.sort_by(|a, b| a.0.cmp(&b.0));
            (loss.to_scalar::<f32>().unwrap() as f64, n, grads)
        };
        let (whole, n, want) = run(None);
        assert!(n > 3, "{}: the fixture has {n} positions", name(&dir));
        // The evaluation loss: the same value, in chunks, with no graph to run backward on.
        let (eval, eval_n) = model.eval_loss(&input, &r.labels).unwrap();
        assert!(!eval.track_op(), "{}: the eval loss carries a graph", name(&dir));
        let eval = eval.to_scalar::<f32>().unwrap() as f64;
        assert_eq!(eval_n, n);
        assert!(
            (eval - whole).abs() <= 1e-6 * whole.abs().max(1.0),
            "{}: eval loss {eval} vs {whole}",
            name(&dir)
        );
        for rows in [3, 1] {
            let (loss, _, got) = run(Some(rows));
            assert!(
                (loss - whole).abs() <= 1e-6 * whole.abs().max(1.0),
                "{}: {rows} rows a chunk: loss {loss} vs {whole}",
                name(&dir)
            );
            for ((key, g), (_, w)) in got.iter().zip(&want) {
                let w = w.to_device(&candle_core::Device::Cpu).unwrap();
                let rel = rel_err(g, &w);
                assert!(
                    rel <= 1e-5,
                    "{}: {rows} rows a chunk: {key} off by {rel:.2e}",
                    name(&dir)
                );
            }
        }
    }
}
