//! Clear errors for bad model and adapter folders: each names the file and says what to do.
// Tests panic on purpose: unwrap/expect are how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use common::*;
use finetune::model::{adapter, LoraConfig, Model};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
}

fn load_err(dir: &Path) -> String {
    Model::load(dir, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string()
}

#[test]
fn missing_config_json() {
    let tmp = tempfile::tempdir().unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("no config.json") && err.contains(&tmp.path().display().to_string()),
        "{err}"
    );
}

#[test]
fn missing_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("tiny-llama/config.json"),
        tmp.path().join("config.json"),
    )
    .unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("no safetensors weights") && err.contains("model.safetensors"),
        "{err}"
    );
}

#[test]
fn missing_shard() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("tiny-llama-sharded"), tmp.path());
    std::fs::remove_file(tmp.path().join("model-00003-of-00010.safetensors")).unwrap();
    let err = load_err(tmp.path());
    assert!(err.contains("model-00003-of-00010.safetensors"), "{err}");
}

#[test]
fn truncated_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("tiny-llama"), tmp.path());
    let path = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("truncated") && err.contains("model.safetensors"),
        "{err}"
    );
}

#[test]
fn tensor_with_the_wrong_shape() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("tiny-llama"), tmp.path());
    // config says 144 intermediate; the weights have 144: claim 160 instead.
    let cfg = std::fs::read_to_string(tmp.path().join("config.json")).unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        cfg.replace("\"intermediate_size\": 144", "\"intermediate_size\": 160"),
    )
    .unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("model.layers.0.mlp.gate_proj.weight")
            && err.contains("[144, 64]")
            && err.contains("[160, 64]"),
        "{err}"
    );
}

#[test]
fn unsupported_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("tiny-llama"), tmp.path());
    let cfg = std::fs::read_to_string(tmp.path().join("config.json")).unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        cfg.replace("LlamaForCausalLM", "FalconForCausalLM"),
    )
    .unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("FalconForCausalLM") && err.contains("Qwen3ForCausalLM"),
        "{err}"
    );
}

#[test]
fn lora_targets_that_do_not_exist() {
    let mut model = load(&fixture("tiny-llama"));
    let cfg = LoraConfig {
        targets: vec!["q_proj".into(), "query_key_value".into()],
        ..Default::default()
    };
    let err = model.attach_lora(&cfg, 0).unwrap_err().to_string();
    assert!(
        err.contains("query_key_value") && err.contains("gate_proj"),
        "{err}"
    );
    let cfg = LoraConfig {
        layers: Some(vec![0, 7]),
        ..Default::default()
    };
    let err = model.attach_lora(&cfg, 0).unwrap_err().to_string();
    assert!(err.contains('7') && err.contains("2 layers"), "{err}");
}

#[test]
fn adapter_for_another_architecture() {
    let mut model = load(&fixture("tiny-llama"));
    let err = adapter::load(&fixture("tiny-gpt2/peft-adapter"), &mut model)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("transformer.h.") && err.contains("adapter_model.safetensors"),
        "{err}"
    );
}

#[test]
fn adapter_folder_without_config() {
    let mut model = load(&fixture("tiny-llama"));
    let tmp = tempfile::tempdir().unwrap();
    let err = adapter::load(tmp.path(), &mut model)
        .unwrap_err()
        .to_string();
    assert!(err.contains("adapter_config.json"), "{err}");
}
