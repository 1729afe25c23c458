//! The one command that proves the Metal path on a Mac: `cargo test --test metal` (Metal is built
//! in by default on macOS; the `metal` feature names it explicitly).
//!
//! - Every parity check of tests/parity.rs (base and LoRA logits, the masked loss and every LoRA
//!   gradient against transformers + PEFT, sharded loads, gradient checkpointing, and bf16 within
//!   bf16 tolerances), run on the Metal device with the tolerances CUDA meets: the checks are
//!   included from tests/common/parity_checks.rs and `common::test_device()` is Metal in this
//!   binary.
//! - A 20-step training run of the demo model on the demo data on Metal, through the same
//!   session the app and the CLI start, with the loss going down and an adapter saved.
//! - Generation on Metal equals the CPU's greedy ids on the demo model.
//!
//! Where no Metal device exists (a Mac VM without GPU access) every test says so and passes
//! without checking anything; the macOS workflow runs on a GPU machine. The speed comparison with
//! mlx-lm is `bench/metal_vs_mlx.sh`. On Linux this file compiles to nothing (the mac check
//! type-checks it for macOS).
#![cfg(metal_gpu)]
// Tests panic on purpose: unwrap/expect are how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candle_core::{DType, Device};
use common::*;
use finetune::model::{adapter, ModelInput};

include!("common/parity_checks.rs");

/// The Metal device, or `None` (said on stderr) where there is none.
fn metal() -> Option<Device> {
    match Device::new_metal(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: no Metal device here ({e})");
            None
        }
    }
}

#[test]
fn the_demo_trains_twenty_steps_on_metal() {
    let Some(_device) = metal() else { return };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_finetune"))
        .args(["train", "--device", "metal", "--model"])
        .arg(root.join("assets/demo-model"))
        .arg("--data")
        .arg(root.join("assets/demo/train.jsonl"))
        .arg("--out")
        .arg(out.path())
        .args([
            "--steps",
            "20",
            "--batch-size",
            "4",
            "--max-seq-len",
            "128",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&status.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let losses: Vec<f64> = events
        .iter()
        .filter(|e| e["event"] == "step")
        .filter_map(|e| e["data"]["loss"].as_f64())
        .collect();
    assert_eq!(losses.len(), 20, "{events:?}");
    assert!(losses.iter().all(|l| l.is_finite()));
    let head: f64 = losses[..5].iter().sum::<f64>() / 5.0;
    let tail: f64 = losses[15..].iter().sum::<f64>() / 5.0;
    assert!(tail < head, "loss {head} → {tail}");
    assert!(out
        .path()
        .join("adapter/adapter_model.safetensors")
        .is_file());
}

#[test]
fn greedy_generation_on_metal_equals_the_cpu() {
    let Some(device) = metal() else { return };
    let dir = fixture("tiny-llama");
    let ids: Vec<u32> = vec![1, 15, 27, 3, 99, 42];
    let run = |dev: &Device| -> Vec<u32> {
        let mut model = finetune::model::Model::load(&dir, DType::F32, dev).unwrap();
        adapter::load(&dir.join("peft-adapter"), &mut model).unwrap();
        let mut cache = model.new_cache();
        let mut out = Vec::new();
        let mut logits: Vec<f32> = model
            .forward_cached(&ids, &mut cache)
            .unwrap()
            .to_vec1()
            .unwrap();
        for _ in 0..16 {
            let next = logits
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i as u32)
                .unwrap();
            out.push(next);
            logits = model
                .forward_cached(&[next], &mut cache)
                .unwrap()
                .to_vec1()
                .unwrap();
        }
        out
    };
    assert_eq!(run(&device), run(&Device::Cpu));
}
