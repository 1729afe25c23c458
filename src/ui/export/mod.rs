//! Step 6, export: pick the latest or the best adapter of the run, a format (PEFT, merged, GGUF
//! with its quantization and each type's size, Ollama, GGUF LoRA, MLX), a destination folder
//! (dialog or typed), export it on a worker thread ([`crate::export`]) with its progress, and offer
//! to show the folder (and, for Ollama, to add the model to Ollama: [`gguf`]).

pub mod gguf;

use std::path::{Path, PathBuf};

use eframe::egui;
use egui::{Color32, RichText, Ui};

use super::run_view::RunView;
use super::settings::error_color;
use super::{pick_path, take_ready, Job, Pick};
use crate::export::ollama::OllamaExport;
use crate::export::{export_adapter, CardInfo, Exported};
use gguf::GgufPanel;

/// Which adapter of the run to export.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Which {
    /// The final adapter, or the most recent checkpoint while training.
    #[default]
    Latest,
    /// The adapter with the best validation loss.
    Best,
    /// An adapter imported from a job run elsewhere.
    Imported,
}

/// What to write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Format {
    /// The PEFT adapter files and a model card.
    #[default]
    Peft,
    /// The base model with the adapter folded in (a Hugging Face folder).
    Merged,
    /// The model with the adapter merged in, as one GGUF file.
    Gguf,
    /// A folder for Ollama: GGUF + Modelfile.
    Ollama,
    /// mlx-lm's adapter layout.
    Mlx,
    /// A GGUF LoRA for llama.cpp, Ollama and LM Studio.
    GgufLora,
}

impl Format {
    /// Every format, in the order the panel lists them.
    pub const ALL: [Format; 6] = [
        Format::Peft,
        Format::Merged,
        Format::Gguf,
        Format::Ollama,
        Format::GgufLora,
        Format::Mlx,
    ];

    /// Whether the format writes a GGUF model (and so takes a quantization).
    pub fn is_gguf_model(self) -> bool {
        matches!(self, Format::Gguf | Format::Ollama)
    }

    /// The radio button's label.
    pub fn label(self) -> &'static str {
        match self {
            Format::Peft => "PEFT adapter",
            Format::Merged => "Merged model",
            Format::Gguf => "GGUF model",
            Format::Ollama => "Ollama",
            Format::Mlx => "MLX adapter",
            Format::GgufLora => "GGUF LoRA",
        }
    }

    /// The end of the suggested destination folder's name.
    pub fn suffix(self) -> &'static str {
        match self {
            Format::Peft => "-lora",
            Format::Merged => "-merged",
            Format::Gguf => "-gguf",
            Format::Ollama => "-ollama",
            Format::Mlx => "-mlx",
            Format::GgufLora => "-gguf-lora",
        }
    }

    /// Where the result runs, in one line.
    pub fn runs_in(self) -> &'static str {
        match self {
            Format::Peft => "A few MB. transformers + PEFT, FineTune (Try, or keep training). Needs the base model beside it.",
            Format::Merged => "The full model with the adapter folded in: transformers, vLLM, mlx_lm.convert, llama.cpp's convert_hf_to_gguf.py. As large as the base model.",
            Format::Gguf => "The tuned model in one file: llama.cpp (llama-cli -m), LM Studio, any GGUF app. Quantized as you choose.",
            Format::Ollama => "A folder with the GGUF and a Modelfile (chat template, stop tokens): ollama create, then ollama run.",
            Format::Mlx => "A few MB. mlx-lm on Apple silicon: mlx_lm.generate --adapter-path, mlx_lm.fuse. Needs the base model beside it.",
            Format::GgufLora => "A few MB. llama.cpp (--lora), Ollama (ADAPTER), LM Studio, with the base model's GGUF.",
        }
    }
}

/// What the export worker hands back: the files, and for Ollama its details.
type ExportOutcome = Result<(Exported, Option<OllamaExport>), String>;

/// Everything an export needs besides the panel's choices.
#[derive(Debug, Clone)]
pub struct ExportJob {
    /// The adapter folder.
    pub adapter: PathBuf,
    /// The destination folder.
    pub dest: PathBuf,
    /// What the model card says.
    pub card: CardInfo,
    /// The base model.
    pub base: Option<PathBuf>,
    /// The training data file.
    pub data: Option<PathBuf>,
}

/// What the export panel asks the app to do.
#[derive(Debug, Clone, PartialEq)]
pub enum ExportAction {
    /// Export `adapter` into `dest` (the app adds the model card).
    Export {
        /// The adapter folder (the run's latest or best save).
        adapter: PathBuf,
        /// The destination folder.
        dest: PathBuf,
    },
    /// Open this folder in the system's file manager.
    OpenFolder(PathBuf),
}

/// The export step's state.
#[derive(Default)]
pub struct ExportPanel {
    /// The destination text field.
    pub dest_text: String,
    /// Which adapter of the run to export.
    pub which: Which,
    /// An adapter imported from a job run elsewhere (offered as [`Which::Imported`]).
    pub imported: Option<PathBuf>,
    /// What to write.
    pub format: Format,
    job: Option<Job<ExportOutcome>>,
    /// The last export's outcome.
    pub result: Option<Result<Exported, String>>,
    /// The last Ollama export's details (its model name, command, warnings).
    pub ollama: Option<OllamaExport>,
    /// GGUF types and sizes, progress, and the Ollama helper.
    pub gguf: GgufPanel,
    /// The last export's files as shown: name and size.
    file_lines: Vec<String>,
    browse: Option<Job<Option<PathBuf>>>,
}

impl ExportPanel {
    /// Starts exporting on a worker thread, in the chosen format; `base` is the run's model (for
    /// every format but PEFT), `data` its training file (the Ollama system prompt).
    pub fn start(&mut self, ctx: &egui::Context, job: ExportJob) {
        self.result = None;
        self.ollama = None;
        self.gguf.create_result = None;
        self.gguf.progress.set(0, 0);
        let format = self.format;
        let (quant, separate) = (self.gguf.quant, self.gguf.separate_adapter);
        let progress = self.gguf.progress.clone();
        let repaint = ctx.clone();
        self.job = Some(Job::spawn(ctx, "export", move || {
            let ExportJob {
                adapter,
                dest,
                card,
                base,
                data,
            } = job;
            let on_progress = move |done: usize, total: usize| {
                progress.set(done, total);
                repaint.request_repaint();
            };
            let plain =
                |r: anyhow::Result<Exported>| r.map(|e| (e, None)).map_err(|e| format!("{e:#}"));
            if format == Format::Peft {
                return export_adapter(&adapter, &dest, &card)
                    .map(|e| (e, None))
                    .map_err(|e| e.to_string());
            }
            let base = base.ok_or("no base model: choose it in step 1")?;
            match format {
                Format::Peft | Format::Merged => plain(
                    crate::export::merged::export_merged_with_card(&adapter, &base, &dest, &card),
                ),
                Format::Gguf => gguf_file(&adapter, &base, &dest, quant, &on_progress),
                Format::Ollama => ollama_folder(
                    &adapter,
                    &base,
                    &dest,
                    (quant, separate),
                    data,
                    &on_progress,
                ),
                Format::GgufLora => {
                    let stem = crate::export::file_stem_of(&base);
                    let file = dest.join(format!("{stem}-lora.gguf"));
                    plain(
                        crate::export::gguf_lora::export_gguf_lora(&adapter, &base, &file).map(
                            |g| Exported {
                                dir: dest.clone(),
                                files: vec![g.path],
                            },
                        ),
                    )
                }
                Format::Mlx => plain(crate::export::mlx::export_mlx_with_card(
                    &adapter, &base, &dest, &card,
                )),
            }
        }));
    }

    /// Whether an export is running.
    pub fn is_busy(&self) -> bool {
        self.job.is_some()
    }

    /// Collects a finished export or a picked folder; returns the folder of a successful export.
    pub fn poll(&mut self) -> Option<PathBuf> {
        self.gguf.poll();
        if let Some(r) = take_ready(&mut self.job) {
            let r = r.and_then(|r| r);
            let dir = r.as_ref().ok().map(|(e, _)| e.dir.clone());
            self.ollama = r.as_ref().ok().and_then(|(_, o)| o.clone());
            // Each file's line with its size, read once here rather than every frame.
            self.file_lines = r
                .as_ref()
                .map(|(e, _)| e.files.iter().map(|f| file_line(f)).collect())
                .unwrap_or_default();
            self.result = Some(r.map(|(e, _)| e));
            return dir;
        }
        if let Some(Ok(Some(p))) = take_ready(&mut self.browse) {
            self.dest_text = p.display().to_string();
        }
        None
    }

    /// The adapter folder the current choice points at, with words about it.
    fn chosen(&self, view: &RunView) -> Option<(PathBuf, String)> {
        match self.which {
            Which::Latest => view.latest_adapter().map(|(step, p)| {
                let what = if view.final_adapter.is_some() {
                    format!("final adapter (step {step})")
                } else {
                    format!("checkpoint of step {step}")
                };
                (p, what)
            }),
            Which::Imported => self
                .imported
                .clone()
                .map(|p| (p, "imported from a job run elsewhere".to_owned())),
            Which::Best => view.best.clone().map(|p| {
                let what = match view.best_val {
                    Some((step, loss)) => format!("best validation loss {loss:.4} (step {step})"),
                    None => "best validation loss".into(),
                };
                (p, what)
            }),
        }
    }

    /// The export step.
    pub fn export_ui(
        &mut self,
        ui: &mut Ui,
        view: &RunView,
        base: Option<&Path>,
    ) -> Option<ExportAction> {
        let mut action = None;
        ui.heading("6. Export the adapter");
        ui.label(
            "Adapter folders and merged models come with a README.md model card (base model, data, settings, losses).",
        );
        ui.add_space(6.0);

        if view.latest_adapter().is_none() && view.best.is_none() && self.imported.is_none() {
            ui.label("Nothing to export yet: train first (step 4). An adapter is saved at every checkpoint, when you press Stop and at the end.");
            return None;
        }
        let chosen = self.choice_ui(ui, view);
        ui.add_space(6.0);
        self.format_ui(ui);
        if self.format.is_gguf_model() {
            ui.add_space(4.0);
            self.gguf.quant_ui(ui, base);
            if self.format == Format::Ollama {
                ui.checkbox(
                    &mut self.gguf.separate_adapter,
                    "Keep the adapter separate (the base GGUF plus a GGUF LoRA as ADAPTER)",
                );
            }
        }
        ui.add_space(6.0);
        self.destination_ui(ui);
        ui.add_space(6.0);
        let dest = self.dest_text.trim();
        let ready = chosen.is_some() && !dest.is_empty() && self.job.is_none();
        if ui
            .add_enabled(ready, egui::Button::new(RichText::new("Export").strong()))
            .clicked()
        {
            if let Some((adapter, _)) = chosen {
                action = Some(ExportAction::Export {
                    adapter,
                    dest: PathBuf::from(dest),
                });
            }
        }
        if dest.is_empty() {
            ui.weak("Choose where to put the adapter.");
        }
        if view.state.is_active() {
            ui.weak("Training is still running: this exports the most recent checkpoint.");
        }
        if self.job.is_some() {
            ui.horizontal(|ui| {
                ui.spinner();
                ui.label("Exporting…");
                if self.format.is_gguf_model() {
                    self.gguf.progress_ui(ui);
                }
            });
        }
        self.result_ui(ui).or(action)
    }

    /// Latest or best, then the chosen adapter's folder (or why there is none).
    fn choice_ui(&mut self, ui: &mut Ui, view: &RunView) -> Option<(PathBuf, String)> {
        ui.horizontal(|ui| {
            ui.label("Adapter:");
            ui.radio_value(&mut self.which, Which::Latest, "Latest");
            ui.add_enabled_ui(view.best.is_some(), |ui| {
                ui.radio_value(&mut self.which, Which::Best, "Best validation loss")
                    .on_disabled_hover_text("The run names its best adapter when it finishes");
            });
            if self.imported.is_some() {
                ui.radio_value(&mut self.which, Which::Imported, "Imported");
            }
        });
        let chosen = self.chosen(view);
        match &chosen {
            Some((p, what)) => {
                ui.horizontal(|ui| {
                    ui.weak(what);
                    ui.monospace(p.display().to_string());
                });
            }
            None => {
                ui.weak("That adapter is not available for this run.");
            }
        }
        chosen
    }

    /// The formats, each with where it runs.
    fn format_ui(&mut self, ui: &mut Ui) {
        ui.label("Format:");
        let before = self.format;
        for f in Format::ALL {
            ui.horizontal(|ui| {
                ui.radio_value(&mut self.format, f, f.label());
                ui.weak(f.runs_in());
            });
        }
        // A suggested destination follows the format, so formats never land in one folder.
        if self.format != before {
            if let Some(stem) = self.dest_text.strip_suffix(before.suffix()) {
                self.dest_text = format!("{stem}{}", self.format.suffix());
            }
        }
        if self.format == Format::Merged {
            ui.weak("The destination must be a new or empty folder.");
        }
    }

    /// The destination field and its folder dialog.
    fn destination_ui(&mut self, ui: &mut Ui) {
        ui.horizontal(|ui| {
            let l = ui.label("Destination folder:");
            ui.add(
                egui::TextEdit::singleline(&mut self.dest_text)
                    .hint_text("/path/to/my-adapter")
                    .desired_width(420.0),
            )
            .labelled_by(l.id);
            if ui
                .add_enabled(self.browse.is_none(), egui::Button::new("Choose…"))
                .clicked()
            {
                self.browse = Some(pick_path(ui.ctx(), Pick::Folder, "Export the adapter to…"));
            }
        });
    }

    /// The last export: the files written and "Open folder", or why it failed.
    fn result_ui(&mut self, ui: &mut Ui) -> Option<ExportAction> {
        let mut action = None;
        match &self.result {
            Some(Ok(done)) => {
                egui::Frame::group(ui.style()).show(ui, |ui| {
                    ui.set_width(ui.available_width());
                    ui.label(
                        RichText::new(format!("Exported to {}", done.dir.display()))
                            .color(Color32::from_rgb(40, 150, 70))
                            .strong(),
                    );
                    for line in &self.file_lines {
                        ui.monospace(line);
                    }
                    let show = if cfg!(target_os = "macos") {
                        "Show in Finder"
                    } else {
                        "Open folder"
                    };
                    if ui.button(show).clicked() {
                        action = Some(ExportAction::OpenFolder(done.dir.clone()));
                    }
                    if let Some(o) = &self.ollama {
                        ui.add_space(4.0);
                        self.gguf.ollama_ui(ui, o);
                    }
                });
            }
            Some(Err(e)) => {
                ui.label(RichText::new(format!("Export failed: {e}")).color(error_color(ui)));
            }
            None => {}
        }
        action
    }
}

/// The GGUF format: the tuned model as one file in `dest`.
fn gguf_file(
    adapter: &Path,
    base: &Path,
    dest: &Path,
    quant: crate::export::gguf::GgufQuant,
    on_progress: &(dyn Fn(usize, usize) + Sync),
) -> ExportOutcome {
    let file = dest.join(format!(
        "{}-tuned-{}.gguf",
        crate::export::file_stem_of(base),
        quant.name()
    ));
    crate::export::gguf::export_gguf(Some(adapter), base, &file, quant, on_progress)
        .map(|g| {
            let e = Exported {
                dir: dest.to_path_buf(),
                files: vec![g.path],
            };
            (e, None)
        })
        .map_err(|e| format!("{e:#}"))
}

/// The Ollama format: a folder with the GGUF(s) and the Modelfile.
fn ollama_folder(
    adapter: &Path,
    base: &Path,
    dest: &Path,
    (quant, separate_adapter): (crate::export::gguf::GgufQuant, bool),
    data: Option<PathBuf>,
    on_progress: &(dyn Fn(usize, usize) + Sync),
) -> ExportOutcome {
    crate::export::ollama::export_ollama(
        &crate::export::ollama::OllamaRequest {
            adapter,
            base,
            dir: dest,
            quant,
            separate_adapter,
            data: data.as_deref(),
        },
        on_progress,
    )
    .map(|o| {
        let e = Exported {
            dir: o.dir.clone(),
            files: o.files.clone(),
        };
        (e, Some(o))
    })
    .map_err(|e| format!("{e:#}"))
}

/// A written file's name and size, as the result lists it.
fn file_line(f: &Path) -> String {
    let name = f
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let size = std::fs::metadata(f)
        .map(|m| format!("  {}", gguf::human_size(m.len())))
        .unwrap_or_default();
    format!("{name}{size}")
}
