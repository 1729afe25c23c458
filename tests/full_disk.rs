//! Issue 20: training and exporting onto a full filesystem (a 700 KB tmpfs mounted in a private
//! user and mount namespace with `unshare -rm`) end with a clear error naming the disk, leave no
//! half-written checkpoint, and keep every earlier checkpoint and the adapter whole.
#![cfg(target_os = "linux")]
// Tests panic on purpose: unwrap/expect are how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device};
use finetune::model::{adapter, Model};

/// Runs `script` (sh) with a `size` tmpfs mounted at `mnt`; (exit status, stdout + stderr).
fn on_small_disk(mnt: &Path, size: &str, script: &str) -> (bool, String) {
    let out = Command::new("unshare")
        .args(["-rm", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs -o size={size} none '{}' && {script}",
            mnt.display()
        ))
        .output()
        .expect("unshare (util-linux) runs the test in its own mount namespace");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn a_full_disk_stops_training_cleanly_and_keeps_what_was_saved() {
    let mnt = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_finetune");
    let model = common::fixture("tiny-llama");
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo/train.jsonl");
    let run = mnt.path().join("run");
    // The tmpfs exists only inside the namespace: the run is copied out before it ends.
    let keep = tempfile::tempdir().unwrap();
    let copy = keep.path().join("copy");
    let script = format!(
        "'{bin}' train --model '{}' --data '{}' --out '{}' --steps 40 --save-every 1 \
         --eval-every 0 --device cpu --max-seq-len 64 --batch-size 2 --rank 8; \
         echo exit=$?; cp -r '{}' '{}'",
        model.display(),
        data.display(),
        run.display(),
        run.display(),
        copy.display(),
    );
    let (_, text) = on_small_disk(mnt.path(), "700k", &script);
    assert!(text.contains("exit=1"), "{text}");
    assert!(
        text.contains("No space left on device") && text.contains("free disk space"),
        "{text}"
    );
    let mut ckpts: Vec<_> = std::fs::read_dir(copy.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    ckpts.sort();
    assert!(!ckpts.is_empty(), "{text}");
    assert!(
        ckpts.iter().all(|p| p.extension().is_none()),
        "a half-written checkpoint was left: {ckpts:?}"
    );
    let base = Model::load(&model, DType::F32, &Device::Cpu).unwrap();
    for dir in ckpts.iter().chain([&copy.join("adapter")]) {
        let mut m = base.clone();
        adapter::load(dir, &mut m).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    }
    for c in &ckpts {
        finetune::train::checkpoint::load_state(c).unwrap();
    }
}

#[test]
fn an_export_onto_a_full_disk_fails_clearly_and_leaves_nothing_half_written() {
    let mnt = tempfile::tempdir().unwrap();
    let keep = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_finetune");
    let model = common::fixture("tiny-llama");
    let adapter = model.join("peft-adapter");
    let m = mnt.path().display();
    // A GGUF export that fits, then a merged export (f32 weights, ~600 KB) that does not.
    let script = format!(
        "'{bin}' export '{a}' '{m}/first.gguf' --format gguf --quant Q8_0 --model '{model}' && \
         '{bin}' export '{a}' '{m}/merged' --format merged --model '{model}'; echo exit=$?; \
         echo listing:; ls -A '{m}'; echo end; cp '{m}/first.gguf' '{keep}/first.gguf'",
        a = adapter.display(),
        model = model.display(),
        keep = keep.path().display(),
    );
    let (_, text) = on_small_disk(mnt.path(), "400k", &script);
    assert!(text.contains("exit=1"), "{text}");
    assert!(text.contains("No space left on device"), "{text}");
    // Only the first export is left on the disk: no partial folder, no temporary file.
    let listing: Vec<&str> = text
        .lines()
        .skip_while(|l| *l != "listing:")
        .skip(1)
        .take_while(|l| *l != "end")
        .collect();
    assert_eq!(listing, ["first.gguf"], "{text}");
    let gguf = keep.path().join("first.gguf");
    let mut f = std::fs::File::open(&gguf).unwrap();
    candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
}
