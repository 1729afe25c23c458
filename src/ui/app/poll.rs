//! Collecting what the panels' workers finished, once a frame.

use eframe::egui;

use super::{Action, FineTuneApp};
use crate::train::capped_seq_len;

impl FineTuneApp {
    /// Collects what the panels' workers finished: model summaries and Hub events, datasets,
    /// exports.
    pub(super) fn poll_workers(&mut self, ctx: &egui::Context) {
        let had = self.models.summary.as_ref().map(|m| m.dir.clone());
        for dir in self.models.poll(ctx) {
            self.actions.push(Action::ChooseModel(dir));
        }
        if let Some(token) = self.models.take_keychain_token() {
            self.settings.hf_token = token;
        }
        if let Some(m) = &self.models.summary {
            let capped = capped_seq_len(self.settings.max_seq_len, m.context_length);
            if had.as_ref() != Some(&m.dir) && capped < self.settings.max_seq_len {
                self.settings.max_seq_len = capped;
                self.info(format!(
                    "Max sequence length lowered to {capped} tokens, the most {} reads.",
                    m.name
                ));
            }
        }
        for a in self.dataset.poll() {
            self.actions.push(Action::Data(a));
        }
        self.playground.poll();
        if let Some(dir) = self.export.poll() {
            self.info(format!("Exported to {}", dir.display()));
        }
        if let Some(dir) = self.elsewhere.poll() {
            self.export.imported = Some(dir.clone());
            self.export.which = crate::ui::export::Which::Imported;
            self.playground.offer_run_adapter(Some(dir.clone()));
            self.info(format!("Imported the adapter: {}", dir.display()));
        }
    }
}
