//! Text generation: a prefill of the prompt, then one token at a time against the model's KV
//! cache ([`Model::forward_cached`]), each token chosen by a [`Sampler`], until a stop token or
//! the token budget. Batch 1, on whatever device the model is on; LoRA as attached and switched
//! ([`Model::set_lora_enabled`]), so base and tuned answers come from one loaded model.
//!
//! The defaults come from the model folder as transformers reads them: `generation_config.json`
//! (sampling settings, `eos_token_id` as a number or a list; config.json's when absent), the
//! tokenizer's EOS and the chat template's end-of-turn token. [`prompt`] renders a chat prompt
//! with the model's template; [`TextStream`] turns tokens into text as they come.

pub mod prompt;
pub mod sample;

use std::ops::ControlFlow;
use std::path::Path;
use std::time::Instant;

use crate::data::{ModelTokenizer, TokenizerError};
use crate::model::{KvCache, Model};
pub use sample::{Sampler, SamplingParams};

/// What `generation_config.json` (or, for EOS, `config.json`) of a model folder says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    /// The sampling settings it sets, transformers' defaults elsewhere.
    pub sampling: SamplingParams,
    /// `eos_token_id`: one id or a list.
    pub eos_ids: Vec<u32>,
    /// `max_new_tokens`, when set.
    pub max_new_tokens: Option<usize>,
}

fn read_json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn ids_of(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|n| n as u32).into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|n| n.as_u64().map(|n| n as u32))
            .collect(),
        _ => Vec::new(),
    }
}

impl GenerationDefaults {
    /// Reads `dir/generation_config.json`; a missing or unreadable file gives transformers'
    /// defaults, and EOS ids from `config.json`.
    pub fn from_dir(dir: &Path) -> Self {
        let gen = read_json(&dir.join("generation_config.json")).unwrap_or_default();
        let mut sampling = SamplingParams::default();
        let num = |k: &str| gen.get(k).and_then(serde_json::Value::as_f64);
        if let Some(t) = num("temperature") {
            sampling.temperature = t;
        }
        if let Some(p) = num("top_p") {
            sampling.top_p = p;
        }
        if let Some(k) = gen.get("top_k").and_then(serde_json::Value::as_u64) {
            sampling.top_k = k as usize;
        }
        if let Some(p) = num("min_p") {
            sampling.min_p = p;
        }
        if let Some(r) = num("repetition_penalty") {
            sampling.repetition_penalty = r;
        }
        if let Some(d) = gen.get("do_sample").and_then(serde_json::Value::as_bool) {
            sampling.do_sample = d;
        }
        let mut eos_ids = ids_of(gen.get("eos_token_id"));
        if eos_ids.is_empty() {
            let config = read_json(&dir.join("config.json")).unwrap_or_default();
            eos_ids = ids_of(config.get("eos_token_id"));
        }
        let max_new_tokens = gen
            .get("max_new_tokens")
            .and_then(serde_json::Value::as_u64)
            .map(|n| n as usize);
        Self {
            sampling,
            eos_ids,
            max_new_tokens,
        }
    }
}

/// End-of-turn tokens of common chat templates, stopped on when the template writes them.
pub const END_OF_TURN_TOKENS: [&str; 6] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
];

/// The ids generation stops at: `eos_ids` (from [`GenerationDefaults`]), the tokenizer's EOS and
/// the end-of-turn tokens that the chat template (ChatML's when the model has none) writes.
pub fn stop_ids(eos_ids: &[u32], tokenizer: &ModelTokenizer) -> Vec<u32> {
    let template = tokenizer
        .chat_template
        .as_deref()
        .unwrap_or(crate::data::FALLBACK_TEMPLATE);
    let mut ids: Vec<u32> = eos_ids.to_vec();
    ids.extend(tokenizer.eos_id());
    ids.extend(
        END_OF_TURN_TOKENS
            .iter()
            .filter(|t| template.contains(*t))
            .filter_map(|t| tokenizer.token_to_id(t)),
    );
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// One generation's settings.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// How each token is chosen.
    pub sampling: SamplingParams,
    /// Seed of the sampler's draws.
    pub seed: u64,
    /// Tokens that end the answer (not part of it); empty = run to `max_new_tokens`.
    pub stop_ids: Vec<u32>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop token came (its id).
    Stop(u32),
    /// `max_new_tokens` were generated.
    Length,
    /// The caller asked to stop.
    Cancelled,
}

/// A finished generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The new tokens (without the stop token).
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub finish: Finish,
    /// Prompt tokens in the prefill.
    pub prompt_tokens: usize,
    /// Seconds of the prefill (up to the first token's logits).
    pub prefill_secs: f64,
    /// Seconds of the decoding steps after it.
    pub decode_secs: f64,
}

impl Generation {
    /// Prompt tokens per second of the prefill.
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }

    /// Tokens per second of the decoding steps (the first token comes from the prefill).
    pub fn decode_tokens_per_sec(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

/// One generation in progress, a token at a time: [`Decoder::new`] runs the prefill, each
/// [`Decoder::step`] feeds the previous token and picks the next. Several decoders can share one
/// model (each has its own KV cache), e.g. base and tuned answers interleaved with the adapter
/// switched between steps. Generation ends at a stop token, `max_new_tokens`, or the model's
/// context ([`Finish::Length`]).
pub struct Decoder {
    options: GenerateOptions,
    cache: KvCache,
    sampler: Sampler,
    seen: Vec<u32>,
    logits: Option<Vec<f32>>,
    pending: Option<u32>,
    tokens: Vec<u32>,
    finish: Option<Finish>,
    prompt_tokens: usize,
    prefill_secs: f64,
    decode_secs: f64,
}

impl Decoder {
    /// Runs the prefill of `prompt` (token ids, not empty) on a fresh KV cache.
    pub fn new(
        model: &Model,
        prompt: &[u32],
        options: GenerateOptions,
    ) -> candle_core::Result<Self> {
        let mut cache = model.new_cache();
        let start = Instant::now();
        let logits = model.forward_cached(prompt, &mut cache)?.to_vec1::<f32>()?;
        let prefill_secs = start.elapsed().as_secs_f64();
        let sampler = Sampler::new(options.sampling.clone(), options.seed);
        Ok(Self {
            finish: (options.max_new_tokens == 0).then_some(Finish::Length),
            options,
            cache,
            sampler,
            seen: prompt.to_vec(),
            logits: Some(logits),
            pending: None,
            tokens: Vec::new(),
            prompt_tokens: prompt.len(),
            prefill_secs,
            decode_secs: 0.0,
        })
    }

    /// The next token, or `None` once generation has ended ([`Decoder::finished`] says why).
    /// The model must be the one the prefill ran on (its adapter may be switched).
    pub fn step(&mut self, model: &Model) -> candle_core::Result<Option<u32>> {
        if self.finish.is_some() {
            return Ok(None);
        }
        let start = Instant::now();
        if let Some(last) = self.pending.take() {
            self.logits = Some(
                model
                    .forward_cached(&[last], &mut self.cache)?
                    .to_vec1::<f32>()?,
            );
        }
        let Some(logits) = self.logits.take() else {
            self.finish = Some(Finish::Length);
            return Ok(None);
        };
        let next = self.sampler.next(logits, &self.seen);
        if !self.tokens.is_empty() {
            self.decode_secs += start.elapsed().as_secs_f64();
        }
        if self.options.stop_ids.contains(&next) {
            self.finish = Some(Finish::Stop(next));
            return Ok(None);
        }
        self.tokens.push(next);
        self.seen.push(next);
        let context = model.config.max_position_embeddings;
        if self.tokens.len() >= self.options.max_new_tokens || self.cache.len() + 1 > context {
            self.finish = Some(Finish::Length);
        } else {
            self.pending = Some(next);
        }
        Ok(Some(next))
    }

    /// Ends generation as [`Finish::Cancelled`] (unless it already ended).
    pub fn cancel(&mut self) {
        self.finish.get_or_insert(Finish::Cancelled);
        self.pending = None;
    }

    /// Why generation ended, once it has.
    pub fn finished(&self) -> Option<Finish> {
        self.finish
    }

    /// The tokens so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The generation so far (its `finish` is [`Finish::Cancelled`] while still running).
    pub fn result(&self) -> Generation {
        Generation {
            tokens: self.tokens.clone(),
            finish: self.finish.unwrap_or(Finish::Cancelled),
            prompt_tokens: self.prompt_tokens,
            prefill_secs: self.prefill_secs,
            decode_secs: self.decode_secs,
        }
    }
}

/// Generates after `prompt` (token ids, not empty) with a fresh KV cache. `on_token` sees each
/// new token (never a stop token) and may end generation with `ControlFlow::Break`. Generation
/// also ends ([`Finish::Length`]) where the model's context does.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    options: &GenerateOptions,
    on_token: &mut dyn FnMut(u32) -> ControlFlow<()>,
) -> candle_core::Result<Generation> {
    let mut decoder = Decoder::new(model, prompt, options.clone())?;
    while let Some(token) = decoder.step(model)? {
        if on_token(token).is_break() {
            decoder.cancel();
        }
    }
    Ok(decoder.result())
}

/// Text of a growing token sequence, released in pieces that are whole characters: a piece is
/// held back while its decoding ends in an incomplete UTF-8 sequence (U+FFFD). Each decode starts
/// one piece back, so tokenizers that drop a leading space on the first token decode the same.
pub struct TextStream<'a> {
    tokenizer: &'a ModelTokenizer,
    ids: Vec<u32>,
    prev: usize,
    current: usize,
}

impl<'a> TextStream<'a> {
    /// An empty stream decoding with `tokenizer`.
    pub fn new(tokenizer: &'a ModelTokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            prev: 0,
            current: 0,
        }
    }

    fn window(&self, end: usize) -> Result<String, TokenizerError> {
        self.tokenizer.decode(&self.ids[self.prev..end])
    }

    /// Adds `id`; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        let before = self.window(self.current)?;
        self.ids.push(id);
        let text = self.window(self.ids.len())?;
        if text.len() > before.len() && !text.ends_with('\u{FFFD}') {
            let piece = text.get(before.len()..).unwrap_or_default().to_owned();
            self.prev = self.current;
            self.current = self.ids.len();
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }

    /// The text held back at the end (an incomplete character decodes as U+FFFD).
    pub fn finish(&mut self) -> Result<Option<String>, TokenizerError> {
        let before = self.window(self.current)?;
        let text = self.window(self.ids.len())?;
        self.prev = self.current;
        self.current = self.ids.len();
        Ok((text.len() > before.len())
            .then(|| text.get(before.len()..).unwrap_or_default().to_owned()))
    }
}
