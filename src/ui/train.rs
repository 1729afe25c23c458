//! Step 4, training: what is missing before a start, Start / Stop, the progress line (step, ETA,
//! tokens/s), the outcome (where the adapter was saved), the live charts and the event log.

use eframe::egui;
use egui::{Color32, RichText, Ui};

use super::app::Step;
use super::charts::run_charts_ui;
use super::run_view::{LogKind, RunState, RunView};
use super::settings::error_color;
use super::{format_duration, model_text};
use crate::train::StopReason;

/// What the train panel asks the app to do.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainAction {
    /// Start a run with the current settings.
    Start,
    /// Stop the run after the current step, saving its adapter.
    Stop,
    /// Show this step (a blocker's fix, or Export after a run).
    GoTo(Step),
    /// Open this folder (the saved adapter) in the file manager.
    OpenFolder(std::path::PathBuf),
    /// Save every point of the charts as CSV in the run's folder.
    SaveCsv,
}

/// A reason training cannot start, and the step that fixes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Blocker {
    /// The step whose panel fixes it.
    pub step: Step,
    /// What is missing, as listed under "Before you start:".
    pub message: String,
}

/// The train step. `blockers` empty = ready to start.
pub fn train_ui(
    ui: &mut Ui,
    view: &RunView,
    blockers: &[Blocker],
    summary: &str,
) -> Option<TrainAction> {
    ui.heading("4. Train the adapter");
    ui.weak(summary);
    ui.add_space(4.0);

    let active = view.state.is_active();
    let mut action = None;
    if !active && !blockers.is_empty() {
        action = blockers_ui(ui, blockers);
        ui.add_space(4.0);
    }
    if let Some(a) = buttons_ui(ui, view, !active && blockers.is_empty()) {
        action = Some(a);
    }
    if view.state != RunState::Idle {
        progress_ui(ui, view);
    }
    if let Some(a) = outcome_ui(ui, view) {
        action = Some(a);
    }
    ui.add_space(6.0);

    let log_height = 130.0;
    egui::Panel::bottom("train-log")
        .resizable(true)
        .default_size(log_height)
        .show(ui, |ui| log_ui(ui, view));
    egui::CentralPanel::default_margins().show(ui, |ui| {
        if view.state == RunState::Idle {
            ui.add_space(20.0);
            ui.vertical_centered(|ui| {
                ui.weak("Live charts of loss, learning rate, throughput and memory appear here once training starts.");
            });
            return;
        }
        egui::ScrollArea::vertical()
            .id_salt("charts")
            .show(ui, |ui| {
                if !view.loss.is_empty()
                    && ui
                        .small_button("Save chart data (CSV)")
                        .on_hover_text("Every point of every chart, one row per step, as metrics.csv in the run's folder")
                        .clicked()
                {
                    action = Some(TrainAction::SaveCsv);
                }
                run_charts_ui(ui, view);
                samples_ui(ui, view);
            });
    });
    action
}

/// "Before you start:" with a Go-to button per blocker.
fn blockers_ui(ui: &mut Ui, blockers: &[Blocker]) -> Option<TrainAction> {
    let mut action = None;
    egui::Frame::group(ui.style()).show(ui, |ui| {
        ui.set_width(ui.available_width());
        ui.strong("Before you start:");
        for b in blockers {
            ui.horizontal(|ui| {
                if ui
                    .small_button(format!("Go to {}", b.step.title()))
                    .clicked()
                {
                    action = Some(TrainAction::GoTo(b.step));
                }
                ui.label(RichText::new(&b.message).color(error_color(ui)));
            });
        }
    });
    action
}

/// Start and Stop, and the run state.
fn buttons_ui(ui: &mut Ui, view: &RunView, can_start: bool) -> Option<TrainAction> {
    let mut action = None;
    ui.horizontal(|ui| {
        let start =
            egui::Button::new(RichText::new("Start training").strong()).fill(if can_start {
                Color32::from_rgb(30, 110, 60)
            } else {
                ui.visuals().widgets.inactive.bg_fill
            });
        if ui
            .add_enabled(can_start, start)
            .on_hover_text("Cmd/Ctrl+Enter")
            .clicked()
        {
            action = Some(TrainAction::Start);
        }
        let can_stop = matches!(view.state, RunState::Starting | RunState::Running);
        if ui
            .add_enabled(can_stop, egui::Button::new("Stop"))
            .on_hover_text(
                "Finishes the current step, saves the adapter and says where (Cmd/Ctrl+.)",
            )
            .clicked()
        {
            action = Some(TrainAction::Stop);
        }
        ui.label(format!("State: {}", view.state.label()));
    });
    action
}

fn progress_ui(ui: &mut Ui, view: &RunView) {
    let total = view.total_steps;
    let (text, fraction) = match view.reading {
        _ if total > 0 => (format!("Step {} of {total}", view.step), view.progress()),
        Some((done, all)) if all > 0 => (
            format!(
                "Reading the dataset: {:.0} of {:.0} MB",
                done as f64 / 1e6,
                all as f64 / 1e6
            ),
            done as f32 / all as f32,
        ),
        _ => ("Loading the model and data…".to_owned(), 0.0),
    };
    ui.add(
        egui::ProgressBar::new(fraction)
            .text(text.clone())
            .desired_height(20.0),
    );
    ui.horizontal_wrapped(|ui| {
        ui.label(text);
        if let Some(eta) = view.eta_secs.filter(|_| view.state.is_active()) {
            ui.label(format!("ETA {}", format_duration(eta)));
        }
        ui.label(format!("elapsed {}", format_duration(view.elapsed_secs)));
        if let Some(tps) = view.tokens_per_sec {
            ui.label(format!("{tps:.0} tokens/s"));
        }
        if view.epoch > 0.0 {
            ui.label(format!("epoch {:.2}", view.epoch));
        }
        if let Some(l) = view.last_loss() {
            ui.label(format!("loss {l:.4}"));
        }
        if let Some(v) = view.last_val_loss() {
            ui.label(format!("val loss {v:.4}"));
        }
        if let Some(info) = &view.info {
            ui.weak(format!(
                "{} on {}, {} trainable parameters",
                info.model, info.device, info.trainable_params
            ));
        }
    });
}

/// The end of a run: where the adapter is, or what went wrong and what to do.
fn outcome_ui(ui: &mut Ui, view: &RunView) -> Option<TrainAction> {
    let mut action = None;
    let (headline, color) = match view.state {
        RunState::Stopped => {
            let why = match &view.stop_reason {
                // The headline already says it.
                Some(StopReason::StoppedByUser { .. }) => String::new(),
                Some(reason) => format!(": {reason}"),
                None => ": stop requested".to_owned(),
            };
            (
                format!("Stopped at step {}{why}. The adapter is saved:", view.step),
                Color32::from_rgb(200, 140, 20),
            )
        }
        RunState::Finished => (
            "Finished. The adapter is saved:".to_owned(),
            Color32::from_rgb(40, 150, 70),
        ),
        RunState::Failed => {
            ui.label(
                RichText::new(format!(
                    "Training failed: {}",
                    view.error.as_deref().unwrap_or("unknown error")
                ))
                .color(error_color(ui)),
            );
            ui.weak("Check the model and dataset steps, lower the batch size or sequence length if memory ran out, then start again.");
            return None;
        }
        _ => return None,
    };
    let path = view.final_adapter.clone()?;
    egui::Frame::group(ui.style()).show(ui, |ui| {
        ui.set_width(ui.available_width());
        ui.label(RichText::new(headline).color(color).strong());
        ui.horizontal(|ui| {
            ui.monospace(path.display().to_string());
            if ui.button("Open folder").clicked() {
                action = Some(TrainAction::OpenFolder(path.clone()));
            }
            if ui
                .button("Try it…")
                .on_hover_text("Ask the base and the tuned model side by side")
                .clicked()
            {
                action = Some(TrainAction::GoTo(Step::Try));
            }
            if ui.button("Export…").clicked() {
                action = Some(TrainAction::GoTo(Step::Export));
            }
        });
    });
    action
}

/// The sample answers of each evaluation, newest first, each next to its expected answer.
fn samples_ui(ui: &mut Ui, view: &RunView) {
    if view.samples.is_empty() {
        return;
    }
    ui.add_space(8.0);
    ui.heading("Sample answers");
    ui.weak("Greedy answers to validation prompts at each evaluation, newest first.");
    for (i, (step, answers)) in view.samples.iter().rev().enumerate() {
        let title = if *step == 0 {
            "Before training (step 0)".to_owned()
        } else {
            format!("Step {step}")
        };
        egui::CollapsingHeader::new(RichText::new(title).strong())
            .id_salt(("samples", step))
            .default_open(i == 0)
            .show(ui, |ui| {
                ui.columns(3, |c| {
                    c[0].strong("Prompt");
                    c[1].strong("Expected");
                    c[2].strong("Model's answer");
                });
                for a in answers {
                    ui.separator();
                    ui.columns(3, |c| {
                        // Columns justify their text; answers read better ragged.
                        let left = egui::Layout::top_down(egui::Align::LEFT);
                        c[0].with_layout(left, |ui| {
                            ui.label(model_text(&a.prompt))
                                .on_hover_text(format!("validation line {}", a.line))
                        });
                        c[1].with_layout(left, |ui| ui.weak(model_text(&a.expected)));
                        c[2].with_layout(left, |ui| ui.label(model_text(&a.answer)));
                    });
                }
            });
    }
}

fn log_ui(ui: &mut Ui, view: &RunView) {
    ui.strong("Log");
    let row_height = ui.text_style_height(&egui::TextStyle::Monospace);
    // Only the visible rows are laid out, so a long log costs nothing per frame.
    egui::ScrollArea::vertical()
        .id_salt("log")
        .stick_to_bottom(true)
        .auto_shrink([false, false])
        .show_rows(ui, row_height, view.log.len(), |ui, rows| {
            for line in &view.log[rows] {
                let color = match line.kind {
                    LogKind::Info => ui.visuals().text_color(),
                    LogKind::Eval => Color32::from_rgb(230, 120, 30),
                    LogKind::Saved => Color32::from_rgb(40, 150, 70),
                    LogKind::Error => error_color(ui),
                };
                ui.add(
                    egui::Label::new(RichText::new(&line.text).monospace().color(color)).truncate(),
                );
            }
        });
}
