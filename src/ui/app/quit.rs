//! Quitting while a run trains (issue 20): closing the window asks first; "Stop, save and quit"
//! stops after the current step, waits for the adapter and checkpoint to be saved, then closes.

use std::time::{Duration, Instant};

use eframe::egui;
use egui::Ui;

use super::FineTuneApp;

/// Where a close request stands.
#[derive(Debug, Default)]
pub(super) struct Quit {
    /// The window's close button was pressed during a run: the question is showing.
    asking: bool,
    /// The person chose to stop and quit: close once the session has ended.
    when_stopped: bool,
    /// The close is allowed through.
    confirmed: bool,
}

impl FineTuneApp {
    /// Holds a close request while a run trains (asking instead), and closes once a run stopped
    /// for quitting has saved.
    pub(super) fn quit_logic(&mut self, ctx: &egui::Context) {
        let requested = ctx.input(|i| i.viewport().close_requested());
        if requested && !self.quit.confirmed && self.session.is_some() {
            ctx.send_viewport_cmd(egui::ViewportCommand::CancelClose);
            self.quit.asking = true;
        }
        if self.quit.when_stopped && self.session.is_none() {
            self.quit.confirmed = true;
            ctx.send_viewport_cmd(egui::ViewportCommand::Close);
        }
    }

    /// The question, while it is asked.
    pub(super) fn quit_ui(&mut self, ui: &mut Ui) {
        if !self.quit.asking {
            return;
        }
        egui::Modal::new(egui::Id::unique("quit-while-training")).show(ui.ctx(), |ui| {
            ui.heading("Training is running");
            ui.label(
                "Quitting stops the run after the current step; its adapter and a checkpoint are saved first, and it can be resumed later.",
            );
            ui.horizontal(|ui| {
                if ui.button("Stop, save and quit").clicked() {
                    if let Some(s) = &self.session {
                        s.stop();
                        self.run.request_stop();
                    }
                    self.quit.asking = false;
                    self.quit.when_stopped = true;
                }
                if ui.button("Keep training").clicked() {
                    self.quit.asking = false;
                }
            });
        });
    }

    /// On quit, asks a running session to stop and gives it a few seconds to save its adapter.
    pub(super) fn stop_on_exit(&mut self) {
        self.models.cancel_download();
        if let Some(mut s) = self.session.take() {
            s.stop();
            let deadline = Instant::now() + Duration::from_secs(10);
            while !s.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if s.is_finished() {
                s.join();
            }
        }
    }
}
