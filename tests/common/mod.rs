//! Shared helpers for integration tests: fixture discovery and tensor comparisons.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use finetune::model::{Model, ModelInput};

pub fn fixtures_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn fixture(name: &str) -> PathBuf {
    fixtures_root().join(name)
}

/// Fixture folders to check: `FINETUNE_FIXTURES` (colon-separated paths) or every folder under
/// tests/fixtures.
pub fn fixture_dirs() -> Vec<PathBuf> {
    if let Ok(list) = std::env::var("FINETUNE_FIXTURES") {
        return list
            .split(':')
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .collect();
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures_root())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

/// Folders with reference numbers (reference.safetensors).
pub fn reference_dirs() -> Vec<PathBuf> {
    fixture_dirs()
        .into_iter()
        .filter(|d| d.join("reference.safetensors").is_file())
        .collect()
}

pub struct Reference {
    pub input_ids: Tensor,
    pub labels: Vec<i64>,
    pub base_logits: Tensor,
    pub lora_logits: Tensor,
    pub grads: Vec<(String, Tensor)>,
    pub loss: f64,
}

pub fn reference(dir: &Path) -> Reference {
    let mut t =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let input_ids = t.remove("input_ids").unwrap().to_dtype(DType::U32).unwrap();
    let labels = t
        .remove("labels")
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap();
    let base_logits = t.remove("base_logits").unwrap();
    let lora_logits = t.remove("lora_logits").unwrap();
    let mut grads: Vec<(String, Tensor)> = t
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix("grad.").map(|k| (k.to_owned(), v)))
        .collect();
    grads.sort_by(|a, b| a.0.cmp(&b.0));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    Reference {
        input_ids,
        labels,
        base_logits,
        lora_logits,
        grads,
        loss: json["loss"].as_f64().unwrap(),
    }
}

/// The device parity runs on: the CPU, CUDA 0 with `FINETUNE_TEST_DEVICE=cuda` (a build with
/// `--features cuda`), or the Mac's GPU with `FINETUNE_TEST_DEVICE=metal` and always in
/// tests/metal.rs's binary (`metal-…`), which runs the parity checks there.
pub fn test_device() -> Device {
    let metal_binary = std::env::current_exe()
        .ok()
        .and_then(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().starts_with("metal-"))
        })
        .unwrap_or(false);
    match std::env::var("FINETUNE_TEST_DEVICE").as_deref() {
        Ok("cuda") => Device::new_cuda(0).unwrap(),
        Ok("metal") => Device::new_metal(0).unwrap(),
        _ if metal_binary => Device::new_metal(0).unwrap(),
        _ => Device::Cpu,
    }
}

pub fn load(dir: &Path) -> Model {
    load_as(dir, DType::F32)
}

/// The model in `dtype` on [`test_device`] (bf16 on the CPU: bf16 weights, f32 activations).
pub fn load_as(dir: &Path, dtype: DType) -> Model {
    Model::load(dir, dtype, &test_device()).unwrap()
}

/// Logits as f32 on the CPU.
pub fn logits(model: &Model, ids: &Tensor) -> Tensor {
    let ids = ids.to_device(model.device()).unwrap();
    model
        .logits(&ModelInput::causal(ids))
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap()
}

/// ‖a − b‖ / ‖b‖ (a moved to the CPU in f32 first).
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a
        .to_dtype(DType::F32)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    norm(&(a - b).unwrap()) / norm(b)
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn norm(a: &Tensor) -> f64 {
    a.to_dtype(DType::F64)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt()
}

pub fn name(dir: &Path) -> String {
    dir.file_name().unwrap().to_string_lossy().into_owned()
}
