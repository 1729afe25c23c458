//! The settings form: one grid row per field with its validation message beside it, the presets
//! bar and the target-module checkboxes.

use std::path::PathBuf;

use eframe::egui;
use egui::{Color32, RichText, Ui};

use super::{DurationKind, Preset, Settings};
use crate::inspect::ModelSummary;
use crate::train::{FieldError, Schedule};

/// Message of the first problem of `field`.
fn problem<'a>(problems: &'a [FieldError], field: &str) -> Option<&'a str> {
    problems
        .iter()
        .find(|p| p.field == field)
        .map(|p| p.message.as_str())
}

/// The red used for problems.
pub fn error_color(ui: &Ui) -> Color32 {
    ui.visuals().error_fg_color
}

/// The field's problem in red, or else `hint` in grey, ending the grid row.
fn problem_or_hint_ui(ui: &mut Ui, problems: &[FieldError], field: &str, hint: &str) {
    match problem(problems, field) {
        Some(msg) => ui.label(RichText::new(msg).color(error_color(ui))),
        None => ui.weak(hint),
    };
    ui.end_row();
}

/// One form row: label, widget, then the field's problem in red or a hint in grey.
fn row_ui(
    ui: &mut Ui,
    label: &str,
    field: &str,
    hint: &str,
    problems: &[FieldError],
    add: impl FnOnce(&mut Ui) -> egui::Response,
) -> bool {
    let l = ui.label(label);
    let changed = add(ui).labelled_by(l.id).changed();
    problem_or_hint_ui(ui, problems, field, hint);
    changed
}

/// The settings form. Returns true when a value changed.
pub fn settings_ui(
    ui: &mut Ui,
    s: &mut Settings,
    model: Option<&ModelSummary>,
    problems: &[FieldError],
) -> bool {
    let before = s.clone();
    presets_ui(ui, s, model.map(|m| m.context_length));
    ui.add_space(6.0);
    egui::Grid::new("settings-grid")
        .num_columns(3)
        .spacing([12.0, 6.0])
        .show(ui, |ui| {
            ui.heading("LoRA");
            ui.end_row();
            lora_rows_ui(ui, s, model, problems);
            ui.end_row();
            ui.heading("Optimization");
            ui.end_row();
            schedule_rows_ui(ui, s, problems);
            batch_rows_ui(ui, s, model, problems);
            run_rows_ui(ui, s, problems);
        });
    *s != before
}

/// The presets bar; the preset the settings match is selected, else "(custom)".
fn presets_ui(ui: &mut Ui, s: &mut Settings, context: Option<usize>) {
    ui.horizontal(|ui| {
        ui.label("Presets:");
        let current = Preset::matching(s, context);
        for p in Preset::ALL {
            if ui
                .selectable_label(current == Some(p), p.label())
                .on_hover_text(p.description())
                .clicked()
            {
                p.apply_for(s, context);
            }
        }
        if current.is_none() {
            ui.weak("(custom)");
        }
    });
}

/// Rank, alpha, dropout, layers and target modules.
fn lora_rows_ui(
    ui: &mut Ui,
    s: &mut Settings,
    model: Option<&ModelSummary>,
    problems: &[FieldError],
) {
    row_ui(
        ui,
        "Rank",
        "lora.rank",
        "8–64 is typical; higher learns more, uses more memory",
        problems,
        |ui| ui.add(egui::DragValue::new(&mut s.lora_rank).range(1..=1024)),
    );
    row_ui(
        ui,
        "Alpha",
        "lora.alpha",
        "scale = alpha / rank; often 2 × rank",
        problems,
        |ui| {
            ui.add(
                egui::DragValue::new(&mut s.lora_alpha)
                    .speed(0.5)
                    .range(0.0..=4096.0),
            )
        },
    );
    row_ui(
        ui,
        "Dropout",
        "lora.dropout",
        "0–0.1; regularizes small datasets",
        problems,
        |ui| {
            ui.add(
                egui::DragValue::new(&mut s.lora_dropout)
                    .speed(0.01)
                    .range(0.0..=0.99)
                    .fixed_decimals(2),
            )
        },
    );
    row_ui(
        ui,
        "DoRA",
        "lora.dora",
        "a trained magnitude per output row; often closer to full tuning, slower",
        problems,
        |ui| ui.checkbox(&mut s.lora_dora, ""),
    );
    quantize_row_ui(ui, s, model, problems);
    let layer_hint = match model {
        Some(m) => format!("all, or e.g. 0-3, 6 (this model has {} layers)", m.layers),
        None => "all, or e.g. 0-3, 6".into(),
    };
    row_ui(ui, "Layers", "lora.layers", &layer_hint, problems, |ui| {
        ui.add_sized(
            [120.0, 22.0],
            egui::TextEdit::singleline(&mut s.lora_layers).hint_text("all"),
        )
    });
    targets_ui(ui, s, model, problems);
}

/// Learning rate, schedule, warmup and how long to train.
fn schedule_rows_ui(ui: &mut Ui, s: &mut Settings, problems: &[FieldError]) {
    row_ui(
        ui,
        "Learning rate",
        "lr",
        "1e-4 to 3e-4 suits LoRA; tiny models take more",
        problems,
        |ui| {
            ui.add(
                egui::DragValue::new(&mut s.lr)
                    .speed(1e-5)
                    .range(0.0..=1.0)
                    .custom_formatter(|v, _| format!("{v:.1e}"))
                    .custom_parser(|t| t.trim().parse::<f64>().ok()),
            )
        },
    );
    ui.label("Schedule");
    ui.horizontal(|ui| {
        for (v, name) in [
            (Schedule::Cosine, "cosine"),
            (Schedule::Linear, "linear"),
            (Schedule::Constant, "constant"),
        ] {
            ui.radio_value(&mut s.schedule, v, name);
        }
    });
    ui.weak("after warmup, the learning rate decays to 0 (cosine, linear) or stays");
    ui.end_row();
    row_ui(
        ui,
        "Warmup steps",
        "warmup_steps",
        "steps rising linearly to the full rate",
        problems,
        |ui| ui.add(egui::DragValue::new(&mut s.warmup_steps).range(0..=100_000)),
    );
    let l = ui.label("Train for");
    ui.horizontal(|ui| {
        match s.duration {
            DurationKind::Steps => ui
                .add(egui::DragValue::new(&mut s.steps).range(0..=1_000_000))
                .labelled_by(l.id),
            DurationKind::Epochs => ui
                .add(egui::DragValue::new(&mut s.epochs).range(0..=1000))
                .labelled_by(l.id),
        };
        ui.radio_value(&mut s.duration, DurationKind::Steps, "steps");
        ui.radio_value(&mut s.duration, DurationKind::Epochs, "epochs");
    });
    problem_or_hint_ui(
        ui,
        problems,
        "duration",
        "an epoch is one pass over the training records",
    );
}

/// Batch size, gradient accumulation and sequence length.
fn batch_rows_ui(
    ui: &mut Ui,
    s: &mut Settings,
    model: Option<&ModelSummary>,
    problems: &[FieldError],
) {
    row_ui(
        ui,
        "Batch size",
        "batch_size",
        "records per batch; lower it if memory runs out",
        problems,
        |ui| ui.add(egui::DragValue::new(&mut s.batch_size).range(0..=1024)),
    );
    row_ui(
        ui,
        "Gradient accumulation",
        "grad_accum",
        "batches per optimizer step (effective batch = batch × this)",
        problems,
        |ui| ui.add(egui::DragValue::new(&mut s.grad_accum).range(0..=1024)),
    );
    let seq_hint = match model {
        Some(m) => format!(
            "tokens per record; longer ones are truncated (model: {})",
            m.context_length
        ),
        None => "tokens per record; longer ones are truncated".into(),
    };
    row_ui(
        ui,
        "Max sequence length",
        "max_seq_len",
        &seq_hint,
        problems,
        |ui| {
            ui.add(
                egui::DragValue::new(&mut s.max_seq_len)
                    .speed(8.0)
                    .range(0..=131_072),
            )
        },
    );
}

/// Eval and save cadence, seed, loss masking, packing and the output folder.
fn run_rows_ui(ui: &mut Ui, s: &mut Settings, problems: &[FieldError]) {
    row_ui(
        ui,
        "Eval every",
        "eval_every",
        "steps between validation runs (0 = start and end only)",
        problems,
        |ui| ui.add(egui::DragValue::new(&mut s.eval_every).range(0..=100_000)),
    );
    row_ui(
        ui,
        "Save every",
        "save_every",
        "steps between checkpoints (0 = end only)",
        problems,
        |ui| ui.add(egui::DragValue::new(&mut s.save_every).range(0..=100_000)),
    );
    row_ui(
        ui,
        "Seed",
        "seed",
        "LoRA init, shuffling and the validation split",
        problems,
        |ui| ui.add(egui::DragValue::new(&mut s.seed)),
    );
    ui.label("Loss");
    ui.checkbox(&mut s.mask_prompt, "on completions only (mask the prompt)");
    ui.weak("only completions and assistant turns train; the prompt is grey in the preview");
    ui.end_row();
    ui.label("Packing");
    ui.checkbox(&mut s.packing, "pack short records together");
    ui.weak("fills rows up to the max sequence length; faster on many short records");
    ui.end_row();
    let l = ui.label("Runs are saved in");
    let mut text = s.output_root.display().to_string();
    if ui
        .add_sized([360.0, 22.0], egui::TextEdit::singleline(&mut text))
        .labelled_by(l.id)
        .changed()
    {
        s.output_root = PathBuf::from(text);
    }
    problem_or_hint_ui(
        ui,
        problems,
        "out_dir",
        "each run gets its own folder: adapters, checkpoints, log",
    );
}

/// One checkbox per linear module of the model (all checked = `None`), as a grid row.
fn targets_ui(
    ui: &mut Ui,
    s: &mut Settings,
    model: Option<&ModelSummary>,
    problems: &[FieldError],
) {
    ui.label("Target modules");
    ui.horizontal_wrapped(|ui| {
        let Some(m) = model else {
            ui.label("every linear layer");
            return;
        };
        for name in &m.linear_names {
            let mut on = s.lora_targets.as_ref().is_none_or(|t| t.contains(name));
            if ui.checkbox(&mut on, name.as_str()).changed() {
                let mut list = s
                    .lora_targets
                    .clone()
                    .unwrap_or_else(|| m.linear_names.clone());
                list.retain(|n| n != name);
                if on {
                    list.push(name.clone());
                }
                // Keep model order; all checked means "every linear layer".
                let ordered: Vec<String> = m
                    .linear_names
                    .iter()
                    .filter(|n| list.contains(n))
                    .cloned()
                    .collect();
                s.lora_targets = if ordered.len() == m.linear_names.len() {
                    None
                } else {
                    Some(ordered)
                };
            }
        }
    });
    match problem(problems, "lora.targets") {
        Some(msg) => ui.label(RichText::new(msg).color(error_color(ui))),
        None if model.is_none() => ui.weak("choose a model to pick its modules"),
        None => ui.weak("attention (q/k/v/o) and MLP projections; all is the usual choice"),
    };
}

/// The QLoRA choice: how the frozen linear weights are kept, with the memory each choice takes
/// for this model's linear weights (about all but the embeddings: parameters − 2·vocab·hidden).
fn quantize_row_ui(
    ui: &mut Ui,
    s: &mut Settings,
    model: Option<&ModelSummary>,
    problems: &[FieldError],
) {
    use crate::model::qload::QuantChoice;
    let gguf = model.is_some_and(|m| {
        m.source
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    });
    let linear = model.map(|m| {
        m.parameters
            .saturating_sub(2 * m.vocab_size * m.hidden_size) as f64
    });
    let label = |q: Option<QuantChoice>| -> String {
        let name = match q {
            None if gguf => "Auto: keep the GGUF's own".to_owned(),
            None => "Auto: float".to_owned(),
            Some(QuantChoice::None) => "Float (no QLoRA)".to_owned(),
            Some(q) => q.as_str().to_uppercase(),
        };
        match (q.and_then(|q| q.bytes_per_weight()), linear) {
            (Some(b), Some(n)) => format!(
                "{name} — {} instead of {} in bf16",
                crate::inspect::format_bytes((n * b) as u64),
                crate::inspect::format_bytes((n * 2.0) as u64)
            ),
            _ => name,
        }
    };
    row_ui(
        ui,
        "Quantize base",
        "quantize",
        "QLoRA: the frozen weights stay quantized, LoRA stays f32; fits bigger models",
        problems,
        |ui| {
            let mut r = egui::ComboBox::from_id_salt("quantize")
                .selected_text(label(s.quantize))
                .width(300.0)
                .show_ui(ui, |ui| {
                    let mut changed = ui
                        .selectable_value(&mut s.quantize, None, label(None))
                        .changed();
                    for q in QuantChoice::ALL {
                        changed |= ui
                            .selectable_value(&mut s.quantize, Some(q), label(Some(q)))
                            .changed();
                    }
                    changed
                });
            if r.inner == Some(true) {
                r.response.mark_changed();
            }
            r.response
        },
    );
}
