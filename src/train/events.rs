//! What the training thread reports, and the [`Reporter`] it reports through. The session sends
//! the events over a bounded channel; the UI drains them into its run view and the CLI prints them.

use std::path::PathBuf;

use crate::data::DatasetSummary;

/// One optimizer step's figures.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StepStats {
    /// 1-based optimizer step.
    pub step: usize,
    /// Optimizer steps the whole run takes.
    pub total_steps: usize,
    /// Fractional epoch (e.g. 1.25 = a quarter into the second epoch).
    pub epoch: f64,
    /// Mean training loss over the step's batches.
    pub loss: f64,
    /// Learning rate this step applied.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Trained (unmasked) tokens in this step.
    pub tokens: usize,
    /// All tokens (incl. masked prompt, excl. padding) processed in this step.
    pub input_tokens: usize,
    /// Input tokens per second over this step.
    pub tokens_per_sec: f64,
    /// Seconds since the step loop began (a resumed run counts from the resume).
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
        /// `architectures[0]` of config.json, e.g. `LlamaForCausalLM`.
        architecture: String,
        /// Device in words, e.g. "CPU (2 cores, AVX-512)".
        device: String,
        /// Parameters of the frozen base model.
        base_params: usize,
        /// Parameters of the LoRA adapter (the only ones trained).
        trainable_params: usize,
        /// Optimizer steps the whole run takes.
        total_steps: usize,
        /// Steps already done when resuming (0 otherwise).
        start_step: usize,
        /// What was read from the training set.
        train: Box<DatasetSummary>,
        /// What was read from the validation set, if there is one.
        valid: Option<Box<DatasetSummary>>,
    },
    /// A human-readable progress note (loading, skipped lines, ...).
    Log(String),
    /// Reading the dataset files before training: bytes read so far of all of them (sent about
    /// every MiB).
    Reading {
        /// Bytes read.
        done: u64,
        /// Bytes of the training and validation files together.
        total: u64,
    },
    /// An optimizer step was taken.
    Step(StepStats),
    /// Validation loss at `step` (0 = before training).
    Eval {
        /// Optimizer steps done when evaluated.
        step: usize,
        /// Mean loss over the validation tokens.
        val_loss: f64,
        /// The lowest so far (its adapter was saved to `out/best` unless at step 0).
        best: bool,
    },
    /// Greedy answers to fixed validation prompts, after the evaluation at `step`.
    Samples {
        /// Optimizer steps done when generated.
        step: usize,
        /// One answer per prompt, in the same order each time.
        answers: Vec<crate::train::SampleAnswer>,
    },
    /// A checkpoint (adapter + optimizer state + trainer state) was written.
    Saved {
        /// Optimizer steps the checkpoint holds.
        step: usize,
        /// The checkpoint folder, `out/checkpoints/step-NNNNNN`.
        path: PathBuf,
    },
    /// Training ran to the end. `adapter` is the final adapter, `best` the best-val one if kept.
    Finished {
        /// The final adapter folder (`out/adapter`).
        adapter: PathBuf,
        /// The best-validation adapter folder (`out/best`), if one was kept.
        best: Option<PathBuf>,
        /// Training loss of the last step.
        final_loss: Option<f64>,
        /// Validation loss of the last evaluation, if there is a validation set.
        final_val_loss: Option<f64>,
    },
    /// Stopped before the end (on request, early stop, a non-finite loss or gradient norm); the
    /// adapter of the last finished step is saved.
    Stopped {
        /// The adapter of the last finished step (`out/adapter`).
        adapter: PathBuf,
        /// The best-validation adapter, if one was kept before the stop.
        best: Option<PathBuf>,
        /// The last finished optimizer step.
        step: usize,
        /// Never [`StopReason::Finished`] (that run ends with `Finished`). JSON: its text.
        reason: StopReason,
    },
    /// Could not run; nothing half-written is left.
    Failed {
        /// The error and its causes, in words.
        error: String,
    },
}

impl Event {
    /// True for the last event of a run.
    pub fn is_terminal(&self) -> bool {
        self.exit_code().is_some()
    }

    /// The process exit code of a run that ended with this event (`None` before the end): 0 when
    /// it finished or stopped for a good reason (the person asked, early stopping), 3 when a
    /// non-finite loss or gradient norm stopped it, 1 when it failed.
    pub fn exit_code(&self) -> Option<u8> {
        match self {
            Event::Finished { .. } => Some(0),
            Event::Stopped { reason, .. } => Some(if reason.is_numeric_failure() { 3 } else { 0 }),
            Event::Failed { .. } => Some(1),
            _ => None,
        }
    }
}

/// Why a run's step loop ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StopReason {
    /// Every step ran.
    Finished,
    /// The person asked (Stop, Ctrl-C, quitting the app); `step` is the last finished step.
    StoppedByUser {
        /// The last finished optimizer step.
        step: usize,
    },
    /// Validation loss did not improve for `patience` evaluations in a row.
    EarlyStopped {
        /// `early_stop_patience` of the config.
        patience: usize,
    },
    /// The loss of (1-based) step `step` was `value` (NaN or infinite); nothing of it was applied.
    NonFiniteLoss {
        /// The (1-based) step whose loss went bad.
        step: usize,
        /// The loss: NaN or ±infinity.
        value: f64,
    },
    /// The gradient norm of step `step` was `value` (NaN or infinite); nothing of it was applied.
    NonFiniteGradNorm {
        /// The (1-based) step whose gradient norm went bad.
        step: usize,
        /// The norm: NaN or ±infinity.
        value: f64,
    },
}

impl StopReason {
    /// True when the numbers went bad (NaN/inf), as opposed to a stop someone or something chose.
    pub fn is_numeric_failure(&self) -> bool {
        matches!(
            self,
            StopReason::NonFiniteLoss { .. } | StopReason::NonFiniteGradNorm { .. }
        )
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let non_finite = |f: &mut std::fmt::Formatter<'_>, what: &str, step: usize, value: f64| {
            write!(
                f,
                "the {what} became {value} at step {step}; nothing of that step was applied and the adapter of step {} is kept. Lower the learning rate",
                step.saturating_sub(1)
            )
        };
        match *self {
            StopReason::Finished => write!(f, "finished"),
            StopReason::StoppedByUser { step } => write!(f, "stopped at step {step}"),
            StopReason::EarlyStopped { patience } => write!(
                f,
                "early stop: validation loss has not improved for {patience} evaluations"
            ),
            StopReason::NonFiniteLoss { step, value } => {
                non_finite(f, "loss", step, value)?;
                write!(f, " or check the data")
            }
            StopReason::NonFiniteGradNorm { step, value } => {
                non_finite(f, "gradient norm", step, value)
            }
        }
    }
}

/// `--json` keeps printing the reason as the sentence it always was.
impl serde::Serialize for StopReason {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Where the training loop reports (a two-method callback, as in mlx-lm's trainer): the session's
/// channel for the app and the CLI, or a test's own.
pub trait Reporter: Send + Sync {
    /// Hands one event on (the run's last one is terminal, see [`Event::is_terminal`]).
    fn send(&self, event: Event);
    /// True once a stop was asked for; the loop checks it between steps.
    fn stop_requested(&self) -> bool;
}

/// "1:05" / "1:02:03" for a number of seconds ("--:--" when unknown); the CLI's progress lines
/// and the app show durations the same way.
pub fn format_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "--:--".into();
    }
    let s = secs.round() as u64;
    let (h, m, s) = (s / 3600, (s / 60) % 60, s % 60);
    if h > 0 {
        format!("{h}:{m:02}:{s:02}")
    } else {
        format!("{m}:{s:02}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_clock_times() {
        assert_eq!(format_duration(65.0), "1:05");
        assert_eq!(format_duration(3723.0), "1:02:03");
        assert_eq!(format_duration(f64::NAN), "--:--");
    }

    #[test]
    fn stop_reasons_keep_their_sentences_and_exit_codes() {
        let stopped = |reason| Event::Stopped {
            adapter: "out/adapter".into(),
            best: None,
            step: 3,
            reason,
        };
        let user = StopReason::StoppedByUser { step: 3 };
        assert_eq!(user.to_string(), "stopped at step 3");
        assert_eq!(stopped(user).exit_code(), Some(0));
        let early = StopReason::EarlyStopped { patience: 2 };
        assert_eq!(stopped(early).exit_code(), Some(0));
        let nan = StopReason::NonFiniteLoss {
            step: 1,
            value: f64::NAN,
        };
        assert_eq!(
            nan.to_string(),
            "the loss became NaN at step 1; nothing of that step was applied and the adapter of step 0 is kept. Lower the learning rate or check the data"
        );
        assert_eq!(stopped(nan).exit_code(), Some(3));
        let json = serde_json::to_value(stopped(early)).unwrap_or_default();
        assert_eq!(json["data"]["reason"], early.to_string());
        assert_eq!(Event::Log("x".into()).exit_code(), None);
        assert_eq!(Event::Failed { error: "x".into() }.exit_code(), Some(1));
    }
}
