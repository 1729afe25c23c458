//! The training settings: the persisted [`Settings`] (the form's raw values, the only thing the app
//! saves between launches), the presets, the conversion to a [`TrainConfig`], and the form with
//! each field's validation message beside it.

use std::path::{Path, PathBuf};

use eframe::egui;
use egui::{Color32, RichText, Ui};
use serde::{Deserialize, Serialize};

use super::hub_worker::HfToken;
use crate::inspect::ModelSummary;
use crate::model::LoraConfig;
use crate::train::{DeviceChoice, DtypeChoice, Duration, FieldError, Schedule, TrainConfig};

/// Starting points for the form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Preset {
    /// A minute-long run to see the whole flow work.
    QuickTest,
    /// Good defaults for a real dataset.
    Balanced,
    /// Higher rank, more epochs, longer sequences: slower, usually better.
    Quality,
}

impl Preset {
    pub const ALL: [Preset; 3] = [Preset::QuickTest, Preset::Balanced, Preset::Quality];

    pub fn label(self) -> &'static str {
        match self {
            Preset::QuickTest => "Quick test",
            Preset::Balanced => "Balanced",
            Preset::Quality => "Quality",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Preset::QuickTest => "60 steps, rank 8: see the whole flow work in about a minute",
            Preset::Balanced => "2 epochs, rank 16: good defaults for a real dataset",
            Preset::Quality => "3 epochs, rank 32, longer sequences: slower, usually better",
        }
    }

    /// [`Preset::apply`], with the sequence length capped at the model's context when known.
    pub fn apply_for(self, s: &mut Settings, context_length: Option<usize>) {
        self.apply(s);
        if let Some(c) = context_length {
            s.max_seq_len = s.max_seq_len.min(c);
        }
    }

    /// Sets the fields this preset owns; paths, targets, layers and seed are left alone.
    pub fn apply(self, s: &mut Settings) {
        let (rank, dropout, lr, warmup, duration, accum, seq, eval, save) = match self {
            Preset::QuickTest => (8, 0.0, 1e-3, 5, (DurationKind::Steps, 60), 1, 256, 10, 20),
            Preset::Balanced => (
                16,
                0.05,
                2e-4,
                20,
                (DurationKind::Epochs, 2),
                2,
                1024,
                50,
                100,
            ),
            Preset::Quality => (
                32,
                0.05,
                1e-4,
                50,
                (DurationKind::Epochs, 3),
                4,
                2048,
                100,
                200,
            ),
        };
        s.lora_rank = rank;
        s.lora_alpha = 2.0 * rank as f64;
        s.lora_dropout = dropout;
        s.lr = lr;
        s.schedule = Schedule::Cosine;
        s.warmup_steps = warmup;
        s.duration = duration.0;
        match duration.0 {
            DurationKind::Steps => s.steps = duration.1,
            DurationKind::Epochs => s.epochs = duration.1,
        }
        s.batch_size = 4;
        s.grad_accum = accum;
        s.max_seq_len = seq;
        s.mask_prompt = true;
        s.packing = false;
        s.eval_every = eval;
        s.save_every = save;
    }

    /// The preset whose values `s` still has, if any (capped as by [`Preset::apply_for`]).
    pub fn matching(s: &Settings, context_length: Option<usize>) -> Option<Preset> {
        Preset::ALL.into_iter().find(|p| {
            let mut t = s.clone();
            p.apply_for(&mut t, context_length);
            t == *s
        })
    }
}

/// Train for steps or for epochs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DurationKind {
    Steps,
    #[default]
    Epochs,
}

/// Everything the app remembers between launches: the last model and datasets, and the form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub model_dir: Option<PathBuf>,
    pub train_data: Option<PathBuf>,
    pub valid_data: Option<PathBuf>,
    /// Runs are written to `output_root/<model>-<date>-<time>/`.
    pub output_root: PathBuf,
    /// Where the last export went.
    pub export_dir: Option<PathBuf>,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// Modules to adapt; `None` = every linear projection.
    pub lora_targets: Option<Vec<String>>,
    /// Layers to adapt: empty or "all", or indices and ranges like "0-3, 6".
    pub lora_layers: String,
    pub lr: f64,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    pub duration: DurationKind,
    pub steps: usize,
    pub epochs: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_seq_len: usize,
    pub mask_prompt: bool,
    pub packing: bool,
    pub eval_every: usize,
    pub save_every: usize,
    pub seed: u64,
    /// Compute device: Auto picks Metal, then CUDA, then the CPU.
    pub device: DeviceChoice,
    /// Compute dtype of the base model: Auto = bf16 on GPUs, f32 on the CPU.
    pub dtype: DtypeChoice,
    /// Recompute activations in backward: far less memory, about a third more compute.
    pub gradient_checkpointing: bool,
    /// With checkpointing, every k-th layer keeps its activations (0 = all recomputed).
    pub checkpoint_keep_every: usize,
    /// The Hugging Face access token typed in the app. Kept in the OS keychain, never in the
    /// settings file (hence `skip`), and never printed (see [`HfToken`]).
    #[serde(skip)]
    pub hf_token: HfToken,
}

impl Default for Settings {
    fn default() -> Self {
        let mut s = Self {
            model_dir: None,
            train_data: None,
            valid_data: None,
            output_root: default_output_root(),
            export_dir: None,
            lora_rank: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            lora_targets: None,
            lora_layers: String::new(),
            lr: 2e-4,
            schedule: Schedule::Cosine,
            warmup_steps: 20,
            duration: DurationKind::Epochs,
            steps: 200,
            epochs: 2,
            batch_size: 4,
            grad_accum: 2,
            max_seq_len: 1024,
            mask_prompt: true,
            packing: false,
            eval_every: 50,
            save_every: 100,
            seed: 0,
            device: DeviceChoice::Auto,
            dtype: DtypeChoice::Auto,
            gradient_checkpointing: false,
            checkpoint_keep_every: 0,
            hf_token: HfToken::default(),
        };
        Preset::Balanced.apply(&mut s);
        s
    }
}

/// `~/FineTune` (or `./FineTune` without a home folder).
pub fn default_output_root() -> PathBuf {
    std::env::var_os("HOME")
        .or_else(|| std::env::var_os("USERPROFILE"))
        .map_or_else(|| PathBuf::from("."), PathBuf::from)
        .join("FineTune")
}

/// `root/<model>-YYYYMMDD-HHMMSS` for a run started at `unix_secs` (UTC).
pub fn run_dir(root: &Path, model_name: &str, unix_secs: i64) -> PathBuf {
    let (y, mo, d) = crate::export::civil_date(unix_secs);
    let t = unix_secs.rem_euclid(86_400);
    let safe: String = model_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    root.join(format!(
        "{safe}-{y:04}{mo:02}{d:02}-{:02}{:02}{:02}",
        t / 3600,
        (t / 60) % 60,
        t % 60
    ))
}

/// "all"/"" → `None`; "0-3, 6" → `Some([0, 1, 2, 3, 6])`; checked against `num_layers` when known.
pub fn parse_layers(text: &str, num_layers: Option<usize>) -> Result<Option<Vec<usize>>, String> {
    let t = text.trim();
    if t.is_empty() || t.eq_ignore_ascii_case("all") {
        return Ok(None);
    }
    let bad =
        |part: &str| format!("\"{part}\" is not a layer number or range; write e.g. 0-3, 6 or all");
    let mut layers = Vec::new();
    for part in t.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let a: usize = a.parse().map_err(|_| bad(part))?;
        let b: usize = b.parse().map_err(|_| bad(part))?;
        if a > b {
            return Err(format!(
                "the range {part} runs backwards; write it low-high"
            ));
        }
        for l in a..=b {
            if !layers.contains(&l) {
                layers.push(l);
            }
        }
    }
    if layers.is_empty() {
        return Err(bad(t));
    }
    layers.sort_unstable();
    if let (Some(n), Some(&max)) = (num_layers, layers.last()) {
        if max >= n {
            return Err(format!(
                "layer {max} does not exist; this model has layers 0-{}",
                n.saturating_sub(1)
            ));
        }
    }
    Ok(Some(layers))
}

impl Settings {
    /// The run's config, writing to `out_dir`. Use only when [`Settings::problems`] is empty.
    pub fn to_config(&self, out_dir: PathBuf) -> TrainConfig {
        TrainConfig {
            model_dir: self.model_dir.clone().unwrap_or_default(),
            train_data: self.train_data.clone().unwrap_or_default(),
            valid_data: self.valid_data.clone(),
            out_dir,
            lora: LoraConfig {
                rank: self.lora_rank,
                alpha: self.lora_alpha,
                dropout: self.lora_dropout,
                targets: self.lora_targets.clone().unwrap_or_default(),
                layers: parse_layers(&self.lora_layers, None).ok().flatten(),
                use_rslora: false,
            },
            lr: self.lr,
            schedule: self.schedule,
            warmup_steps: self.warmup_steps,
            duration: match self.duration {
                DurationKind::Steps => Duration::Steps(self.steps),
                DurationKind::Epochs => Duration::Epochs(self.epochs),
            },
            batch_size: self.batch_size,
            grad_accum: self.grad_accum,
            max_seq_len: self.max_seq_len,
            mask_prompt: self.mask_prompt,
            packing: self.packing,
            eval_every: self.eval_every,
            save_every: self.save_every,
            seed: self.seed,
            device: self.device,
            dtype: self.dtype,
            gradient_checkpointing: self.gradient_checkpointing,
            checkpoint_keep_every: self.checkpoint_keep_every,
            ..TrainConfig::default()
        }
    }

    /// Every problem, by `TrainConfig` field name: the config's own checks plus what only the form
    /// knows (the layers text, the targets, the model's context length).
    pub fn problems(&self, model: Option<&ModelSummary>) -> Vec<FieldError> {
        let mut p = self.to_config(self.output_root.join("run")).problems();
        if let Err(message) = parse_layers(&self.lora_layers, model.map(|m| m.layers)) {
            p.push(FieldError {
                field: "lora.layers",
                message,
            });
        }
        if let Some(targets) = &self.lora_targets {
            if targets.is_empty() {
                p.push(FieldError {
                    field: "lora.targets",
                    message: "choose at least one module to adapt".into(),
                });
            } else if let Some(m) = model {
                if let Some(t) = targets.iter().find(|t| !m.linear_names.contains(t)) {
                    p.push(FieldError {
                        field: "lora.targets",
                        message: format!("{t} is not a module of this model"),
                    });
                }
            }
        }
        if let Some(m) = model {
            if self.max_seq_len > m.context_length {
                p.push(FieldError {
                    field: "max_seq_len",
                    message: format!(
                        "the model reads at most {} tokens; use {} or less",
                        m.context_length, m.context_length
                    ),
                });
            }
        }
        p
    }
}

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
    match problem(problems, field) {
        Some(msg) => ui.label(RichText::new(msg).color(error_color(ui))),
        None => ui.weak(hint),
    };
    ui.end_row();
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
    ui.horizontal(|ui| {
        ui.label("Presets:");
        let context = model.map(|m| m.context_length);
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
    ui.add_space(6.0);

    egui::Grid::new("settings-grid")
        .num_columns(3)
        .spacing([12.0, 6.0])
        .show(ui, |ui| {
            ui.heading("LoRA");
            ui.end_row();
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
            ui.end_row();
            ui.heading("Optimization");
            ui.end_row();
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
            match problem(problems, "duration") {
                Some(msg) => ui.label(RichText::new(msg).color(error_color(ui))),
                None => ui.weak("an epoch is one pass over the training records"),
            };
            ui.end_row();
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
            ui.weak(
                "only completions and assistant turns train; the prompt is grey in the preview",
            );
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
            match problem(problems, "out_dir") {
                Some(msg) => ui.label(RichText::new(msg).color(error_color(ui))),
                None => ui.weak("each run gets its own folder: adapters, checkpoints, log"),
            };
            ui.end_row();
        });
    *s != before
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_apply_and_are_recognized() {
        let mut s = Settings::default();
        assert_eq!(Preset::matching(&s, None), Some(Preset::Balanced));
        Preset::QuickTest.apply(&mut s);
        assert_eq!(Preset::matching(&s, None), Some(Preset::QuickTest));
        assert_eq!(
            (s.duration, s.steps, s.lora_rank),
            (DurationKind::Steps, 60, 8)
        );
        s.seed = 7; // not a preset field
        assert_eq!(Preset::matching(&s, None), Some(Preset::QuickTest));
        s.lr = 5e-5;
        assert_eq!(Preset::matching(&s, None), None);
        // Capped to a small model's context, a preset is still that preset.
        Preset::Quality.apply_for(&mut s, Some(256));
        assert_eq!(s.max_seq_len, 256);
        assert_eq!(Preset::matching(&s, Some(256)), Some(Preset::Quality));
        assert_eq!(Preset::matching(&s, None), None);
    }

    #[test]
    fn layers_text_parses() {
        assert_eq!(parse_layers("", None), Ok(None));
        assert_eq!(parse_layers(" All ", None), Ok(None));
        assert_eq!(parse_layers("6, 0-2,2", None), Ok(Some(vec![0, 1, 2, 6])));
        assert!(parse_layers("3-1", None).unwrap_err().contains("backwards"));
        assert!(parse_layers("x", None).unwrap_err().contains("\"x\""));
        assert!(parse_layers("0-4", Some(2))
            .unwrap_err()
            .contains("layers 0-1"));
    }

    #[test]
    fn config_carries_the_form_and_problems_name_fields() {
        let mut s = Settings {
            model_dir: Some("m".into()),
            train_data: Some("t.jsonl".into()),
            lora_layers: "0-1".into(),
            lora_targets: Some(vec!["q_proj".into()]),
            ..Settings::default()
        };
        Preset::QuickTest.apply(&mut s);
        let c = s.to_config("out".into());
        assert_eq!(c.duration, Duration::Steps(60));
        assert_eq!(c.lora.layers, Some(vec![0, 1]));
        assert_eq!(c.lora.targets, vec!["q_proj".to_string()]);
        assert_eq!(c.out_dir, PathBuf::from("out"));

        s.lora_rank = 0;
        s.lora_targets = Some(vec![]);
        s.lora_layers = "zz".into();
        let fields: Vec<&str> = s.problems(None).iter().map(|p| p.field).collect();
        for f in [
            "model_dir",
            "train_data",
            "lora.rank",
            "lora.targets",
            "lora.layers",
        ] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
    }

    #[test]
    fn settings_survive_a_round_trip_and_old_files() {
        let s = Settings {
            model_dir: Some("/m".into()),
            lora_targets: Some(vec!["q_proj".into()]),
            ..Settings::default()
        };
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Settings>(&text).unwrap(), s);
        // Missing fields take defaults (settings saved by an older version).
        let old: Settings = serde_json::from_str(r#"{"lora_rank": 4}"#).unwrap();
        assert_eq!(old.lora_rank, 4);
        assert_eq!(old.batch_size, Settings::default().batch_size);
    }

    #[test]
    fn run_folders_are_named_by_model_and_time() {
        let d = run_dir(Path::new("/r"), "org/My Model", 1_749_427_200 + 3_723);
        assert_eq!(d, PathBuf::from("/r/org-My-Model-20250609-010203"));
    }
}
