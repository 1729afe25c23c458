//! The training loop end to end on a fixture model and the bundled demo data: loss falls, events
//! arrive in order, checkpoints are complete, Stop saves and Resume continues exactly, a non-finite
//! loss stops with the last good adapter, early stopping keeps the best, bad data never starts.
//! These train for real on CPU (a few seconds each with the dev profile's optimized deps).
// Tests panic on purpose: unwrap/expect are how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Device;
use common::*;
use finetune::model::{adapter, Model};
use finetune::session;
use finetune::train::{self, Duration, Event, Reporter, Schedule, StopReason, TrainConfig};

fn demo(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets/demo")
        .join(name)
}

fn config(out: &Path, steps: usize) -> TrainConfig {
    TrainConfig {
        model_dir: fixture("tiny-llama"),
        train_data: demo("train.jsonl"),
        valid_data: Some(demo("valid.jsonl")),
        out_dir: out.to_path_buf(),
        duration: Duration::Steps(steps),
        lr: 2e-2,
        batch_size: 4,
        max_seq_len: 128,
        eval_every: 5,
        eval_batches: 2,
        save_every: 5,
        ..Default::default()
    }
}

/// The session's reporter, asking for a stop right after step `after` (on the training thread,
/// so exactly there, as a person pressing Stop at that moment would).
struct StopAfter<'a> {
    inner: &'a dyn Reporter,
    after: Option<usize>,
    stop: AtomicBool,
}

impl Reporter for StopAfter<'_> {
    fn send(&self, event: Event) {
        if let Event::Step(s) = &event {
            if Some(s.step) == self.after {
                self.stop.store(true, Ordering::SeqCst);
            }
        }
        self.inner.send(event);
    }

    fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst) || self.inner.stop_requested()
    }
}

/// Runs to the end through a session; with `stop_after`, stops right after that step.
fn run(config: TrainConfig, stop_after: Option<usize>) -> Vec<Event> {
    let config = config.validate().unwrap();
    let mut session = session::start_with(config, None, move |config, reporter| {
        let reporter = StopAfter {
            inner: reporter,
            after: stop_after,
            stop: AtomicBool::new(false),
        };
        train::run(config, &reporter)
    });
    let all: Vec<Event> = std::iter::from_fn(|| session.recv()).collect();
    session.join();
    all
}

fn steps(events: &[Event]) -> Vec<(usize, f64)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Step(s) => Some((s.step, s.loss)),
            _ => None,
        })
        .collect()
}

fn adapter_tensors(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let mut t: Vec<(String, Vec<f32>)> =
        candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
            .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

#[test]
fn a_run_learns_reports_in_order_and_saves_complete_checkpoints() {
    let out = tempfile::tempdir().unwrap();
    let events = run(config(out.path(), 20), None);
    assert!(
        matches!(events.last(), Some(Event::Finished { .. })),
        "{:?}",
        events.last()
    );
    let started = events
        .iter()
        .position(|e| matches!(e, Event::Started { .. }))
        .unwrap();
    let first_eval = events
        .iter()
        .position(|e| matches!(e, Event::Eval { step: 0, .. }))
        .unwrap();
    let first_step = events
        .iter()
        .position(|e| matches!(e, Event::Step(_)))
        .unwrap();
    assert!(started < first_eval && first_eval < first_step);
    let s = steps(&events);
    assert_eq!(
        s.iter().map(|x| x.0).collect::<Vec<_>>(),
        (1..=20).collect::<Vec<_>>()
    );
    // The fixture is a random-weight model (logits bounded by its 0.02-std head), so LoRA moves the
    // loss slowly; what must hold is a steady fall of train and validation loss.
    let mean = |v: &[(usize, f64)]| v.iter().map(|x| x.1).sum::<f64>() / v.len() as f64;
    assert!(
        mean(&s[15..]) < mean(&s[..5]) - 0.02,
        "loss did not fall: {s:?}"
    );
    let evals: Vec<f64> = events
        .iter()
        .filter_map(|e| match e {
            Event::Eval { val_loss, .. } => Some(*val_loss),
            _ => None,
        })
        .collect();
    assert_eq!(evals.len(), 5, "evals at 0, 5, 10, 15 and the end");
    assert!(
        evals.last().unwrap() < &(evals[0] - 0.05),
        "val loss did not fall: {evals:?}"
    );
    for step in [5, 10, 15, 20] {
        let ckpt = out.path().join(format!("checkpoints/step-{step:06}"));
        for f in [
            "adapter_model.safetensors",
            "adapter_config.json",
            "optimizer.safetensors",
            "trainer_state.json",
        ] {
            assert!(ckpt.join(f).is_file(), "{}", ckpt.join(f).display());
        }
    }
    let mut model = Model::load(
        &fixture("tiny-llama"),
        candle_core::DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    adapter::load(&out.path().join("adapter"), &mut model).unwrap();
    assert!(out.path().join("best/adapter_model.safetensors").is_file());
    // No temp folders left behind.
    let leftovers: Vec<_> = std::fs::read_dir(out.path().join("checkpoints"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some())
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn max_seq_len_past_the_model_context_is_capped() {
    let out = tempfile::tempdir().unwrap();
    let mut c = config(out.path(), 2);
    c.max_seq_len = 1 << 20;
    c.eval_every = 0;
    let events = run(c, None);
    assert!(
        matches!(events.last(), Some(Event::Finished { .. })),
        "{:?}",
        events.last()
    );
    assert!(events.iter().any(|e| matches!(e,
        Event::Log(l) if l.starts_with("max sequence length lowered from 1048576"))));
}

#[test]
fn stop_names_the_best_adapter_kept_so_far() {
    let mut c = config(Path::new(""), 8);
    c.eval_every = 1;
    let out = tempfile::tempdir().unwrap();
    c.out_dir = out.path().to_path_buf();
    let events = run(c, Some(3));
    let Some(Event::Stopped { best, .. }) = events.last() else {
        panic!("expected Stopped, got {:?}", events.last());
    };
    let improved_after_start = events
        .iter()
        .any(|e| matches!(e, Event::Eval { step, best: true, .. } if *step > 0));
    assert!(
        improved_after_start,
        "expected a better val loss after step 0"
    );
    assert_eq!(best.as_deref(), Some(out.path().join("best").as_path()));
    assert!(out.path().join("best/adapter_model.safetensors").is_file());
}

#[test]
fn stop_saves_and_resume_continues_exactly() {
    stop_and_resume(false);
}

#[test]
fn stop_saves_and_resume_continues_exactly_with_dora() {
    // The magnitudes and their AdamW moments come back too.
    stop_and_resume(true);
}

fn stop_and_resume(dora: bool) {
    let mut c = config(Path::new(""), 8);
    c.lora.use_dora = dora;
    c.lora.dropout = 0.1; // seeded dropout must replay identically after resume
    c.grad_accum = 2;
    c.eval_every = 0;
    c.save_every = 0;

    let straight = tempfile::tempdir().unwrap();
    c.out_dir = straight.path().to_path_buf();
    let a = run(c.clone(), None);
    assert!(matches!(a.last(), Some(Event::Finished { .. })));

    let stopped = tempfile::tempdir().unwrap();
    c.out_dir = stopped.path().to_path_buf();
    let b = run(c.clone(), Some(3));
    let Some(Event::Stopped { adapter, step, .. }) = b.last() else {
        panic!("expected Stopped, got {:?}", b.last());
    };
    assert_eq!(*step, 3);
    assert_eq!(adapter, &stopped.path().join("adapter"));
    let ckpt = stopped.path().join("checkpoints/step-000003");
    assert!(ckpt.join("optimizer.safetensors").is_file());

    c.resume_from = Some(ckpt);
    let resumed = run(c.clone(), None);
    assert!(
        matches!(resumed.last(), Some(Event::Finished { .. })),
        "{:?}",
        resumed.last()
    );
    let rs = steps(&resumed);
    assert_eq!(rs.first().unwrap().0, 4);
    // Same losses step for step, and bit-identical final adapters.
    let full = steps(&a);
    for (x, y) in rs.iter().zip(&full[3..]) {
        assert_eq!(x.0, y.0);
        assert_eq!(
            x.1.to_bits(),
            y.1.to_bits(),
            "step {}: {} vs {}",
            x.0,
            x.1,
            y.1
        );
    }
    let saved = adapter_tensors(&stopped.path().join("adapter"));
    assert_eq!(adapter_tensors(&straight.path().join("adapter")), saved);
    let magnitudes = saved
        .iter()
        .filter(|(k, _)| k.ends_with(".lora_magnitude_vector"))
        .count();
    assert_eq!(magnitudes > 0, dora, "{magnitudes} magnitude tensors saved");
}

#[test]
fn a_non_finite_loss_stops_and_keeps_the_last_good_adapter() {
    // A copy of the model with one poisoned weight makes every loss NaN.
    let model_dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture("tiny-llama")).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, model_dir.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    let mut w =
        candle_core::safetensors::load(model_dir.path().join("model.safetensors"), &Device::Cpu)
            .unwrap();
    let norm = w.get("model.norm.weight").unwrap();
    let poisoned = (norm * f64::NAN).unwrap();
    w.insert("model.norm.weight".into(), poisoned);
    candle_core::safetensors::save(&w, model_dir.path().join("model.safetensors")).unwrap();

    let out = tempfile::tempdir().unwrap();
    let mut c = config(out.path(), 5);
    c.model_dir = model_dir.path().to_path_buf();
    let events = run(c, None);
    let Some(Event::Stopped {
        adapter,
        step,
        reason,
        ..
    }) = events.last()
    else {
        panic!("expected Stopped, got {:?}", events.last());
    };
    assert_eq!(*step, 0);
    let reason = reason.to_string();
    assert!(
        reason.contains("NaN") && reason.contains("learning rate"),
        "{reason}"
    );
    assert!(adapter.join("adapter_model.safetensors").is_file());
    assert!(steps(&events).is_empty());
}

#[test]
fn early_stop_keeps_the_best_adapter() {
    let out = tempfile::tempdir().unwrap();
    let mut c = config(out.path(), 60);
    // A learning rate far too high for this model: validation loss soon rises.
    c.lr = 0.5;
    c.schedule = Schedule::Constant;
    c.max_grad_norm = 0.0;
    c.eval_every = 1;
    c.save_every = 0;
    c.early_stop_patience = 2;
    let events = run(c, None);
    // An early stop ends as Stopped (it used to end as Finished, although the docs said Stopped).
    let Some(Event::Stopped { best, reason, .. }) = events.last() else {
        panic!("expected Stopped, got {:?}", events.last());
    };
    assert!(steps(&events).len() < 60, "early stop did not trigger");
    assert_eq!(*reason, StopReason::EarlyStopped { patience: 2 });
    assert!(reason.to_string().contains("early stop"));
    let evals: Vec<(usize, f64, bool)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Eval {
                step,
                val_loss,
                best,
            } => Some((*step, *val_loss, *best)),
            _ => None,
        })
        .collect();
    let n = evals.len();
    assert!(
        !evals[n - 1].2 && !evals[n - 2].2,
        "the last two evals did not improve"
    );
    let best_step = evals.iter().rfind(|e| e.2).unwrap().0;
    if best_step > 0 {
        assert_eq!(best.as_deref(), Some(out.path().join("best").as_path()));
    }
}

#[test]
fn bad_data_fails_before_training_with_line_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("bad.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"a\", \"completion\": \"b\"}\nnot json\n{\"prompt\": 3, \"completion\": \"b\"}\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let mut c = config(&out, 5);
    c.train_data = data;
    c.valid_data = None;
    let events = run(c, None);
    let Some(Event::Failed { error }) = events.last() else {
        panic!("expected Failed, got {:?}", events.last());
    };
    assert!(
        error.contains("line 2") && error.contains("line 3") && error.contains("bad.jsonl"),
        "{error}"
    );
    assert!(!out.join("adapter").exists());
}

#[test]
fn cli_trains_headless() {
    let out = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_finetune"))
        .args(["train", "--model"])
        .arg(fixture("tiny-gpt2"))
        .arg("--data")
        .arg(demo("train.jsonl"))
        .arg("--out")
        .arg(out.path())
        .args([
            "--steps",
            "3",
            "--max-seq-len",
            "64",
            "--rank",
            "4",
            "--targets",
            "c_attn,c_fc",
            "--packing",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("step     3/3") && stdout.contains("finished"),
        "{stdout}"
    );
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["target_modules"], serde_json::json!(["c_attn", "c_fc"]));
    assert_eq!(cfg["fan_in_fan_out"], true);
}

#[test]
fn cli_reads_a_settings_file_flags_override_and_json_events() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let settings = dir.path().join("run.toml");
    std::fs::write(
        &settings,
        format!(
            "model_dir = {:?}\ntrain_data = {:?}\nout_dir = {:?}\nmax_seq_len = 64\neval_every = 0\nsave_every = 0\n[duration]\nsteps = 2\n[lora]\nrank = 4\n",
            fixture("tiny-qwen2"),
            demo("train.jsonl"),
            out
        ),
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_finetune"))
        .args(["train", "--config"])
        .arg(&settings)
        .args(["--rank", "2", "--json"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"started") && kinds.contains(&"step"),
        "{kinds:?}"
    );
    assert_eq!(kinds.last(), Some(&"finished"));
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["r"], 2, "the flag overrides the file");
}

#[test]
fn cli_inspect_data_lists_problems_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"hi\"}\n{\"text\": 5}\nnope\n").unwrap();
    let run = |file: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_finetune"))
            .arg("inspect-data")
            .arg(file)
            .arg("--model")
            .arg(fixture("tiny-llama"))
            .output()
            .unwrap()
    };
    let output = run(&bad);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success());
    assert!(
        text.contains("line 2") && text.contains("line 3") && text.contains("bad.jsonl"),
        "{text}"
    );
    let output = run(&demo("train.jsonl"));
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("200 records"));
}

fn finetune_cli(args: &[&std::ffi::OsStr]) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_finetune"))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn each_evaluation_answers_distinct_validation_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo-model");
    let out = dir.path().join("out");
    let os = |s: &str| std::ffi::OsString::from(s);
    let args: Vec<std::ffi::OsString> = vec![
        os("train"),
        os("--model"),
        model.clone().into(),
        os("--data"),
        demo("train.jsonl").into(),
        os("--valid"),
        demo("valid.jsonl").into(),
        os("--out"),
        out.into(),
        os("--steps"),
        os("4"),
        os("--eval-every"),
        os("2"),
        os("--eval-batches"),
        os("1"),
        os("--lr"),
        os("1e-2"),
        os("--samples"),
        os("2"),
        os("--sample-tokens"),
        os("8"),
        os("--json"),
    ];
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let stdout = finetune_cli(&args);
    let samples: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["event"] == "samples")
        .collect();
    let steps: Vec<u64> = samples
        .iter()
        .map(|e| e["data"]["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [0, 2, 4]);
    let records: Vec<serde_json::Value> = std::fs::read_to_string(demo("valid.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let first = samples[0]["data"]["answers"].as_array().unwrap();
    assert_eq!(first.len(), 2);
    assert_ne!(first[0]["prompt"], first[1]["prompt"], "distinct prompts");
    for a in first {
        // The expected answer is the record's completion; the prompt holds its question.
        let record = &records[a["line"].as_u64().unwrap() as usize - 1];
        assert_eq!(a["expected"], record["completion"]);
        let question = record["prompt"].as_str().unwrap();
        assert!(a["prompt"].as_str().unwrap().contains(question), "{a}");
        // Before training, the answer is the base model's greedy chat answer.
        let base = finetune_cli(&[
            "generate".as_ref(),
            "--model".as_ref(),
            model.as_os_str(),
            "--chat".as_ref(),
            "--prompt".as_ref(),
            question.as_ref(),
            "--max-new-tokens".as_ref(),
            "8".as_ref(),
            "--temperature".as_ref(),
            "0".as_ref(),
        ]);
        assert_eq!(a["answer"].as_str().unwrap(), base.trim());
    }
    // The same prompts every time; training (lr 1e-2) changes what the model answers.
    let last = samples[2]["data"]["answers"].as_array().unwrap();
    let lines = |v: &[serde_json::Value]| v.iter().map(|a| a["line"].clone()).collect::<Vec<_>>();
    assert_eq!(lines(first), lines(last));
    assert_ne!(first[0]["answer"], last[0]["answer"]);
}
