//! The desktop app (egui/eframe): pick a model, drop a dataset, set up and run training with live
//! charts, stop, and export the adapter. Only this module and its children import egui; they reach
//! the engine through [`crate::session`] (training) and plain functions run on worker [`Job`]s
//! (model summaries, dataset loading, export), so the UI thread never blocks.
//!
//! `app` holds the [`eframe::App`]; each step of the flow has its own panel file; `run_view` is the
//! pure state the charts read, built from engine events.

pub mod app;
pub mod charts;
pub mod compute;
pub mod dataset;
pub mod elsewhere;
pub mod export;
pub mod hub_worker;
pub mod models;
pub mod playground;
pub mod run_csv;
pub mod run_view;
pub mod settings;
pub mod status;
pub mod steps;
pub mod train;

use std::path::{Path, PathBuf};

use crossbeam_channel::{bounded, Receiver, TryRecvError};
use eframe::egui;

pub use app::{real_engine, Engine, FineTuneApp, Step};
pub use run_view::{RunState, RunView};
pub use settings::{Preset, Settings};

/// The app's name for window titles and eframe's storage folder.
pub const APP_NAME: &str = "FineTune";

/// Opens the window. `paths` (from the command line or a Dock drop) are loaded: a `.jsonl` file is
/// a dataset, a model folder or `.gguf` file the model (see [`classify_paths`]).
pub fn run_app(paths: Vec<PathBuf>) -> anyhow::Result<()> {
    run_app_with(paths, real_engine())
}

/// [`run_app`] with another engine (e.g. a scripted one to preview the UI; see
/// `examples/app_scripted.rs`).
pub fn run_app_with(paths: Vec<PathBuf>, engine: Engine) -> anyhow::Result<()> {
    crate::macos::install();
    eframe::run_native(
        APP_NAME,
        native_options(),
        Box::new(move |cc| {
            let ctx = cc.egui_ctx.clone();
            crate::macos::set_waker(move || ctx.request_repaint());
            let settings = FineTuneApp::load_settings(cc.storage);
            Ok(Box::new(FineTuneApp::with_engine(settings, paths, engine)))
        }),
    )
    .map_err(|e| anyhow::anyhow!("could not open the window ({e}); FineTune needs a display with OpenGL 2+ (on Linux: X11 or Wayland and Mesa)"))
}

/// The window: title, size, drag and drop, the glow (OpenGL) renderer.
pub fn native_options() -> eframe::NativeOptions {
    let viewport = egui::ViewportBuilder::default()
        .with_title(APP_NAME)
        .with_app_id("finetune")
        .with_inner_size([1280.0, 820.0])
        .with_min_inner_size([900.0, 600.0])
        .with_drag_and_drop(true)
        .with_icon(app_icon());
    eframe::NativeOptions {
        viewport,
        renderer: eframe::Renderer::Glow,
        ..Default::default()
    }
}

/// The window (and, unbundled, Dock) icon. Inside FineTune.app the bundle's FineTune.icns already
/// is the Dock icon, and eframe would swap it for egui's logo unless given an empty icon.
fn app_icon() -> egui::IconData {
    let in_app_bundle = cfg!(target_os = "macos")
        && std::env::current_exe()
            .is_ok_and(|exe| exe.to_string_lossy().contains(".app/Contents/MacOS/"));
    if in_app_bundle {
        return egui::IconData::default();
    }
    eframe::icon_data::from_png_bytes(include_bytes!("../../assets/icon/finetune-256.png"))
        .unwrap_or_default()
}

/// What a path given to the app is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// A model: a Hugging Face folder (safetensors or PyTorch .bin) or a .gguf file.
    Model(PathBuf),
    /// A training dataset.
    Train(PathBuf),
    /// A validation dataset (its name says valid/val/eval/dev/test).
    Valid(PathBuf),
    /// Anything else, with why it was not used.
    Unknown(PathBuf, String),
}

/// Model text as the app draws it: a byte sequence the tokenizer could not decode (U+FFFD, e.g.
/// a character cut at the token limit) shows as `?`, which every font has.
pub fn model_text(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\u{FFFD}') {
        text.replace('\u{FFFD}', "?").into()
    } else {
        text.into()
    }
}

/// Sorts paths into a model folder and datasets. Of several `.jsonl` files, one whose name says
/// valid/val/eval/dev/test is the validation set; the first other one trains.
pub fn classify_paths(paths: &[PathBuf]) -> Vec<Opened> {
    let jsonl = paths.iter().filter(|p| is_jsonl(p)).count();
    let mut have_train = false;
    paths
        .iter()
        .map(|p| {
            if is_jsonl(p) && !p.is_dir() {
                if (jsonl > 1 && looks_like_validation(p)) || have_train {
                    Opened::Valid(p.clone())
                } else {
                    have_train = true;
                    Opened::Train(p.clone())
                }
            } else {
                // Folders, .gguf files and anything else: the model source decides (and says
                // what to do when it is not a model either).
                // A folder meant as a model whose files are incomplete is still chosen, so the
                // Models step shows what is missing.
                use crate::model::SourceError;
                match crate::model::ModelSource::open(p) {
                    Ok(_) | Err(SourceError::Model(_)) => Opened::Model(p.clone()),
                    Err(SourceError::NotAModelFile(_) | SourceError::NotFound { .. }) => {
                        Opened::Unknown(
                            p.clone(),
                            "not a .jsonl dataset or a model (a folder or a .gguf file); datasets are JSON Lines files".into(),
                        )
                    }
                    Err(e) => Opened::Unknown(p.clone(), e.to_string()),
                }
            }
        })
        .collect()
}

fn is_jsonl(p: &Path) -> bool {
    p.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("jsonl") || e.eq_ignore_ascii_case("json"))
}

fn looks_like_validation(p: &Path) -> bool {
    let stem = p
        .file_stem()
        .map(|s| s.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    stem.split(|c: char| !c.is_ascii_alphanumeric())
        .any(|w| matches!(w, "valid" | "validation" | "val" | "eval" | "dev" | "test"))
}

/// The folder holding `demo-model/` and `demo/`: next to the executable (or in an app bundle's
/// Resources), in the source tree the binary was built from, or under the current folder.
pub fn find_assets() -> Result<PathBuf, String> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(4) {
            candidates.push(dir.join("assets"));
            candidates.push(dir.join("Resources").join("assets"));
        }
    }
    candidates.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets"));
    if let Ok(cwd) = std::env::current_dir() {
        candidates.push(cwd.join("assets"));
    }
    for c in &candidates {
        if c.join("demo-model").join("config.json").is_file()
            && c.join("demo").join("train.jsonl").is_file()
        {
            return Ok(c.clone());
        }
    }
    Err(format!(
        "the demo files (assets/demo-model and assets/demo) were not found; run FineTune from its \
         folder or reinstall it. Looked in: {}",
        candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// Work running on its own thread; the result arrives over a channel and wakes the UI.
pub struct Job<T> {
    rx: Receiver<Result<T, String>>,
}

/// What [`Job::poll`] found.
#[derive(Debug)]
pub enum Poll<T> {
    /// Still running.
    Pending,
    /// Finished with this result.
    Ready(T),
    /// The worker crashed or could not start; the text says what happened.
    Failed(String),
}

impl<T: Send + 'static> Job<T> {
    /// Runs `work` on a named thread and requests a repaint of `ctx` when it is done. A panic in
    /// `work` (a bug, or a library choking on a bad file) becomes [`Poll::Failed`], not a crash.
    pub fn spawn(
        ctx: &egui::Context,
        name: &str,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Self {
        let (tx, rx) = bounded(1);
        let ctx = ctx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("finetune-{name}"))
            .spawn({
                let tx = tx.clone();
                move || {
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
                        .map_err(|p| {
                            let what = p
                                .downcast_ref::<&str>()
                                .map(|s| (*s).to_owned())
                                .or_else(|| p.downcast_ref::<String>().cloned())
                                .unwrap_or_else(|| "unknown panic".into());
                            format!("the worker stopped unexpectedly ({what}); please report this")
                        });
                    // The receiver is gone when the result is no longer wanted.
                    let _ = tx.send(result);
                    ctx.request_repaint();
                }
            });
        if let Err(e) = spawned {
            let _ = tx.send(Err(format!("could not start a worker thread ({e})")));
        }
        Self { rx }
    }

    /// Takes the result if it is there.
    pub fn poll(&self) -> Poll<T> {
        match self.rx.try_recv() {
            Ok(Ok(v)) => Poll::Ready(v),
            Ok(Err(e)) => Poll::Failed(e),
            Err(TryRecvError::Empty) => Poll::Pending,
            Err(TryRecvError::Disconnected) => {
                Poll::Failed("the worker ended without a result".into())
            }
        }
    }
}

/// Takes a finished job's result out of `slot` (leaving it empty), or leaves a pending one.
pub fn take_ready<T: Send + 'static>(slot: &mut Option<Job<T>>) -> Option<Result<T, String>> {
    let out = match slot.as_ref()?.poll() {
        Poll::Pending => return None,
        Poll::Ready(v) => Ok(v),
        Poll::Failed(e) => Err(e),
    };
    *slot = None;
    Some(out)
}

/// What a file dialog should pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// A folder (a model folder, or an export destination).
    Folder,
    /// A `.jsonl` dataset file.
    Jsonl,
    /// A model file: `.gguf` (PyTorch `.bin` files are chosen by their folder).
    Gguf,
}

/// Opens a native file dialog on a worker thread (rfd's blocking dialog; on macOS rfd runs it on
/// the main thread itself), so rendering goes on while it is open. `None` = cancelled.
pub fn pick_path(ctx: &egui::Context, what: Pick, title: &str) -> Job<Option<PathBuf>> {
    let title = title.to_owned();
    Job::spawn(ctx, "dialog", move || {
        let dialog = rfd::FileDialog::new().set_title(title);
        match what {
            Pick::Folder => dialog.pick_folder(),
            Pick::Jsonl => dialog
                .add_filter("JSON Lines", &["jsonl", "json"])
                .pick_file(),
            Pick::Gguf => dialog.add_filter("GGUF model", &["gguf"]).pick_file(),
        }
    })
}

/// Opens `dir` in the system file browser (Finder, or the desktop's default).
pub fn open_folder(dir: &Path) -> Result<(), String> {
    let program = if cfg!(target_os = "macos") {
        "open"
    } else if cfg!(target_os = "windows") {
        "explorer"
    } else {
        "xdg-open"
    };
    std::process::Command::new(program)
        .arg(dir)
        .spawn()
        .map(|_| ())
        .map_err(|e| {
            format!(
                "could not run `{program}` to open the folder ({e}); open it yourself: {}",
                dir.display()
            )
        })
}

pub use crate::train::format_duration;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_classified() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        std::fs::create_dir(&model).unwrap();
        std::fs::write(model.join("config.json"), "{}").unwrap();
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let got = classify_paths(&[
            dir.path().join("my-valid.jsonl"),
            model.clone(),
            dir.path().join("train.jsonl"),
            empty.clone(),
            dir.path().join("notes.txt"),
        ]);
        assert_eq!(got[0], Opened::Valid(dir.path().join("my-valid.jsonl")));
        assert_eq!(got[1], Opened::Model(model));
        assert_eq!(got[2], Opened::Train(dir.path().join("train.jsonl")));
        assert!(
            matches!(&got[3], Opened::Unknown(p, why) if *p == empty && why.contains("config.json"))
        );
        assert!(matches!(&got[4], Opened::Unknown(_, why) if why.contains(".jsonl")));
        // A lone file trains whatever its name.
        assert_eq!(
            classify_paths(&[PathBuf::from("test.jsonl")]),
            vec![Opened::Train(PathBuf::from("test.jsonl"))]
        );
    }

    #[test]
    fn the_demo_assets_are_found_from_the_source_tree() {
        let assets = find_assets().unwrap();
        assert!(assets.join("demo-model/model.safetensors").is_file());
        assert!(assets.join("demo/valid.jsonl").is_file());
    }

    #[test]
    fn jobs_deliver_results_and_survive_panics() {
        let ctx = egui::Context::default();
        let mut ok = Some(Job::spawn(&ctx, "t", || 41 + 1));
        let mut bad: Option<Job<i32>> = Some(Job::spawn(&ctx, "t", || panic!("boom")));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let (mut a, mut b) = (None, None);
        while (a.is_none() || b.is_none()) && std::time::Instant::now() < deadline {
            a = a.or_else(|| take_ready(&mut ok));
            b = b.or_else(|| take_ready(&mut bad));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(a, Some(Ok(42)));
        let err = b.unwrap().unwrap_err();
        assert!(err.contains("boom"), "{err}");
        assert!(ok.is_none() && bad.is_none());
    }
}
