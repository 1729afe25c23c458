//! Step 2, the dataset: training and optional validation JSONL (dropped on the window, picked in a
//! dialog or typed), read on a worker thread through the model's tokenizer and chat template. Shows
//! the detected format, counts, a token-length histogram, the first records as the model sees
//! them (the masked prompt greyed), and every problem with its line number.

use std::path::PathBuf;

use eframe::egui;
use egui::text::LayoutJob;
use egui::{Color32, FontId, RichText, TextFormat, Ui};

use super::charts::histogram_ui;
use super::settings::{error_color, Settings};
use super::{pick_path, take_ready, Job, Pick};
use crate::data::{DatasetSummary, PreviewRecord, TemplateUse};

mod read;
pub use read::{
    read_dataset, DataKey, DatasetReport, LoadedReport, Outcome, ProblemLine, PREVIEW_RECORDS,
};

/// Characters shown per previewed record.
const PREVIEW_CHARS: usize = 1500;
/// Problems listed (the rest are counted).
const MAX_PROBLEMS_SHOWN: usize = 200;

/// What the dataset panel asks the app to do.
#[derive(Debug, Clone, PartialEq)]
pub enum DatasetAction {
    /// Use this training file.
    SetTrain(PathBuf),
    /// Use this validation file (`None`: hold out part of the training file).
    SetValid(Option<PathBuf>),
}

/// The dataset step's state.
#[derive(Default)]
pub struct DatasetPanel {
    job: Option<Job<Outcome>>,
    /// Bytes read and in all of the running read (the worker stores, the panel shows).
    reading: std::sync::Arc<[std::sync::atomic::AtomicU64; 2]>,
    job_key: Option<DataKey>,
    /// The last finished read, if any.
    pub report: Option<DatasetReport>,
    browse_train: Option<Job<Option<PathBuf>>>,
    browse_valid: Option<Job<Option<PathBuf>>>,
    train_text: String,
    valid_text: String,
}

impl DatasetPanel {
    /// Starts reading `key` unless it is already read or being read. One read at a time: a newer
    /// key waits for the running read, so dragging a setting does not start a read per frame.
    pub fn want(&mut self, ctx: &egui::Context, key: Option<DataKey>) {
        let Some(key) = key else {
            self.report = None;
            return;
        };
        if self.job.is_some() || self.report.as_ref().is_some_and(|r| r.key == key) {
            return;
        }
        let k = key.clone();
        let reading = std::sync::Arc::new(Default::default());
        self.reading = std::sync::Arc::clone(&reading);
        let repaint = ctx.clone();
        self.job = Some(Job::spawn(ctx, "dataset", move || {
            read_dataset(&k, &|done, total| {
                use std::sync::atomic::Ordering::Relaxed;
                let [d, t]: &[std::sync::atomic::AtomicU64; 2] = &reading;
                d.store(done, Relaxed);
                t.store(total, Relaxed);
                repaint.request_repaint();
            })
        }));
        self.job_key = Some(key);
    }

    /// Whether a read is running.
    pub fn is_busy(&self) -> bool {
        self.job.is_some()
    }

    /// Collects a finished read and dialog results.
    pub fn poll(&mut self) -> Vec<DatasetAction> {
        if let Some(r) = take_ready(&mut self.job) {
            if let Some(key) = self.job_key.take() {
                let outcome = r.unwrap_or_else(Outcome::Failed);
                self.report = Some(DatasetReport { key, outcome });
            }
        }
        let mut actions = Vec::new();
        if let Some(Ok(Some(p))) = take_ready(&mut self.browse_train) {
            actions.push(DatasetAction::SetTrain(p));
        }
        if let Some(Ok(Some(p))) = take_ready(&mut self.browse_valid) {
            actions.push(DatasetAction::SetValid(Some(p)));
        }
        actions
    }

    /// Opens the dialog for the training file (Cmd/Ctrl+O).
    pub fn browse_train(&mut self, ctx: &egui::Context) {
        if self.browse_train.is_none() {
            self.browse_train = Some(pick_path(
                ctx,
                Pick::Jsonl,
                "Choose a training dataset (.jsonl)",
            ));
        }
    }

    /// The dataset step.
    pub fn dataset_ui(&mut self, ui: &mut Ui, s: &Settings) -> Vec<DatasetAction> {
        let mut actions = Vec::new();
        ui.heading("2. Add a dataset");
        ui.label("JSON Lines: one record per line, as {\"text\"}, {\"prompt\", \"completion\"}, {\"messages\"}, alpaca or sharegpt. Drop .jsonl files anywhere on the window.");
        ui.add_space(6.0);
        self.sync_path_texts(ui, s);
        egui::Grid::new("data-files")
            .num_columns(3)
            .spacing([8.0, 6.0])
            .show(ui, |ui| {
                self.train_row_ui(ui, &mut actions);
                self.valid_row_ui(ui, s, &mut actions);
            });
        ui.add_space(8.0);
        self.report_ui(ui, s);
        actions
    }

    /// Shows the chosen paths in the path fields, except in one being edited.
    fn sync_path_texts(&mut self, ui: &Ui, s: &Settings) {
        if !ui.memory(|m| m.has_focus(egui::Id::unique("train-path"))) {
            self.train_text = s
                .train_data
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
        }
        if !ui.memory(|m| m.has_focus(egui::Id::unique("valid-path"))) {
            self.valid_text = s
                .valid_data
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
        }
    }

    /// The training file row: path field and dialog button.
    fn train_row_ui(&mut self, ui: &mut Ui, actions: &mut Vec<DatasetAction>) {
        let r = path_edit_ui(
            ui,
            "Training file",
            &mut self.train_text,
            "train-path",
            "train.jsonl",
        );
        if r.lost_focus() && !self.train_text.trim().is_empty() {
            actions.push(DatasetAction::SetTrain(PathBuf::from(
                self.train_text.trim(),
            )));
        }
        ui.horizontal(|ui| {
            if ui
                .add_enabled(
                    self.browse_train.is_none(),
                    egui::Button::new("Choose training file…"),
                )
                .on_hover_text("Cmd/Ctrl+O")
                .clicked()
            {
                self.browse_train(ui.ctx());
            }
        });
        ui.end_row();
    }

    /// The validation file row: path field, dialog button and Clear.
    fn valid_row_ui(&mut self, ui: &mut Ui, s: &Settings, actions: &mut Vec<DatasetAction>) {
        let r = path_edit_ui(
            ui,
            "Validation file",
            &mut self.valid_text,
            "valid-path",
            "optional: valid.jsonl",
        );
        if r.lost_focus() {
            let t = self.valid_text.trim();
            actions.push(DatasetAction::SetValid(
                (!t.is_empty()).then(|| PathBuf::from(t)),
            ));
        }
        ui.horizontal(|ui| {
            if ui
                .add_enabled(
                    self.browse_valid.is_none(),
                    egui::Button::new("Choose validation file…"),
                )
                .on_hover_text("Choose a validation file")
                .clicked()
            {
                self.browse_valid = Some(pick_path(
                    ui.ctx(),
                    Pick::Jsonl,
                    "Choose a validation dataset (.jsonl)",
                ));
            }
            if s.valid_data.is_some()
                && ui
                    .button("Clear")
                    .on_hover_text("Hold out part of the training file instead")
                    .clicked()
            {
                actions.push(DatasetAction::SetValid(None));
            }
        });
        ui.end_row();
    }

    /// The running read's progress bar (a big file takes a while; the window stays live).
    fn reading_ui(&self, ui: &mut Ui) {
        use std::sync::atomic::Ordering::Relaxed;
        let [d, t]: &[std::sync::atomic::AtomicU64; 2] = &self.reading;
        let (done, total) = (d.load(Relaxed), t.load(Relaxed));
        let text = if total > 0 {
            format!(
                "Reading and tokenizing the dataset: {:.0} of {:.0} MB",
                done as f64 / 1e6,
                total as f64 / 1e6
            )
        } else {
            "Reading and tokenizing the dataset…".to_owned()
        };
        let fraction = if total > 0 {
            done as f32 / total as f32
        } else {
            0.0
        };
        ui.add(
            egui::ProgressBar::new(fraction)
                .text(text)
                .desired_height(18.0),
        );
        ui.ctx()
            .request_repaint_after(std::time::Duration::from_millis(200));
    }

    /// Below the files: the drop zone, what is missing, the reading spinner, or what was read.
    fn report_ui(&mut self, ui: &mut Ui, s: &Settings) {
        if s.train_data.is_none() {
            drop_zone_ui(ui);
            return;
        }
        if s.model_dir.is_none() {
            ui.label("Choose a model first (step 1): the preview shows the records through its tokenizer and chat template.");
            return;
        }
        if self.job.is_none()
            && self.report.is_some()
            && ui
                .small_button("Read again")
                .on_hover_text("After fixing the file on disk")
                .clicked()
        {
            self.report = None;
            ui.ctx().request_repaint();
        }
        if self.job.is_some() {
            self.reading_ui(ui);
        }
        let Some(report) = &self.report else {
            return;
        };
        if self.job.is_some() && report.key.train != s.train_data.clone().unwrap_or_default() {
            return;
        }
        match &report.outcome {
            Outcome::Failed(e) => {
                ui.label(RichText::new(e).color(error_color(ui)));
            }
            Outcome::Problems(p) => problems_ui(ui, p),
            Outcome::Loaded(l) => loaded_ui(ui, l, s.max_seq_len),
        }
    }
}

/// A path field of the files grid: its label, then a text edit with a stable `id` (so focus
/// survives frames).
fn path_edit_ui(
    ui: &mut Ui,
    label: &str,
    text: &mut String,
    id: &str,
    hint: &str,
) -> egui::Response {
    let l = ui.label(label);
    ui.add_sized(
        [460.0, 22.0],
        egui::TextEdit::singleline(text)
            .id(egui::Id::unique(id))
            .hint_text(hint)
            .desired_width(420.0),
    )
    .labelled_by(l.id)
}

fn drop_zone_ui(ui: &mut Ui) {
    egui::Frame::group(ui.style())
        .inner_margin(24.0)
        .show(ui, |ui| {
            ui.set_width(ui.available_width());
            ui.vertical_centered(|ui| {
                ui.label(RichText::new("Drop a .jsonl file here").size(18.0));
                ui.weak(
                    "Two files at once: the one named valid/eval/test validates, the other trains.",
                );
            });
        });
}

fn problems_ui(ui: &mut Ui, problems: &[ProblemLine]) {
    ui.label(
        RichText::new(format!(
            "{} problem{} found; fix the file and it is read again when you choose it, or pick another file.",
            problems.len(),
            if problems.len() == 1 { "" } else { "s" }
        ))
        .color(error_color(ui))
        .strong(),
    );
    egui::ScrollArea::vertical()
        .id_salt("problems")
        .max_height(400.0)
        .show(ui, |ui| {
            egui::Grid::new("problem-grid")
                .num_columns(2)
                .striped(true)
                .spacing([12.0, 4.0])
                .show(ui, |ui| {
                    for p in problems.iter().take(MAX_PROBLEMS_SHOWN) {
                        let place = match p.line {
                            Some(l) => format!("{} line {l}", p.file),
                            None => p.file.clone(),
                        };
                        ui.monospace(place);
                        ui.label(&p.message);
                        ui.end_row();
                    }
                });
            if problems.len() > MAX_PROBLEMS_SHOWN {
                ui.weak(format!("…and {} more", problems.len() - MAX_PROBLEMS_SHOWN));
            }
        });
}

fn loaded_ui(ui: &mut Ui, l: &LoadedReport, max_seq_len: usize) {
    ui.columns(2, |cols| {
        facts_ui(&mut cols[0], l);
        for n in length_notes(&l.train, max_seq_len) {
            cols[0].weak(n);
        }
        histogram_ui(&mut cols[1], "length-histogram", &l.train, max_seq_len);
    });
    ui.add_space(8.0);
    ui.horizontal(|ui| {
        ui.strong("Preview: the first records as the model sees them");
        ui.weak("(grey = prompt, not trained; bright = trained)");
    });
    egui::ScrollArea::vertical()
        .id_salt("preview")
        .auto_shrink([false, true])
        .show(ui, |ui| {
            for r in &l.preview {
                egui::Frame::group(ui.style()).show(ui, |ui| {
                    ui.set_width(ui.available_width());
                    ui.weak(format!("line {}", r.line));
                    let job = preview_job(ui, r);
                    ui.label(job);
                });
            }
        });
}

/// Format, template, record and token counts, and lengths of a dataset that read cleanly.
fn facts_ui(ui: &mut Ui, l: &LoadedReport) {
    let t = &l.train;
    let template = match t.template {
        TemplateUse::None => "none (not a chat)",
        TemplateUse::Model => "the model's chat template",
        TemplateUse::Fallback => "ChatML fallback (the model has none)",
    };
    egui::Grid::new("data-facts")
        .num_columns(2)
        .spacing([16.0, 4.0])
        .show(ui, |ui| {
            ui.weak("Format");
            ui.strong(t.format.to_string());
            ui.end_row();
            ui.weak("Template");
            ui.label(template);
            ui.end_row();
            ui.weak("Training records");
            ui.strong(t.records.to_string());
            ui.end_row();
            ui.weak("Validation");
            ui.label(match &l.valid {
                Some(v) => format!("{} records ({})", v.records, l.valid_note),
                None => l.valid_note.clone(),
            });
            ui.end_row();
            ui.weak("Tokens");
            ui.label(format!(
                "{} total, {} trained ({:.0}% masked)",
                t.total_tokens,
                t.trained_tokens,
                t.masked_fraction * 100.0
            ));
            ui.end_row();
            ui.weak("Length (tokens)");
            ui.label(format!(
                "p50 {}, p90 {}, max {}",
                t.length_p50, t.length_p90, t.length_max
            ));
            ui.end_row();
        });
}

/// Records truncated, dropped, or masked only approximately, in words (none when all is well).
fn length_notes(t: &DatasetSummary, max_seq_len: usize) -> Vec<String> {
    let mut notes = Vec::new();
    if t.truncated > 0 {
        notes.push(format!(
            "{} records truncated to {max_seq_len} tokens",
            t.truncated
        ));
    }
    if t.dropped > 0 {
        notes.push(format!("{} dropped as too long", t.dropped));
    }
    if t.untrainable > 0 {
        notes.push(format!(
            "{} dropped with nothing to train on",
            t.untrainable
        ));
    }
    if t.approximate_masks > 0 {
        notes.push(format!(
            "{} with approximate assistant masks",
            t.approximate_masks
        ));
    }
    notes
}

/// One previewed record as monospace text: the masked prompt grey, what trains bright, cut at
/// [`PREVIEW_CHARS`] characters.
fn preview_job(ui: &Ui, r: &PreviewRecord) -> LayoutJob {
    let mut job = LayoutJob::default();
    job.wrap.max_width = ui.available_width();
    let font = FontId::monospace(12.0);
    let masked = TextFormat {
        font_id: font.clone(),
        color: ui.visuals().weak_text_color(),
        ..Default::default()
    };
    let trained = TextFormat {
        font_id: font,
        color: ui.visuals().strong_text_color(),
        background: ui.visuals().extreme_bg_color,
        ..Default::default()
    };
    let mut left = PREVIEW_CHARS;
    for seg in &r.segments {
        if left == 0 {
            break;
        }
        let text: String = seg.text.chars().take(left).collect();
        left -= text.chars().count();
        job.append(
            &text,
            0.0,
            if seg.trained {
                trained.clone()
            } else {
                masked.clone()
            },
        );
    }
    if left == 0 {
        job.append(
            " …",
            0.0,
            TextFormat {
                color: Color32::GRAY,
                ..Default::default()
            },
        );
    }
    job
}

/// While files are dragged over the window: a veil saying what a drop does.
pub fn drop_overlay_ui(ui: &Ui) {
    if ui.input(|i| i.raw.hovered_files.is_empty()) {
        return;
    }
    let rect = ui.ctx().content_rect();
    let painter = ui.ctx().layer_painter(egui::LayerId::new(
        egui::Order::Foreground,
        egui::Id::unique("drop-overlay"),
    ));
    painter.rect_filled(rect, 0.0, Color32::from_black_alpha(160));
    painter.text(
        rect.center(),
        egui::Align2::CENTER_CENTER,
        "Drop .jsonl datasets or a model folder",
        FontId::proportional(24.0),
        Color32::WHITE,
    );
}
