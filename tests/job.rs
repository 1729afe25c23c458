//! Issue 21, run elsewhere: `finetune job export` writes the TRL, Axolotl and mlx-lm bundles of a
//! run, the pre-tokenized data carries exactly FineTune's first-epoch tokens and loss mask, and
//! `finetune job import` takes back a PEFT adapter and an mlx-lm one (converted to PEFT, equal
//! deltas). `trl_bundle_runs_and_matches_finetune` (ignored: it needs TRL, see its doc) runs the
//! TRL bundle for real.
// Tests panic on purpose: unwrap/expect are how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use finetune::data::{self, BatchOptions, ModelTokenizer};
use finetune::export::job::{export_job, import_adapter, JobTarget};
use finetune::train::{Duration, TrainConfig};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn config(packing: bool) -> TrainConfig {
    let mut c = TrainConfig {
        model_dir: common::fixture("tiny-llama"),
        train_data: root().join("assets/demo/train.jsonl"),
        valid_data: Some(root().join("assets/demo/valid.jsonl")),
        duration: Duration::Steps(3),
        batch_size: 4,
        max_seq_len: 128,
        packing,
        ..Default::default()
    };
    c.lora.rank = 4;
    c
}

fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn the_bundles_carry_finetunes_tokens_mask_and_settings() {
    let cfg = config(false);
    let out = tempfile::tempdir().unwrap();
    let trl = export_job(&cfg, JobTarget::Trl, &out.path().join("trl")).unwrap();
    for f in [
        "train.py",
        "launch.sh",
        "job.json",
        "requirements.txt",
        "README.md",
    ] {
        assert!(trl.dir.join(f).is_file(), "{f}");
    }
    for f in ["ddp", "fsdp", "zero3"] {
        assert!(trl.dir.join(format!("accelerate/{f}.yaml")).is_file());
    }
    // The records, in FineTune's first-epoch order, with FineTune's labels.
    let tok = ModelTokenizer::from_dir(&cfg.model_dir).unwrap();
    let loaded = data::load(
        &cfg.train_data,
        cfg.valid_data.as_deref(),
        &tok,
        &cfg.data_options(),
    )
    .unwrap();
    let options = BatchOptions {
        batch_size: 4,
        max_seq_len: 128,
        ..Default::default()
    };
    let rows = read_jsonl(&trl.dir.join("data/train.jsonl"));
    assert_eq!(rows.len(), loaded.train.len());
    let first = data::batches(&loaded.train, &options, cfg.seed, 0)
        .next()
        .unwrap();
    for (r, row) in rows.iter().take(first.batch_size).enumerate() {
        let ids: Vec<u32> = serde_json::from_value(row["input_ids"].clone()).unwrap();
        let labels: Vec<i64> = serde_json::from_value(row["labels"].clone()).unwrap();
        let t = first.seq_len;
        assert_eq!(ids, first.input_ids[r * t..r * t + ids.len()]);
        assert_eq!(labels, first.labels[r * t..r * t + ids.len()]);
        assert!(labels.contains(&-100) && labels.iter().any(|&l| l >= 0));
    }
    let job: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(trl.dir.join("job.json")).unwrap()).unwrap();
    assert_eq!(
        (job["max_steps"].as_u64(), job["lora"]["rank"].as_u64()),
        (Some(3), Some(4))
    );
    // Axolotl reads the same pre-tokenized records; mlx-lm gets the records and mask_prompt.
    let ax = export_job(&cfg, JobTarget::Axolotl, &out.path().join("ax")).unwrap();
    let yaml = std::fs::read_to_string(ax.dir.join("axolotl.yaml")).unwrap();
    let body: serde_json::Value = serde_json::from_str(
        yaml.lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
            .as_str(),
    )
    .unwrap();
    assert_eq!(body["lora_r"], 4);
    assert_eq!(body["lora_target_linear"], true);
    assert_eq!(rows, read_jsonl(&ax.dir.join("data/train.jsonl")));
    let mlx = export_job(&cfg, JobTarget::MlxLm, &out.path().join("mlx")).unwrap();
    let yaml = std::fs::read_to_string(mlx.dir.join("lora.yaml")).unwrap();
    assert!(yaml.contains("\"mask_prompt\": true") && yaml.contains("\"iters\": 3"));
    assert!(mlx.dir.join("data/valid.jsonl").is_file());
    // What a target cannot express is said, in the README too.
    let packed = export_job(&config(true), JobTarget::Trl, &out.path().join("packed")).unwrap();
    assert!(packed.notes.iter().any(|n| n.starts_with("packing")));
    let readme = std::fs::read_to_string(packed.dir.join("README.md")).unwrap();
    assert!(readme.contains("Not carried over") && readme.contains("packing"));
}

#[test]
fn import_takes_back_peft_and_mlx_adapters() {
    let out = tempfile::tempdir().unwrap();
    let peft = common::fixture("tiny-llama").join("peft-adapter");
    // A trainer's output: checkpoints and the final adapter.
    let run = out.path().join("run");
    for sub in ["checkpoint-2", "adapter"] {
        std::fs::create_dir_all(run.join(sub)).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(peft.join(f), run.join(sub).join(f)).unwrap();
        }
    }
    let found = import_adapter(&run).unwrap();
    assert_eq!((found.dir, found.from_mlx), (run.join("adapter"), false));
    // mlx-lm's layout, converted back to PEFT: the same deltas.
    let mlx = out.path().join("mlx");
    finetune::export::mlx::export_mlx(&peft, &common::fixture("tiny-llama"), &mlx).unwrap();
    let found = import_adapter(&mlx).unwrap();
    assert!(found.from_mlx);
    let (a, _) = finetune::model::adapter::read_deltas(&peft).unwrap();
    let (b, _) = finetune::model::adapter::read_deltas(&found.dir).unwrap();
    assert_eq!(a.len(), b.len());
    for (k, d) in &a {
        let e = &b[k];
        assert!((d.scale - e.scale).abs() < 1e-9, "{k}");
        assert_eq!(common::max_abs_diff(&d.a, &e.a), 0.0, "{k}");
        assert_eq!(common::max_abs_diff(&d.b, &e.b), 0.0, "{k}");
    }
    assert!(import_adapter(out.path().join("nothing-here").as_path()).is_err());
}

/// The TRL bundle for real: `CPU=1 NUM_PROCESSES=2 MAX_STEPS=3 bash launch.sh` writes a PEFT
/// adapter that FineTune imports and loads; with one process its first-step loss equals
/// FineTune's on the same batch within 1e-4. Needs a Python with requirements.txt's packages:
/// `FINETUNE_TRL_PYTHON=/path/to/python cargo test --test job -- --ignored --nocapture`.
#[test]
#[ignore]
fn trl_bundle_runs_and_matches_finetune() {
    let python = std::env::var("FINETUNE_TRL_PYTHON").expect("FINETUNE_TRL_PYTHON");
    let cfg = config(false);
    let out = tempfile::tempdir().unwrap();
    let job = export_job(&cfg, JobTarget::Trl, &out.path().join("trl")).unwrap();
    let launch = |procs: &str, steps: &str, dest: &Path| {
        let status = Command::new("bash")
            .arg(job.dir.join("launch.sh"))
            .env("PYTHON", &python)
            .env("CPU", "1")
            .env("NUM_PROCESSES", procs)
            .env("MAX_STEPS", steps)
            .env("OUT", dest)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&status.stderr);
        assert!(status.status.success(), "{err}");
        assert!(err.contains(&format!("processes: {procs}")), "{err}");
    };
    let three = out.path().join("three");
    launch("2", "3", &three);
    let found = import_adapter(&three).unwrap();
    let mut m = common::load(&cfg.model_dir);
    finetune::model::adapter::load(&found.dir, &mut m).unwrap();
    // Its logits here equal PEFT's for the same adapter.
    let ids: Vec<u32> = (1..=24).map(|i| (i * 37) % 500 + 3).collect();
    let peft_out = out.path().join("peft_logits.safetensors");
    let script = format!(
        "import torch, safetensors.torch as st\nfrom transformers import AutoModelForCausalLM\nfrom peft import PeftModel\nm = AutoModelForCausalLM.from_pretrained({:?}, dtype=torch.float32)\nm = PeftModel.from_pretrained(m, {:?}).eval()\nwith torch.no_grad():\n    l = m(torch.tensor([{:?}])).logits\nst.save_file({{'logits': l.contiguous()}}, {:?})\n",
        cfg.model_dir.display().to_string(),
        found.dir.display().to_string(),
        ids,
        peft_out.display().to_string()
    );
    assert!(Command::new(&python)
        .args(["-c", &script])
        .status()
        .unwrap()
        .success());
    let theirs = candle_core::safetensors::load(&peft_out, &candle_core::Device::Cpu).unwrap()
        ["logits"]
        .clone();
    let ours = common::logits(
        &m,
        &candle_core::Tensor::new(ids.as_slice(), &candle_core::Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap(),
    );
    let err = common::rel_err(&ours, &theirs);
    println!("imported TRL adapter: logits rel. error vs PEFT {err:.2e}");
    assert!(err < 1e-5, "{err}");
    let one = out.path().join("one");
    launch("1", "1", &one);
    let trl: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(one.join("first_step_loss.json")).unwrap())
            .unwrap();
    let trl_loss = trl["loss"].as_f64().unwrap();
    let ours = Command::new(env!("CARGO_BIN_EXE_finetune"))
        .args([
            "train",
            "--steps",
            "1",
            "--batch-size",
            "4",
            "--max-seq-len",
            "128",
        ])
        .args([
            "--rank",
            "4",
            "--json",
            "--device",
            "cpu",
            "--eval-every",
            "0",
        ])
        .arg("--model")
        .arg(&cfg.model_dir)
        .arg("--data")
        .arg(&cfg.train_data)
        .arg("--valid")
        .arg(cfg.valid_data.as_ref().unwrap())
        .arg("--out")
        .arg(out.path().join("ours"))
        .output()
        .unwrap();
    let text = String::from_utf8(ours.stdout).unwrap();
    let step: serde_json::Value = serde_json::from_str(
        text.lines()
            .find(|l| l.starts_with(r#"{"event":"step""#))
            .unwrap(),
    )
    .unwrap();
    let our_loss = step["data"]["loss"].as_f64().unwrap();
    println!("first-step loss: FineTune {our_loss}, TRL {trl_loss}");
    assert!((our_loss - trl_loss).abs() < 1e-4);
}

/// The mlx-lm bundle for real: `MAX_STEPS=2 bash launch.sh` with mlx[cpu] writes an mlx-lm
/// adapter that `job import` converts and FineTune loads. Needs a Python with mlx-lm:
/// `FINETUNE_MLX_PYTHON=/path/to/python cargo test --test job -- --ignored --nocapture`.
#[test]
#[ignore]
fn mlx_bundle_runs_two_steps_and_imports() {
    let python = std::env::var("FINETUNE_MLX_PYTHON").expect("FINETUNE_MLX_PYTHON");
    let cfg = config(false);
    let out = tempfile::tempdir().unwrap();
    let job = export_job(&cfg, JobTarget::MlxLm, &out.path().join("mlx")).unwrap();
    let run = Command::new("bash")
        .arg(job.dir.join("launch.sh"))
        .env("PYTHON", &python)
        .env("MAX_STEPS", "2")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&run.stdout).to_string() + &String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{text}");
    let found = import_adapter(&job.dir.join("output")).unwrap();
    assert!(found.from_mlx);
    let mut m = common::load(&cfg.model_dir);
    let state = finetune::model::adapter::load(&found.dir, &mut m).unwrap();
    println!("mlx-lm adapter imported: {}", found.dir.display());
    drop(state);
}
