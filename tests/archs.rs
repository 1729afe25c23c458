//! The architectures of issue 19 beyond the shared parity suite (which checks their logits, loss,
//! every LoRA gradient and sharded loads like every fixture's): Phi-3's short RoPE factors within
//! its original context, Gemma 3's language model read out of a multimodal checkpoint, and a
//! short `finetune train` on real data per architecture whose validation loss goes down and whose
//! adapter loads back, and the GGUF files llama.cpp's own converter writes for them
//! (tests/fixtures/convert/tiny-*.gguf, tools/make_arch_gguf.py): imported to the same tensors and
//! logits, and trained on their own Q8_0 weights (QLoRA).
// Tests panic on purpose: unwrap/expect are how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use common::*;
use finetune::model::config::RopeScaling;
use finetune::model::{adapter, Model, ModelInput};

const NEW_ARCHS: [&str; 4] = ["tiny-gemma2", "tiny-gemma3", "tiny-phi3", "tiny-smollm3"];

#[test]
fn phi3_uses_the_short_factors_within_its_original_context() {
    // The reference's 24-token rows run past original_max_position_embeddings (16) on the long
    // factors (the parity suite); cut to 16 they run on the short ones, as transformers did.
    let dir = fixture("tiny-phi3");
    let r =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let ids = r["input_ids"]
        .narrow(1, 0, 16)
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap();
    let model = Model::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let got = model.logits(&ModelInput::causal(ids)).unwrap();
    let diff = max_abs_diff(&got, &r["short_logits"]);
    println!("tiny-phi3 16-token logits (short factors) max|diff| = {diff:.2e}");
    assert!(diff <= 1e-4, "{diff}");
    // The long factors would give other logits: the test can tell the two apart.
    let full = logits(&model, &r["input_ids"].to_dtype(DType::U32).unwrap());
    let long_first16 = full.narrow(1, 0, 16).unwrap();
    assert!(max_abs_diff(&long_first16, &r["short_logits"]) > 1e-3);
}

#[test]
fn gemma3_multimodal_checkpoint_loads_its_language_model() {
    // tiny-gemma3-vlm holds tiny-gemma3's weights under `language_model.` beside a vision tower,
    // with Gemma3ForConditionalGeneration's config (text_config); transformers gave the same text
    // logits for both (tools/make_arch_fixtures.py).
    let text = fixture("tiny-gemma3");
    let vlm = fixture("tiny-gemma3-vlm");
    let r = reference(&text);
    let model = Model::load(&vlm, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(model.config.architecture, "Gemma3ForConditionalGeneration");
    let diff = max_abs_diff(&logits(&model, &r.input_ids), &r.base_logits);
    println!("tiny-gemma3-vlm text logits max|diff| = {diff:.2e}");
    assert!(diff <= 1e-4, "{diff}");
}

fn tensors_of(dir: &Path) -> HashMap<String, Tensor> {
    let mut all = HashMap::new();
    for file in finetune::model::weights::checkpoint_files(dir).unwrap() {
        all.extend(candle_core::safetensors::load(&file, &Device::Cpu).unwrap());
    }
    all
}

/// A copy of fixture `name` with `edit` applied to its config.json.
fn edited_copy(name: &str, edit: impl Fn(&mut serde_json::Value)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, tmp.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let cfg_path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    tmp
}

#[test]
fn llama_cpp_gguf_files_import_to_the_same_tensors_and_logits() {
    for name in NEW_ARCHS {
        let gguf = fixture(&format!("convert/{name}.F32.gguf"));
        let out = tempfile::tempdir().unwrap();
        let options = finetune::convert::ConvertOptions {
            dtype: Some(DType::F32),
            ..Default::default()
        };
        finetune::convert::convert(&gguf, out.path(), &options).unwrap();
        // Every tensor back under its transformers name; Gemma's norms come back from llama.cpp's
        // 1 + w (one f32 rounding each way).
        let want = tensors_of(&fixture(name));
        let got = tensors_of(out.path());
        let tied_head = want.contains_key("lm_head.weight") && !got.contains_key("lm_head.weight");
        assert_eq!(got.len() + usize::from(tied_head), want.len(), "{name}");
        for (key, w) in &want {
            let Some(g) = got.get(key) else {
                assert!(tied_head && key == "lm_head.weight", "{name}: no {key}");
                continue;
            };
            let limit = if key.ends_with("norm.weight") && name.contains("gemma") {
                1e-7
            } else {
                0.0
            };
            let diff = max_abs_diff(g, w);
            assert!(diff <= limit, "{name} {key}: {diff}");
        }
        // The config llama.cpp's reading implies: for tiny-gemma2, whose query_pre_attn_scalar
        // (24) no GGUF key carries, llama.cpp scales by head_dim (16), so the imported model is
        // compared with the fixture under that config.
        let cfg = finetune::model::ModelConfig::from_dir(out.path()).unwrap();
        let orig = finetune::model::ModelConfig::from_dir(&fixture(name)).unwrap();
        let r = reference(&fixture(name));
        let model = Model::load(out.path(), DType::F32, &Device::Cpu).unwrap();
        let got_logits = logits(&model, &r.input_ids);
        let want_logits = if name == "tiny-gemma2" {
            assert_eq!(cfg.variant.query_pre_attn_scalar, Some(16.0));
            let copy = edited_copy(name, |c| c["query_pre_attn_scalar"] = 16.into());
            let as_llama_cpp = Model::load(copy.path(), DType::F32, &Device::Cpu).unwrap();
            logits(&as_llama_cpp, &r.input_ids)
        } else {
            r.base_logits.clone()
        };
        // GGUF stores numbers as f32.
        let f32s = |c: &finetune::model::ModelConfig| match &c.rope_scaling {
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            } => RopeScaling::LongRope {
                short_factor: short_factor.iter().map(|&x| x as f32 as f64).collect(),
                long_factor: long_factor.iter().map(|&x| x as f32 as f64).collect(),
                original_max_position_embeddings: *original_max_position_embeddings,
                attention_factor: *attention_factor as f32 as f64,
            },
            other => other.clone(),
        };
        let mut same = orig.clone();
        same.variant.query_pre_attn_scalar = cfg.variant.query_pre_attn_scalar;
        same.norm_eps = cfg.norm_eps; // stored as f32 in GGUF
        same.stored_dtype = cfg.stored_dtype.clone();
        same.max_position_embeddings = cfg.max_position_embeddings;
        assert_eq!(
            (
                &cfg.variant,
                f32s(&cfg),
                cfg.rope_theta,
                cfg.tie_word_embeddings
            ),
            (
                &same.variant,
                f32s(&same),
                same.rope_theta,
                same.tie_word_embeddings
            ),
            "{name}"
        );
        let diff = max_abs_diff(&got_logits, &want_logits);
        println!("{name}: llama.cpp's F32 GGUF imported, logits max|diff| = {diff:.2e}");
        assert!(diff <= 1e-4, "{name}: {diff}");
    }
}

#[test]
fn qlora_on_llama_cpp_q8_files_keeps_their_weights_quantized() {
    use finetune::model::lora::Frozen;
    use finetune::model::qload::LinearQuant;
    for name in NEW_ARCHS {
        let gguf = fixture(&format!("convert/{name}.Q8_0.gguf"));
        let cache = tempfile::tempdir().unwrap();
        let prepared = finetune::model::ModelSource::open(&gguf)
            .unwrap()
            .prepare(cache.path())
            .unwrap();
        let float = Model::load(&prepared.dir, DType::F32, &Device::Cpu).unwrap();
        let q = Model::load_with(
            &prepared.dir,
            DType::F32,
            &Device::Cpu,
            &LinearQuant::Gguf(gguf.clone()),
        )
        .unwrap();
        let mut kept = 0;
        for (f, l) in float.linears().iter().zip(q.linears()) {
            if let Frozen::Quant(qw) = &l.weight {
                kept += 1;
                let d = max_abs_diff(
                    &qw.dequantize(DType::F32).unwrap(),
                    &f.weight.dense().unwrap(),
                );
                // The converted folder holds the same values rounded to f16.
                assert!(d <= 1e-3, "{name}: {} differs by {d}", l.path);
            }
        }
        let ids = Tensor::new(&[[1u32, 5, 9, 14, 3, 7, 2, 8, 11, 4, 6, 10]], &Device::Cpu).unwrap();
        let e = rel_err(&logits(&q, &ids), &logits(&float, &ids));
        println!("{name}: {kept} weights kept as Q8_0; logits vs the converted folder {e:.1e}");
        assert!(kept >= q.linears().len() / 2, "{name}: only {kept} kept");
        assert!(e <= 1e-3, "{name}: {e}");
    }
}

/// `(step, val_loss)` of every "eval at step N: val loss X" line.
fn eval_lines(stdout: &str) -> Vec<(usize, f64)> {
    stdout
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("eval at step ")?;
            let (step, rest) = rest.split_once(": val loss ")?;
            Some((
                step.parse().ok()?,
                rest.split_whitespace().next()?.parse().ok()?,
            ))
        })
        .collect()
}

/// Long-ish (about 10 s per architecture with the dev profile on two cores); runs in CI.
#[test]
fn a_short_training_run_lowers_the_validation_loss_on_every_new_architecture() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shared = root.join("../shared/data");
    let (train, valid) = if shared.join("wwdc25-train.jsonl").is_file() {
        (
            shared.join("wwdc25-train.jsonl"),
            shared.join("wwdc25-valid.jsonl"),
        )
    } else {
        (
            root.join("assets/demo/train.jsonl"),
            root.join("assets/demo/valid.jsonl"),
        )
    };
    for name in NEW_ARCHS {
        let out = tempfile::tempdir().unwrap();
        let model_dir = fixture(name);
        #[rustfmt::skip]
        let flags = [
            "--device", "cpu", "--seed", "0", "--rank", "8", "--steps", "60",
            "--batch-size", "4", "--max-seq-len", "96", "--lr", "1e-2",
            "--eval-every", "60", "--eval-batches", "6", "--save-every", "0",
            "--log-every", "30",
        ];
        let output = Command::new(env!("CARGO_BIN_EXE_finetune"))
            .arg("train")
            .arg("--model")
            .arg(&model_dir)
            .arg("--data")
            .arg(&train)
            .arg("--valid")
            .arg(&valid)
            .arg("--out")
            .arg(out.path())
            .args(flags)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{name}: finetune train failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let evals = eval_lines(&stdout);
        assert_eq!(
            evals.iter().map(|e| e.0).collect::<Vec<_>>(),
            [0, 60],
            "{stdout}"
        );
        let (first, last) = (evals[0].1, evals[1].1);
        println!("{name}: val loss {first:.4} -> {last:.4}");
        // A random-weight model learns the data's byte statistics quickly; a fall under 0.05
        // would mean the gradients do not reach the weights that matter.
        assert!(
            last < first - 0.05,
            "{name}: val loss {first:.4} -> {last:.4}:\n{stdout}"
        );
        let mut tuned = Model::load(&model_dir, DType::F32, &Device::Cpu).unwrap();
        let state = adapter::load(&out.path().join("adapter"), &mut tuned).unwrap();
        assert_eq!(state.config.rank, 8);
        let base = Model::load(&model_dir, DType::F32, &Device::Cpu).unwrap();
        let ids = Tensor::new(&[[1u32, 72, 101, 108, 108, 111, 2]], &Device::Cpu).unwrap();
        let input = ModelInput::causal(ids);
        let moved = max_abs_diff(
            &base.logits(&input).unwrap(),
            &tuned.logits(&input).unwrap(),
        );
        assert!(
            moved > 1e-3,
            "{name}: the trained adapter moves logits by {moved}"
        );
    }
}

#[test]
fn gemma3_multimodal_adapters_use_transformers_module_paths_both_ways() {
    // tiny-gemma3-vlm/peft-adapter is tiny-gemma3's adapter as PEFT saved it on the multimodal
    // model (`model.language_model.layers.N...`); PEFT's logits with it equal tiny-gemma3's
    // lora_logits (tools/make_arch_fixtures.py --vlm-adapter).
    let vlm = fixture("tiny-gemma3-vlm");
    let r = reference(&fixture("tiny-gemma3"));
    let mut model = Model::load(&vlm, DType::F32, &Device::Cpu).unwrap();
    let state = adapter::load(&vlm.join("peft-adapter"), &mut model).unwrap();
    let loaded = logits(&model, &r.input_ids);
    let diff = max_abs_diff(&loaded, &r.lora_logits);
    println!("tiny-gemma3-vlm + PEFT's adapter: logits vs PEFT {diff:.2e}");
    assert!(diff <= 1e-4, "{diff}");
    // Saved back under the same names, with targets PEFT matches on the language model only.
    let out = tempfile::tempdir().unwrap();
    adapter::save(out.path(), &state, &model, None).unwrap();
    let names = |dir: &Path| {
        let mut k: Vec<String> =
            candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
                .unwrap()
                .into_keys()
                .collect();
        k.sort();
        k
    };
    assert_eq!(names(out.path()), names(&vlm.join("peft-adapter")));
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    let pattern = cfg["target_modules"].as_str().expect("a regex").to_owned();
    assert!(pattern.contains("language_model"), "{pattern}");
    let mut again = Model::load(&vlm, DType::F32, &Device::Cpu).unwrap();
    adapter::load(out.path(), &mut again).unwrap();
    assert_eq!(max_abs_diff(&logits(&again, &r.input_ids), &loaded), 0.0);
    // transformers 4 named the same modules `language_model.model.layers.N...`.
    let v4 = tempfile::tempdir().unwrap();
    let renamed: HashMap<String, Tensor> = candle_core::safetensors::load(
        vlm.join("peft-adapter/adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
    .into_iter()
    .map(|(k, t)| {
        let k = k.replace(
            "base_model.model.model.language_model.",
            "base_model.model.language_model.model.",
        );
        (k, t)
    })
    .collect();
    assert!(renamed
        .keys()
        .all(|k| k.contains(".language_model.model.layers.")));
    candle_core::safetensors::save(&renamed, v4.path().join("adapter_model.safetensors")).unwrap();
    std::fs::copy(
        vlm.join("peft-adapter/adapter_config.json"),
        v4.path().join("adapter_config.json"),
    )
    .unwrap();
    let mut old = Model::load(&vlm, DType::F32, &Device::Cpu).unwrap();
    adapter::load(v4.path(), &mut old).unwrap();
    assert_eq!(max_abs_diff(&logits(&old, &r.input_ids), &loaded), 0.0);
}
