//! The central panel: the notices above it and the current step's panel. Panels return actions
//! that the next `logic()` carries out.

use eframe::egui;
use egui::{Color32, RichText, Ui};

use super::{Action, FineTuneApp, Step};
use crate::ui::compute::compute_ui;
use crate::ui::export::ExportAction;
use crate::ui::models::ModelAction;
use crate::ui::settings::settings_ui;
use crate::ui::train::{train_ui, TrainAction};

impl FineTuneApp {
    pub(super) fn central_ui(&mut self, ui: &mut Ui) {
        self.notices_ui(ui);
        match self.step {
            Step::Model => self.model_step_ui(ui),
            Step::Dataset => {
                let acts = self.dataset.dataset_ui(ui, &self.settings);
                self.actions.extend(acts.into_iter().map(Action::Data));
            }
            Step::Settings => self.settings_step_ui(ui),
            Step::Train => {
                let blockers = self.blockers();
                let summary = self.run_summary();
                match train_ui(ui, &self.run, &blockers, &summary) {
                    Some(TrainAction::Start) => self.actions.push(Action::Start),
                    Some(TrainAction::Stop) => self.actions.push(Action::Stop),
                    Some(TrainAction::GoTo(s)) => self.actions.push(Action::GoTo(s)),
                    Some(TrainAction::OpenFolder(p)) => self.actions.push(Action::OpenFolder(p)),
                    Some(TrainAction::SaveCsv) => self.actions.push(Action::SaveCsv),
                    None => {}
                }
            }
            Step::Try => {
                if !self.run.state.is_active() {
                    let adapter = self.run.final_adapter.clone();
                    self.playground.offer_run_adapter(adapter);
                }
                let cx = self.try_context();
                if self.playground.try_ui(ui, &cx) {
                    self.actions.push(Action::TrySend);
                }
            }
            Step::Export => self.export_step_ui(ui),
        }
        if !self.actions.is_empty() {
            ui.ctx().request_repaint();
        }
    }

    /// The messages above the panel, each with its Dismiss button.
    fn notices_ui(&mut self, ui: &mut Ui) {
        let mut dismissed = None;
        for (i, n) in self.notices.iter().enumerate() {
            let color = if n.error {
                ui.visuals().error_fg_color
            } else {
                Color32::from_rgb(40, 150, 70)
            };
            egui::Frame::group(ui.style()).show(ui, |ui| {
                ui.set_width(ui.available_width());
                ui.horizontal_wrapped(|ui| {
                    ui.label(RichText::new(&n.text).color(color));
                    if ui.small_button("Dismiss").clicked() {
                        dismissed = Some(i);
                    }
                });
            });
        }
        if let Some(i) = dismissed {
            self.notices.remove(i);
        }
        if !self.notices.is_empty() {
            ui.add_space(6.0);
        }
    }

    fn model_step_ui(&mut self, ui: &mut Ui) {
        let chosen = self.settings.model_dir.clone();
        egui::ScrollArea::vertical()
            .id_salt("model-step")
            .show(ui, |ui| {
                let token = &mut self.settings.hf_token;
                match self.models.models_ui(ui, chosen.as_deref(), token) {
                    Some(ModelAction::Choose(p)) => self.actions.push(Action::ChooseModel(p)),
                    Some(ModelAction::TryDemo) => self.actions.push(Action::TryDemo),
                    None => {}
                }
            });
    }

    fn settings_step_ui(&mut self, ui: &mut Ui) {
        let problems = self.settings.problems(self.models.summary.as_ref());
        egui::ScrollArea::vertical()
            .id_salt("settings-step")
            .show(ui, |ui| {
                ui.heading("3. Training settings");
                settings_ui(
                    ui,
                    &mut self.settings,
                    self.models.summary.as_ref(),
                    &problems,
                );
                ui.add_space(12.0);
                compute_ui(
                    ui,
                    &mut self.settings,
                    self.models.summary.as_ref(),
                    self.status.plan(),
                );
                ui.add_space(12.0);
                ui.heading("Hugging Face");
                self.models.hub_token_ui(ui, &mut self.settings.hf_token);
                ui.add_space(12.0);
                let ready = self.settings.model_dir.is_some() && self.settings.train_data.is_some();
                let config =
                    ready.then(|| self.settings.to_config(self.settings.output_root.clone()));
                self.elsewhere.run_elsewhere_ui(ui, config);
            });
    }

    fn export_step_ui(&mut self, ui: &mut Ui) {
        if self.export.dest_text.is_empty() {
            let dir = self.settings.export_dir.clone().unwrap_or_else(|| {
                self.settings
                    .output_root
                    .join("exports")
                    .join(format!("{}-lora", self.model_name().replace('/', "-")))
            });
            self.export.dest_text = dir.display().to_string();
        }
        let base = self.export_base();
        egui::ScrollArea::vertical()
            .id_salt("export-step")
            .show(ui, |ui| {
                match self.export.export_ui(ui, &self.run, base.as_deref()) {
                    Some(ExportAction::Export { adapter, dest }) => {
                        self.actions.push(Action::Export { adapter, dest })
                    }
                    Some(ExportAction::OpenFolder(p)) => self.actions.push(Action::OpenFolder(p)),
                    None => {}
                }
                ui.add_space(12.0);
                ui.heading("From a job run elsewhere");
                self.elsewhere.import_ui(ui);
            });
    }
}
