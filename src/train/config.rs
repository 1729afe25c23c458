//! [`TrainConfig`]: every setting of a training run, validated before any work starts. The UI form
//! and the CLI flags both start a run only with the [`ValidConfig`] that [`TrainConfig::validate`]
//! returns. [`capped_seq_len`] is the one place the model's context caps the sequence length.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::data::{DataOptions, OverLong, PromptCompletionStyle};
use crate::model::LoraConfig;
use crate::train::optim::AdamWConfig;

/// Learning-rate shape after warmup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Cosine decay from `lr` to `min_lr_ratio·lr` over the run.
    #[default]
    Cosine,
    /// Linear decay from `lr` to `min_lr_ratio·lr`.
    Linear,
    /// `lr` throughout.
    Constant,
}

/// How long to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Duration {
    /// Optimizer steps (each is `grad_accum` batches).
    Steps(usize),
    /// Passes over the training set.
    Epochs(usize),
}

/// Which compute device to run on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceChoice {
    /// Metal, then CUDA, then CPU: the first one present.
    #[default]
    Auto,
    /// The CPU (always present).
    Cpu,
    /// The first CUDA GPU (needs the `cuda` feature).
    Cuda,
    /// The Apple GPU (needs the `metal` feature).
    Metal,
}

/// Dtype of the frozen base weights and activations (LoRA and optimizer state are always f32).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DtypeChoice {
    /// bf16 on GPUs, f32 on the CPU.
    #[default]
    Auto,
    /// 32-bit float: full precision, twice the memory of the 16-bit types.
    F32,
    /// bfloat16: f32's range at half the memory.
    Bf16,
    /// IEEE half precision: half the memory, a narrower range than bf16.
    F16,
}

/// Every setting of a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// The base model as [`crate::model::ModelSource::open`] takes it: a Hugging Face folder
    /// (safetensors or PyTorch .bin), a `.gguf` file, or a Hub id in the cache.
    pub model_dir: PathBuf,
    /// Training JSONL.
    pub train_data: PathBuf,
    /// Validation JSONL; without one, `valid_fraction` of the training records is held out.
    pub valid_data: Option<PathBuf>,
    /// Where adapters, checkpoints and trainer state are written.
    pub out_dir: PathBuf,
    /// LoRA rank, alpha, dropout, targets, layers.
    pub lora: LoraConfig,
    /// Peak learning rate. Default 2e-4.
    pub lr: f64,
    /// Learning-rate shape after warmup. Default cosine.
    pub schedule: Schedule,
    /// Final lr as a fraction of `lr` for cosine/linear. Default 0.
    pub min_lr_ratio: f64,
    /// Linear warmup steps from 0 to `lr`. Default 0.
    pub warmup_steps: usize,
    /// Steps or epochs. Default 1 epoch.
    pub duration: Duration,
    /// Records per batch. Default 4.
    pub batch_size: usize,
    /// Batches per optimizer step. Default 1.
    pub grad_accum: usize,
    /// Longest record in tokens; longer ones are truncated or dropped. Default 1024.
    pub max_seq_len: usize,
    /// Loss only on completions / assistant turns. Default on.
    pub mask_prompt: bool,
    /// How prompt/completion records are rendered.
    pub prompt_completion: PromptCompletionStyle,
    /// Pack short records into rows of `max_seq_len` (attention stays inside each record).
    pub packing: bool,
    /// What to do with records longer than `max_seq_len`. Default truncate.
    pub over_long: OverLong,
    /// Skip bad JSONL lines (reported) instead of refusing to start.
    pub skip_bad_lines: bool,
    /// Share held out for validation when there is no validation file. Default 0.1.
    pub valid_fraction: f64,
    /// Evaluate every N steps (and always at start and end); 0 = only start and end. Default 50.
    pub eval_every: usize,
    /// Cap on validation batches per evaluation; 0 = the whole validation set. Default 0.
    pub eval_batches: usize,
    /// Validation prompts the model answers (greedily) at each evaluation; 0 = none. Default 3.
    pub samples: usize,
    /// Most tokens of each sample answer. Default 64.
    pub sample_tokens: usize,
    /// Save a checkpoint every N steps (and always at the end); 0 = only at the end. Default 100.
    pub save_every: usize,
    /// Clip the global gradient norm to this; 0 = off. Default 1.0.
    pub max_grad_norm: f64,
    /// AdamW betas, epsilon and weight decay.
    pub adamw: AdamWConfig,
    /// Stop when val loss has not improved for this many evaluations; 0 = off.
    pub early_stop_patience: usize,
    /// Seed for LoRA init, dropout, shuffling and the hold-out split. Default 0.
    pub seed: u64,
    /// Compute device. Default auto.
    pub device: DeviceChoice,
    /// Compute dtype of the base model; `Auto` suits the device.
    pub dtype: DtypeChoice,
    /// QLoRA: how the frozen linear weights are kept. `None` = a GGUF model keeps its own
    /// quantization when `dtype` is `Auto`; other models stay float
    /// ([`TrainConfig::linear_quant`]).
    pub quantize: Option<crate::model::qload::QuantChoice>,
    /// Recompute each layer's activations in backward instead of keeping them: far less memory,
    /// about a third more compute (llama family). Default off.
    pub gradient_checkpointing: bool,
    /// With checkpointing, every k-th layer keeps its activations instead (0 = all recomputed;
    /// 3 = two layers in three recomputed: less extra compute, somewhat more memory).
    pub checkpoint_keep_every: usize,
    /// Checkpoint folder to resume from (`out_dir/checkpoints/step-N` or `out_dir/latest`).
    pub resume_from: Option<PathBuf>,
    /// Report progress every N steps in the CLI. Default 1.
    pub log_every: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model_dir: PathBuf::new(),
            train_data: PathBuf::new(),
            valid_data: None,
            out_dir: PathBuf::from("finetune-out"),
            lora: LoraConfig::default(),
            lr: 2e-4,
            schedule: Schedule::Cosine,
            min_lr_ratio: 0.0,
            warmup_steps: 0,
            duration: Duration::Epochs(1),
            batch_size: 4,
            grad_accum: 1,
            max_seq_len: 1024,
            mask_prompt: true,
            prompt_completion: PromptCompletionStyle::Auto,
            packing: false,
            over_long: OverLong::Truncate,
            skip_bad_lines: false,
            valid_fraction: 0.1,
            eval_every: 50,
            eval_batches: 0,
            samples: 3,
            sample_tokens: 64,
            save_every: 100,
            max_grad_norm: 1.0,
            adamw: AdamWConfig::default(),
            early_stop_patience: 0,
            seed: 0,
            device: DeviceChoice::Auto,
            dtype: DtypeChoice::Auto,
            quantize: None,
            gradient_checkpointing: false,
            checkpoint_keep_every: 0,
            resume_from: None,
            log_every: 1,
        }
    }
}

/// A setting that cannot be used, named by its field so a form can show it beside the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// The `TrainConfig` field (e.g. `lr`, `lora.rank`).
    pub field: &'static str,
    /// What is wrong and what would be accepted, e.g. "must be above 0".
    pub message: String,
}

/// A [`TrainConfig`] every check of [`TrainConfig::validate`] passed: the only thing
/// [`crate::session::start`] takes, so an unchecked config cannot start a run.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidConfig(TrainConfig);

impl ValidConfig {
    /// The settings themselves.
    pub fn into_inner(self) -> TrainConfig {
        self.0
    }
}

impl std::ops::Deref for ValidConfig {
    type Target = TrainConfig;

    fn deref(&self) -> &TrainConfig {
        &self.0
    }
}

impl From<ValidConfig> for TrainConfig {
    fn from(c: ValidConfig) -> Self {
        c.0
    }
}

/// The sequence length a model with `context_tokens` of context can train on: `max_seq_len`,
/// lowered to the context when above it (a context of 0, unknown, lowers nothing). The trainer,
/// the app's model choice and its presets all cap through this.
pub fn capped_seq_len(max_seq_len: usize, context_tokens: usize) -> usize {
    if context_tokens > 0 {
        max_seq_len.min(context_tokens)
    } else {
        max_seq_len
    }
}

/// Collects [`FieldError`]s.
#[derive(Default)]
struct Problems(Vec<FieldError>);

impl Problems {
    fn bad(&mut self, field: &'static str, message: impl Into<String>) {
        self.0.push(FieldError {
            field,
            message: message.into(),
        });
    }
}

impl TrainConfig {
    /// Checks every field; returns all problems at once (empty = fine).
    pub fn problems(&self) -> Vec<FieldError> {
        let mut p = Problems::default();
        self.check_paths(&mut p);
        self.check_lora(&mut p);
        self.check_schedule(&mut p);
        self.check_batches(&mut p);
        self.check_optimizer(&mut p);
        if let Some(r) = &self.resume_from {
            if !r.is_dir() {
                p.bad(
                    "resume_from",
                    format!("no checkpoint folder: {}", r.display()),
                );
            }
        }
        p.0
    }

    fn check_paths(&self, p: &mut Problems) {
        if self.model_dir.as_os_str().is_empty() {
            p.bad("model_dir", "choose a model folder");
        } else if let Err(e) = crate::model::ModelSource::open(&self.model_dir) {
            p.bad("model_dir", e.to_string());
        }
        if self.train_data.as_os_str().is_empty() {
            p.bad("train_data", "choose a training JSONL file");
        } else if !self.train_data.is_file() {
            p.bad(
                "train_data",
                format!("file not found: {}", self.train_data.display()),
            );
        }
        if let Some(v) = &self.valid_data {
            if !v.is_file() {
                p.bad("valid_data", format!("file not found: {}", v.display()));
            }
        }
        if self.out_dir.as_os_str().is_empty() {
            p.bad("out_dir", "choose an output folder");
        }
    }

    fn check_lora(&self, p: &mut Problems) {
        if self.lora.rank == 0 || self.lora.rank > 1024 {
            p.bad(
                "lora.rank",
                "rank must be between 1 and 1024 (8–64 is typical)",
            );
        }
        if self.lora.alpha.is_nan() || self.lora.alpha <= 0.0 {
            p.bad("lora.alpha", "alpha must be positive (often 2 × rank)");
        }
        if !(0.0..1.0).contains(&self.lora.dropout) {
            p.bad("lora.dropout", "dropout must be in [0, 1)");
        }
    }

    fn check_schedule(&self, p: &mut Problems) {
        if !(self.lr > 0.0 && self.lr < 1.0) {
            p.bad(
                "lr",
                "learning rate must be in (0, 1); 1e-4 to 3e-4 suits LoRA",
            );
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            p.bad("min_lr_ratio", "must be between 0 and 1");
        }
        match self.duration {
            Duration::Steps(0) => p.bad("duration", "train for at least 1 step"),
            Duration::Epochs(0) => p.bad("duration", "train for at least 1 epoch"),
            _ => {}
        }
    }

    fn check_batches(&self, p: &mut Problems) {
        if self.batch_size == 0 {
            p.bad("batch_size", "batch size must be at least 1");
        }
        if self.grad_accum == 0 {
            p.bad("grad_accum", "gradient accumulation must be at least 1");
        }
        if self.max_seq_len < 8 {
            p.bad(
                "max_seq_len",
                "max sequence length must be at least 8 tokens",
            );
        }
        if !(0.0..0.9).contains(&self.valid_fraction) {
            p.bad("valid_fraction", "hold-out share must be in [0, 0.9)");
        }
    }

    fn check_optimizer(&self, p: &mut Problems) {
        if self.max_grad_norm.is_nan() || self.max_grad_norm < 0.0 {
            p.bad("max_grad_norm", "must be 0 (off) or positive");
        }
        if self.adamw.weight_decay.is_nan() || self.adamw.weight_decay < 0.0 {
            p.bad("adamw.weight_decay", "must be 0 or positive");
        }
        if !(0.0..1.0).contains(&self.adamw.beta1) || !(0.0..1.0).contains(&self.adamw.beta2) {
            p.bad("adamw.betas", "betas must be in [0, 1)");
        }
    }

    /// The checked config, if every field is usable; else every problem at once.
    pub fn validate(self) -> Result<ValidConfig, Vec<FieldError>> {
        let p = self.problems();
        if p.is_empty() {
            Ok(ValidConfig(self))
        } else {
            Err(p)
        }
    }

    /// How the linear weights of `source` are kept for this run ([`TrainConfig::quantize`]).
    pub fn linear_quant(
        &self,
        source: &crate::model::ModelSource,
    ) -> crate::model::qload::LinearQuant {
        use crate::model::qload::LinearQuant;
        match (self.quantize, &source.format) {
            (Some(q), _) => q.ggml().map_or(LinearQuant::Float, LinearQuant::To),
            (None, crate::model::source::ModelFormat::Gguf(path))
                if self.dtype == DtypeChoice::Auto =>
            {
                LinearQuant::Gguf(path.clone())
            }
            (None, _) => LinearQuant::Float,
        }
    }

    /// How the data module should read the datasets.
    pub fn data_options(&self) -> DataOptions {
        DataOptions {
            max_seq_len: self.max_seq_len,
            mask_prompt: self.mask_prompt,
            prompt_completion: self.prompt_completion,
            over_long: self.over_long,
            skip_bad_lines: self.skip_bad_lines,
            valid_fraction: self.valid_fraction,
            seed: self.seed,
            ..DataOptions::default()
        }
    }

    /// Learning rate at optimizer step `step` (0-based) of `total`.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let floor = self.lr * self.min_lr_ratio;
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Linear => floor + (self.lr - floor) * (1.0 - progress),
            Schedule::Cosine => {
                floor + (self.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_shapes() {
        let c = TrainConfig {
            lr: 1.0,
            warmup_steps: 2,
            ..Default::default()
        };
        assert_eq!(c.lr_at(0, 12), 0.5);
        assert_eq!(c.lr_at(1, 12), 1.0);
        assert_eq!(c.lr_at(2, 12), 1.0);
        assert!((c.lr_at(7, 12) - 0.5).abs() < 1e-12);
        let lin = TrainConfig {
            schedule: Schedule::Linear,
            ..c.clone()
        };
        assert!((lin.lr_at(7, 12) - 0.5).abs() < 1e-12);
        let constant = TrainConfig {
            schedule: Schedule::Constant,
            ..c
        };
        assert_eq!(constant.lr_at(11, 12), 1.0);
    }

    #[test]
    fn validate_lists_every_problem_by_field() {
        let c = TrainConfig {
            lr: -1.0,
            batch_size: 0,
            ..Default::default()
        };
        let fields: Vec<&str> = c.problems().iter().map(|p| p.field).collect();
        for f in ["model_dir", "train_data", "lr", "batch_size"] {
            assert!(fields.contains(&f), "{fields:?}");
        }
    }

    #[test]
    fn the_context_caps_the_sequence_length_when_known() {
        assert_eq!(capped_seq_len(2048, 512), 512);
        assert_eq!(capped_seq_len(256, 512), 256);
        assert_eq!(capped_seq_len(2048, 0), 2048);
    }
}
