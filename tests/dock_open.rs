//! Files that macOS opens with FineTune (Dock icon, "Open With") load like a drop on the window.
//! Its own test binary: the queue is process-wide, and other app tests would drain it.
// Tests panic on purpose: unwrap/expect are how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use egui_kittest::Harness;
use finetune::ui::FineTuneApp;

#[test]
fn paths_opened_through_the_system_load_like_a_drop() {
    let assets = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets");
    let mut harness = Harness::new_eframe(|cc| FineTuneApp::new(cc, Vec::new()));
    harness.run_steps(2);
    assert_eq!(harness.state().settings().train_data, None);
    finetune::macos::push_opened_paths(vec![assets.join("demo/train.jsonl")]);
    harness.run_steps(2);
    let train = harness.state().settings().train_data.clone();
    assert_eq!(
        train,
        Some(std::fs::canonicalize(assets.join("demo/train.jsonl")).unwrap())
    );
    assert!(finetune::macos::take_opened_paths().is_empty());
}
