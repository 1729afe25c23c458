//! The GGUF and Ollama parts of the export step: the quantization picker with each type's file
//! size (computed on a worker from the base model's tensor shapes, before anything is written),
//! the export's progress, and "Add to Ollama" (`ollama create` on a worker, its progress shown)
//! when an `ollama` program is on PATH.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use eframe::egui;
use egui::{RichText, Ui};

use crate::export::gguf::GgufQuant;
use crate::ui::{take_ready, Job};

/// Tensors quantized so far, of how many.
#[derive(Debug, Default)]
pub struct Progress {
    done: AtomicUsize,
    total: AtomicUsize,
}

impl Progress {
    /// Records `done` of `total`.
    pub fn set(&self, done: usize, total: usize) {
        self.total.store(total, Ordering::Relaxed);
        self.done.store(done, Ordering::Relaxed);
    }

    fn fraction(&self) -> Option<(usize, usize)> {
        let total = self.total.load(Ordering::Relaxed);
        (total > 0).then(|| (self.done.load(Ordering::Relaxed), total))
    }
}

/// Sizes of each type for one base model.
type Sizes = Result<Vec<(GgufQuant, u64)>, String>;

/// The GGUF choices and the Ollama helper.
pub struct GgufPanel {
    /// The chosen type.
    pub quant: GgufQuant,
    /// Ollama: base GGUF + GGUF LoRA instead of one merged file.
    pub separate_adapter: bool,
    /// The export's progress (shared with the worker).
    pub progress: Arc<Progress>,
    sizes: Option<(PathBuf, Sizes)>,
    sizes_job: Option<Job<Sizes>>,
    /// The base model `sizes_job` measures.
    sizes_for: Option<PathBuf>,
    /// The `ollama` program, when one is on PATH.
    pub ollama_program: Option<PathBuf>,
    create_job: Option<Job<Result<String, String>>>,
    create_log: Arc<Mutex<String>>,
    /// The last `ollama create`'s outcome.
    pub create_result: Option<Result<String, String>>,
}

impl Default for GgufPanel {
    fn default() -> Self {
        Self {
            quant: GgufQuant::Q4KM,
            separate_adapter: false,
            progress: Arc::default(),
            sizes: None,
            sizes_job: None,
            sizes_for: None,
            ollama_program: find_on_path("ollama"),
            create_job: None,
            create_log: Arc::default(),
            create_result: None,
        }
    }
}

/// `name` in one of PATH's folders.
fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Megabytes or gigabytes, for people.
pub fn human_size(bytes: u64) -> String {
    if bytes >= 1_000_000_000 {
        format!("{:.2} GB", bytes as f64 / 1e9)
    } else if bytes >= 1_000_000 {
        format!("{:.0} MB", bytes as f64 / 1e6)
    } else {
        format!("{:.0} KB", (bytes as f64 / 1e3).max(1.0))
    }
}

impl GgufPanel {
    /// Collects finished workers.
    pub fn poll(&mut self) {
        if let Some(r) = take_ready(&mut self.sizes_job) {
            if let Some(base) = self.sizes_for.clone() {
                self.sizes = Some((base, r.and_then(|r| r)));
            }
        }
        if let Some(r) = take_ready(&mut self.create_job) {
            self.create_result = Some(r.and_then(|r| r));
        }
    }

    /// The type picker, each type with its file size for `base`.
    pub fn quant_ui(&mut self, ui: &mut Ui, base: Option<&Path>) {
        if let Some(base) = base {
            let known = self.sizes.as_ref().is_some_and(|(b, _)| b == base)
                || (self.sizes_job.is_some() && self.sizes_for.as_deref() == Some(base));
            if !known {
                let b = base.to_path_buf();
                self.sizes_job = Some(Job::spawn(ui.ctx(), "gguf-sizes", move || {
                    crate::export::gguf::estimate_sizes(&b).map_err(|e| format!("{e:#}"))
                }));
                self.sizes_for = Some(base.to_path_buf());
            }
        }
        let sizes = match &self.sizes {
            Some((b, Ok(s))) if Some(b.as_path()) == base => Some(s.clone()),
            _ => None,
        };
        ui.label("Quantization:");
        egui::Grid::new("gguf-quants")
            .num_columns(3)
            .show(ui, |ui| {
                for q in GgufQuant::ALL {
                    ui.radio_value(&mut self.quant, q, q.name());
                    let size = sizes
                        .as_ref()
                        .and_then(|s| s.iter().find(|(x, _)| *x == q))
                        .map_or_else(|| "…".to_owned(), |(_, b)| human_size(*b));
                    ui.monospace(size);
                    ui.weak(q.about());
                    ui.end_row();
                }
            });
        if let Some((b, Err(e))) = &self.sizes {
            if Some(b.as_path()) == base {
                ui.label(RichText::new(e).color(crate::ui::settings::error_color(ui)));
            }
        }
    }

    /// The progress bar of a running export.
    pub fn progress_ui(&self, ui: &mut Ui) {
        if let Some((done, total)) = self.progress.fraction() {
            ui.add(
                egui::ProgressBar::new(done as f32 / total as f32)
                    .text(format!("{done}/{total} tensors"))
                    .desired_width(320.0),
            );
        }
    }

    /// After an Ollama export: the command, and "Add to Ollama" when the program is there.
    pub fn ollama_ui(&mut self, ui: &mut Ui, done: &crate::export::ollama::OllamaExport) {
        for w in &done.warnings {
            ui.label(RichText::new(format!("Note: {w}")).weak());
        }
        ui.horizontal_wrapped(|ui| {
            ui.label("In a terminal:");
            ui.monospace(&done.command);
        });
        let Some(program) = self.ollama_program.clone() else {
            ui.weak(
                "Ollama is not on PATH: install it from ollama.com, then run the command above.",
            );
            return;
        };
        let busy = self.create_job.is_some();
        if ui
            .add_enabled(
                !busy,
                egui::Button::new(format!("Add to Ollama as {}", done.name)),
            )
            .clicked()
        {
            self.create_result = None;
            let log = self.create_log.clone();
            if let Ok(mut l) = log.lock() {
                l.clear();
            }
            let (dir, name, ctx) = (done.dir.clone(), done.name.clone(), ui.ctx().clone());
            self.create_job = Some(Job::spawn(ui.ctx(), "ollama-create", move || {
                ollama_create(&program, &dir, &name, &log, &ctx)
            }));
        }
        if busy {
            let line = self
                .create_log
                .lock()
                .map(|l| l.clone())
                .unwrap_or_default();
            ui.horizontal(|ui| {
                ui.spinner();
                ui.monospace(if line.is_empty() {
                    "starting ollama…"
                } else {
                    &line
                });
            });
        }
        match &self.create_result {
            Some(Ok(name)) => {
                ui.label(
                    RichText::new(format!("Added to Ollama: ollama run {name}"))
                        .color(egui::Color32::from_rgb(40, 150, 70)),
                );
            }
            Some(Err(e)) => {
                ui.label(
                    RichText::new(format!("ollama create failed: {e}"))
                        .color(crate::ui::settings::error_color(ui)),
                );
            }
            None => {}
        }
    }
}

/// Runs `ollama create NAME -f Modelfile` in `dir`, keeping its latest progress line in `log`.
fn ollama_create(
    program: &Path,
    dir: &Path,
    name: &str,
    log: &Mutex<String>,
    ctx: &egui::Context,
) -> Result<String, String> {
    let mut child = std::process::Command::new(program)
        .args(["create", name, "-f", "Modelfile"])
        .current_dir(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    // Ollama writes its progress to stderr, lines ended by \r or \n.
    let mut all = String::new();
    if let Some(mut err) = child.stderr.take() {
        let mut buf = [0u8; 512];
        let mut line = Vec::new();
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            for &b in &buf[..n] {
                if b == b'\n' || b == b'\r' {
                    let text = String::from_utf8_lossy(&line).trim().to_owned();
                    if !text.is_empty() {
                        all.push_str(&text);
                        all.push('\n');
                        if let Ok(mut l) = log.lock() {
                            *l = text;
                        }
                        ctx.request_repaint();
                    }
                    line.clear();
                } else {
                    line.push(b);
                }
            }
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    if status.success() {
        Ok(name.to_owned())
    } else {
        let tail: Vec<&str> = all.lines().rev().take(3).collect();
        Err(format!(
            "{status}: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
        ))
    }
}
