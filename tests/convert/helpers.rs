//! Helpers of tests/convert.rs (fixture paths come from tests/common): whole-folder tensor reads,
//! error measures, and logits of a model folder on the tiny-llama reference input.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use finetune::model::{Model, ModelInput};

use crate::common::fixture;

/// Every tensor of a (possibly sharded) safetensors folder, as f32.
pub fn tensors_of(dir: &Path) -> HashMap<String, Tensor> {
    let mut all = HashMap::new();
    for file in finetune::model::weights::checkpoint_files(dir).unwrap() {
        for (k, v) in candle_core::safetensors::load(&file, &Device::Cpu).unwrap() {
            all.insert(k, v);
        }
    }
    all
}

pub fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap())
}

pub fn logits(dir: &Path) -> Tensor {
    let model = Model::load(dir, DType::F32, &Device::Cpu).unwrap();
    let reference =
        candle_core::safetensors::load(fixture("tiny-llama/reference.safetensors"), &Device::Cpu)
            .unwrap();
    let ids = reference["input_ids"].to_dtype(DType::U32).unwrap();
    model.logits(&ModelInput::causal(ids)).unwrap()
}

pub fn cosine(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.flatten_all().unwrap();
    let b = b.flatten_all().unwrap();
    let dot: f32 = (&a * &b).unwrap().sum_all().unwrap().to_scalar().unwrap();
    let norm = |t: &Tensor| -> f32 {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    dot / (norm(&a) * norm(&b))
}
