//! The state of one training run as the UI shows it, built only from engine [`Event`]s: run state,
//! progress, the chart series (loss raw + smoothed, validation loss, learning rate, tokens/s,
//! memory), saved adapters and a log. Pure data, no egui, so it is unit-tested directly.

use std::path::PathBuf;

use crate::data::DatasetSummary;
use crate::train::{Event, SampleAnswer, StepStats, StopReason};

/// Weight of the newest loss in the smoothed curve (TensorBoard-style EMA with bias correction).
pub const EMA_ALPHA: f64 = 0.1;

/// Most log lines kept; older ones are dropped.
pub const MAX_LOG_LINES: usize = 2000;

/// Most evaluations whose sample answers are kept; older ones are dropped.
pub const MAX_SAMPLE_EVALS: usize = 100;

/// Where a run is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RunState {
    /// Nothing started yet.
    #[default]
    Idle,
    /// Start pressed; loading model and data.
    Starting,
    /// Steps are being taken.
    Running,
    /// Stop pressed; finishing the current step and saving.
    Stopping,
    /// Every step ran; the final adapter is saved.
    Finished,
    /// Ended early (stop request, early stop, NaN); the last step's adapter is saved.
    Stopped,
    /// Could not run; `RunView::error` says why.
    Failed,
}

impl RunState {
    /// True while the training thread works.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Starting | Self::Running | Self::Stopping)
    }

    /// One lowercase word for the status line, e.g. "training".
    pub fn label(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Starting => "starting",
            Self::Running => "training",
            Self::Stopping => "stopping",
            Self::Finished => "finished",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
        }
    }
}

/// Kind of a log line, for its colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogKind {
    /// Progress notes: loading, skipped lines, the run's start.
    Info,
    /// A validation loss.
    Eval,
    /// A checkpoint or adapter written.
    Saved,
    /// A failure or a loss that is not a number.
    Error,
}

/// One line of the run's log.
#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    /// What it reports, for its colour.
    pub kind: LogKind,
    /// The line as shown.
    pub text: String,
}

/// What the engine said when training began.
#[derive(Debug, Clone, PartialEq)]
pub struct RunInfo {
    /// Model folder name.
    pub model: String,
    /// `architectures[0]` of config.json, e.g. `LlamaForCausalLM`.
    pub architecture: String,
    /// Device in words, e.g. "CPU (2 cores, AVX-512)".
    pub device: String,
    /// Parameters of the frozen base model.
    pub base_params: usize,
    /// Parameters of the LoRA adapter (the only ones trained).
    pub trainable_params: usize,
    /// What was read from the training set.
    pub train: DatasetSummary,
    /// What was read from the validation set, if there is one.
    pub valid: Option<DatasetSummary>,
}

/// A run, as the UI sees it. Series are `[step, value]` points for egui_plot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunView {
    /// Where the run is.
    pub state: RunState,
    /// Model, device and data, once the engine reports `Started`.
    pub info: Option<RunInfo>,
    /// Optimizer steps the whole run takes.
    pub total_steps: usize,
    /// Last finished optimizer step.
    pub step: usize,
    /// Fractional epoch of the last step (1.25 = a quarter into the second).
    pub epoch: f64,
    /// Estimated seconds to the end; `Some(0.0)` once finished, `None` when unknown or stopped.
    pub eta_secs: Option<f64>,
    /// Seconds since the step loop began.
    pub elapsed_secs: f64,
    /// Input tokens per second of the last step.
    pub tokens_per_sec: Option<f64>,
    /// Trained tokens so far.
    pub trained_tokens: usize,
    /// Training loss of each step (non-finite losses are left out).
    pub loss: Vec<[f64; 2]>,
    /// `loss` smoothed by a bias-corrected EMA ([`EMA_ALPHA`]).
    pub loss_smooth: Vec<[f64; 2]>,
    /// Validation loss of each evaluation (step 0 = before training).
    pub val_loss: Vec<[f64; 2]>,
    /// Learning rate of each step.
    pub lr: Vec<[f64; 2]>,
    /// Input tokens per second of each step.
    pub throughput: Vec<[f64; 2]>,
    /// Process resident memory in MB.
    pub rss_mb: Vec<[f64; 2]>,
    /// Device memory in MB, when the backend reports it.
    pub device_mb: Vec<[f64; 2]>,
    /// (step, loss) of the best validation loss so far.
    pub best_val: Option<(usize, f64)>,
    /// The most recent save: (step, adapter folder).
    pub latest: Option<(usize, PathBuf)>,
    /// The best-validation adapter, once the engine names it.
    pub best: Option<PathBuf>,
    /// The adapter written at the end (finished or stopped).
    pub final_adapter: Option<PathBuf>,
    /// Training loss of the last step, once the run ended.
    pub final_loss: Option<f64>,
    /// Validation loss of the last evaluation, once the run ended.
    pub final_val_loss: Option<f64>,
    /// Why the run stopped (stop request, early stop, NaN…).
    pub stop_reason: Option<StopReason>,
    /// Why the run failed, in words.
    pub error: Option<String>,
    /// Sample answers of each evaluation, oldest first: (step, answers).
    pub samples: Vec<(usize, Vec<SampleAnswer>)>,
    /// The run's log, oldest first, at most [`MAX_LOG_LINES`].
    pub log: Vec<LogLine>,
    /// Bytes of the dataset read and in all, while the run reads it before training.
    pub reading: Option<(u64, u64)>,
    ema: Option<Ema>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Ema {
    value: f64,
    /// Sum of weights so far, for bias correction: value / weight is the estimate.
    weight: f64,
}

impl RunView {
    /// A fresh view for a run that is starting.
    pub fn starting() -> Self {
        let mut v = Self {
            state: RunState::Starting,
            ..Default::default()
        };
        v.push_log(
            LogKind::Info,
            "starting: loading the model and the data".into(),
        );
        v
    }

    /// Marks a stop request (the engine confirms with `Stopped`).
    pub fn request_stop(&mut self) {
        if self.state.is_active() {
            self.state = RunState::Stopping;
            self.push_log(
                LogKind::Info,
                "stop requested: finishing the current step, then saving".into(),
            );
        }
    }

    /// Step progress in 0..=1.
    pub fn progress(&self) -> f32 {
        if self.total_steps == 0 {
            0.0
        } else {
            (self.step as f32 / self.total_steps as f32).clamp(0.0, 1.0)
        }
    }

    /// Training loss of the latest step on the chart.
    pub fn last_loss(&self) -> Option<f64> {
        self.loss.last().map(|p| p[1])
    }

    /// The latest validation loss.
    pub fn last_val_loss(&self) -> Option<f64> {
        self.val_loss.last().map(|p| p[1])
    }

    /// The adapter an export should take by default: the final one, else the latest save.
    pub fn latest_adapter(&self) -> Option<(usize, PathBuf)> {
        match &self.final_adapter {
            Some(p) => Some((self.step, p.clone())),
            None => self.latest.clone(),
        }
    }

    /// Folds one engine event into the view.
    pub fn apply(&mut self, event: Event) {
        match event {
            Event::Started {
                model,
                architecture,
                device,
                base_params,
                trainable_params,
                total_steps,
                start_step,
                train,
                valid,
            } => {
                self.total_steps = total_steps;
                self.step = start_step;
                self.started(RunInfo {
                    model,
                    architecture,
                    device,
                    base_params,
                    trainable_params,
                    train: *train,
                    valid: valid.map(|v| *v),
                });
            }
            Event::Log(text) => self.push_log(LogKind::Info, text),
            Event::Reading { done, total } => self.reading = Some((done, total)),
            Event::Step(s) => self.step_stats(&s),
            Event::Eval {
                step,
                val_loss,
                best,
            } => self.eval(step, val_loss, best),
            Event::Samples { step, answers } => {
                self.samples.push((step, answers));
                if self.samples.len() > MAX_SAMPLE_EVALS {
                    self.samples.remove(0);
                }
            }
            Event::Saved { step, path } => {
                self.push_log(
                    LogKind::Saved,
                    format!("step {step}: saved {}", path.display()),
                );
                self.latest = Some((step, path));
            }
            Event::Finished {
                adapter,
                best,
                final_loss,
                final_val_loss,
            } => {
                self.state = RunState::Finished;
                self.final_loss = final_loss.or(self.last_loss());
                self.final_val_loss = final_val_loss.or(self.last_val_loss());
                self.push_log(
                    LogKind::Saved,
                    format!("finished: adapter saved to {}", adapter.display()),
                );
                self.final_adapter = Some(adapter);
                self.best = best;
                self.eta_secs = Some(0.0);
            }
            Event::Stopped {
                adapter,
                best,
                step,
                reason,
            } => self.stopped(adapter, best, step, reason),
            Event::Failed { error } => {
                self.state = RunState::Failed;
                self.push_log(LogKind::Error, format!("failed: {error}"));
                self.error = Some(error);
                self.eta_secs = None;
            }
        }
    }

    fn started(&mut self, info: RunInfo) {
        if self.state != RunState::Stopping {
            self.state = RunState::Running;
        }
        self.push_log(
            LogKind::Info,
            format!(
                "training {} ({}) on {}: {} trainable of {} parameters, {} steps, {} training records",
                info.model,
                info.architecture,
                info.device,
                info.trainable_params,
                info.base_params,
                self.total_steps,
                info.train.records
            ),
        );
        self.info = Some(info);
    }

    fn eval(&mut self, step: usize, val_loss: f64, best: bool) {
        self.val_loss.push([step as f64, val_loss]);
        if best || self.best_val.is_none_or(|(_, b)| val_loss < b) {
            self.best_val = Some((step, val_loss));
        }
        let mark = if best { " (best so far)" } else { "" };
        self.push_log(
            LogKind::Eval,
            format!("step {step}: validation loss {val_loss:.4}{mark}"),
        );
    }

    fn stopped(
        &mut self,
        adapter: PathBuf,
        best: Option<PathBuf>,
        step: usize,
        reason: StopReason,
    ) {
        self.state = RunState::Stopped;
        self.best = best;
        self.step = step;
        self.final_loss = self.last_loss();
        self.final_val_loss = self.last_val_loss();
        let saved = format!("adapter saved to {}", adapter.display());
        self.push_log(
            LogKind::Saved,
            match reason {
                // "stopped at step N" says it all.
                StopReason::StoppedByUser { .. } => format!("{reason}: {saved}"),
                _ => format!("stopped ({reason}): {saved}"),
            },
        );
        self.final_adapter = Some(adapter);
        self.stop_reason = Some(reason);
        self.eta_secs = None;
    }

    fn step_stats(&mut self, s: &StepStats) {
        if self.state == RunState::Starting {
            self.state = RunState::Running;
        }
        let x = s.step as f64;
        self.step = s.step;
        self.total_steps = s.total_steps;
        self.epoch = s.epoch;
        self.eta_secs = Some(s.eta_secs);
        self.elapsed_secs = s.elapsed_secs;
        self.tokens_per_sec = Some(s.tokens_per_sec);
        self.trained_tokens += s.tokens;
        if s.loss.is_finite() {
            self.loss.push([x, s.loss]);
            let ema = self.ema.get_or_insert_with(Ema::default);
            ema.value = (1.0 - EMA_ALPHA) * ema.value + EMA_ALPHA * s.loss;
            ema.weight = (1.0 - EMA_ALPHA) * ema.weight + EMA_ALPHA;
            self.loss_smooth.push([x, ema.value / ema.weight]);
        } else {
            self.push_log(
                LogKind::Error,
                format!("step {}: the loss is not a number", s.step),
            );
        }
        self.lr.push([x, s.lr]);
        self.throughput.push([x, s.tokens_per_sec]);
        if let Some(b) = s.rss_bytes {
            self.rss_mb.push([x, b as f64 / 1e6]);
        }
        if let Some(b) = s.device_bytes {
            self.device_mb.push([x, b as f64 / 1e6]);
        }
    }

    fn push_log(&mut self, kind: LogKind, text: String) {
        if self.log.len() >= MAX_LOG_LINES {
            self.log.drain(..MAX_LOG_LINES / 10);
        }
        self.log.push(LogLine { kind, text });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Format, TemplateUse};

    pub(crate) fn stats(step: usize, loss: f64) -> StepStats {
        StepStats {
            step,
            total_steps: 10,
            epoch: step as f64 / 5.0,
            loss,
            lr: 1e-3,
            grad_norm: 1.0,
            tokens: 100,
            input_tokens: 150,
            tokens_per_sec: 1000.0,
            elapsed_secs: step as f64,
            eta_secs: (10 - step) as f64,
            rss_bytes: Some(200_000_000),
            device_bytes: None,
        }
    }

    fn summary() -> DatasetSummary {
        DatasetSummary {
            format: Format::Text,
            template: TemplateUse::None,
            prompt_masked: true,
            records: 20,
            total_tokens: 1000,
            trained_tokens: 800,
            masked_fraction: 0.2,
            length_p50: 50,
            length_p90: 60,
            length_p99: 70,
            length_max: 70,
            histogram: vec![(0, 20)],
            truncated: 0,
            dropped: 0,
            untrainable: 0,
            skipped_lines: 0,
            approximate_masks: 0,
        }
    }

    fn started() -> Event {
        Event::Started {
            model: "tiny".into(),
            architecture: "LlamaForCausalLM".into(),
            device: "CPU".into(),
            base_params: 1000,
            trainable_params: 10,
            total_steps: 10,
            start_step: 0,
            train: Box::new(summary()),
            valid: None,
        }
    }

    #[test]
    fn steps_fill_the_series_and_progress() {
        let mut v = RunView::starting();
        assert_eq!(v.state, RunState::Starting);
        v.apply(started());
        assert_eq!(v.state, RunState::Running);
        for (i, loss) in [3.0, 2.0, 1.0].into_iter().enumerate() {
            v.apply(Event::Step(stats(i + 1, loss)));
        }
        assert_eq!(v.step, 3);
        assert_eq!(v.loss, vec![[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]]);
        assert!((v.progress() - 0.3).abs() < 1e-6);
        assert_eq!(v.eta_secs, Some(7.0));
        assert_eq!(v.trained_tokens, 300);
        assert_eq!(v.rss_mb.last(), Some(&[3.0, 200.0]));
        assert!(v.device_mb.is_empty());
        // Bias-corrected EMA: the first point equals the first loss, then it lags behind.
        assert!((v.loss_smooth[0][1] - 3.0).abs() < 1e-12);
        let expected = (0.9 * 0.1 * 3.0 + 0.1 * 2.0) / (0.9 * 0.1 + 0.1);
        assert!((v.loss_smooth[1][1] - expected).abs() < 1e-12);
        assert!(v.loss_smooth[2][1] > 1.0 && v.loss_smooth[2][1] < 2.0);
    }

    #[test]
    fn evals_track_the_best_and_saves_the_latest() {
        let mut v = RunView::starting();
        v.apply(Event::Eval {
            step: 0,
            val_loss: 3.0,
            best: true,
        });
        v.apply(Event::Eval {
            step: 5,
            val_loss: 3.5,
            best: false,
        });
        assert_eq!(v.best_val, Some((0, 3.0)));
        v.apply(Event::Eval {
            step: 10,
            val_loss: 2.5,
            best: true,
        });
        assert_eq!(v.best_val, Some((10, 2.5)));
        assert_eq!(v.val_loss.len(), 3);
        v.apply(Event::Saved {
            step: 5,
            path: "out/step-5".into(),
        });
        assert_eq!(v.latest, Some((5, PathBuf::from("out/step-5"))));
        assert_eq!(v.latest_adapter(), Some((5, PathBuf::from("out/step-5"))));
        assert!(v.log.iter().any(|l| l.kind == LogKind::Saved));
    }

    #[test]
    fn stop_finish_and_failure_end_the_run() {
        let mut v = RunView::starting();
        v.apply(Event::Step(stats(1, 2.0)));
        v.request_stop();
        assert_eq!(v.state, RunState::Stopping);
        v.apply(Event::Stopped {
            adapter: "out/latest".into(),
            best: None,
            step: 1,
            reason: StopReason::StoppedByUser { step: 1 },
        });
        assert_eq!(v.state, RunState::Stopped);
        assert!(!v.state.is_active());
        assert_eq!(v.final_adapter, Some(PathBuf::from("out/latest")));
        assert_eq!(v.final_loss, Some(2.0));
        assert!(v.log.last().unwrap().text.contains("out/latest"));
        // A stop request after the end changes nothing.
        v.request_stop();
        assert_eq!(v.state, RunState::Stopped);

        let mut f = RunView::starting();
        f.apply(Event::Finished {
            adapter: "out/final".into(),
            best: Some("out/best".into()),
            final_loss: Some(0.5),
            final_val_loss: Some(0.7),
        });
        assert_eq!(f.state, RunState::Finished);
        assert_eq!(f.best, Some(PathBuf::from("out/best")));
        assert_eq!(f.final_val_loss, Some(0.7));

        let mut e = RunView::starting();
        e.apply(Event::Failed {
            error: "out of memory".into(),
        });
        assert_eq!(e.state, RunState::Failed);
        assert_eq!(e.error.as_deref(), Some("out of memory"));
    }

    #[test]
    fn nan_losses_are_logged_not_plotted_and_the_log_is_capped() {
        let mut v = RunView::starting();
        v.apply(Event::Step(stats(1, f64::NAN)));
        assert!(v.loss.is_empty() && v.loss_smooth.is_empty());
        assert_eq!(v.lr.len(), 1);
        for i in 0..(MAX_LOG_LINES * 2) {
            v.apply(Event::Log(format!("note {i}")));
        }
        assert!(v.log.len() <= MAX_LOG_LINES);
        assert_eq!(
            v.log.last().unwrap().text,
            format!("note {}", MAX_LOG_LINES * 2 - 1)
        );
    }
}
