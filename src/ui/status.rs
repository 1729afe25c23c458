//! The status bar and the figures behind it: device, process memory (refreshed about once a
//! second), run state, and the app's own frame times (p99 shown; logged every 5 s with
//! `FINETUNE_FRAME_LOG=1`, and with `=continuous` the window also repaints every frame so the
//! figures cover many frames).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use eframe::egui;
use egui::Ui;

use super::run_view::{RunState, RunView};
use super::{Job, Poll};
use crate::backend::Plan;
use crate::inspect::format_bytes;
use crate::train::{DeviceChoice, DtypeChoice};

/// Frames kept for the frame-time figures.
const FRAME_WINDOW: usize = 600;

/// The last `FRAME_WINDOW` (600) frame times in ms.
#[derive(Debug, Default)]
pub struct Window(VecDeque<f32>);

impl Window {
    /// Adds one frame time in ms, dropping the oldest past the window.
    pub fn push(&mut self, ms: f32) {
        if self.0.len() >= FRAME_WINDOW {
            self.0.pop_front();
        }
        self.0.push_back(ms);
    }

    /// Frames held.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no frame was recorded yet.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `p`th percentile (nearest rank).
    pub fn percentile(&self, p: usize) -> Option<f32> {
        if self.0.is_empty() {
            return None;
        }
        let mut v: Vec<f32> = self.0.iter().copied().collect();
        v.sort_by(f32::total_cmp);
        let rank = (p * v.len()).div_ceil(100).clamp(1, v.len());
        Some(v[rank - 1])
    }
}

/// The app's own time per frame (`logic` + `ui`), and eframe's CPU time for the whole frame
/// (adds tessellation and OpenGL painting; with a software renderer that is most of it).
#[derive(Debug, Default)]
pub struct FrameTimes {
    /// The app's own time per frame (`logic` + `ui`).
    pub app: Window,
    /// eframe's CPU time for the whole frame.
    pub frame: Window,
    started: Option<Instant>,
    logged: Option<Instant>,
}

impl FrameTimes {
    /// Call first thing in `logic()`, with eframe's figure for the previous frame.
    pub fn begin(&mut self, eframe_cpu_secs: Option<f32>) {
        self.started = Some(Instant::now());
        if let Some(cpu) = eframe_cpu_secs {
            self.frame.push(cpu * 1000.0);
        }
    }

    /// Call last thing in `ui()`.
    pub fn end(&mut self) {
        if let Some(t0) = self.started.take() {
            self.app.push(t0.elapsed().as_secs_f32() * 1000.0);
        }
    }

    /// Starts the figures afresh (when a run starts, so they cover the run).
    pub fn reset(&mut self) {
        self.app = Window::default();
        self.frame = Window::default();
    }

    /// "ui p99 1.2 ms, frame p99 4.0 ms".
    pub fn text(&self) -> Option<String> {
        let app = self.app.percentile(99)?;
        Some(match self.frame.percentile(99) {
            Some(f) => format!("ui p99 {app:.1} ms, frame p99 {f:.1} ms"),
            None => format!("ui p99 {app:.1} ms"),
        })
    }

    /// With `FINETUNE_FRAME_LOG` set: a line on stderr every 5 s, and continuous repaints for
    /// `=continuous`.
    pub fn log(&mut self, ctx: &egui::Context, run: &RunView) {
        let Some(mode) = std::env::var_os("FINETUNE_FRAME_LOG") else {
            return;
        };
        if mode == "continuous" {
            ctx.request_repaint();
        }
        if self
            .logged
            .is_some_and(|t| t.elapsed() < Duration::from_secs(5))
        {
            return;
        }
        self.logged = Some(Instant::now());
        if let Some(t) = self.text() {
            eprintln!(
                "frame time over the last {} frames: {t} (run: {}, step {})",
                self.app.len(),
                run.state.label(),
                run.step
            );
        }
    }
}

/// What the status bar shows that the run view does not.
#[derive(Default)]
pub struct Status {
    /// The frame-time figures.
    pub frames: FrameTimes,
    rss_bytes: Option<u64>,
    refreshed: Option<Instant>,
    /// The device the settings' choice picks (and why), before any run says which it uses.
    plan: Option<(Choice, Result<Plan, String>)>,
    plan_job: Option<(Choice, Job<Result<Plan, String>>)>,
}

/// The settings' device and dtype choice.
type Choice = (DeviceChoice, DtypeChoice);

impl Status {
    /// Refreshes memory about once a second; plans the device for `choice` when it changes.
    pub fn refresh(&mut self, ctx: &egui::Context, choice: Choice) {
        let planned = self.plan.as_ref().map(|(c, _)| *c);
        let planning = self.plan_job.as_ref().map(|(c, _)| *c);
        if planned != Some(choice) && planning != Some(choice) {
            // Probing a GPU can take a moment: not on the UI thread.
            let job = Job::spawn(ctx, "device", move || {
                crate::backend::plan(choice.0, choice.1, &crate::backend::SystemProbe)
                    .map_err(|e| e.to_string())
            });
            self.plan_job = Some((choice, job));
        }
        if let Some((c, job)) = &self.plan_job {
            let done = match job.poll() {
                Poll::Pending => None,
                Poll::Ready(r) => Some(r),
                Poll::Failed(e) => Some(Err(e)),
            };
            if let Some(r) = done {
                self.plan = Some((*c, r));
                self.plan_job = None;
            }
        }
        if self
            .refreshed
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.refreshed = Some(Instant::now());
        self.rss_bytes = crate::memory::process_rss_bytes();
    }

    /// The device plan for the settings' current choice, once known.
    pub fn plan(&self) -> Option<&Result<Plan, String>> {
        self.plan.as_ref().map(|(_, p)| p)
    }

    /// The bar at the bottom of the window.
    pub fn status_ui(&self, ui: &mut Ui, run: &RunView) {
        ui.horizontal(|ui| {
            match (&run.info, &self.plan) {
                (Some(i), _) => ui.label(format!("Device: {}", i.device)),
                (None, Some((_, Ok(p)))) => ui
                    .label(format!("Device: {}", p.name))
                    .on_hover_text(&p.reason),
                (None, Some((_, Err(e)))) => ui.label(format!("Device: unavailable ({e})")),
                (None, None) => ui.label("Device: …"),
            };
            ui.separator();
            let mem = self.rss_bytes.map_or_else(|| "n/a".into(), format_bytes);
            ui.label(format!("Memory: {mem}"));
            if let Some(d) = run.device_mb.last() {
                ui.label(format!("(device {:.0} MB)", d[1]));
            }
            ui.separator();
            let state = match run.state {
                RunState::Running | RunState::Stopping => format!(
                    "{} (step {} of {})",
                    run.state.label(),
                    run.step,
                    run.total_steps
                ),
                s => s.label().to_owned(),
            };
            ui.label(format!("Run: {state}"));
            ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                if let Some(t) = self.frames.text() {
                    ui.weak(t);
                }
            });
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_over_a_sliding_window() {
        let mut w = Window::default();
        assert_eq!(w.percentile(99), None);
        for i in 1..=100 {
            w.push(i as f32);
        }
        assert_eq!(w.percentile(50), Some(50.0));
        assert_eq!(w.percentile(99), Some(99.0));
        for _ in 0..FRAME_WINDOW {
            w.push(1.0);
        }
        assert_eq!(w.len(), FRAME_WINDOW);
        assert_eq!(w.percentile(99), Some(1.0), "old frames fall out");
    }

    #[test]
    fn frame_times_text() {
        let mut f = FrameTimes::default();
        assert_eq!(f.text(), None);
        f.begin(Some(0.004));
        f.end();
        let t = f.text().unwrap();
        assert!(
            t.starts_with("ui p99 ") && t.ends_with("frame p99 4.0 ms"),
            "{t}"
        );
        f.reset();
        assert!(f.app.is_empty() && f.frame.is_empty());
    }
}
