//! Issue 20: a logout (SIGTERM) or a closed terminal (SIGHUP) during `finetune train` stops it as
//! Ctrl-C does: the current step finishes, the adapter and a checkpoint are saved, the run ends
//! with a `stopped` event, and the adapter loads back.
#![cfg(unix)]
// Tests panic on purpose: unwrap/expect are how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use candle_core::{DType, Device};
use finetune::model::{adapter, Model};

fn stops_cleanly_on(signal: &str) {
    let out = tempfile::tempdir().unwrap();
    let model = common::fixture("tiny-llama");
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo/train.jsonl");
    let mut child = Command::new(env!("CARGO_BIN_EXE_finetune"))
        .arg("train")
        .arg("--model")
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(out.path())
        .args([
            "--steps",
            "100000",
            "--json",
            "--device",
            "cpu",
            "--max-seq-len",
            "64",
        ])
        .args([
            "--batch-size",
            "2",
            "--save-every",
            "0",
            "--eval-every",
            "0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // Wait for the second training step, then ask the process to end.
    let mut steps = 0;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.starts_with(r#"{"event":"step""#) {
            steps += 1;
            if steps == 2 {
                break;
            }
        }
    }
    assert_eq!(steps, 2, "the run never reached its second step");
    let killed = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    let last = rest.last().cloned().unwrap_or_default();
    assert!(
        last.starts_with(r#"{"event":"stopped""#),
        "{signal}: the run ended with {last:?} ({status})"
    );
    let v: serde_json::Value = serde_json::from_str(&last).unwrap();
    let step = v["data"]["step"].as_u64().unwrap();
    assert!(step >= 2, "{last}");
    let saved = out.path().join("adapter");
    assert_eq!(v["data"]["adapter"].as_str(), saved.to_str());
    let mut m = Model::load(&model, DType::F32, &Device::Cpu).unwrap();
    adapter::load(&saved, &mut m).unwrap();
    assert!(
        out.path()
            .join(format!("checkpoints/step-{step:06}"))
            .is_dir(),
        "no checkpoint of step {step}"
    );
}

#[test]
fn sigterm_stops_training_after_the_step_and_saves() {
    stops_cleanly_on("TERM");
}

#[test]
fn sighup_stops_training_after_the_step_and_saves() {
    stops_cleanly_on("HUP");
}
