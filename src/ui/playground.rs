//! Step 5, Try: a chat box whose questions the base model and the tuned one (the same loaded
//! weights, adapter off and on) answer side by side as the tokens come, with the sampling
//! settings, tokens/s, Stop and Clear. The adapter is the last run's, or any PEFT adapter folder
//! picked on disk; the model is the one chosen in step 1. Generation runs on
//! [`worker::TryWorker`]'s thread, never on the UI thread.

pub mod worker;

use std::path::PathBuf;

use crossbeam_channel::TryRecvError;
use eframe::egui;
use egui::{RichText, Ui};

use super::settings::error_color;
use super::{pick_path, take_ready, Job, Pick};
use crate::generate::{prompt::Prompt, prompt::Turn, GenerateOptions, SamplingParams};
use worker::{AnswerStats, Ask, LoadKey, Side, TryEvent, TryWorker};

/// One side's answer to a message.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Answer {
    /// The text so far.
    pub text: String,
    /// Its figures, once it ended.
    pub stats: Option<AnswerStats>,
}

/// A message and the answers to it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exchange {
    /// What the person wrote.
    pub user: String,
    /// The base model's answer.
    pub base: Option<Answer>,
    /// The tuned model's answer.
    pub tuned: Option<Answer>,
}

impl Exchange {
    fn side_mut(&mut self, side: Side) -> Option<&mut Answer> {
        match side {
            Side::Base => self.base.as_mut(),
            Side::Tuned => self.tuned.as_mut(),
        }
    }

    fn side(&self, side: Side) -> Option<&Answer> {
        match side {
            Side::Base => self.base.as_ref(),
            Side::Tuned => self.tuned.as_ref(),
        }
    }

    fn answering(&self) -> bool {
        [&self.base, &self.tuned]
            .iter()
            .any(|a| a.as_ref().is_some_and(|a| a.stats.is_none()))
    }
}

/// Where the loaded model is.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum LoadState {
    /// Nothing loaded yet.
    #[default]
    None,
    /// The worker is loading (or converting) it.
    Loading,
    /// Loaded; the model and device in words.
    Ready(String),
}

/// What the Try panel needs from the rest of the app each frame.
pub struct TryContext {
    /// The model of step 1.
    pub model: Option<PathBuf>,
    /// The device and dtype of the settings.
    pub device: (crate::train::DeviceChoice, crate::train::DtypeChoice),
    /// The adapter of the last run (final, else latest save).
    pub run_adapter: Option<PathBuf>,
    /// A training run is using the machine.
    pub training: bool,
}

/// The Try step's state.
pub struct TryPanel {
    /// The adapter folder text field; empty = the base model alone.
    pub adapter_text: String,
    /// A system message at the start of each conversation.
    pub system: String,
    /// The message being written.
    pub input: String,
    /// The conversation, oldest first.
    pub exchanges: Vec<Exchange>,
    /// Sampling settings (greedy when `do_sample` is off).
    pub sampling: SamplingParams,
    /// Most tokens per answer.
    pub max_new_tokens: usize,
    /// Seed of the sampler.
    pub seed: u64,
    /// The model's load state.
    pub load: LoadState,
    /// The last error, in words.
    pub error: Option<String>,
    /// The run adapter already filled in (so clearing the field sticks).
    filled_from_run: Option<PathBuf>,
    defaults_applied: bool,
    focus_input: bool,
    worker: Option<TryWorker>,
    browse: Option<Job<Option<PathBuf>>>,
}

impl Default for TryPanel {
    fn default() -> Self {
        Self {
            adapter_text: String::new(),
            system: String::new(),
            input: String::new(),
            exchanges: Vec::new(),
            sampling: SamplingParams::default(),
            max_new_tokens: 256,
            seed: 0,
            load: LoadState::None,
            error: None,
            filled_from_run: None,
            defaults_applied: false,
            focus_input: true,
            worker: None,
            browse: None,
        }
    }
}

impl TryPanel {
    /// The adapter the field names, if any.
    pub fn adapter(&self) -> Option<PathBuf> {
        let t = self.adapter_text.trim();
        (!t.is_empty()).then(|| PathBuf::from(t))
    }

    /// Whether an answer is being written.
    pub fn is_answering(&self) -> bool {
        self.exchanges.last().is_some_and(Exchange::answering)
    }

    /// Fills the adapter field with a new run adapter (once per adapter).
    pub fn offer_run_adapter(&mut self, adapter: Option<PathBuf>) {
        if let Some(a) = adapter {
            if self.filled_from_run.as_ref() != Some(&a) {
                self.adapter_text = a.display().to_string();
                self.filled_from_run = Some(a);
            }
        }
    }

    /// The load key of the current choices, if a model is chosen.
    fn key(&self, cx: &TryContext) -> Option<LoadKey> {
        Some(LoadKey {
            model: cx.model.clone()?,
            adapter: self.adapter(),
            device: cx.device.0,
            dtype: cx.device.1,
        })
    }

    /// Sends the message in the input box (when there is one and nothing is being answered).
    pub fn send(&mut self, ctx: &egui::Context, cx: &TryContext) {
        let text = self.input.trim().to_owned();
        if text.is_empty() || self.is_answering() || cx.training {
            return;
        }
        let Some(key) = self.key(cx) else {
            self.error = Some("Choose a model in step 1 first.".into());
            return;
        };
        if self.worker.as_ref().is_none_or(|w| w.key != key) {
            self.worker = Some(TryWorker::spawn(ctx, key.clone()));
            self.load = LoadState::Loading;
        }
        let compare = key.adapter.is_some();
        let prompt = |side: Side| Prompt {
            text: text.clone(),
            chat: true,
            system: (!self.system.trim().is_empty()).then(|| self.system.clone()),
            enable_thinking: None,
            history: self.history(side),
        };
        let ask = Ask {
            base: Some(prompt(Side::Base)),
            tuned: compare.then(|| prompt(Side::Tuned)),
            options: GenerateOptions {
                max_new_tokens: self.max_new_tokens.max(1),
                sampling: self.sampling.clone(),
                seed: self.seed,
                stop_ids: Vec::new(),
            },
        };
        self.exchanges.push(Exchange {
            user: text,
            base: Some(Answer::default()),
            tuned: compare.then(Answer::default),
        });
        self.input.clear();
        self.focus_input = true;
        self.error = None;
        if let Some(w) = &self.worker {
            w.ask(ask);
        }
    }

    /// One side's conversation so far (finished exchanges only).
    fn history(&self, side: Side) -> Vec<Turn> {
        self.exchanges
            .iter()
            .filter_map(|e| {
                let a = e.side(side)?;
                Some(Turn {
                    user: e.user.clone(),
                    assistant: a.text.clone(),
                })
            })
            .collect()
    }

    /// Ends the answers being written.
    pub fn stop(&mut self) {
        if let Some(w) = &self.worker {
            w.stop();
        }
    }

    /// Forgets the conversation.
    pub fn clear(&mut self) {
        self.stop();
        self.exchanges.clear();
    }

    /// Takes what the worker reported.
    pub fn poll(&mut self) {
        if let Some(Ok(Some(p))) = take_ready(&mut self.browse) {
            self.adapter_text = p.display().to_string();
        }
        loop {
            let Some(w) = &self.worker else { return };
            match w.try_recv() {
                Ok(event) => self.apply(event),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    self.worker = None;
                    self.load = LoadState::None;
                    return;
                }
            }
        }
    }

    fn apply(&mut self, event: TryEvent) {
        match event {
            TryEvent::Loaded {
                description,
                defaults,
            } => {
                self.load = LoadState::Ready(description);
                if !self.defaults_applied {
                    self.defaults_applied = true;
                    self.sampling = defaults.sampling;
                    if let Some(n) = defaults.max_new_tokens {
                        self.max_new_tokens = n;
                    }
                }
            }
            TryEvent::Piece(side, text) => {
                if let Some(a) = self.exchanges.last_mut().and_then(|e| e.side_mut(side)) {
                    a.text.push_str(&text);
                }
            }
            TryEvent::Done(side, stats) => {
                if let Some(a) = self.exchanges.last_mut().and_then(|e| e.side_mut(side)) {
                    a.stats = Some(stats);
                }
            }
            TryEvent::Failed(e) => {
                self.error = Some(e);
                // The unanswered message goes back into the box.
                if let Some(e) = self.exchanges.pop_if(|e| e.answering()) {
                    self.input = e.user;
                }
                if self.load == LoadState::Loading {
                    self.worker = None;
                    self.load = LoadState::None;
                }
            }
        }
    }

    /// The panel. Returns true when the person asked to send (button or Cmd/Ctrl+Enter in the
    /// app's shortcuts).
    pub fn try_ui(&mut self, ui: &mut Ui, cx: &TryContext) -> bool {
        ui.heading("5. Try the model");
        ui.weak("Ask something: the base model and your tuned one answer side by side, from the same loaded weights.");
        ui.add_space(4.0);
        self.source_ui(ui, cx);
        self.sampling_ui(ui);
        if let Some(e) = &self.error {
            ui.label(RichText::new(e).color(error_color(ui)));
        }
        if cx.training {
            ui.label(
                RichText::new("Training is running: try the model when it ends, or stop it.")
                    .color(ui.visuals().warn_fg_color),
            );
        }
        let send = self.input_ui(ui, cx);
        ui.separator();
        self.conversation_ui(ui);
        send
    }

    fn source_ui(&mut self, ui: &mut Ui, cx: &TryContext) {
        egui::Grid::new("try-source").num_columns(2).show(ui, |ui| {
            ui.label("Model");
            match &cx.model {
                Some(m) => ui.monospace(m.display().to_string()),
                None => ui.weak("none: choose one in step 1"),
            };
            ui.end_row();
            ui.label("Adapter");
            ui.horizontal(|ui| {
                ui.add(
                    egui::TextEdit::singleline(&mut self.adapter_text)
                        .hint_text("none: the base model alone")
                        .desired_width(420.0),
                );
                if ui.button("Folder…").clicked() {
                    self.browse = Some(pick_path(
                        ui.ctx(),
                        Pick::Folder,
                        "Choose an adapter folder",
                    ));
                }
                if let Some(a) = &cx.run_adapter {
                    if ui
                        .button("Last run's")
                        .on_hover_text(a.display().to_string())
                        .clicked()
                    {
                        self.adapter_text = a.display().to_string();
                    }
                }
            });
            ui.end_row();
            ui.label("Loaded");
            match &self.load {
                LoadState::None => ui.weak("loads with the first message"),
                LoadState::Loading => {
                    ui.horizontal(|ui| {
                        ui.spinner();
                        ui.label("loading…");
                    })
                    .response
                }
                LoadState::Ready(d) => ui.label(d),
            };
            ui.end_row();
        });
    }

    fn sampling_ui(&mut self, ui: &mut Ui) {
        egui::CollapsingHeader::new("Sampling and system message")
            .id_salt("try-sampling")
            .show(ui, |ui| {
                let s = &mut self.sampling;
                ui.horizontal_wrapped(|ui| {
                    ui.checkbox(&mut s.do_sample, "Sample")
                        .on_hover_text("Off: greedy, always the likeliest token.");
                    ui.add_enabled_ui(s.do_sample, |ui| {
                        ui.label("temperature");
                        ui.add(
                            egui::DragValue::new(&mut s.temperature)
                                .range(0.01..=5.0)
                                .speed(0.01),
                        );
                        ui.label("top-p");
                        ui.add(
                            egui::DragValue::new(&mut s.top_p)
                                .range(0.0..=1.0)
                                .speed(0.01),
                        );
                        ui.label("top-k");
                        ui.add(egui::DragValue::new(&mut s.top_k).range(0..=1000));
                        ui.label("min-p");
                        ui.add(
                            egui::DragValue::new(&mut s.min_p)
                                .range(0.0..=1.0)
                                .speed(0.01),
                        );
                        ui.label("seed");
                        ui.add(egui::DragValue::new(&mut self.seed));
                    });
                });
                ui.horizontal_wrapped(|ui| {
                    ui.label("repetition penalty");
                    ui.add(
                        egui::DragValue::new(&mut s.repetition_penalty)
                            .range(1.0..=3.0)
                            .speed(0.01),
                    );
                    ui.label("max new tokens");
                    ui.add(egui::DragValue::new(&mut self.max_new_tokens).range(1..=8192));
                });
                ui.label("System message");
                ui.add(
                    egui::TextEdit::multiline(&mut self.system)
                        .desired_rows(2)
                        .desired_width(f32::INFINITY)
                        .hint_text("optional, e.g. You are a concise assistant."),
                );
            });
    }

    fn input_ui(&mut self, ui: &mut Ui, cx: &TryContext) -> bool {
        let mut send = false;
        let input = ui.add(
            egui::TextEdit::multiline(&mut self.input)
                .id_salt("try-input")
                .desired_rows(3)
                .desired_width(f32::INFINITY)
                .hint_text("Your message… (Cmd/Ctrl+Enter sends)"),
        );
        // The box has the keyboard when the step opens and after each send.
        if std::mem::take(&mut self.focus_input) {
            input.request_focus();
        }
        ui.horizontal(|ui| {
            let answering = self.is_answering();
            let can_send =
                !answering && !cx.training && cx.model.is_some() && !self.input.trim().is_empty();
            if ui
                .add_enabled(can_send, egui::Button::new("Send"))
                .clicked()
            {
                send = true;
            }
            if ui
                .add_enabled(answering, egui::Button::new("Stop"))
                .clicked()
            {
                self.stop();
            }
            if ui
                .add_enabled(!self.exchanges.is_empty(), egui::Button::new("Clear"))
                .clicked()
            {
                self.clear();
            }
        });
        send
    }

    fn conversation_ui(&mut self, ui: &mut Ui) {
        let sides: Vec<(Side, &str)> = if self.exchanges.iter().any(|e| e.tuned.is_some()) {
            vec![(Side::Base, "Base"), (Side::Tuned, "Tuned")]
        } else {
            vec![(Side::Base, "Base model")]
        };
        egui::ScrollArea::vertical()
            .id_salt("try-conversation")
            .stick_to_bottom(true)
            .auto_shrink([false, false])
            .show(ui, |ui| {
                ui.columns(sides.len(), |cols| {
                    for (col, (side, title)) in cols.iter_mut().zip(&sides) {
                        // Columns justify their text; answers read better ragged.
                        col.with_layout(egui::Layout::top_down(egui::Align::LEFT), |col| {
                            col.strong(*title);
                            for e in &self.exchanges {
                                exchange_ui(col, e, *side);
                            }
                        });
                    }
                });
            });
    }
}

fn exchange_ui(ui: &mut Ui, e: &Exchange, side: Side) {
    ui.add_space(4.0);
    ui.label(RichText::new(format!("You: {}", e.user)).strong());
    let Some(a) = e.side(side) else {
        ui.weak("(not asked)");
        return;
    };
    egui::Frame::group(ui.style()).show(ui, |ui| {
        ui.set_width(ui.available_width());
        if a.text.is_empty() && a.stats.is_none() {
            ui.spinner();
        } else {
            ui.label(super::model_text(&a.text));
        }
        if let Some(s) = &a.stats {
            let end = match s.finish {
                crate::generate::Finish::Stop(_) => "",
                crate::generate::Finish::Length => ", token limit",
                crate::generate::Finish::Cancelled => ", stopped",
            };
            ui.weak(format!(
                "{} tokens · {:.1} tok/s · prompt {} tokens at {:.0} tok/s{end}",
                s.tokens, s.decode_tok_s, s.prompt_tokens, s.prefill_tok_s
            ));
        }
    });
}
