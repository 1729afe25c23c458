//! Run elsewhere (issue 21) in the app: the Settings step writes the job of the current settings
//! for TRL, Axolotl or mlx-lm into a folder; the Try and Export steps import the adapter such a
//! run wrote (PEFT, or mlx-lm's converted), which both steps then offer.

use std::path::PathBuf;

use eframe::egui;
use egui::Ui;

use super::settings::error_color;
use super::{pick_path, take_ready, Job, Pick};
use crate::export::job::{export_job, import_adapter, ImportedAdapter, JobExport, JobTarget};
use crate::train::TrainConfig;

/// The panel's state: the job being written and the adapter being imported.
#[derive(Default)]
pub struct ElsewherePanel {
    target: Option<JobTarget>,
    /// Where the job is written.
    pub dest_text: String,
    writing: Option<Job<Result<JobExport, String>>>,
    written: Option<Result<JobExport, String>>,
    browse_dest: Option<Job<Option<PathBuf>>>,
    /// The job run's output folder to import from.
    pub import_text: String,
    importing: Option<Job<Result<ImportedAdapter, String>>>,
    import_error: Option<String>,
    browse_import: Option<Job<Option<PathBuf>>>,
    /// The imported adapter (a PEFT folder), once there is one.
    pub imported: Option<PathBuf>,
}

fn target_label(t: JobTarget) -> &'static str {
    match t {
        JobTarget::Trl => "TRL + accelerate (GPU clusters: DDP, FSDP, DeepSpeed)",
        JobTarget::Axolotl => "Axolotl (a YAML for axolotl train)",
        JobTarget::MlxLm => "mlx-lm (one Mac, or several with mlx.launch)",
    }
}

impl ElsewherePanel {
    /// Collects finished work; returns a newly imported adapter.
    pub fn poll(&mut self) -> Option<PathBuf> {
        if let Some(r) = take_ready(&mut self.writing) {
            self.written = Some(r.and_then(|x| x));
        }
        if let Some(Ok(Some(p))) = take_ready(&mut self.browse_dest) {
            self.dest_text = p.display().to_string();
        }
        if let Some(Ok(Some(p))) = take_ready(&mut self.browse_import) {
            self.import_text = p.display().to_string();
        }
        match take_ready(&mut self.importing)?.and_then(|x| x) {
            Ok(found) => {
                self.import_error = None;
                self.imported = Some(found.dir.clone());
                Some(found.dir)
            }
            Err(e) => {
                self.import_error = Some(e);
                None
            }
        }
    }

    /// The Settings step's section: which trainer, where, and "Write job" (`config` is the run
    /// the current settings make, `None` until a model and data are chosen).
    pub fn run_elsewhere_ui(&mut self, ui: &mut Ui, config: Option<TrainConfig>) {
        if self.dest_text.is_empty() {
            if let Some(c) = &config {
                self.dest_text = c.out_dir.join("jobs").join("job").display().to_string();
            }
        }
        ui.heading("Run elsewhere");
        ui.label("When this Mac is not enough: write these settings as a job for a trainer that scales, with the data encoded as FineTune encodes it (the same tokens and loss mask). Bring its adapter back in step 6 (From a job run elsewhere): Try and Export then offer it.");
        let target = self.target.get_or_insert(JobTarget::Trl);
        egui::ComboBox::from_label("Trainer")
            .selected_text(target_label(*target))
            .show_ui(ui, |ui| {
                for t in [JobTarget::Trl, JobTarget::Axolotl, JobTarget::MlxLm] {
                    ui.selectable_value(target, t, target_label(t));
                }
            });
        let target = *target;
        ui.horizontal(|ui| {
            let l = ui.label("Job folder:");
            ui.add(
                egui::TextEdit::singleline(&mut self.dest_text)
                    .hint_text("/path/to/my-job")
                    .desired_width(380.0),
            )
            .labelled_by(l.id);
            if ui
                .add_enabled(self.browse_dest.is_none(), egui::Button::new("Choose…"))
                .clicked()
            {
                self.browse_dest = Some(pick_path(ui.ctx(), Pick::Folder, "Write the job to…"));
            }
        });
        let dest = PathBuf::from(self.dest_text.trim());
        let ready = config.is_some() && !self.dest_text.trim().is_empty() && self.writing.is_none();
        if ui
            .add_enabled(ready, egui::Button::new("Write job"))
            .on_disabled_hover_text("Choose a model, a dataset and a job folder first")
            .clicked()
        {
            if let Some(config) = config {
                self.written = None;
                self.writing = Some(Job::spawn(ui.ctx(), "job-export", move || {
                    export_job(&config, target, &dest).map_err(|e| format!("{e:#}"))
                }));
            }
        }
        if self.writing.is_some() {
            ui.horizontal(|ui| {
                ui.spinner();
                ui.label("Writing the job (encoding the data)…");
            });
        }
        match &self.written {
            Some(Ok(done)) => {
                ui.label(format!("Job written: {}", done.dir.display()));
                ui.weak("See its README.md for how to run it.");
                for n in &done.notes {
                    ui.weak(format!("Not carried over: {n}"));
                }
            }
            Some(Err(e)) => {
                ui.label(egui::RichText::new(e).color(error_color(ui)));
            }
            None => {}
        }
    }

    /// "Import from a job run": the run's output folder, and Import.
    pub fn import_ui(&mut self, ui: &mut Ui) {
        ui.horizontal(|ui| {
            let l = ui.label("Adapter from a job run elsewhere:");
            ui.add(
                egui::TextEdit::singleline(&mut self.import_text)
                    .hint_text("the job's output folder")
                    .desired_width(320.0),
            )
            .labelled_by(l.id);
            if ui
                .add_enabled(self.browse_import.is_none(), egui::Button::new("Choose…"))
                .clicked()
            {
                self.browse_import = Some(pick_path(
                    ui.ctx(),
                    Pick::Folder,
                    "The job run's output folder",
                ));
            }
            let dir = PathBuf::from(self.import_text.trim());
            if ui
                .add_enabled(
                    !self.import_text.trim().is_empty() && self.importing.is_none(),
                    egui::Button::new("Import"),
                )
                .clicked()
            {
                self.importing = Some(Job::spawn(ui.ctx(), "job-import", move || {
                    import_adapter(&dir).map_err(|e| format!("{e:#}"))
                }));
            }
        });
        if let Some(e) = &self.import_error {
            ui.label(egui::RichText::new(e).color(error_color(ui)));
        }
        if let Some(p) = &self.imported {
            ui.weak(format!("Imported: {}", p.display()));
        }
    }
}
