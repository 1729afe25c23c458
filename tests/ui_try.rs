//! The Try step driven through egui_kittest on the real engine: a demo run shows its sample
//! answers under the charts, "Try it…" opens the Try step with the run's adapter, Cmd/Ctrl+Enter
//! sends, and base and tuned answers stream side by side from one loaded model, each equal to
//! greedy generation in-process with the adapter off and on; the conversation carries on, Stop
//! ends an answer, and an adapter folder that is not one says so.
// Tests panic on purpose: unwrap/expect are how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use eframe::egui;
use egui_kittest::kittest::Queryable;
use egui_kittest::Harness;

use finetune::generate::{self, prompt::Prompt, prompt::Turn, GenerateOptions};
use finetune::model::{adapter, Model};
use finetune::train::{DeviceChoice, DtypeChoice};
use finetune::ui::dataset::Outcome;
use finetune::ui::hub_worker::HubSetup;
use finetune::ui::{FineTuneApp, RunState, Settings, Step};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn harness(out: &Path) -> Harness<'static, FineTuneApp> {
    let settings = Settings {
        output_root: out.to_path_buf(),
        ..Settings::default()
    };
    let app = FineTuneApp::with_engine(settings, vec![], finetune::ui::real_engine()).with_hub(
        HubSetup {
            keychain: false,
            ..HubSetup::default()
        },
    );
    // The tiny demo model answers in arbitrary Unicode the test fonts lack (the app draws boxes).
    Harness::builder()
        .with_size([1280.0, 860.0])
        .allow_missing_glyphs()
        .build_eframe(|_cc| app)
}

fn wait_for(h: &mut Harness<'_, FineTuneApp>, what: &str, cond: impl Fn(&FineTuneApp) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !cond(h.state()) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        h.step();
        std::thread::sleep(Duration::from_millis(5));
    }
    h.step();
    h.step();
}

fn has_label(h: &Harness<'_, FineTuneApp>, text: &str) -> bool {
    h.query_all_by_label_contains(text).next().is_some()
}

/// The greedy chat answer in-process: the demo model on the device and dtype the app picks by
/// default (bf16 on a CPU with AMX or AVX512-BF16, f32 on others), the adapter on or off.
fn expected(adapter_dir: Option<&Path>, history: &[Turn], text: &str, n: usize) -> String {
    let dir = root().join("assets/demo-model");
    let backend = finetune::backend::pick_with(DeviceChoice::Auto, DtypeChoice::Auto).unwrap();
    let mut model = Model::load(&dir, backend.dtype, &backend.device).unwrap();
    if let Some(a) = adapter_dir {
        adapter::load(a, &mut model).unwrap();
    }
    let tok = finetune::data::ModelTokenizer::from_dir(&dir).unwrap();
    let prompt = Prompt {
        text: text.into(),
        chat: true,
        history: history.to_vec(),
        ..Default::default()
    };
    let ids = generate::prompt::ids(&tok, &prompt).unwrap();
    let d = generate::GenerationDefaults::from_dir(&dir);
    let options = GenerateOptions {
        max_new_tokens: n,
        sampling: Default::default(),
        seed: 0,
        stop_ids: generate::stop_ids(&d.eos_ids, &tok),
    };
    let g = generate::generate(&model, &ids, &options, &mut |_| ControlFlow::Continue(())).unwrap();
    tok.decode(&g.tokens).unwrap()
}

fn answered(a: &FineTuneApp, n: usize) -> bool {
    a.playground().exchanges.len() == n && !a.playground().is_answering()
}

#[test]
fn a_demo_run_shows_samples_then_base_and_tuned_answer_side_by_side() {
    let out = tempfile::tempdir().unwrap();
    let mut h = harness(out.path());
    h.run();
    h.get_by_label("Try the demo").click();
    wait_for(&mut h, "the demo to load", |a| {
        a.model_summary().is_some()
            && matches!(a.dataset_outcome(), Some(Outcome::Loaded(_)))
            && !a.is_busy()
    });
    {
        let s = h.state_mut().settings_mut();
        s.steps = 10;
        s.eval_every = 5;
        s.lr = 1e-2;
    }
    h.state_mut().set_step(Step::Train);
    h.run();
    h.get_by_label("Start training").click();
    wait_for(&mut h, "the run to end", |a| {
        let s = a.run_view().state;
        s != RunState::Idle && !s.is_active()
    });
    let view = h.state().run_view().clone();
    assert_eq!(view.state, RunState::Finished, "{:?}", view.log);
    let steps: Vec<usize> = view.samples.iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, [0, 5, 10]);
    assert!(view.samples.iter().all(|(_, a)| a.len() == 3));
    assert!(has_label(&h, "Sample answers") && has_label(&h, "Before training (step 0)"));
    let adapter_dir = view.final_adapter.clone().unwrap();

    // "Try it…" opens the Try step with the run's adapter.
    h.get_by_label("Try it…").click();
    h.run();
    assert_eq!(h.state().step(), Step::Try);
    assert_eq!(
        h.state().playground().adapter(),
        Some(adapter_dir.clone()),
        "the run's adapter is filled in"
    );
    let question = "How many yards did Patrick Mahomes throw for?";
    h.state_mut().playground_mut().max_new_tokens = 12;
    h.state_mut().playground_mut().input = question.into();
    h.run();
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::Enter);
    wait_for(&mut h, "both answers", |a| answered(a, 1));
    let p = h.state().playground();
    assert_eq!(p.error, None);
    let e = &p.exchanges[0];
    let (base, tuned) = (e.base.clone().unwrap(), e.tuned.clone().unwrap());
    assert_eq!(base.text, expected(None, &[], question, 12));
    assert_eq!(tuned.text, expected(Some(&adapter_dir), &[], question, 12));
    assert_ne!(
        base.text, tuned.text,
        "ten steps at lr 1e-2 change the answer"
    );
    assert!(base.stats.unwrap().decode_tok_s > 0.0);
    assert!(p.input.is_empty(), "the box empties on send");
    assert!(has_label(&h, "Base") && has_label(&h, "Tuned") && has_label(&h, "tok/s"));

    // The conversation goes on: each side sees its own earlier answer.
    let follow = "And in the first half?";
    h.state_mut().playground_mut().input = follow.into();
    h.run();
    h.get_by_label("Send").click();
    wait_for(&mut h, "the second answers", |a| answered(a, 2));
    let e = h.state().playground().exchanges[1].clone();
    let turn = |text: &str| Turn {
        user: question.into(),
        assistant: text.into(),
    };
    assert_eq!(
        e.base.unwrap().text,
        expected(None, &[turn(&base.text)], follow, 12)
    );
    assert_eq!(
        e.tuned.unwrap().text,
        expected(Some(&adapter_dir), &[turn(&tuned.text)], follow, 12)
    );

    // Stop ends both answers; Clear forgets the conversation.
    h.state_mut().playground_mut().max_new_tokens = 4000;
    h.state_mut().playground_mut().input = "Tell me everything.".into();
    h.run();
    h.get_by_label("Send").click();
    // The click lands in the next frame, the send in the one after; Stop right then (the demo
    // model needs far longer than two frames for its 200-odd tokens).
    h.step();
    h.step();
    assert!(h.state().playground().is_answering());
    h.get_by_label("Stop").click();
    wait_for(&mut h, "the stopped answers", |a| answered(a, 3));
    let e = h.state().playground().exchanges[2].clone();
    for a in [e.base.unwrap(), e.tuned.unwrap()] {
        let s = a.stats.unwrap();
        assert_eq!(s.finish, generate::Finish::Cancelled, "{s:?}");
    }
    h.get_by_label("Clear").click();
    h.run();
    assert!(h.state().playground().exchanges.is_empty());

    // A folder that is not an adapter: the error says so and the message stays in the box.
    let not_adapter = out.path().join("empty");
    std::fs::create_dir_all(&not_adapter).unwrap();
    h.state_mut().playground_mut().adapter_text = not_adapter.display().to_string();
    h.state_mut().playground_mut().input = question.into();
    h.run();
    h.get_by_label("Send").click();
    wait_for(&mut h, "the load error", |a| a.playground().error.is_some());
    let p = h.state().playground();
    assert!(
        p.error.as_deref().unwrap().contains("adapter_config.json"),
        "{:?}",
        p.error
    );
    assert_eq!(p.input, question);
    assert!(p.exchanges.is_empty());
}
