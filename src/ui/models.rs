//! Step 1, the model: a typed path or a folder dialog, the models already in the Hugging Face
//! cache, the demo model, Hub search (results table, details pane, download with progress and
//! cancel; the calls run on the [`HubWorker`]), the Hugging Face token, and the chosen model's
//! facts (read by [`crate::inspect`] on a worker thread, no weights loaded).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use eframe::egui;
use egui::{Color32, RichText, Ui};

use super::app::{drain, Drained};
use super::hub_worker::{HfToken, HubCommand, HubEvent, HubSetup, HubWorker, Problem, ProblemKind};
use super::settings::error_color;
use super::{format_duration, pick_path, take_ready, Job, Pick};
use crate::hub::{
    Cancel, DownloadEvent, DownloadProgress, ModelDetails, SearchQuery, SearchRow, SearchSort,
    TokenSource,
};
use crate::inspect::{self, format_bytes, format_count, CachedModel, ModelSummary};

/// Rows a Hub search asks for.
const SEARCH_LIMIT: usize = 25;

/// What the model panel asks the app to do.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelAction {
    /// Use this folder as the base model.
    Choose(PathBuf),
    /// Load the bundled demo model and dataset.
    TryDemo,
}

/// The model step's state (none of it persisted).
pub struct ModelsPanel {
    /// The path text field.
    pub path_text: String,
    cache_dir: Option<PathBuf>,
    cache: Vec<CachedModel>,
    cache_job: Option<Job<Vec<CachedModel>>>,
    summary_job: Option<Job<Result<ModelSummary, String>>>,
    /// The chosen model's facts.
    pub summary: Option<ModelSummary>,
    /// Why the chosen folder cannot be used.
    pub error: Option<String>,
    /// The model being converted to safetensors (first load of a .bin folder or GGUF file) and
    /// since when.
    converting: Option<(String, Instant)>,
    browse: Option<Job<Option<PathBuf>>>,
    hub: HubPanel,
}

impl Default for ModelsPanel {
    fn default() -> Self {
        Self {
            path_text: String::new(),
            cache_dir: inspect::hub_cache_dir(),
            cache: Vec::new(),
            cache_job: None,
            summary_job: None,
            summary: None,
            error: None,
            converting: None,
            browse: None,
            hub: HubPanel::default(),
        }
    }
}

impl ModelsPanel {
    /// Starts scanning the cache folder.
    pub fn rescan(&mut self, ctx: &egui::Context) {
        if let Some(dir) = self.cache_dir.clone() {
            self.cache_job = Some(Job::spawn(ctx, "cache-scan", move || {
                inspect::scan_cache(&dir)
            }));
        }
    }

    /// Starts preparing the model `path` names (converting a `.bin` folder or a GGUF file once)
    /// and reading its config and headers; the result replaces the summary.
    pub fn inspect(&mut self, ctx: &egui::Context, path: &Path) {
        self.path_text = path.display().to_string();
        self.error = None;
        let cache = crate::convert::converted_cache_dir();
        self.converting = crate::model::ModelSource::open(path)
            .ok()
            .filter(|s| s.needs_conversion(&cache))
            .map(|s| (s.name(), Instant::now()));
        let owned = path.to_path_buf();
        let job = Job::spawn(ctx, "inspect", move || {
            let prepared = crate::model::ModelSource::open(&owned)
                .and_then(|s| s.prepare(&cache))
                .map_err(|e| e.to_string())?;
            inspect::summarize_prepared(&prepared).map_err(|e| e.to_string())
        });
        self.summary_job = Some(job);
    }

    /// Points the Hub search at another endpoint or cache (tests use a fake Hub); call before
    /// the first frame, which starts the worker.
    pub fn set_hub_setup(&mut self, setup: HubSetup) {
        self.cache_dir = setup.cache_dir();
        self.hub.setup = setup;
    }

    /// Starts the Hub worker (it reads the keychain token and builds the client; nothing is
    /// contacted until a search).
    pub fn start_hub(&mut self, ctx: &egui::Context) {
        if self.hub.worker.is_some() {
            return;
        }
        match HubWorker::spawn(ctx, self.hub.setup.clone()) {
            Ok(w) => self.hub.worker = Some(w),
            Err(e) => self.hub.worker_problem = Some(Problem::other(e)),
        }
    }

    /// The token found in the OS keychain at start, once, for the Settings field.
    pub fn take_keychain_token(&mut self) -> Option<HfToken> {
        self.hub.keychain_token.take()
    }

    /// Asks a running download to stop (on quit); what arrived stays in the cache.
    pub fn cancel_download(&mut self) {
        if let Some(d) = &mut self.hub.download {
            d.cancel.cancel();
            d.cancelling = true;
        }
    }

    /// True while a summary or scan is being read, or a Hub search, details read or download
    /// runs.
    pub fn is_busy(&self) -> bool {
        self.summary_job.is_some()
            || self.cache_job.is_some()
            || self.hub.searching
            || !self.hub.asked.is_empty()
            || self.hub.download.is_some()
    }

    /// Collects finished work and Hub events (for at most [`super::app::EVENT_BUDGET`]); returns
    /// the folders to choose: one picked in the dialog, or a finished download's snapshot.
    pub fn poll(&mut self, ctx: &egui::Context) -> Vec<PathBuf> {
        let mut chosen = Vec::new();
        let end = drain(
            ctx,
            self,
            |panel| panel.hub.worker.as_ref().map(|w| w.try_recv()),
            |panel, event| {
                chosen.extend(panel.apply_hub(ctx, event));
                true
            },
        );
        if end == Drained::Disconnected {
            self.hub.worker_stopped();
        }
        if let Some(r) = take_ready(&mut self.cache_job) {
            self.cache = r.unwrap_or_default();
        }
        if let Some(r) = take_ready(&mut self.summary_job) {
            self.converting = None;
            match r.and_then(|r| r) {
                Ok(s) => {
                    self.summary = Some(s);
                    self.error = None;
                }
                Err(e) => {
                    self.summary = None;
                    self.error = Some(e);
                }
            }
        }
        if let Some(dir) = take_ready(&mut self.browse).and_then(|r| r.ok().flatten()) {
            chosen.push(dir);
        }
        chosen
    }

    /// Folds one Hub event into the panel; a finished download's snapshot is returned.
    fn apply_hub(&mut self, ctx: &egui::Context, event: HubEvent) -> Option<PathBuf> {
        let hub = &mut self.hub;
        match event {
            HubEvent::Connected {
                endpoint,
                token_source,
            } => {
                hub.endpoint = Some(endpoint);
                hub.token_source = token_source;
                hub.worker_problem = None;
            }
            HubEvent::Unavailable(p) => hub.worker_problem = Some(p),
            HubEvent::KeychainToken(Ok(t)) => hub.keychain_token = t,
            HubEvent::KeychainToken(Err(e)) => hub.token_note = Some(Err(e)),
            HubEvent::Searched { query, result } => hub.searched(query, result),
            HubEvent::Details { repo, result } => {
                hub.asked.remove(&repo);
                // A prefetched answer is not replaced by a later failure.
                let keep = result.is_err() && matches!(hub.details.get(&repo), Some(Ok(_)));
                if !keep {
                    hub.details.insert(repo, result.map(|d| *d));
                }
            }
            HubEvent::Download { repo, event } => {
                if let Some(d) = hub.download.as_mut().filter(|d| d.repo == repo) {
                    d.apply(event);
                }
            }
            HubEvent::Downloaded { repo, snapshot } => {
                hub.download = None;
                hub.outcome = Some((repo, Ok(snapshot.clone())));
                self.rescan(ctx);
                return Some(snapshot);
            }
            HubEvent::DownloadFailed { repo, problem } => {
                hub.download = None;
                if matches!(
                    problem.kind,
                    ProblemKind::Gated { .. } | ProblemKind::BadToken
                ) {
                    hub.open_token = true;
                }
                hub.outcome = Some((repo, Err(problem)));
            }
            HubEvent::TokenSaved(r) => hub.token_saved(r),
        }
        None
    }

    /// The model step. `chosen` is the folder in the settings; `token` the Hugging Face token
    /// field of the settings.
    pub fn models_ui(
        &mut self,
        ui: &mut Ui,
        chosen: Option<&Path>,
        token: &mut HfToken,
    ) -> Option<ModelAction> {
        let mut action = None;
        ui.heading("1. Choose a model");
        ui.label(
            "A Hugging Face model folder (safetensors or PyTorch .bin weights), a .gguf file, or a model from the Hub. .bin and GGUF models are converted to safetensors once, the first time.",
        );
        ui.add_space(6.0);

        ui.horizontal(|ui| {
            if ui
                .button("Try the demo")
                .on_hover_text(
                    "A tiny bundled model and dataset: the whole flow in about a minute, offline",
                )
                .clicked()
            {
                action = Some(ModelAction::TryDemo);
            }
            ui.weak("no download needed");
        });
        ui.add_space(6.0);

        ui.horizontal(|ui| {
            let l = ui.label("Model:");
            let edit = ui
                .add(
                    egui::TextEdit::singleline(&mut self.path_text)
                        .hint_text("/path/to/model folder, model.gguf, or org/name")
                        .desired_width(440.0),
                )
                .labelled_by(l.id);
            let enter = edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
            if ui.button("Use").clicked() || enter {
                let p = PathBuf::from(self.path_text.trim());
                if !p.as_os_str().is_empty() {
                    action = Some(ModelAction::Choose(p));
                }
            }
            if ui
                .add_enabled(self.browse.is_none(), egui::Button::new("Folder…"))
                .on_hover_text("Choose a Hugging Face model folder (safetensors or .bin)")
                .clicked()
            {
                self.browse = Some(pick_path(ui.ctx(), Pick::Folder, "Choose a model folder"));
            }
            if ui
                .add_enabled(self.browse.is_none(), egui::Button::new("GGUF file…"))
                .on_hover_text("Choose a .gguf file, e.g. the one you run in Ollama or LM Studio")
                .clicked()
            {
                self.browse = Some(pick_path(ui.ctx(), Pick::Gguf, "Choose a GGUF model file"));
            }
        });
        ui.add_space(8.0);

        if let Some(a) = self.chosen_ui(ui, chosen) {
            action = Some(a);
        }
        ui.add_space(10.0);
        if let Some(a) = self.cache_ui(ui) {
            action = Some(a);
        }
        ui.add_space(10.0);
        if let Some(a) = self.hub_ui(ui, token) {
            action = Some(a);
        }
        action
    }

    /// Facts about the chosen model, or why it cannot be used.
    fn chosen_ui(&self, ui: &mut Ui, chosen: Option<&Path>) -> Option<ModelAction> {
        let reading = self.summary_job.is_some();
        egui::Frame::group(ui.style()).show(ui, |ui| {
            ui.set_width(ui.available_width());
            if reading {
                self.reading_ui(ui);
                return;
            }
            if let Some(err) = &self.error {
                ui.label(RichText::new(err).color(error_color(ui)));
                return;
            }
            let Some(s) = &self.summary else {
                match chosen {
                    Some(p) => ui.label(format!("Chosen: {}", p.display())),
                    None => ui.weak("No model chosen yet."),
                };
                return;
            };
            ui.horizontal(|ui| {
                ui.strong(RichText::new(&s.name).size(16.0));
                ui.weak(s.source.display().to_string());
            });
            if s.source != s.dir {
                ui.weak(format!(
                    "Trained from its safetensors copy, converted once: {}",
                    s.dir.display()
                ));
            }
            egui::Grid::new("model-facts")
                .num_columns(4)
                .spacing([24.0, 4.0])
                .show(ui, |ui| {
                    fact(ui, "Architecture", &s.architecture);
                    fact(ui, "Parameters", &format_count(s.parameters));
                    ui.end_row();
                    fact(ui, "Layers", &s.layers.to_string());
                    fact(ui, "Hidden size", &s.hidden_size.to_string());
                    ui.end_row();
                    fact(ui, "Vocabulary", &s.vocab_size.to_string());
                    fact(ui, "Context length", &s.context_length.to_string());
                    ui.end_row();
                    fact(ui, "Weights dtype", &s.dtype_text());
                    fact(
                        ui,
                        "Size on disk",
                        &format!(
                            "{} ({} weight file{})",
                            format_bytes(s.size_bytes),
                            s.weight_files,
                            if s.weight_files == 1 { "" } else { "s" }
                        ),
                    );
                    ui.end_row();
                });
            if !s.has_tokenizer {
                ui.label(
                    RichText::new("No tokenizer.json in this folder: datasets cannot be read. Download the model's tokenizer files too.")
                        .color(error_color(ui)),
                );
            } else if !s.has_chat_template {
                ui.weak("No chat template: chat datasets use the ChatML fallback.");
            }
            ui.weak(format!("LoRA can adapt: {}", s.linear_names.join(", ")));
        });
        None
    }

    /// What the model step is doing while the chosen model is prepared and read.
    fn reading_ui(&self, ui: &mut Ui) {
        match &self.converting {
            Some((name, since)) => {
                ui.horizontal(|ui| {
                    ui.spinner();
                    ui.label(format!(
                        "Converting {name} to safetensors… {} (first time only: later loads reuse the copy)",
                        format_duration(since.elapsed().as_secs_f64())
                    ));
                });
                ui.ctx()
                    .request_repaint_after(std::time::Duration::from_millis(250));
            }
            None => {
                ui.label("Reading the model's config and file headers…");
            }
        }
    }

    /// The models already downloaded.
    fn cache_ui(&mut self, ui: &mut Ui) -> Option<ModelAction> {
        let mut action = None;
        ui.horizontal(|ui| {
            ui.strong("Downloaded models");
            match &self.cache_dir {
                Some(d) => ui.weak(d.display().to_string()),
                None => ui.weak("(no home folder: set HF_HUB_CACHE)"),
            };
            if ui.small_button("Rescan").clicked() {
                self.rescan(ui.ctx());
            }
        });
        if self.cache_job.is_some() {
            ui.label("Scanning…");
            return None;
        }
        if self.cache.is_empty() {
            ui.weak("None found in the Hugging Face cache. Models downloaded with huggingface_hub or `hf download` appear here.");
            return None;
        }
        egui::ScrollArea::vertical()
            .id_salt("cache-list")
            .max_height(220.0)
            .show(ui, |ui| {
                egui::Grid::new("cache-grid")
                    .num_columns(4)
                    .striped(true)
                    .spacing([16.0, 4.0])
                    .show(ui, |ui| {
                        for m in &self.cache {
                            let arch = m.architecture.as_deref().unwrap_or("unknown");
                            let supported = crate::model::SUPPORTED_ARCHITECTURES.contains(&arch);
                            if ui
                                .add_enabled(supported, egui::Button::new(&m.repo_id))
                                .on_hover_text(m.path.display().to_string())
                                .on_disabled_hover_text(format!("{arch} is not supported yet"))
                                .clicked()
                            {
                                action = Some(ModelAction::Choose(m.path.clone()));
                            }
                            ui.label(arch);
                            ui.label(format_bytes(m.size_bytes));
                            let rev: String = m.revision.chars().take(8).collect();
                            ui.weak(if m.is_main {
                                format!("{rev} (main)")
                            } else {
                                rev
                            });
                            ui.end_row();
                        }
                    });
            });
        action
    }
}

fn fact(ui: &mut Ui, name: &str, value: &str) {
    ui.weak(name);
    ui.strong(value);
}

impl HubPanel {
    /// Takes a search's answer, unless a later search superseded it.
    fn searched(&mut self, query: SearchQuery, result: Result<Vec<SearchRow>, Problem>) {
        if self.last_query.as_ref() != Some(&query) {
            return;
        }
        self.searching = false;
        self.searched = Some(query);
        match result {
            Ok(rows) => {
                self.search_problem = None;
                if !rows.iter().any(|r| Some(&r.repo) == self.selected.as_ref()) {
                    self.selected = None;
                }
                self.rows = rows;
            }
            Err(p) => {
                self.search_problem = Some(p);
                self.rows.clear();
                self.selected = None;
            }
        }
    }

    /// Says where a new token went; a new token may open gated or private models, so what
    /// failed before is forgotten.
    fn token_saved(&mut self, r: Result<bool, String>) {
        self.token_note = Some(match r {
            Ok(true) if self.saving_empty => Ok("Removed from the OS keychain.".into()),
            Ok(true) => Ok("Saved in the OS keychain.".into()),
            Ok(false) => Ok("Used until FineTune quits (the keychain is off).".into()),
            Err(e) => Err(format!("{e}; the token is used until FineTune quits")),
        });
        self.details.retain(|_, d| d.is_ok());
        if self.outcome.as_ref().is_some_and(|(_, o)| o.is_err()) {
            self.outcome = None;
        }
    }
}

/// The Hub part of the model step (none of it persisted).
mod hub;
mod hub_view;
mod hub_widgets;
use hub::*;
use hub_widgets::*;
