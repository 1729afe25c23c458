//! What the training thread reports. Sent over a bounded crossbeam channel; the UI drains them into
//! its run view and the CLI prints them.

use std::path::PathBuf;

use crate::data::DatasetSummary;

/// One optimizer step's figures.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StepStats {
    /// 1-based optimizer step.
    pub step: usize,
    pub total_steps: usize,
    /// Fractional epoch (e.g. 1.25 = a quarter into the second epoch).
    pub epoch: f64,
    /// Mean training loss over the step's batches.
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Trained (unmasked) tokens in this step.
    pub tokens: usize,
    /// All tokens (incl. masked prompt, excl. padding) processed in this step.
    pub input_tokens: usize,
    /// Input tokens per second over this step.
    pub tokens_per_sec: f64,
    pub elapsed_secs: f64,
    /// Estimated seconds to the end.
    pub eta_secs: f64,
    /// Resident memory of the process.
    pub rss_bytes: Option<u64>,
    /// Device memory in use (CUDA/Metal) when the backend tells.
    pub device_bytes: Option<u64>,
}

/// Events from the training thread, in order (`finetune train --json` prints one per line).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "event", content = "data", rename_all = "snake_case")]
pub enum Event {
    /// The model and data are loaded and training begins.
    Started {
        /// Model folder name.
        model: String,
        architecture: String,
        /// Device in words, e.g. "CPU (2 cores, AVX-512)".
        device: String,
        base_params: usize,
        trainable_params: usize,
        total_steps: usize,
        /// Steps already done when resuming (0 otherwise).
        start_step: usize,
        train: Box<DatasetSummary>,
        valid: Option<Box<DatasetSummary>>,
    },
    /// A human-readable progress note (loading, skipped lines, ...).
    Log(String),
    Step(StepStats),
    /// Validation loss at `step` (0 = before training).
    Eval {
        step: usize,
        val_loss: f64,
        best: bool,
    },
    /// A checkpoint (adapter + optimizer state + trainer state) was written.
    Saved {
        step: usize,
        path: PathBuf,
    },
    /// Training ran to the end. `adapter` is the final adapter, `best` the best-val one if kept.
    Finished {
        adapter: PathBuf,
        best: Option<PathBuf>,
        final_loss: Option<f64>,
        final_val_loss: Option<f64>,
    },
    /// Stopped on request (or early stop / NaN); the adapter of the last finished step is saved.
    Stopped {
        adapter: PathBuf,
        /// The best-validation adapter, if one was kept before the stop.
        best: Option<PathBuf>,
        step: usize,
        reason: String,
    },
    /// Could not run; nothing half-written is left.
    Failed {
        error: String,
    },
}

impl Event {
    /// True for the last event of a run.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Event::Finished { .. } | Event::Stopped { .. } | Event::Failed { .. }
        )
    }
}
