//! What the app shows that is derived from its state rather than stored: why training cannot
//! start yet, each step's status line, the one-line run summary, and the facts for the model card.

use std::path::PathBuf;

use super::{FineTuneApp, Step};
use crate::export::{today, CardInfo};
use crate::ui::dataset::{DataKey, Outcome};
use crate::ui::playground::LoadState;
use crate::ui::run_view::RunState;
use crate::ui::settings::{DurationKind, Preset};
use crate::ui::train::Blocker;

impl FineTuneApp {
    /// Reasons training cannot start, each with the step that fixes it.
    pub fn blockers(&self) -> Vec<Blocker> {
        let mut out: Vec<Blocker> = self
            .settings
            .problems(self.models.summary.as_ref())
            .into_iter()
            .map(|p| Blocker {
                step: match p.field {
                    "model_dir" => Step::Model,
                    "train_data" | "valid_data" => Step::Dataset,
                    _ => Step::Settings,
                },
                message: p.message,
            })
            .collect();
        if let Some(e) = &self.models.error {
            out.push(Blocker {
                step: Step::Model,
                message: e.clone(),
            });
        }
        let current = DataKey::from_settings(&self.settings);
        if let Some(r) = self
            .dataset
            .report
            .as_ref()
            .filter(|r| Some(&r.key) == current.as_ref())
        {
            match &r.outcome {
                Outcome::Problems(p) => out.push(Blocker {
                    step: Step::Dataset,
                    message: format!(
                        "the dataset has {} problem(s); fix them or choose another file",
                        p.len()
                    ),
                }),
                Outcome::Failed(e) => out.push(Blocker {
                    step: Step::Dataset,
                    message: e.clone(),
                }),
                Outcome::Loaded(_) => {}
            }
        }
        out
    }

    pub(super) fn model_name(&self) -> String {
        match (&self.models.summary, &self.settings.model_dir) {
            (Some(s), _) => s.name.clone(),
            (None, Some(d)) => crate::inspect::display_name(d),
            (None, None) => "model".into(),
        }
    }

    pub(super) fn card_info(&self) -> CardInfo {
        let name = |p: &Option<PathBuf>| {
            p.as_ref()
                .and_then(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
        };
        let config = self
            .run_config
            .clone()
            .unwrap_or_else(|| self.settings.to_config(self.settings.output_root.clone()));
        CardInfo {
            base_model: self.model_name(),
            dataset: name(&Some(config.train_data.clone())).unwrap_or_default(),
            valid_dataset: name(&config.valid_data),
            steps_done: self.run.step,
            total_steps: self.run.total_steps,
            final_loss: self.run.final_loss.or(self.run.last_loss()),
            final_val_loss: self.run.final_val_loss.or(self.run.last_val_loss()),
            best_val_loss: self.run.best_val.map(|b| b.1),
            date: today(),
            config,
        }
    }

    /// One line under each step in the side panel, and whether it is in order.
    pub(super) fn step_status(&self, step: Step) -> (String, bool) {
        match step {
            Step::Model => match (&self.models.summary, &self.models.error) {
                (Some(s), _) => (s.name.clone(), true),
                (None, Some(_)) => ("cannot be used".into(), false),
                (None, None) => ("not chosen".into(), false),
            },
            Step::Dataset => match (
                &self.settings.train_data,
                self.dataset.report.as_ref().map(|r| &r.outcome),
            ) {
                (None, _) => ("no file yet".into(), false),
                (Some(_), _) if self.dataset.is_busy() => ("reading…".into(), true),
                (Some(_), Some(Outcome::Loaded(l))) => (
                    format!("{} records, {}", l.train.records, l.train.format),
                    true,
                ),
                (Some(_), Some(Outcome::Problems(p))) => (format!("{} problem(s)", p.len()), false),
                (Some(_), Some(Outcome::Failed(_))) => ("cannot be read".into(), false),
                (Some(_), None) => ("waiting for a model".into(), false),
            },
            Step::Settings => {
                let n = self
                    .settings
                    .problems(self.models.summary.as_ref())
                    .iter()
                    .filter(|p| !matches!(p.field, "model_dir" | "train_data" | "valid_data"))
                    .count();
                if n > 0 {
                    (format!("{n} to fix"), false)
                } else {
                    (
                        Preset::matching(
                            &self.settings,
                            self.models.summary.as_ref().map(|m| m.context_length),
                        )
                        .map_or("custom", |p| p.label())
                        .to_lowercase(),
                        true,
                    )
                }
            }
            Step::Train => match self.run.state {
                RunState::Running | RunState::Stopping => (
                    format!("step {} of {}", self.run.step, self.run.total_steps),
                    true,
                ),
                RunState::Failed => ("failed".into(), false),
                s => (s.label().into(), true),
            },
            Step::Try => {
                let p = &self.playground;
                let text = if p.is_answering() {
                    "answering…"
                } else if p.load == LoadState::Loading {
                    "loading…"
                } else if p.adapter().is_some() || self.run.latest_adapter().is_some() {
                    "base vs tuned"
                } else {
                    "base model"
                };
                (text.into(), true)
            }
            Step::Export => match &self.export.result {
                Some(Ok(_)) => ("exported".into(), true),
                Some(Err(_)) => ("failed".into(), false),
                None if self.run.latest_adapter().is_some() => ("adapter ready".into(), true),
                None => ("after training".into(), true),
            },
        }
    }

    /// One line saying what Start would run.
    pub(super) fn run_summary(&self) -> String {
        let s = &self.settings;
        let file = |p: &Option<PathBuf>| {
            p.as_ref()
                .and_then(|p| p.file_name())
                .map_or_else(|| "-".to_owned(), |n| n.to_string_lossy().into_owned())
        };
        let duration = match s.duration {
            DurationKind::Steps => format!("{} steps", s.steps),
            DurationKind::Epochs => format!("{} epochs", s.epochs),
        };
        format!(
            "{} on {}{}: {duration}, batch {} × {}, lr {:.1e}, rank {}; runs are saved in {}",
            self.model_name(),
            file(&s.train_data),
            s.valid_data.as_ref().map_or(String::new(), |_| format!(
                " (validation {})",
                file(&s.valid_data)
            )),
            s.batch_size,
            s.grad_accum,
            s.lr,
            s.lora_rank,
            s.output_root.display()
        )
    }
}
