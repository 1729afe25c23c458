//! The FineTune window with a scripted engine instead of the real one: 300 steps of a made-up,
//! decaying loss at ~10 steps/s, evals every 25 steps, checkpoints every 50 (copies of the
//! tiny-llama PEFT fixture), Stop honoured. For looking at the UI (charts, Stop, export) without
//! training anything. Arguments are opened like `finetune`'s (model folders, JSONL files).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use finetune::session;
use finetune::train::{Event, Reporter, StepStats, StopReason, ValidConfig};

const STEPS: usize = 300;

fn save(dir: &Path) {
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama/peft-adapter");
    if std::fs::create_dir_all(dir).is_ok() {
        for f in ["adapter_model.safetensors", "adapter_config.json"] {
            // A failed copy shows up as an export error in the UI, which is fine for a preview.
            let _ = std::fs::copy(fixture.join(f), dir.join(f));
        }
    }
}

fn scripted(cfg: ValidConfig, r: &dyn Reporter) {
    let t0 = Instant::now();
    r.send(Event::Log(format!(
        "scripted engine: {STEPS} steps, nothing is trained"
    )));
    let summary = |records| finetune::data::DatasetSummary {
        format: finetune::data::Format::PromptCompletion,
        template: finetune::data::TemplateUse::Model,
        prompt_masked: true,
        records,
        total_tokens: records * 180,
        trained_tokens: records * 150,
        masked_fraction: 0.17,
        length_p50: 180,
        length_p90: 340,
        length_p99: 900,
        length_max: 1000,
        histogram: vec![],
        truncated: 0,
        dropped: 0,
        untrainable: 0,
        skipped_lines: 0,
        approximate_masks: 0,
    };
    r.send(Event::Started {
        model: cfg
            .model_dir
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        architecture: "LlamaForCausalLM".into(),
        device: "scripted CPU".into(),
        base_params: 145_700,
        trainable_params: 9_216,
        total_steps: STEPS,
        start_step: 0,
        train: Box::new(summary(1620)),
        valid: Some(Box::new(summary(180))),
    });
    let val = |step: usize| 2.2 + 4.0 * (-(step as f64) / 80.0).exp();
    let mut best = f64::INFINITY;
    let mut eval = |step: usize| {
        let v = val(step);
        let is_best = v < best;
        best = best.min(v);
        r.send(Event::Eval {
            step,
            val_loss: v,
            best: is_best,
        });
    };
    eval(0);
    let mut last_save = None;
    for step in 1..=STEPS {
        if r.stop_requested() {
            let dir = cfg.out_dir.join("latest");
            save(&dir);
            r.send(Event::Saved {
                step: step - 1,
                path: dir.clone(),
            });
            r.send(Event::Stopped {
                adapter: dir,
                best: None,
                step: step - 1,
                reason: StopReason::StoppedByUser { step: step - 1 },
            });
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
        let x = step as f64;
        let noise = ((x * 12.9898).sin() * 43_758.545).fract() - 0.5;
        let elapsed = t0.elapsed().as_secs_f64();
        r.send(Event::Step(StepStats {
            step,
            total_steps: STEPS,
            epoch: x / 100.0,
            loss: 2.0 + 4.0 * (-x / 70.0).exp() + 0.4 * noise,
            lr: cfg.lr_at(step - 1, STEPS),
            grad_norm: 1.0,
            tokens: 600,
            input_tokens: 720,
            tokens_per_sec: 7_200.0 + 300.0 * noise,
            elapsed_secs: elapsed,
            eta_secs: elapsed / x * (STEPS - step) as f64,
            rss_bytes: Some(180_000_000 + step as u64 * 150_000),
            device_bytes: None,
        }));
        if step % 25 == 0 {
            eval(step);
        }
        if step % 50 == 0 {
            let dir = cfg.out_dir.join("checkpoints").join(format!("step-{step}"));
            save(&dir);
            r.send(Event::Saved {
                step,
                path: dir.clone(),
            });
            last_save = Some(dir);
        }
    }
    let dir = cfg.out_dir.join("final");
    save(&dir);
    r.send(Event::Finished {
        adapter: dir,
        best: last_save,
        final_loss: None,
        final_val_loss: None,
    });
}

fn main() -> std::process::ExitCode {
    let paths = std::env::args_os().skip(1).map(Into::into).collect();
    let engine: finetune::ui::Engine =
        Arc::new(|config, repaint| session::start_with(config, repaint, scripted));
    match finetune::ui::run_app_with(paths, engine) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
