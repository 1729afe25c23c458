//! The app driven through egui_kittest (AccessKit queries, clicks, keys, dropped files) with a
//! scripted fake engine behind `session::start_with`, plus one run on the real engine: the steps
//! are visible, the demo fills model and dataset, Start feeds the run view and charts, Stop saves
//! and says where, export writes a loadable PEFT adapter, and bad data shows its problems.
// Tests panic on purpose: unwrap/expect are how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eframe::egui;
use egui_kittest::kittest::{NodeT, Queryable};
use egui_kittest::Harness;

use finetune::data::{DatasetSummary, Format, TemplateUse};
use finetune::session;
use finetune::train::{self, Event, Reporter, StepStats, StopReason, TrainConfig, ValidConfig};
use finetune::ui::dataset::Outcome;
use finetune::ui::hub_worker::HubSetup;
use finetune::ui::{Engine, FineTuneApp, Preset, RunState, Settings, Step};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

/// Settings that write under `out` (never the person's home folder).
fn settings(out: &Path) -> Settings {
    Settings {
        output_root: out.to_path_buf(),
        ..Settings::default()
    }
}

fn harness(app: FineTuneApp) -> Harness<'static, FineTuneApp> {
    // The Hub client never touches the person's keychain in tests (tests/ui_hub.rs covers it).
    let app = app.with_hub(HubSetup {
        keychain: false,
        ..HubSetup::default()
    });
    Harness::builder()
        .with_size([1280.0, 860.0])
        // The app asks for a repaint a second after each frame; on a loaded 2-core machine
        // frames can take that long, so settling may need more than kittest's default 4 steps.
        .with_max_steps(16)
        .build_eframe(|_cc| app)
}

/// As [`harness`], for runs on the real engine: the sample answers of tiny random models are
/// arbitrary Unicode the test fonts lack, which the app draws as boxes.
fn real_harness(app: FineTuneApp) -> Harness<'static, FineTuneApp> {
    let app = app.with_hub(HubSetup {
        keychain: false,
        ..HubSetup::default()
    });
    Harness::builder()
        .with_size([1280.0, 860.0])
        .allow_missing_glyphs()
        .with_max_steps(16)
        .build_eframe(|_cc| app)
}

/// Steps frames until `cond` holds (workers and the fake engine run on real threads).
fn wait_for(h: &mut Harness<'_, FineTuneApp>, what: &str, cond: impl Fn(&FineTuneApp) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !cond(h.state()) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        h.step();
        std::thread::sleep(Duration::from_millis(5));
    }
    // Let the frame after the change lay out what it shows.
    h.step();
    h.step();
}

fn has_label(h: &Harness<'_, FineTuneApp>, text: &str) -> bool {
    h.query_all_by_label_contains(text).next().is_some()
}

fn summary() -> DatasetSummary {
    DatasetSummary {
        format: Format::PromptCompletion,
        template: TemplateUse::Model,
        prompt_masked: true,
        records: 200,
        total_tokens: 20_000,
        trained_tokens: 15_000,
        masked_fraction: 0.25,
        length_p50: 90,
        length_p90: 150,
        length_p99: 250,
        length_max: 256,
        histogram: vec![(0, 50), (64, 100), (128, 50)],
        truncated: 3,
        dropped: 0,
        untrainable: 0,
        skipped_lines: 0,
        approximate_masks: 0,
    }
}

fn stats(step: usize, total: usize) -> StepStats {
    StepStats {
        step,
        total_steps: total,
        epoch: step as f64 / 50.0,
        loss: 4.0 / (1.0 + step as f64 * 0.2),
        lr: 1e-3 * (1.0 - step as f64 / total as f64),
        grad_norm: 1.0,
        tokens: 400,
        input_tokens: 600,
        tokens_per_sec: 5_000.0 + step as f64,
        elapsed_secs: step as f64 * 0.1,
        eta_secs: (total - step) as f64 * 0.1,
        rss_bytes: Some(150_000_000 + step as u64 * 1_000_000),
        device_bytes: None,
    }
}

/// Copies the PEFT adapter the reference stack made for tiny-llama into `dir`, as a save would.
fn save_adapter(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::copy(fixture("tiny-llama/peft-adapter").join(f), dir.join(f)).unwrap();
    }
}

/// A scripted engine: `steps` steps (an eval every 4), stopping early on request. `delay` paces
/// the steps so a test can press Stop mid-run. Records the config it was started with.
fn fake_engine(steps: usize, delay: Duration, seen: Arc<Mutex<Option<TrainConfig>>>) -> Engine {
    Arc::new(move |config: ValidConfig, repaint| {
        *seen.lock().unwrap() = Some(TrainConfig::clone(&config));
        session::start_with(
            config,
            repaint,
            move |cfg: ValidConfig, r: &dyn Reporter| {
                r.send(Event::Started {
                    model: "demo-model".into(),
                    architecture: "LlamaForCausalLM".into(),
                    device: "Fake CPU".into(),
                    base_params: 150_000,
                    trainable_params: 9_000,
                    total_steps: steps,
                    start_step: 0,
                    train: Box::new(summary()),
                    valid: None,
                });
                r.send(Event::Eval {
                    step: 0,
                    val_loss: 4.2,
                    best: true,
                });
                for step in 1..=steps {
                    if r.stop_requested() {
                        let adapter = cfg.out_dir.join("latest");
                        save_adapter(&adapter);
                        r.send(Event::Saved {
                            step: step - 1,
                            path: adapter.clone(),
                        });
                        r.send(Event::Stopped {
                            adapter,
                            best: None,
                            step: step - 1,
                            reason: StopReason::StoppedByUser { step: step - 1 },
                        });
                        return;
                    }
                    r.send(Event::Step(stats(step, steps)));
                    if step % 4 == 0 {
                        r.send(Event::Eval {
                            step,
                            val_loss: 4.0 / (1.0 + step as f64 * 0.15),
                            best: true,
                        });
                    }
                    std::thread::sleep(delay);
                }
                let adapter = cfg.out_dir.join("final");
                save_adapter(&adapter);
                r.send(Event::Finished {
                    adapter,
                    best: Some(cfg.out_dir.join("best")),
                    final_loss: None,
                    final_val_loss: None,
                });
            },
        )
    })
}

fn demo_loaded(app: &FineTuneApp) -> bool {
    app.model_summary().is_some()
        && matches!(app.dataset_outcome(), Some(Outcome::Loaded(_)))
        && !app.is_busy()
}

#[test]
fn steps_and_status_bar_are_visible() {
    let out = tempfile::tempdir().unwrap();
    let seen = Arc::new(Mutex::new(None));
    let mut h = harness(FineTuneApp::with_engine(
        settings(out.path()),
        vec![],
        fake_engine(1, Duration::ZERO, seen),
    ));
    h.run();
    for step in Step::ALL {
        h.get_by_label(step.title());
    }
    assert!(has_label(&h, "Device: "));
    assert!(has_label(&h, "Memory: "));
    assert!(has_label(&h, "Run: idle"));
    // The model step is first, with the demo and Hub search.
    assert_eq!(h.state().step(), Step::Model);
    h.get_by_label("Try the demo");
    assert!(has_label(&h, "Search the Hugging Face Hub"));

    h.get_by_label("3. Settings").click();
    h.run();
    assert_eq!(h.state().step(), Step::Settings);
    h.get_by_label("Presets:");
    h.get_by_label("Quick test").click();
    h.run();
    assert_eq!(
        Preset::matching(h.state().settings(), None),
        Some(Preset::QuickTest)
    );
    // Nothing chosen yet: training is blocked, and the train step says why.
    h.get_by_label("4. Train").click();
    h.run();
    assert!(has_label(&h, "Before you start:"));
    assert!(has_label(&h, "choose a model folder"));
}

#[test]
fn the_demo_fills_model_dataset_and_preview() {
    let out = tempfile::tempdir().unwrap();
    let seen = Arc::new(Mutex::new(None));
    let mut h = harness(FineTuneApp::with_engine(
        settings(out.path()),
        vec![],
        fake_engine(1, Duration::ZERO, seen),
    ));
    h.run();
    h.get_by_label("Try the demo").click();
    wait_for(&mut h, "the demo to load", demo_loaded);
    h.run();
    let app = h.state();
    let m = app.model_summary().unwrap();
    assert_eq!(m.architecture, "LlamaForCausalLM");
    assert_eq!((m.layers, m.hidden_size, m.vocab_size), (2, 64, 512));
    assert!(app
        .settings()
        .train_data
        .as_ref()
        .unwrap()
        .ends_with("demo/train.jsonl"));
    assert!(app
        .settings()
        .valid_data
        .as_ref()
        .unwrap()
        .ends_with("demo/valid.jsonl"));
    assert_eq!(
        Preset::matching(app.settings(), None),
        Some(Preset::QuickTest)
    );
    let Some(Outcome::Loaded(l)) = app.dataset_outcome() else {
        panic!("not loaded")
    };
    assert_eq!(l.train.records, 200);
    assert_eq!(l.train.format, Format::PromptCompletion);
    assert_eq!(l.valid.as_ref().map(|v| v.records), Some(40));
    assert!(!l.preview.is_empty());
    // Masked prompt and trained completion are separate pieces.
    assert!(l.preview[0].segments.iter().any(|s| !s.trained));
    assert!(l.preview[0].segments.iter().any(|s| s.trained));
    assert_eq!(app.step(), Step::Dataset);
    // What the person sees: format, counts and the first record's text.
    assert!(has_label(&h, "prompt/completion"));
    assert!(has_label(&h, "line 1"));
    assert!(has_label(&h, "What is Super Bowl LIX?"));
    assert!(has_label(&h, "40 records (validation file valid.jsonl)"));
    assert!(
        has_label(&h, "200 records, prompt/completion"),
        "side panel status"
    );
}

#[test]
fn start_feeds_the_run_view_and_charts() {
    let out = tempfile::tempdir().unwrap();
    let seen = Arc::new(Mutex::new(None));
    let mut h = harness(FineTuneApp::with_engine(
        settings(out.path()),
        vec![],
        fake_engine(12, Duration::from_millis(2), seen.clone()),
    ));
    h.run();
    h.get_by_label("Try the demo").click();
    wait_for(&mut h, "the demo to load", demo_loaded);
    h.get_by_label("4. Train").click();
    h.run();
    h.get_by_label("Start training").click();
    wait_for(&mut h, "the run to finish", |a| {
        a.run_view().state == RunState::Finished
    });
    h.run();

    let v = h.state().run_view();
    assert_eq!(v.loss.len(), 12);
    assert_eq!(v.loss_smooth.len(), 12);
    assert_eq!(v.lr.len(), 12);
    assert_eq!(v.throughput.len(), 12);
    assert_eq!(v.rss_mb.len(), 12);
    assert_eq!(v.val_loss.len(), 4, "evals at 0, 4, 8, 12");
    assert_eq!(v.loss[11], [12.0, 4.0 / (1.0 + 12.0 * 0.2)]);
    assert_eq!((v.step, v.total_steps), (12, 12));
    assert!(v.final_adapter.as_ref().unwrap().ends_with("final"));
    assert!(v.best.as_ref().unwrap().ends_with("best"));
    // The settings reached the engine: Quick test is 60 steps on the demo model, written under
    // the output folder.
    let cfg = seen.lock().unwrap().clone().unwrap();
    assert_eq!(cfg.duration, train::Duration::Steps(60));
    assert!(cfg.model_dir.ends_with("demo-model"));
    assert!(cfg.out_dir.starts_with(out.path()));
    // What the person sees.
    assert!(has_label(&h, "Step 12 of 12"));
    assert!(has_label(&h, "Run: finished"));
    assert!(has_label(&h, "Finished. The adapter is saved:"));
    assert!(has_label(&h, "Fake CPU"));
    assert!(has_label(&h, "step 12: validation loss"));
    // Every point of the charts, saved as CSV in the run's folder.
    h.get_by_label("Save chart data (CSV)").click();
    h.run();
    let csv = std::fs::read_to_string(cfg.out_dir.join("metrics.csv"))
        .unwrap_or_else(|e| panic!("{e}: {:?}", h.state().notices()));
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(
        rows.len(),
        1 + 13,
        "a row per step, and step 0's evaluation"
    );
    assert!(rows[0].starts_with("step,loss,loss_smoothed,val_loss"));
    assert!(rows[13].starts_with(&format!("12,{},", 4.0 / (1.0 + 12.0 * 0.2))));
    assert!(has_label(&h, "Chart data saved:"));
}

#[test]
fn stop_saves_says_where_and_the_export_loads() {
    let out = tempfile::tempdir().unwrap();
    let seen = Arc::new(Mutex::new(None));
    let mut h = harness(FineTuneApp::with_engine(
        settings(out.path()),
        vec![],
        fake_engine(100_000, Duration::from_millis(20), seen),
    ));
    h.run();
    h.get_by_label("Try the demo").click();
    wait_for(&mut h, "the demo to load", demo_loaded);
    // Cmd/Ctrl+Enter starts from any step.
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::Enter);
    wait_for(&mut h, "a few steps", |a| a.run_view().step >= 3);
    assert_eq!(h.state().step(), Step::Train);
    assert!(has_label(&h, "Run: training (step"));
    h.get_by_label("Stop").click();
    wait_for(&mut h, "the stop", |a| {
        a.run_view().state == RunState::Stopped
    });
    h.run();

    let v = h.state().run_view();
    let adapter = v.final_adapter.clone().unwrap();
    assert!(adapter.ends_with("latest"));
    assert!(adapter.join("adapter_model.safetensors").is_file());
    assert!(v.step >= 3 && v.step < 100_000);
    assert!(has_label(&h, &format!("Stopped at step {}", v.step)));
    assert!(has_label(&h, &adapter.display().to_string()));

    // Export it.
    h.get_by_label("6. Export").click();
    h.run();
    let dest = out.path().join("exported");
    h.state_mut().set_export_dir(&dest);
    h.run();
    h.get_by_label("Export").click();
    wait_for(&mut h, "the export", |a| a.export_result().is_some());
    h.run();
    let done = h.state().export_result().unwrap().clone().unwrap();
    assert_eq!(done.dir, dest);
    assert!(has_label(&h, &format!("Exported to {}", dest.display())));
    let readme = std::fs::read_to_string(dest.join("README.md")).unwrap();
    assert!(readme.contains("base_model: 'demo-model'"), "{readme}");
    assert!(readme.contains("train.jsonl"));
    // The exported adapter loads onto its base model.
    let dev = candle_core::Device::Cpu;
    let mut model =
        finetune::model::Model::load(&fixture("tiny-llama"), candle_core::DType::F32, &dev)
            .unwrap();
    let state = finetune::model::adapter::load(&dest, &mut model).unwrap();
    assert_eq!(state.config.rank, 4);
}

#[test]
fn a_bad_dataset_shows_its_problems_and_cannot_start() {
    let out = tempfile::tempdir().unwrap();
    let bad = out.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n{not json\n{\"prompt\": \"only a prompt\"}\n",
    )
    .unwrap();
    let garbage = out.path().join("garbage.jsonl");
    std::fs::write(&garbage, [0xff_u8, 0xfe, 0x00, 0x9c, b'\n', 0x80, 0x81]).unwrap();

    let mut s = settings(out.path());
    s.model_dir = Some(fixture("tiny-llama"));
    Preset::QuickTest.apply(&mut s);
    let seen = Arc::new(Mutex::new(None));
    let mut h = harness(FineTuneApp::with_engine(
        s,
        vec![],
        fake_engine(1, Duration::ZERO, seen.clone()),
    ));
    h.run();

    // Drop the file on the window.
    h.input_mut()
        .dropped_files
        .push(Arc::new(Dropped(bad.clone())));
    wait_for(&mut h, "the problems", |a| {
        matches!(a.dataset_outcome(), Some(Outcome::Problems(_))) && !a.is_busy()
    });
    h.run();
    assert_eq!(h.state().step(), Step::Dataset);
    let Some(Outcome::Problems(p)) = h.state().dataset_outcome() else {
        unreachable!()
    };
    let lines: Vec<Option<usize>> = p.iter().map(|p| p.line).collect();
    assert_eq!(lines, vec![Some(2), Some(3)]);
    h.get_by_label("bad.jsonl line 2");
    h.get_by_label("bad.jsonl line 3");
    assert!(has_label(&h, "invalid JSON"));
    assert!(has_label(&h, "2 problems found"));

    // Start is refused, with the reason.
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::Enter);
    h.run();
    assert_eq!(h.state().run_view().state, RunState::Idle);
    assert!(seen.lock().unwrap().is_none(), "the engine must not start");
    assert!(h
        .state()
        .notices()
        .iter()
        .any(|n| n.contains("the dataset has 2 problem(s)")));

    // Bytes that are not text at all: problems again, no crash.
    h.input_mut().dropped_files.push(Arc::new(Dropped(garbage)));
    wait_for(&mut h, "the garbage's problems", |a| {
        a.settings()
            .train_data
            .as_ref()
            .is_some_and(|t| t.ends_with("garbage.jsonl"))
            && matches!(a.dataset_outcome(), Some(Outcome::Problems(_)))
            && !a.is_busy()
    });
    h.run();
    assert!(has_label(&h, "garbage.jsonl line 1"));
    assert!(has_label(&h, "UTF-8"));
}

#[test]
fn command_line_paths_open_model_and_dataset() {
    let out = tempfile::tempdir().unwrap();
    let seen = Arc::new(Mutex::new(None));
    let paths = vec![
        fixture("tiny-qwen2"),
        root().join("assets/demo/train.jsonl"),
        out.path().join("nope.txt"),
    ];
    let mut h = harness(FineTuneApp::with_engine(
        settings(out.path()),
        paths,
        fake_engine(1, Duration::ZERO, seen),
    ));
    wait_for(&mut h, "model and dataset", demo_loaded);
    h.run();
    let app = h.state();
    assert_eq!(
        app.model_summary().unwrap().architecture,
        "Qwen2ForCausalLM"
    );
    assert!(app
        .settings()
        .train_data
        .as_ref()
        .unwrap()
        .ends_with("train.jsonl"));
    assert_eq!(app.step(), Step::Dataset);
    // The path that is neither is reported, not ignored.
    assert!(app.notices().iter().any(|n| n.contains("nope.txt")));
    // Its context is 256 tokens: the sequence length was lowered to fit, and the app says so.
    assert_eq!(app.settings().max_seq_len, 256);
    assert!(app.notices().iter().any(|n| n.contains("lowered to 256")));
}

#[test]
fn settings_persist_through_eframe_storage() {
    #[derive(Default)]
    struct Memory(HashMap<String, String>);
    impl eframe::Storage for Memory {
        fn get_string(&self, key: &str) -> Option<String> {
            self.0.get(key).cloned()
        }
        fn set_string(&mut self, key: &str, value: String) {
            self.0.insert(key.into(), value);
        }
        fn remove_string(&mut self, key: &str) {
            self.0.remove(key);
        }
        fn flush(&mut self) {}
    }
    let out = tempfile::tempdir().unwrap();
    let seen = Arc::new(Mutex::new(None));
    let mut app = FineTuneApp::with_engine(
        settings(out.path()),
        vec![],
        fake_engine(1, Duration::ZERO, seen),
    );
    app.settings_mut().lora_rank = 48;
    app.settings_mut().model_dir = Some(fixture("tiny-gpt2"));
    let mut storage = Memory::default();
    eframe::App::save(&mut app, &mut storage);
    let restored = FineTuneApp::load_settings(Some(&storage));
    assert_eq!(restored, *app.settings());
    assert_eq!(restored.lora_rank, 48);
    assert_eq!(FineTuneApp::load_settings(None), Settings::default());
}

/// The real engine on the bundled demo model: a short run end to end, its charts, the model
/// card and an exported adapter that loads onto the base model.
#[test]
fn the_real_engine_trains_the_demo_and_exports() {
    let out = tempfile::tempdir().unwrap();
    let mut h = real_harness(FineTuneApp::with_engine(
        settings(out.path()),
        vec![],
        finetune::ui::real_engine(),
    ));
    h.run();
    h.get_by_label("Try the demo").click();
    wait_for(&mut h, "the demo to load", demo_loaded);
    h.state_mut().settings_mut().steps = 6;
    h.state_mut().settings_mut().eval_every = 3;
    h.state_mut().settings_mut().save_every = 3;
    h.state_mut().set_step(Step::Train);
    h.run();
    h.get_by_label("Start training").click();
    wait_for(&mut h, "the run to end", |a| {
        let s = a.run_view().state;
        s != RunState::Idle && !s.is_active()
    });
    h.run();
    let v = h.state().run_view();
    assert_eq!(v.state, RunState::Finished, "{:?}", v.log);
    assert_eq!(v.loss.len(), 6);
    assert!(v.loss.iter().all(|p| p[1].is_finite() && p[1] > 0.0));
    assert_eq!(v.lr.len(), 6);
    assert!(
        v.val_loss.len() >= 2,
        "evals at 0, 3 and 6: {:?}",
        v.val_loss
    );
    assert!(v.rss_mb.iter().all(|p| p[1] > 1.0));
    let info = v.info.clone().unwrap();
    assert_eq!(
        info.train.records + info.valid.map_or(0, |x| x.records),
        240
    );
    let adapter = v.final_adapter.clone().unwrap();
    assert!(adapter.join("adapter_model.safetensors").is_file());
    assert!(adapter.starts_with(out.path()));
    assert!(has_label(&h, "Step 6 of 6"));
    assert!(has_label(&h, "Finished. The adapter is saved:"));

    h.get_by_label("6. Export").click();
    h.run();
    let dest = out.path().join("demo-export");
    h.state_mut().set_export_dir(&dest);
    h.run();
    h.get_by_label("Export").click();
    wait_for(&mut h, "the export", |a| a.export_result().is_some());
    let done = h.state().export_result().unwrap().clone().unwrap();
    assert_eq!(done.files.len(), 3);
    let readme = std::fs::read_to_string(dest.join("README.md")).unwrap();
    assert!(readme.contains("(6 of 6 steps)"), "{readme}");
    let dev = candle_core::Device::Cpu;
    let demo = root().join("assets/demo-model");
    let mut model = finetune::model::Model::load(&demo, candle_core::DType::F32, &dev).unwrap();
    let state = finetune::model::adapter::load(&dest, &mut model).unwrap();
    assert_eq!(state.config.rank, 8, "Quick test trains rank 8");

    // The merged model: the run's base with the adapter folded in, loadable on its own.
    h.get_by_label("Merged model").click();
    h.run();
    let merged = out.path().join("demo-merged");
    h.state_mut().set_export_dir(&merged);
    h.run();
    h.get_by_label("Export").click();
    wait_for(&mut h, "the merged export", |a| match a.export_result() {
        Some(Ok(e)) => e.dir == merged,
        Some(Err(_)) => true,
        None => false,
    });
    let done = h.state().export_result().unwrap().clone().unwrap();
    assert!(done.files.iter().any(|f| f.ends_with("model.safetensors")));
    let readme = std::fs::read_to_string(merged.join("README.md")).unwrap();
    assert!(readme.contains("base_model_relation: merge"), "{readme}");
    let ids = candle_core::Tensor::new(&[[1u32, 5, 9, 42]], &dev).unwrap();
    let input = finetune::model::ModelInput::causal(ids);
    let folded = finetune::model::Model::load(&merged, candle_core::DType::F32, &dev).unwrap();
    let d = (folded.logits(&input).unwrap() - model.logits(&input).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-4, "merged vs base + adapter: {d}");

    // The MLX adapter: mlx-lm's files and a card that says how to run it.
    h.get_by_label("MLX adapter").click();
    h.run();
    let mlx = out.path().join("demo-mlx");
    h.state_mut().set_export_dir(&mlx);
    h.run();
    h.get_by_label("Export").click();
    wait_for(&mut h, "the MLX export", |a| match a.export_result() {
        Some(Ok(e)) => e.dir == mlx,
        Some(Err(_)) => true,
        None => false,
    });
    assert!(h.state().export_result().unwrap().is_ok());
    assert!(mlx.join("adapters.safetensors").is_file());
    let readme = std::fs::read_to_string(mlx.join("README.md")).unwrap();
    assert!(readme.contains("mlx_lm.generate"), "{readme}");

    // The GGUF LoRA: one file named after the model, beside nothing else.
    h.get_by_label("GGUF LoRA").click();
    h.run();
    let gguf = out.path().join("demo-gguf");
    h.state_mut().set_export_dir(&gguf);
    h.run();
    h.get_by_label("Export").click();
    wait_for(&mut h, "the GGUF LoRA export", |a| {
        match a.export_result() {
            Some(Ok(e)) => e.dir == gguf,
            Some(Err(_)) => true,
            None => false,
        }
    });
    let done = h.state().export_result().unwrap().clone().unwrap();
    assert_eq!(done.files, [gguf.join("demo-model-lora.gguf")]);
    assert!(done.files[0].is_file());

    // The GGUF model: the sizes of every type are shown before writing; Q8_0 is written.
    h.get_by_label("GGUF model").click();
    h.run();
    for _ in 0..200 {
        h.step();
        if has_label(&h, " KB") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(has_label(&h, " KB"), "no file sizes shown");
    h.get_by_label("Q8_0").click();
    h.run();
    let model_gguf = out.path().join("demo-model-gguf");
    h.state_mut().set_export_dir(&model_gguf);
    h.run();
    h.get_by_label("Export").click();
    wait_for(&mut h, "the GGUF export", |a| match a.export_result() {
        Some(Ok(e)) => e.dir == model_gguf,
        Some(Err(_)) => true,
        None => false,
    });
    let done = h.state().export_result().unwrap().clone().unwrap();
    assert_eq!(done.files, [model_gguf.join("demo-model-tuned-Q8_0.gguf")]);
    let mut f = std::fs::File::open(&done.files[0]).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    assert_eq!(
        content.metadata["general.file_type"].to_u32().unwrap(),
        7,
        "Q8_0"
    );

    // Ollama: GGUF + Modelfile, and "Add to Ollama" runs `ollama create` (a stand-in here).
    let fake = out.path().join("fake-ollama");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho \"$@\" > \"$(pwd)/ollama-args\"\necho 'writing manifest' >&2\necho success >&2\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    h.state_mut().set_ollama_program(Some(fake));
    h.get_by_label("Ollama").click();
    h.run();
    let ollama = out.path().join("demo-ollama");
    h.state_mut().set_export_dir(&ollama);
    h.run();
    h.get_by_label("Export").click();
    wait_for(&mut h, "the Ollama export", |a| match a.export_result() {
        Some(Ok(e)) => e.dir == ollama,
        Some(Err(_)) => true,
        None => false,
    });
    assert!(h.state().export_result().unwrap().is_ok());
    let modelfile = std::fs::read_to_string(ollama.join("Modelfile")).unwrap();
    assert!(
        modelfile.contains("FROM ./demo-model-tuned-Q8_0.gguf"),
        "{modelfile}"
    );
    assert!(modelfile.contains("TEMPLATE"), "{modelfile}");
    let name = h.state().ollama_export().unwrap().name.clone();
    h.get_by_label_contains("Add to Ollama").click();
    wait_for(&mut h, "ollama create", |a| {
        a.ollama_create_result().is_some()
    });
    assert_eq!(h.state().ollama_create_result(), Some(&Ok(name.clone())));
    let args = std::fs::read_to_string(ollama.join("ollama-args")).unwrap();
    assert_eq!(args.trim(), format!("create {name} -f Modelfile"));
}

/// A file dropped on the window in a test.
#[derive(Debug)]
struct Dropped(PathBuf);

impl egui::DroppedFile for Dropped {
    fn path(&self) -> &Path {
        &self.0
    }

    fn bytes(&self) -> Result<Vec<u8>, String> {
        std::fs::read(&self.0).map_err(|e| e.to_string())
    }
}

#[test]
fn settings_show_the_device_plan_and_the_memory_estimate() {
    let out = tempfile::tempdir().unwrap();
    let mut s = settings(out.path());
    s.model_dir = Some(fixture("tiny-llama"));
    let seen = Arc::new(Mutex::new(None));
    let mut h = harness(FineTuneApp::with_engine(
        s,
        vec![],
        fake_engine(1, Duration::ZERO, seen),
    ));
    h.run();
    h.get_by_label("3. Settings").click();
    wait_for(&mut h, "the device plan and the estimate", |_| true);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(has_label(&h, "at most for the longest batch") && has_label(&h, "CPU (")) {
        assert!(Instant::now() < deadline, "no estimate or device shown");
        h.step();
        std::thread::sleep(Duration::from_millis(5));
    }
    h.get_by_label("Memory saver");
    // The tiny model fits easily: no warning (the warning itself: ui::compute's unit tests).
    assert!(!has_label(&h, "⚠ needs about"));
    // The estimate follows the form: checkpointing lowers it.
    let before = estimate_text(&h);
    h.state_mut().settings_mut().gradient_checkpointing = true;
    h.run();
    assert_ne!(estimate_text(&h), before);
}

fn estimate_text(h: &Harness<'_, FineTuneApp>) -> String {
    h.query_all_by_label_contains("at most for the longest batch")
        .next()
        .map(|n| format!("{n:?}"))
        .unwrap_or_default()
}

/// Drops `model` (a `.gguf` file or a `.bin`-only folder) on the window, waits for the model step
/// to convert and describe it, then trains two steps on the real engine.
fn drop_model_and_train(model: &Path, name: &str) {
    let out = tempfile::tempdir().unwrap();
    let mut s = settings(out.path());
    s.train_data = Some(root().join("assets/demo/train.jsonl"));
    Preset::QuickTest.apply(&mut s);
    s.steps = 2;
    let mut h = real_harness(FineTuneApp::with_engine(
        s,
        vec![],
        finetune::ui::real_engine(),
    ));
    h.run();
    h.input_mut()
        .dropped_files
        .push(Arc::new(Dropped(model.to_path_buf())));
    wait_for(&mut h, "the converted model and the dataset", demo_loaded);
    let summary = h.state().model_summary().unwrap().clone();
    assert_eq!(summary.name, name);
    assert_eq!(summary.source, model);
    assert_ne!(summary.dir, model, "trains on the converted copy");
    assert_eq!(h.state().settings().model_dir.as_deref(), Some(model));
    assert!(has_label(&h, name));
    h.state_mut().set_step(Step::Train);
    h.run();
    h.get_by_label("Start training").click();
    wait_for(&mut h, "the run to end", |a| {
        let s = a.run_view().state;
        s != RunState::Idle && !s.is_active()
    });
    let v = h.state().run_view();
    assert_eq!(v.state, RunState::Finished, "{:?}", v.log);
    let adapter = v.final_adapter.clone().unwrap();
    let mut tuned = finetune::model::Model::load(
        &summary.dir,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    finetune::model::adapter::load(&adapter, &mut tuned).unwrap();
    // The conversion went to the person's cache: take back what this test put there.
    std::fs::remove_dir_all(&summary.dir).unwrap();
}

#[test]
fn a_dropped_gguf_file_converts_and_trains() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny-llama.Q8_0.gguf");
    std::fs::copy(fixture("convert/tiny-llama.Q8_0.gguf"), &gguf).unwrap();
    drop_model_and_train(&gguf, "tiny-llama.Q8_0");
}

#[test]
fn a_dropped_pytorch_bin_folder_converts_and_trains() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("tiny-llama-bin");
    std::fs::create_dir(&bin).unwrap();
    for e in std::fs::read_dir(fixture("convert/tiny-llama-bin")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, bin.join(p.file_name().unwrap())).unwrap();
    }
    drop_model_and_train(&bin, "tiny-llama-bin");
}

/// Issue 20: closing the window during a run asks first; "Keep training" keeps it running,
/// "Stop, save and quit" stops after the step, saves, then closes the window.
#[test]
fn closing_the_window_while_training_asks_then_stops_saves_and_quits() {
    let out = tempfile::tempdir().unwrap();
    let seen = Arc::new(Mutex::new(None));
    let mut h = harness(FineTuneApp::with_engine(
        settings(out.path()),
        vec![],
        fake_engine(100_000, Duration::from_millis(20), seen),
    ));
    h.run();
    h.get_by_label("Try the demo").click();
    wait_for(&mut h, "the demo to load", demo_loaded);
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::Enter);
    wait_for(&mut h, "a few steps", |a| a.run_view().step >= 3);
    let close = |h: &mut Harness<'_, FineTuneApp>| {
        h.input_mut()
            .viewports
            .entry(egui::ViewportId::ROOT)
            .or_default()
            .events
            .push(egui::ViewportEvent::Close);
        h.step();
    };
    let commands = |h: &Harness<'_, FineTuneApp>| {
        h.output()
            .viewport_output
            .get(&egui::ViewportId::ROOT)
            .map(|v| v.commands.clone())
            .unwrap_or_default()
    };
    close(&mut h);
    assert!(commands(&h).contains(&egui::ViewportCommand::CancelClose));
    h.run();
    assert!(has_label(&h, "Training is running"));
    h.get_by_label("Keep training").click();
    h.run();
    assert!(!has_label(&h, "Training is running"));
    let step = h.state().run_view().step;
    wait_for(&mut h, "more steps", |a| a.run_view().step > step + 2);

    close(&mut h);
    assert!(commands(&h).contains(&egui::ViewportCommand::CancelClose));
    h.run();
    h.get_by_label("Stop, save and quit").click();
    let mut closed = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !closed && Instant::now() < deadline {
        h.step();
        closed = commands(&h).contains(&egui::ViewportCommand::Close);
    }
    assert!(closed, "the window was never closed");
    let v = h.state().run_view();
    assert_eq!(v.state, RunState::Stopped);
    let adapter = v.final_adapter.clone().unwrap();
    assert!(adapter.join("adapter_model.safetensors").is_file());
}

/// Issue 20, big inputs: while a 16 MB dataset is read (a worker thread), the window keeps drawing
/// frames and its progress bar moves.
#[test]
fn a_big_dataset_loads_behind_a_moving_progress_bar() {
    let out = tempfile::tempdir().unwrap();
    let big = out.path().join("big.jsonl");
    let demo = std::fs::read_to_string(root().join("assets/demo/train.jsonl")).unwrap();
    let mut text = String::new();
    while text.len() < 16 << 20 {
        text.push_str(&demo);
    }
    std::fs::write(&big, text).unwrap();
    let seen = Arc::new(Mutex::new(None));
    let mut h = harness(FineTuneApp::with_engine(
        settings(out.path()),
        vec![fixture("tiny-llama"), big],
        fake_engine(1, Duration::ZERO, seen),
    ));
    let deadline = Instant::now() + Duration::from_secs(600);
    let (mut shown, mut frames, mut slowest) = (Vec::<String>::new(), 0, Duration::ZERO);
    while h.state().dataset_outcome().is_none() {
        assert!(Instant::now() < deadline, "the dataset never loaded");
        let t = Instant::now();
        h.step();
        slowest = slowest.max(t.elapsed());
        frames += 1;
        if let Some(node) = h
            .query_all_by_label_contains("Reading and tokenizing the dataset:")
            .next()
        {
            let label = node.accesskit_node().label().unwrap_or_default();
            if shown.last() != Some(&label) {
                shown.push(label);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "{frames} frames while loading (slowest {slowest:?}); progress shown: {} steps, up to {:?}",
        shown.len(),
        shown.last()
    );
    assert!(shown.len() >= 3, "the progress bar did not move: {shown:?}");
    let Some(Outcome::Loaded(l)) = h.state().dataset_outcome() else {
        panic!("not loaded: {:?}", h.state().dataset_outcome())
    };
    assert!(l.train.records > 13_000, "{}", l.train.records);
}

/// Issue 21 in the app: the Settings step writes the demo's job for TRL into a folder, and the
/// Export step imports the adapter of a job run (here a PEFT output folder), which Export then
/// offers and Try fills in.
#[test]
fn run_elsewhere_writes_the_job_and_imports_its_adapter() {
    let out = tempfile::tempdir().unwrap();
    let seen = Arc::new(Mutex::new(None));
    let app = FineTuneApp::with_engine(
        settings(out.path()),
        vec![],
        fake_engine(1, Duration::ZERO, seen),
    )
    .with_hub(HubSetup {
        keychain: false,
        ..HubSetup::default()
    });
    // Tall enough that the Settings step's last section is on screen (clicks need it visible).
    let mut h = Harness::builder()
        .with_size([1280.0, 2600.0])
        .build_eframe(|_cc| app);
    h.run();
    h.get_by_label("Try the demo").click();
    wait_for(&mut h, "the demo to load", demo_loaded);
    h.get_by_label("3. Settings").click();
    h.run();
    // The job folder defaults to one under the runs folder.
    let job = out.path().join("jobs/job");
    h.get_by_label("Write job").click();
    wait_for(&mut h, "the job", |_| {
        job.join("train.py").is_file() && job.join("README.md").is_file()
    });
    wait_for(&mut h, "the report", |_| true);
    assert!(has_label(&h, "Job written:"));
    assert!(job.join("data/train.jsonl").is_file());
    // A job run's output: the adapter TRL saves.
    let run_out = out.path().join("run-out/adapter");
    std::fs::create_dir_all(&run_out).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(
            fixture("tiny-llama").join("peft-adapter").join(f),
            run_out.join(f),
        )
        .unwrap();
    }
    h.get_by_label("6. Export").click();
    h.run();
    let field = "Adapter from a job run elsewhere:";
    h.get_by_label(field).click();
    h.get_by_label(field)
        .type_text(out.path().join("run-out").to_str().unwrap());
    h.run();
    h.get_by_label("Import").click();
    wait_for(&mut h, "the import", |a| {
        a.notices()
            .iter()
            .any(|n| n.starts_with("Imported the adapter"))
    });
    assert!(has_label(&h, "imported from a job run elsewhere"));
    assert!(has_label(&h, run_out.to_str().unwrap()));
}
