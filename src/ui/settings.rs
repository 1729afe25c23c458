//! The training settings: the persisted [`Settings`] (the form's raw values, the only thing the app
//! saves between launches), the presets and the conversion to a [`TrainConfig`]; the form, with
//! each field's validation message beside it, is in `settings/form.rs`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod form;
pub use form::{error_color, settings_ui};

use super::hub_worker::HfToken;
use crate::inspect::ModelSummary;
use crate::model::LoraConfig;
use crate::train::{
    capped_seq_len, DeviceChoice, DtypeChoice, Duration, FieldError, Schedule, TrainConfig,
};

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
    /// Every preset, in the order the form lists them.
    pub const ALL: [Preset; 3] = [Preset::QuickTest, Preset::Balanced, Preset::Quality];

    /// The name on the preset's button.
    pub fn label(self) -> &'static str {
        match self {
            Preset::QuickTest => "Quick test",
            Preset::Balanced => "Balanced",
            Preset::Quality => "Quality",
        }
    }

    /// One line on what the preset is for, shown beside it.
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
            s.max_seq_len = capped_seq_len(s.max_seq_len, c);
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
    /// Train for `Settings::steps` optimizer steps.
    Steps,
    /// Train for `Settings::epochs` passes over the training set (the default).
    #[default]
    Epochs,
}

/// Everything the app remembers between launches: the last model and datasets, and the form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// The base model as chosen: a model folder, a `.gguf` file or a Hub id in the cache.
    pub model_dir: Option<PathBuf>,
    /// The training JSONL file.
    pub train_data: Option<PathBuf>,
    /// The validation JSONL file; `None` holds out part of the training file.
    pub valid_data: Option<PathBuf>,
    /// Runs are written to `output_root/<model>-<date>-<time>/`.
    pub output_root: PathBuf,
    /// Where the last export went.
    pub export_dir: Option<PathBuf>,
    /// LoRA rank r. Default 16 (Balanced).
    pub lora_rank: usize,
    /// LoRA alpha; the scale is alpha / r. Default 32 (presets set 2 × rank).
    pub lora_alpha: f64,
    /// Dropout on the LoRA input, 0..1. Default 0.05.
    pub lora_dropout: f64,
    /// DoRA (a trainable magnitude per output row) instead of plain LoRA. Default off.
    pub lora_dora: bool,
    /// QLoRA: keep the frozen linear weights quantized. `None` = automatic (a GGUF model keeps its
    /// own quantization, others stay float).
    pub quantize: Option<crate::model::qload::QuantChoice>,
    /// Modules to adapt; `None` = every linear projection.
    pub lora_targets: Option<Vec<String>>,
    /// Layers to adapt: empty or "all", or indices and ranges like "0-3, 6".
    pub lora_layers: String,
    /// Peak learning rate. Default 2e-4.
    pub lr: f64,
    /// Learning-rate schedule after warmup. Default cosine.
    pub schedule: Schedule,
    /// Linear warmup steps from 0 to `lr`. Default 20.
    pub warmup_steps: usize,
    /// Whether `steps` or `epochs` sets the length of the run. Default epochs.
    pub duration: DurationKind,
    /// Optimizer steps when training for steps. Default 200.
    pub steps: usize,
    /// Passes over the training set when training for epochs. Default 2.
    pub epochs: usize,
    /// Records per batch. Default 4.
    pub batch_size: usize,
    /// Batches per optimizer step (gradient accumulation). Default 2.
    pub grad_accum: usize,
    /// Longest record in tokens (capped at the model's context length). Default 1024.
    pub max_seq_len: usize,
    /// Loss only on completions / assistant turns. Default on.
    pub mask_prompt: bool,
    /// Pack short records into rows of `max_seq_len`. Default off.
    pub packing: bool,
    /// Evaluate every N steps (and at start and end); 0 = only start and end. Default 50.
    pub eval_every: usize,
    /// Save a checkpoint every N steps (and at the end); 0 = only at the end. Default 100.
    pub save_every: usize,
    /// Seed for LoRA init, dropout, shuffling and the hold-out split. Default 0.
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
            lora_dora: false,
            quantize: None,
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
                use_dora: self.lora_dora,
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
            quantize: self.quantize,
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
            if capped_seq_len(self.max_seq_len, m.context_length) < self.max_seq_len {
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
