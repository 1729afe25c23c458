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

/// Issue 20, a laptop sleep mid-step: the process is frozen (SIGSTOP) for three seconds in the
/// middle of a run and woken (SIGCONT), harsher than a real sleep (whose clock stops too): the run
/// goes on to its last step, every step's loss, throughput, elapsed time and ETA are finite, the
/// steps follow each other without a gap, and it finishes and saves.
#[test]
fn a_frozen_and_woken_run_goes_on_without_nan_or_stall() {
    let out = tempfile::tempdir().unwrap();
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo/train.jsonl");
    let mut child = Command::new(env!("CARGO_BIN_EXE_finetune"))
        .arg("train")
        .arg("--model")
        .arg(common::fixture("tiny-llama"))
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(out.path())
        .args(["--steps", "60", "--json", "--device", "cpu"])
        .args(["--max-seq-len", "64", "--batch-size", "2"])
        .args(["--save-every", "20", "--eval-every", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let signal = |sig: &str| {
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    };
    let mut steps = Vec::new();
    let mut last = String::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.starts_with(r#"{"event":"step""#) {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            let d = &v["data"];
            for key in [
                "loss",
                "tokens_per_sec",
                "elapsed_secs",
                "eta_secs",
                "grad_norm",
            ] {
                let x = d[key].as_f64();
                assert!(x.is_some_and(f64::is_finite), "{key} at {line}");
            }
            steps.push(d["step"].as_u64().unwrap());
            if steps.len() == 25 {
                signal("-STOP");
                std::thread::sleep(std::time::Duration::from_secs(3));
                signal("-CONT");
            }
        }
        last = line;
    }
    assert!(child.wait().unwrap().success());
    assert_eq!(steps, (1..=60).collect::<Vec<u64>>());
    assert!(last.starts_with(r#"{"event":"finished""#), "{last}");
    assert!(out
        .path()
        .join("adapter/adapter_model.safetensors")
        .is_file());
}
