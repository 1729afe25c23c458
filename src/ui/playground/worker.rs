//! The Try step's worker thread: it loads the model (and the adapter) once, then answers each
//! question with base and tuned decoders interleaved a token at a time on that one model, the
//! adapter switched off and on between their steps ([`crate::generate::Decoder`]). Text comes
//! back in whole-character pieces as it is generated; Stop ends both answers after the current
//! token. Nothing here runs on the UI thread.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::{unbounded, Receiver, Sender, TryRecvError};
use eframe::egui;

use crate::data::ModelTokenizer;
use crate::generate::{self, prompt::Prompt, Decoder, GenerateOptions, GenerationDefaults};
use crate::model::Model;
use crate::train::{DeviceChoice, DtypeChoice};

/// Which answer a piece of text belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The base model, adapter off.
    Base,
    /// The base model with the adapter.
    Tuned,
}

/// What to load: the worker is started anew when any of it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadKey {
    /// The model as [`crate::model::ModelSource::open`] takes it.
    pub model: PathBuf,
    /// The adapter folder, if any.
    pub adapter: Option<PathBuf>,
    /// Compute device.
    pub device: DeviceChoice,
    /// Compute dtype.
    pub dtype: DtypeChoice,
}

/// A question: the prompt each side answers (a side left out is not asked).
#[derive(Debug, Clone)]
pub struct Ask {
    /// The base model's conversation so far and the new message.
    pub base: Option<Prompt>,
    /// The tuned model's conversation so far and the new message.
    pub tuned: Option<Prompt>,
    /// Sampling settings, token budget and seed (stop ids are the worker's).
    pub options: GenerateOptions,
}

/// One answer's figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AnswerStats {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub tokens: usize,
    /// Prefill tokens per second.
    pub prefill_tok_s: f64,
    /// Decode tokens per second.
    pub decode_tok_s: f64,
    /// Why it ended.
    pub finish: generate::Finish,
}

/// What the worker reports.
#[derive(Debug, Clone)]
pub enum TryEvent {
    /// The model is loaded.
    Loaded {
        /// The model and device in words.
        description: String,
        /// `generation_config.json`'s settings.
        defaults: GenerationDefaults,
    },
    /// Text of one side's answer.
    Piece(Side, String),
    /// One side's answer ended.
    Done(Side, AnswerStats),
    /// Loading or generating failed; the text says what and what to do.
    Failed(String),
}

/// The handle the panel keeps: requests go in, events come out.
pub struct TryWorker {
    /// What it loaded (or is loading).
    pub key: LoadKey,
    asks: Sender<Ask>,
    events: Receiver<TryEvent>,
    stop: Arc<AtomicBool>,
}

impl TryWorker {
    /// Starts a worker that loads `key`; `ctx` is repainted whenever it reports.
    pub fn spawn(ctx: &egui::Context, key: LoadKey) -> Self {
        let (asks, asks_rx) = unbounded::<Ask>();
        let (events_tx, events) = unbounded();
        let stop = Arc::new(AtomicBool::new(false));
        let report = Reporter {
            tx: events_tx.clone(),
            ctx: ctx.clone(),
        };
        let (k, s) = (key.clone(), stop.clone());
        let spawned = std::thread::Builder::new()
            .name("finetune-try".into())
            .spawn(move || {
                let run = std::panic::AssertUnwindSafe(|| serve(&k, &asks_rx, &s, &report));
                if std::panic::catch_unwind(run).is_err() {
                    report.send(TryEvent::Failed("the generation worker crashed".into()));
                }
            });
        if let Err(e) = spawned {
            let _ = events_tx.send(TryEvent::Failed(format!("could not start a thread: {e}")));
        }
        Self {
            key,
            asks,
            events,
            stop,
        }
    }

    /// Queues a question (answered once the model is loaded).
    pub fn ask(&self, ask: Ask) {
        self.stop.store(false, Ordering::Relaxed);
        let _ = self.asks.send(ask);
    }

    /// Ends the answers being written after their current token.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// The next event, if one is waiting.
    pub fn try_recv(&self) -> Result<TryEvent, TryRecvError> {
        self.events.try_recv()
    }
}

impl Drop for TryWorker {
    fn drop(&mut self) {
        // The thread ends at its next check; its channel closes with this handle.
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct Reporter {
    tx: Sender<TryEvent>,
    ctx: egui::Context,
}

impl Reporter {
    fn send(&self, event: TryEvent) -> bool {
        let sent = self.tx.send(event).is_ok();
        self.ctx.request_repaint();
        sent
    }
}

struct Loaded {
    model: Model,
    tokenizer: ModelTokenizer,
    stop_ids: Vec<u32>,
}

fn load(key: &LoadKey) -> anyhow::Result<(Loaded, String, GenerationDefaults)> {
    let prepared = crate::model::source::prepare(&key.model)?;
    let backend = crate::backend::pick_with(key.device, key.dtype)?;
    let mut model = Model::load(&prepared.dir, backend.dtype, &backend.device)?;
    if let Some(adapter) = &key.adapter {
        crate::model::adapter::load(adapter, &mut model)?;
    }
    let tokenizer = ModelTokenizer::from_dir(&prepared.dir)?;
    let defaults = GenerationDefaults::from_dir(&prepared.dir);
    let stop_ids = generate::stop_ids(&defaults.eos_ids, &tokenizer);
    let description = format!("{} on {}", prepared.source.name(), backend.name);
    Ok((
        Loaded {
            model,
            tokenizer,
            stop_ids,
        },
        description,
        defaults,
    ))
}

/// The worker's life: load, then answer until the panel lets go of its handle.
fn serve(key: &LoadKey, asks: &Receiver<Ask>, stop: &AtomicBool, report: &Reporter) {
    let mut loaded = match load(key) {
        Ok((loaded, description, defaults)) => {
            report.send(TryEvent::Loaded {
                description,
                defaults,
            });
            loaded
        }
        Err(e) => {
            report.send(TryEvent::Failed(format!(
                "could not load {}: {e:#}",
                key.model.display()
            )));
            return;
        }
    };
    while let Ok(ask) = asks.recv() {
        if let Err(e) = answer(&mut loaded, ask, stop, report) {
            report.send(TryEvent::Failed(format!("generation failed: {e:#}")));
        }
        loaded.model.set_lora_enabled(true);
    }
}

/// One side's decoder and the text it has released.
struct Answer<'t> {
    side: Side,
    decoder: Decoder,
    text: generate::TextStream<'t>,
    done: bool,
}

fn stats(d: &Decoder) -> AnswerStats {
    let g = d.result();
    AnswerStats {
        prompt_tokens: g.prompt_tokens,
        tokens: g.tokens.len(),
        prefill_tok_s: g.prefill_tokens_per_sec(),
        decode_tok_s: g.decode_tokens_per_sec(),
        finish: g.finish,
    }
}

/// Answers `ask` on both sides, a token each in turn.
fn answer(
    loaded: &mut Loaded,
    ask: Ask,
    stop: &AtomicBool,
    report: &Reporter,
) -> anyhow::Result<()> {
    let mut options = ask.options;
    options.stop_ids = loaded.stop_ids.clone();
    let mut answers = Vec::new();
    for (side, prompt) in [(Side::Base, ask.base), (Side::Tuned, ask.tuned)] {
        let Some(prompt) = prompt else { continue };
        let ids = generate::prompt::ids(&loaded.tokenizer, &prompt)?;
        loaded.model.set_lora_enabled(side == Side::Tuned);
        answers.push(Answer {
            side,
            decoder: Decoder::new(&loaded.model, &ids, options.clone())?,
            text: generate::TextStream::new(&loaded.tokenizer),
            done: false,
        });
    }
    while answers.iter().any(|a| !a.done) {
        for a in answers.iter_mut().filter(|a| !a.done) {
            if stop.load(Ordering::Relaxed) {
                a.decoder.cancel();
            }
            loaded.model.set_lora_enabled(a.side == Side::Tuned);
            let piece = match a.decoder.step(&loaded.model)? {
                Some(id) => a.text.push(id)?,
                None => {
                    a.done = true;
                    a.text.finish()?
                }
            };
            if let Some(piece) = piece {
                if !report.send(TryEvent::Piece(a.side, piece)) {
                    return Ok(());
                }
            }
            if a.done {
                report.send(TryEvent::Done(a.side, stats(&a.decoder)));
            }
        }
    }
    Ok(())
}
