//! The exports. Merged: for every fixture architecture (GPT-2's transposed Conv1D included), the
//! merged folder loads as a plain model whose logits equal the base model with the PEFT adapter
//! applied; tokenizer and config files come along; small shard limits give an index that loads;
//! a non-empty destination and an adapter of another model are refused with what to do. The
//! transformers side (the merged folder in transformers vs PEFT on the base) is
//! tools/merged_check.py. MLX: the tensors are PEFT's transposed under mlx-lm's names, with its
//! config; mlx-lm itself judges them in tools/mlx_check.py.
// Tests panic on purpose: unwrap/expect are how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use finetune::export::merged::{export_merged, MAX_SHARD_BYTES};
use finetune::model::{adapter, Model, ModelInput};

const ARCHS: [&str; 4] = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-gpt2"];

fn logits(model: &Model) -> Vec<f32> {
    let ids: Vec<u32> = vec![1, 5, 9, 42, 7, 3, 11, 2];
    let input = ModelInput::causal(
        Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap(),
    );
    model
        .logits(&input)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn load(dir: &Path) -> Model {
    Model::load(dir, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn merged_models_equal_base_plus_adapter_on_every_architecture() {
    // Each architecture with its LoRA and with its DoRA adapter (the magnitude folded in too).
    let names = ARCHS
        .iter()
        .flat_map(|a| [a.to_string(), format!("{a}-dora")]);
    for name in names {
        let name = name.as_str();
        let dir = common::fixture(name);
        let peft = dir.join("peft-adapter");
        let mut tuned = load(&dir);
        adapter::load(&peft, &mut tuned).unwrap();
        let want = logits(&tuned);
        let base = logits(&load(&dir));
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let m = export_merged(&peft, &dir, &out, MAX_SHARD_BYTES).unwrap();
        assert!(m.merged > 0 && m.shards == 1, "{name}: {m:?}");
        let got = logits(&load(&out));
        let d = max_diff(&got, &want);
        assert!(d < 1e-4, "{name}: merged vs base + adapter differ by {d}");
        assert!(
            max_diff(&got, &base) > 1e-3,
            "{name}: the merge changed nothing"
        );
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            assert!(out.join(f).is_file(), "{name}: {f} not copied");
        }
        assert!(!out.join("peft-adapter").exists());
        // Tiny shards: an index, and the model loads the same.
        let sharded = tmp.path().join("sharded");
        let m = export_merged(&peft, &dir, &sharded, 20_000).unwrap();
        assert!(m.shards > 1, "{name}: {m:?}");
        assert!(sharded.join("model.safetensors.index.json").is_file());
        assert!(
            max_diff(&logits(&load(&sharded)), &got) == 0.0,
            "{name}: sharded differs"
        );
    }
}

#[test]
fn merging_refuses_a_used_destination_and_another_models_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let llama = common::fixture("tiny-llama");
    let used = tmp.path().join("used");
    std::fs::create_dir_all(&used).unwrap();
    std::fs::write(used.join("keep.txt"), "mine").unwrap();
    let e = export_merged(&llama.join("peft-adapter"), &llama, &used, MAX_SHARD_BYTES)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not an empty folder"), "{e}");
    assert_eq!(
        std::fs::read_to_string(used.join("keep.txt")).unwrap(),
        "mine"
    );
    let gpt2_adapter = common::fixture("tiny-gpt2").join("peft-adapter");
    let out = tmp.path().join("x");
    let e = format!(
        "{:#}",
        export_merged(&gpt2_adapter, &llama, &out, MAX_SHARD_BYTES).unwrap_err()
    );
    assert!(e.contains("--model"), "{e}");
    assert!(!out.exists(), "nothing is left behind");
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".finetune-merge")
        })
        .collect();
    assert!(leftovers.is_empty(), "temporary folders are removed");
}

#[test]
fn cli_merges_a_trained_run_without_being_told_the_base() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("assets/demo-model");
    let run = tmp.path().join("run");
    let status = Command::new(env!("CARGO_BIN_EXE_finetune"))
        .args(["train", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(root.join("assets/demo/train.jsonl"))
        .arg("--out")
        .arg(&run)
        .args([
            "--steps",
            "3",
            "--lr",
            "1e-2",
            "--eval-every",
            "0",
            "--samples",
            "0",
        ])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let merged = tmp.path().join("merged");
    let out = Command::new(env!("CARGO_BIN_EXE_finetune"))
        .arg("export")
        .arg(run.join("checkpoints/step-000003"))
        .arg(&merged)
        .args(["--format", "merged"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("merged") && text.contains("demo-model"),
        "{text}"
    );
    let mut tuned = load(&model);
    adapter::load(&run.join("checkpoints/step-000003"), &mut tuned).unwrap();
    assert!(max_diff(&logits(&load(&merged)), &logits(&tuned)) < 1e-4);
}

#[test]
fn mlx_adapters_hold_the_transposed_factors_under_mlx_names() {
    for (name, block) in [("tiny-llama", "model.layers"), ("tiny-gpt2", "model.h")] {
        let dir = common::fixture(name);
        let peft = dir.join("peft-adapter");
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("mlx");
        let m = finetune::export::mlx::export_mlx(&peft, &dir, &out).unwrap();
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let peft_config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(peft.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let r = peft_config["r"].as_f64().unwrap();
        let alpha = peft_config["lora_alpha"].as_f64().unwrap();
        assert_eq!(config["fine_tune_type"], "lora");
        assert_eq!(config["num_layers"], m.num_layers);
        assert_eq!(config["lora_parameters"]["rank"].as_f64().unwrap(), r);
        assert!((config["lora_parameters"]["scale"].as_f64().unwrap() - alpha / r).abs() < 1e-12);
        let theirs =
            candle_core::safetensors::load(peft.join("adapter_model.safetensors"), &Device::Cpu)
                .unwrap();
        let ours =
            candle_core::safetensors::load(out.join("adapters.safetensors"), &Device::Cpu).unwrap();
        assert_eq!(ours.len(), theirs.len(), "{name}");
        let mut keys = std::collections::BTreeSet::new();
        for (key, a) in theirs.iter().filter(|(k, _)| k.contains("lora_A")) {
            let module = key
                .trim_start_matches("base_model.model.")
                .split(".lora_A")
                .next()
                .unwrap();
            let (prefix, rest) = module
                .split_once(".0.")
                .or(module.split_once(".1."))
                .unwrap();
            let layer = &module[prefix.len() + 1..module.len() - rest.len() - 1];
            let mlx = format!("{block}.{layer}.{rest}");
            keys.insert(rest.to_owned());
            let b = &theirs[&key.replace("lora_A", "lora_B")];
            let diff = |x: &Tensor, y: &Tensor| {
                (x - y)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            assert_eq!(
                diff(&ours[&format!("{mlx}.lora_a")], &a.t().unwrap()),
                0.0,
                "{mlx}"
            );
            assert_eq!(
                diff(&ours[&format!("{mlx}.lora_b")], &b.t().unwrap()),
                0.0,
                "{mlx}"
            );
        }
        let want: Vec<serde_json::Value> = keys.into_iter().map(Into::into).collect();
        assert_eq!(
            config["lora_parameters"]["keys"],
            serde_json::Value::Array(want)
        );
    }
}

#[test]
fn gguf_loras_hold_the_factors_under_llama_cpp_names_with_q_and_k_permuted() {
    use candle_core::quantized::gguf_file::{Content, Value};
    let dir = common::fixture("tiny-llama");
    let peft = dir.join("peft-adapter");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("lora.gguf");
    let g = finetune::export::gguf_lora::export_gguf_lora(&peft, &dir, &out).unwrap();
    assert_eq!(g.architecture, "llama");
    let mut file = std::fs::File::open(&out).unwrap();
    let content = Content::read(&mut file).unwrap();
    let text = |k: &str| match content.metadata.get(k) {
        Some(Value::String(s)) => s.clone(),
        other => panic!("{k}: {other:?}"),
    };
    assert_eq!(text("general.type"), "adapter");
    assert_eq!(text("adapter.type"), "lora");
    assert_eq!(text("general.architecture"), "llama");
    let peft_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(peft.join("adapter_config.json")).unwrap())
            .unwrap();
    let Some(Value::F32(alpha)) = content.metadata.get("adapter.lora.alpha") else {
        panic!("no alpha");
    };
    assert_eq!(
        f64::from(*alpha),
        peft_config["lora_alpha"].as_f64().unwrap()
    );
    let theirs =
        candle_core::safetensors::load(peft.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let mut read = |name: &str| {
        content
            .tensor(&mut file, name, &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
    };
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let heads = cfg["num_attention_heads"].as_u64().unwrap() as usize;
    let peft_key = |m: &str, w: &str| format!("base_model.model.model.layers.0.{m}.{w}.weight");
    let same = |a: &Tensor, b: &Tensor| {
        assert_eq!(a.dims(), b.dims());
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0);
    };
    // v: as PEFT has it; q: lora_b's rows permuted as convert_hf_to_gguf.py permutes q's weight.
    same(
        &read("blk.0.attn_v.weight.lora_a"),
        &theirs[&peft_key("self_attn.v_proj", "lora_A")],
    );
    same(
        &read("blk.0.attn_v.weight.lora_b"),
        &theirs[&peft_key("self_attn.v_proj", "lora_B")],
    );
    same(
        &read("blk.0.attn_q.weight.lora_a"),
        &theirs[&peft_key("self_attn.q_proj", "lora_A")],
    );
    let qb = &theirs[&peft_key("self_attn.q_proj", "lora_B")];
    let permuted = finetune::export::gguf_lora::permute(qb, heads).unwrap();
    same(&read("blk.0.attn_q.weight.lora_b"), &permuted);
    assert!(
        (permuted - qb)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0,
        "the permutation moves rows"
    );
    assert_eq!(content.tensor_infos.len(), 2 * g.modules);
}

#[test]
fn a_dora_adapter_exports_to_mlx_with_its_magnitudes_and_is_refused_as_a_gguf_lora() {
    let dir = common::fixture("tiny-llama-dora");
    let tmp = tempfile::tempdir().unwrap();
    let e = finetune::export::gguf_lora::export_gguf_lora(
        &dir.join("peft-adapter"),
        &dir,
        &tmp.path().join("x.gguf"),
    )
    .unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("DoRA") && msg.contains("merged"),
        "unclear refusal: {msg}"
    );
    assert!(!tmp.path().join("x.gguf").exists());
    let out = tmp.path().join("mlx");
    finetune::export::mlx::export_mlx(&dir.join("peft-adapter"), &dir, &out).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["fine_tune_type"], "dora");
    let t = candle_core::safetensors::load(out.join("adapters.safetensors"), &Device::Cpu).unwrap();
    let m = &t["model.layers.0.self_attn.q_proj.m"];
    let peft = candle_core::safetensors::load(
        dir.join("peft-adapter/adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let want = &peft["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"];
    assert_eq!(m.to_vec1::<f32>().unwrap(), want.to_vec1::<f32>().unwrap());
    // And it loads back as the same DoRA adapter.
    let mut tuned = load(&dir);
    adapter::load(&dir.join("peft-adapter"), &mut tuned).unwrap();
    let mut back = load(&dir);
    let state = adapter::load(&out, &mut back).unwrap();
    assert!(state.config.use_dora);
    let d = max_diff(&logits(&back), &logits(&tuned));
    assert!(d < 1e-5, "DoRA back from MLX: {d}");
}

#[test]
fn mlx_and_gguf_loras_load_back_as_the_same_adapter() {
    for name in ARCHS {
        let dir = common::fixture(name);
        let peft = dir.join("peft-adapter");
        let mut tuned = load(&dir);
        adapter::load(&peft, &mut tuned).unwrap();
        let want = logits(&tuned);
        let tmp = tempfile::tempdir().unwrap();
        let mlx = tmp.path().join("mlx");
        finetune::export::mlx::export_mlx(&peft, &dir, &mlx).unwrap();
        let gguf = tmp.path().join("lora.gguf");
        finetune::export::gguf_lora::export_gguf_lora(&peft, &dir, &gguf).unwrap();
        for back in [&mlx, &gguf] {
            let mut model = load(&dir);
            let state = adapter::load(back, &mut model).unwrap();
            assert!(state.parameter_count() > 0);
            let d = max_diff(&logits(&model), &want);
            assert!(d < 1e-5, "{name} from {}: {d}", back.display());
        }
    }
    // A GGUF LoRA for another architecture is refused by name.
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("gpt2.gguf");
    let gpt2 = common::fixture("tiny-gpt2");
    finetune::export::gguf_lora::export_gguf_lora(&gpt2.join("peft-adapter"), &gpt2, &gguf)
        .unwrap();
    let e = adapter::load(&gguf, &mut load(&common::fixture("tiny-llama")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("gpt2") && e.contains("llama"), "{e}");
}
