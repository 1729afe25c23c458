//! LoRA adapters: our PEFT export re-imports to the same logits, and a short AdamW run on a
//! fixture learns through LoRA alone (loss falls, every B leaves zero, base weights untouched).
// Tests panic on purpose: unwrap/expect are how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use finetune::model::{adapter, LoraConfig, ModelInput};
use finetune::train::optim::{AdamW, AdamWConfig};

#[test]
fn exported_adapter_reimports_to_the_same_logits() {
    for dir in reference_dirs() {
        let r = reference(&dir);
        let mut model = load(&dir);
        let state = adapter::load(&dir.join("peft-adapter"), &mut model).unwrap();
        let before = logits(&model, &r.input_ids);
        let out = tempfile::tempdir().unwrap();
        adapter::save(out.path(), &state, &model, Some("tiny")).unwrap();

        // Exactly PEFT's layout and config keys.
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["peft_type"], "LORA");
        assert_eq!(cfg["task_type"], "CAUSAL_LM");
        assert_eq!(cfg["r"], 4);
        assert_eq!(cfg["lora_alpha"], 8.0);
        assert_eq!(cfg["base_model_name_or_path"], "tiny");
        assert_eq!(cfg["use_rslora"], false);
        let peft_cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("peft-adapter/adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["fan_in_fan_out"], peft_cfg["fan_in_fan_out"]);
        let mut ours: Vec<String> = serde_json::from_value(cfg["target_modules"].clone()).unwrap();
        let mut theirs: Vec<String> =
            serde_json::from_value(peft_cfg["target_modules"].clone()).unwrap();
        ours.sort();
        theirs.sort();
        assert_eq!(ours, theirs);
        let written = candle_core::safetensors::load(
            out.path().join("adapter_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let original = candle_core::safetensors::load(
            dir.join("peft-adapter/adapter_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let mut a: Vec<_> = written.keys().cloned().collect();
        let mut b: Vec<_> = original.keys().cloned().collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{}: tensor names differ from PEFT's", name(&dir));
        for (k, t) in &written {
            assert_eq!(t.dims(), original[k].dims(), "{k}");
        }
        // No temp files left behind.
        assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 2);

        let mut fresh = load(&dir);
        adapter::load(out.path(), &mut fresh).unwrap();
        let after = logits(&fresh, &r.input_ids);
        assert_eq!(max_abs_diff(&before, &after), 0.0, "{}", name(&dir));
        assert!(max_abs_diff(&after, &r.lora_logits) <= 1e-4);
    }
}

#[test]
fn fresh_lora_starts_as_the_base_model() {
    let dir = fixture("tiny-qwen3");
    let r = reference(&dir);
    let mut model = load(&dir);
    let state = model.attach_lora(&LoraConfig::default(), 0).unwrap();
    // 2 layers × (q,k,v,o,gate,up,down) × (A, B); r=8: exact count from the shapes.
    let (h, q, kv, i, r8) = (64, 128, 64, 144, 8);
    let per_layer = r8 * ((h + q) + (h + kv) * 2 + (q + h) + (h + i) * 2 + (i + h));
    assert_eq!(state.parameter_count(), 2 * per_layer);
    assert_eq!(state.named_vars().len(), 28);
    assert!(max_abs_diff(&logits(&model, &r.input_ids), &r.base_logits) <= 1e-4);
}

#[test]
fn short_adamw_run_learns_through_lora_only() {
    for arch in ["tiny-llama", "tiny-gpt2"] {
        let dir = fixture(arch);
        let r = reference(&dir);
        let mut model = load(&dir);
        let base_weights: Vec<Vec<f32>> = model
            .linears()
            .iter()
            .map(|l| {
                l.weight
                    .dense()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect();
        let cfg = LoraConfig {
            rank: 4,
            alpha: 8.0,
            ..Default::default()
        };
        let state = model.attach_lora(&cfg, 42).unwrap();
        let mut opt = AdamW::new(state.named_vars(), AdamWConfig::default()).unwrap();
        let input = ModelInput::causal(r.input_ids.clone());
        let mut losses = Vec::new();
        for _ in 0..60 {
            let (loss, _) = model.loss(&input, &r.labels, true).unwrap();
            losses.push(loss.to_scalar::<f32>().unwrap());
            let grads = opt.collect(&model.backward(&loss).unwrap()).unwrap();
            opt.step(&grads, 2e-2, 1.0).unwrap();
        }
        let (first, last) = (losses[0], *losses.last().unwrap());
        println!("{arch}: loss {first:.3} → {last:.3}");
        // These tiny random models have lm_head rows of norm ≈0.16 after a unit-RMS final norm, so
        // logits are bounded and the loss floor is far above 0; a fall of more than 1 nat (of ≈6.2)
        // is what LoRA alone can do here, and it must do it steadily.
        assert!(last < first - 1.0, "{arch}: loss {first} → {last}");
        let mean = |s: &[f32]| s.iter().sum::<f32>() / s.len() as f32;
        assert!(
            mean(&losses[50..]) < mean(&losses[40..50]),
            "{arch}: loss stopped falling"
        );
        for (k, v) in state.named_vars() {
            if k.contains("lora_B") {
                let n = norm(v.as_tensor());
                assert!(n > 0.0, "{arch}: {k} is still zero");
            }
        }
        for (l, before) in model.linears().iter().zip(&base_weights) {
            let after = l
                .weight
                .dense()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert!(
                after
                    .iter()
                    .zip(before)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{arch}: base weight {} changed",
                l.path
            );
        }
        model.detach_lora();
        assert!(max_abs_diff(&logits(&model, &r.input_ids), &r.base_logits) <= 1e-4);
    }
}
