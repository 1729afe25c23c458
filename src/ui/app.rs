//! [`FineTuneApp`], the [`eframe::App`]: `logic()` does the non-UI work (dropped files, shortcuts,
//! queued actions, worker results, draining session events with a time cap, memory figures);
//! `ui()` draws the steps side panel, the status bar and the current step's panel (app/central.rs).
//! Panels never act directly: they return actions that the next `logic()` carries out.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::TryRecvError;
use eframe::egui;
use egui::Ui;

use super::dataset::{drop_overlay_ui, DataKey, DatasetAction, DatasetPanel, Outcome};
use super::export::ExportPanel;
use super::hub_worker::HubSetup;
use super::models::ModelsPanel;
use super::playground::{TryContext, TryPanel};
use super::run_view::RunView;
use super::settings::{run_dir, Preset, Settings};
use super::status::Status;
use super::steps::steps_ui;
pub use super::steps::Step;
use super::{classify_paths, find_assets, open_folder, Opened};
use crate::inspect::ModelSummary;
use crate::session::{Repaint, Session};
use crate::train::{TrainConfig, ValidConfig};

mod central;
mod derived;
mod poll;
mod quit;

/// Longest time `logic()` spends draining engine events per frame.
pub const EVENT_BUDGET: Duration = Duration::from_millis(10);

/// Why [`drain`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Drained {
    /// Nothing (more) is waiting, or there is no source.
    Empty,
    /// The budget ran out with more perhaps waiting; another frame is asked for.
    OutOfTime,
    /// `apply` said the stream has ended.
    Stopped,
    /// The sender has gone.
    Disconnected,
}

/// Takes what `next` yields from a worker's channel (`None`: no worker) and folds each item into
/// `state` with `apply` (false: that was the last one), for at most [`EVENT_BUDGET`]; asks for
/// another frame when time runs out. Training events and Hub events drain this way.
pub(crate) fn drain<S, T>(
    ctx: &egui::Context,
    state: &mut S,
    mut next: impl FnMut(&mut S) -> Option<Result<T, TryRecvError>>,
    mut apply: impl FnMut(&mut S, T) -> bool,
) -> Drained {
    let deadline = Instant::now() + EVENT_BUDGET;
    loop {
        match next(state) {
            None | Some(Err(TryRecvError::Empty)) => return Drained::Empty,
            Some(Err(TryRecvError::Disconnected)) => return Drained::Disconnected,
            Some(Ok(item)) => {
                if !apply(state, item) {
                    return Drained::Stopped;
                }
            }
        }
        if Instant::now() >= deadline {
            // More may be waiting: come back next frame.
            ctx.request_repaint();
            return Drained::OutOfTime;
        }
    }
}

/// Starts a training session; the real engine or a scripted fake in tests.
pub type Engine = Arc<dyn Fn(ValidConfig, Option<Repaint>) -> Session + Send + Sync>;

/// The real engine: [`crate::session::start`].
pub fn real_engine() -> Engine {
    Arc::new(crate::session::start)
}

/// Work the panels ask for, done in the next `logic()`.
#[derive(Debug, Clone, PartialEq)]
enum Action {
    ChooseModel(PathBuf),
    TryDemo,
    Data(DatasetAction),
    BrowseTrain,
    Start,
    Stop,
    TrySend,
    GoTo(Step),
    Export { adapter: PathBuf, dest: PathBuf },
    OpenFolder(PathBuf),
    SaveCsv,
}

/// A message above the panel: what happened, or what went wrong and what to do.
#[derive(Debug, Clone, PartialEq)]
struct Notice {
    text: String,
    error: bool,
}

/// The app.
pub struct FineTuneApp {
    settings: Settings,
    step: Step,
    models: ModelsPanel,
    dataset: DatasetPanel,
    export: ExportPanel,
    elsewhere: crate::ui::elsewhere::ElsewherePanel,
    playground: TryPanel,
    run: RunView,
    session: Option<Session>,
    run_config: Option<TrainConfig>,
    engine: Engine,
    actions: Vec<Action>,
    notices: Vec<Notice>,
    status: Status,
    first_frame_done: bool,
    quit: quit::Quit,
}

impl FineTuneApp {
    /// The app as the window opens it: settings restored, `paths` loaded, the real engine.
    pub fn new(cc: &eframe::CreationContext<'_>, paths: Vec<PathBuf>) -> Self {
        Self::with_engine(Self::load_settings(cc.storage), paths, real_engine())
    }

    /// The settings saved by the last launch, or the defaults.
    pub fn load_settings(storage: Option<&dyn eframe::Storage>) -> Settings {
        storage
            .and_then(|s| eframe::get_value::<Settings>(s, eframe::APP_KEY))
            .unwrap_or_default()
    }

    /// The app with given settings and engine (tests pass a scripted fake).
    pub fn with_engine(settings: Settings, paths: Vec<PathBuf>, engine: Engine) -> Self {
        let mut app = Self {
            settings,
            step: Step::Model,
            models: ModelsPanel::default(),
            dataset: DatasetPanel::default(),
            export: ExportPanel::default(),
            elsewhere: Default::default(),
            playground: TryPanel::default(),
            run: RunView::default(),
            session: None,
            run_config: None,
            engine,
            actions: Vec::new(),
            notices: Vec::new(),
            status: Status::default(),
            first_frame_done: false,
            quit: quit::Quit::default(),
        };
        app.open_paths(&paths);
        app
    }

    /// Points the Models panel's Hub search and downloads at `setup` instead of the environment's
    /// Hub and cache (tests use a fake Hub on 127.0.0.1 and keep the keychain out of it).
    pub fn with_hub(mut self, setup: HubSetup) -> Self {
        self.models.set_hub_setup(setup);
        self
    }

    /// The training settings the form holds (saved between launches).
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The training settings, to change as the form would.
    pub fn settings_mut(&mut self) -> &mut Settings {
        &mut self.settings
    }

    /// The current or last training run as the Train step shows it.
    pub fn run_view(&self) -> &RunView {
        &self.run
    }

    /// The step of the flow on screen.
    pub fn step(&self) -> Step {
        self.step
    }

    /// Shows `step`, as clicking it in the step bar does.
    pub fn set_step(&mut self, step: Step) {
        self.step = step;
    }

    /// The chosen model's facts, once read.
    pub fn model_summary(&self) -> Option<&ModelSummary> {
        self.models.summary.as_ref()
    }

    /// What reading the dataset found, once read.
    pub fn dataset_outcome(&self) -> Option<&Outcome> {
        self.dataset.report.as_ref().map(|r| &r.outcome)
    }

    /// The messages shown above the panel, oldest first.
    pub fn notices(&self) -> Vec<&str> {
        self.notices.iter().map(|n| n.text.as_str()).collect()
    }

    /// The Try step's state.
    pub fn playground(&self) -> &TryPanel {
        &self.playground
    }

    /// The Try step's state, to change as its form would.
    pub fn playground_mut(&mut self) -> &mut TryPanel {
        &mut self.playground
    }

    /// What the Try step needs from the rest of the app.
    fn try_context(&self) -> TryContext {
        TryContext {
            model: self.settings.model_dir.clone(),
            device: (self.settings.device, self.settings.dtype),
            run_adapter: self.run.latest_adapter().map(|(_, p)| p),
            training: self.run.state.is_active(),
        }
    }

    /// The destination of the next export (the export step's text field).
    pub fn set_export_dir(&mut self, dir: &Path) {
        self.export.dest_text = dir.display().to_string();
    }

    /// Uses `program` as the `ollama` command of "Add to Ollama" (tests use a stand-in).
    pub fn set_ollama_program(&mut self, program: Option<PathBuf>) {
        self.export.gguf.ollama_program = program;
    }

    /// The last Ollama export's details.
    pub fn ollama_export(&self) -> Option<&crate::export::ollama::OllamaExport> {
        self.export.ollama.as_ref()
    }

    /// The last "Add to Ollama" outcome.
    pub fn ollama_create_result(&self) -> Option<&Result<String, String>> {
        self.export.gguf.create_result.as_ref()
    }

    /// The last export's outcome.
    pub fn export_result(&self) -> Option<&Result<crate::export::Exported, String>> {
        self.export.result.as_ref()
    }

    /// True while any worker (model summary, dataset read, export) is running.
    pub fn is_busy(&self) -> bool {
        self.models.is_busy() || self.dataset.is_busy() || self.export.is_busy()
    }

    /// Loads the bundled demo (model, dataset, Quick-test settings) in the next frame.
    pub fn load_demo(&mut self) {
        self.actions.push(Action::TryDemo);
    }

    /// Queues the paths (command line, dropped files): model folders and JSONL datasets.
    pub fn open_paths(&mut self, paths: &[PathBuf]) {
        // Absolute paths, so runs and model cards do not depend on the working folder.
        let paths: Vec<PathBuf> = paths
            .iter()
            .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
            .collect();
        for o in classify_paths(&paths) {
            match o {
                Opened::Model(p) => self.actions.push(Action::ChooseModel(p)),
                Opened::Train(p) => {
                    self.actions.push(Action::Data(DatasetAction::SetTrain(p)));
                    self.actions.push(Action::GoTo(Step::Dataset));
                }
                Opened::Valid(p) => self
                    .actions
                    .push(Action::Data(DatasetAction::SetValid(Some(p)))),
                Opened::Unknown(p, why) => self.error(format!("{why}: {}", p.display())),
            }
        }
    }

    fn error(&mut self, text: String) {
        self.notify(Notice { text, error: true });
    }

    fn info(&mut self, text: String) {
        self.notify(Notice { text, error: false });
    }

    /// Adds a message above the panel (the oldest goes when there are more than four).
    fn notify(&mut self, notice: Notice) {
        self.notices.retain(|n| n.text != notice.text);
        if self.notices.len() >= 4 {
            self.notices.remove(0);
        }
        self.notices.push(notice);
    }

    fn do_action(&mut self, ctx: &egui::Context, action: Action) {
        match action {
            Action::ChooseModel(dir) => {
                self.models.inspect(ctx, &dir);
                self.settings.model_dir = Some(dir);
            }
            Action::TryDemo => match find_assets() {
                Ok(a) => {
                    self.do_action(ctx, Action::ChooseModel(a.join("demo-model")));
                    self.settings.train_data = Some(a.join("demo").join("train.jsonl"));
                    let valid = a.join("demo").join("valid.jsonl");
                    self.settings.valid_data = valid.is_file().then_some(valid);
                    Preset::QuickTest.apply_for(&mut self.settings, Some(256));
                    self.settings.lora_targets = None;
                    self.settings.lora_layers.clear();
                    self.step = Step::Dataset;
                    self.info("Demo loaded: a tiny model and 200 records. Look at the preview, then press Start in step 4 (Cmd/Ctrl+Enter).".into());
                }
                Err(e) => self.error(e),
            },
            Action::Data(DatasetAction::SetTrain(p)) => {
                if !p.is_file() {
                    self.error(format!("file not found; check the path: {}", p.display()));
                }
                self.settings.train_data = Some(p);
            }
            Action::Data(DatasetAction::SetValid(p)) => self.settings.valid_data = p,
            Action::BrowseTrain => self.dataset.browse_train(ctx),
            Action::GoTo(step) => self.step = step,
            Action::TrySend => {
                let cx = self.try_context();
                self.playground.send(ctx, &cx);
            }
            Action::Start => self.start(ctx),
            Action::Stop => {
                if let Some(s) = &self.session {
                    s.stop();
                    self.run.request_stop();
                }
            }
            Action::Export { adapter, dest } => {
                let job = crate::ui::export::ExportJob {
                    adapter,
                    dest: dest.clone(),
                    card: self.card_info(),
                    base: self.export_base(),
                    data: self.run_config.as_ref().map(|c| c.train_data.clone()),
                };
                self.export.start(ctx, job);
                self.settings.export_dir = Some(dest);
            }
            Action::OpenFolder(dir) => {
                if let Err(e) = open_folder(&dir) {
                    self.error(e);
                }
            }
            Action::SaveCsv => match self.run_config.as_ref().map(|c| c.out_dir.clone()) {
                Some(dir) => match crate::ui::run_csv::save_run_csv(&self.run, &dir) {
                    Ok(p) => self.info(format!("Chart data saved: {}", p.display())),
                    Err(e) => self.error(e),
                },
                None => self.error("No run to save the chart data of.".into()),
            },
        }
    }

    /// The model the export step exports with: the run's, else the one chosen in step 1.
    pub(crate) fn export_base(&self) -> Option<PathBuf> {
        self.run_config
            .as_ref()
            .map(|c| c.model_dir.clone())
            .or_else(|| self.settings.model_dir.clone())
    }

    fn start(&mut self, ctx: &egui::Context) {
        if self.run.state.is_active() {
            return;
        }
        self.step = Step::Train;
        let blockers = self.blockers();
        if let Some(b) = blockers.first() {
            self.error(format!(
                "Cannot start yet: {} (step {}).",
                b.message,
                b.step.title()
            ));
            return;
        }
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let out = run_dir(&self.settings.output_root, &self.model_name(), secs);
        let config = match self.settings.to_config(out).validate() {
            Ok(c) => c,
            Err(p) => {
                let text = p
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; ");
                self.error(format!("Cannot start: {text}"));
                return;
            }
        };
        let repaint_ctx = ctx.clone();
        let repaint: Repaint = Arc::new(move || repaint_ctx.request_repaint());
        self.run = RunView::starting();
        // Frame-time figures cover the run from here.
        self.status.frames.reset();
        self.export.result = None;
        self.notices.clear();
        self.run_config = Some(TrainConfig::clone(&config));
        self.session = Some((self.engine)(config, Some(repaint)));
    }

    /// Folds queued engine events into the run view, for at most [`EVENT_BUDGET`].
    fn drain_events(&mut self, ctx: &egui::Context) {
        let end = drain(
            ctx,
            self,
            |app| app.session.as_mut().map(Session::try_recv),
            |app, event| {
                let terminal = event.is_terminal();
                app.run.apply(event);
                !terminal
            },
        );
        if matches!(end, Drained::Stopped | Drained::Disconnected) {
            self.session = None;
        }
    }

    fn logic_inner(&mut self, ctx: &egui::Context) {
        if !self.first_frame_done {
            self.first_frame_done = true;
            self.first_frame(ctx);
        }
        self.open_dropped(ctx);
        self.shortcuts(ctx);
        self.poll_workers(ctx);
        for a in std::mem::take(&mut self.actions) {
            self.do_action(ctx, a);
        }
        // Targets the chosen model does not have (after switching models) fall back to all.
        if let (Some(m), Some(t)) = (&self.models.summary, &self.settings.lora_targets) {
            if t.iter().any(|n| !m.linear_names.contains(n)) {
                self.settings.lora_targets = None;
            }
        }
        self.dataset
            .want(ctx, DataKey::from_settings(&self.settings));
        self.drain_events(ctx);
        self.status
            .refresh(ctx, (self.settings.device, self.settings.dtype));
        ctx.request_repaint_after(Duration::from_secs(1));
    }

    /// Scans the cache, starts the Hub client and reads the remembered model.
    fn first_frame(&mut self, ctx: &egui::Context) {
        self.models.rescan(ctx);
        self.models.start_hub(ctx);
        if let Some(d) = self.settings.model_dir.clone() {
            if !self
                .actions
                .iter()
                .any(|a| matches!(a, Action::ChooseModel(_)))
            {
                self.models.inspect(ctx, &d);
            }
        }
    }

    /// Opens files dropped on the window, or on the Dock icon / from Finder (macOS; always empty
    /// elsewhere).
    fn open_dropped(&mut self, ctx: &egui::Context) {
        let dropped: Vec<PathBuf> = ctx.input(|i| {
            i.raw
                .dropped_files
                .iter()
                .map(|f| f.path().to_path_buf())
                .collect()
        });
        if !dropped.is_empty() {
            self.open_paths(&dropped);
        }
        let opened = crate::macos::take_opened_paths();
        if !opened.is_empty() {
            self.open_paths(&opened);
        }
    }

    /// Cmd/Ctrl+O browse, +Enter start (send, in the Try step), +. stop, +1…6 go to a step.
    fn shortcuts(&mut self, ctx: &egui::Context) {
        let (open, start, stop, goto) = ctx.input_mut(|i| {
            let open = i.consume_key(egui::Modifiers::COMMAND, egui::Key::O);
            let start = i.consume_key(egui::Modifiers::COMMAND, egui::Key::Enter);
            let stop = i.consume_key(egui::Modifiers::COMMAND, egui::Key::Period);
            let keys = [
                egui::Key::Num1,
                egui::Key::Num2,
                egui::Key::Num3,
                egui::Key::Num4,
                egui::Key::Num5,
                egui::Key::Num6,
            ];
            let goto = keys
                .iter()
                .position(|k| i.consume_key(egui::Modifiers::COMMAND, *k));
            (open, start, stop, goto)
        });
        if open {
            self.actions.push(Action::BrowseTrain);
        }
        if start && self.step == Step::Try {
            self.actions.push(Action::TrySend);
        } else if start {
            self.actions.push(Action::Start);
        }
        if stop {
            self.actions.push(Action::Stop);
        }
        if let Some(i) = goto {
            self.step = Step::ALL[i];
        }
    }
}

impl eframe::App for FineTuneApp {
    fn logic(&mut self, ctx: &egui::Context, frame: &mut eframe::Frame) {
        self.status.frames.begin(frame.info().cpu_usage);
        self.logic_inner(ctx);
        self.quit_logic(ctx);
        self.status.frames.log(ctx, &self.run);
    }

    fn ui(&mut self, ui: &mut Ui, _frame: &mut eframe::Frame) {
        egui::Panel::bottom("status-bar").show(ui, |ui| self.status.status_ui(ui, &self.run));
        egui::Panel::left("steps")
            .resizable(false)
            .exact_size(190.0)
            .show(ui, |ui| {
                let mut step = self.step;
                steps_ui(ui, &mut step, |s| self.step_status(s));
                self.step = step;
            });
        egui::CentralPanel::default_margins().show(ui, |ui| self.central_ui(ui));
        drop_overlay_ui(ui);
        self.quit_ui(ui);
        self.status.frames.end();
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, eframe::APP_KEY, &self.settings);
    }

    fn persist_egui_memory(&self) -> bool {
        false
    }

    fn on_exit(&mut self, _gl: Option<&eframe::glow::Context>) {
        self.stop_on_exit();
    }
}
