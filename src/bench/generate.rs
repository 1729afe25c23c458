//! `finetune bench --generate`: prefill and decode speed of greedy generation with the KV cache,
//! measured the way `bench/generate_ref.py` measures transformers and llama.cpp, so the figures
//! stand side by side (bench/generate_compare.sh runs all three).
//!
//! The prompt is a fixed English paragraph, repeated and tokenized without special tokens, cut to
//! exactly `prompt_tokens` ids. Prefill is one cached pass over the prompt (logits of the last
//! position only); decode is `new_tokens` single-token steps, each feeding the previous greedy
//! token, with no stop token. One warm-up run, then `runs` timed runs; the median of each phase
//! is reported. The same is then timed with a rank-r LoRA adapter attached unmerged (as the Try
//! step runs the tuned model), to show what the adapter costs.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::DType;

use super::{bench_model_dir, median, BenchOptions};
use crate::backend;
use crate::data::ModelTokenizer;
use crate::generate::{Decoder, GenerateOptions, SamplingParams};
use crate::model::{LoraConfig, Model};

/// The paragraph the prompt is made of (the same text as bench/generate_ref.py's).
pub const PARAGRAPH: &str = "The history of the river valley is written in its stones. Long before the first farmers arrived, \
glaciers carved the wide basin and left behind a scattering of boulders, gravel banks and quiet \
lakes. Over thousands of years the forests returned, and with them came deer, wolves and the \
people who hunted them. Villages grew along the water, where fish were plentiful and the soil was \
rich enough to feed a family through the long winter. Traders followed the river south to the \
sea, carrying furs, salt and iron tools, and they brought back stories of distant cities. ";

/// What the generation benchmark measures besides [`BenchOptions`]' model, device and dtype.
#[derive(Debug, Clone, Copy)]
pub struct GenerateParams {
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Decode steps per run.
    pub new_tokens: usize,
    /// Timed runs (the median is reported).
    pub runs: usize,
}

/// Prefill and decode speed of one configuration.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Speed {
    /// Prompt tokens per second of the prefill (median).
    pub prefill_tok_s: f64,
    /// Decode steps per second (median).
    pub decode_tok_s: f64,
}

/// The generation benchmark's figures.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GenerateReport {
    /// Always "finetune".
    pub engine: String,
    /// The model folder.
    pub model: String,
    /// The device in words.
    pub device: String,
    /// The compute dtype of the weights.
    pub dtype: String,
    /// The CPU's model name.
    pub cpu: String,
    /// Logical CPUs of the machine.
    pub threads: usize,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Decode steps per run.
    pub new_tokens: usize,
    /// The base model.
    pub base: Speed,
    /// With a LoRA adapter of `rank` on every projection, unmerged.
    pub lora: Speed,
    /// Rank of that adapter.
    pub rank: usize,
    /// The folder had no weights, so random ones were used.
    pub random_weights: bool,
}

/// The CPU's model name, as the OS reports it.
pub fn cpu_name() -> String {
    let brand = sysinfo::System::new().ok().and_then(|mut sys| {
        sys.refresh_cpu_all();
        let b = sys.cpus().first()?.brand().trim().to_owned();
        (!b.is_empty()).then_some(b)
    });
    brand.unwrap_or_else(|| std::env::consts::ARCH.to_owned())
}

/// The prompt: [`PARAGRAPH`] repeated and tokenized without special tokens, cut to `n` ids.
pub fn prompt_ids(tokenizer: &ModelTokenizer, n: usize) -> anyhow::Result<Vec<u32>> {
    let mut text = PARAGRAPH.to_owned();
    loop {
        let ids = tokenizer.encode(&text, false)?;
        if ids.len() >= n {
            return Ok(ids[..n].to_vec());
        }
        if ids.is_empty() {
            anyhow::bail!("the tokenizer makes no tokens of English text");
        }
        text.push_str(PARAGRAPH);
    }
}

/// Times one generation: (prefill seconds, decode steps per second).
fn one_run(model: &Model, ids: &[u32], new_tokens: usize) -> anyhow::Result<(f64, f64)> {
    let options = GenerateOptions {
        max_new_tokens: new_tokens + 1,
        sampling: SamplingParams::default(),
        seed: 0,
        stop_ids: Vec::new(),
    };
    let start = Instant::now();
    let mut decoder = Decoder::new(model, ids, options)?;
    // The first token comes from the prefill's logits.
    decoder.step(model)?;
    let prefill = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut steps = 0;
    while decoder.step(model)?.is_some() {
        steps += 1;
    }
    Ok((
        prefill,
        steps as f64 / start.elapsed().as_secs_f64().max(1e-9),
    ))
}

fn speed(model: &Model, ids: &[u32], p: &GenerateParams) -> anyhow::Result<Speed> {
    one_run(model, ids, p.new_tokens.min(8))?;
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for _ in 0..p.runs.max(1) {
        let (secs, rate) = one_run(model, ids, p.new_tokens)?;
        prefill.push(ids.len() as f64 / secs.max(1e-9));
        decode.push(rate);
    }
    Ok(Speed {
        prefill_tok_s: median(&mut prefill),
        decode_tok_s: median(&mut decode),
    })
}

/// Runs the generation benchmark.
pub fn run(opts: &BenchOptions, p: &GenerateParams) -> anyhow::Result<GenerateReport> {
    let backend = backend::pick_with(opts.device, opts.dtype)?;
    let (model_dir, _tmp, has_weights) = bench_model_dir(opts)?;
    let tokenizer =
        ModelTokenizer::from_dir(&model_dir).or_else(|_| ModelTokenizer::from_dir(&opts.model))?;
    let mut model = Model::load(&model_dir, backend.dtype, &backend.device)?;
    let context = model.config.max_position_embeddings;
    if p.prompt_tokens + p.new_tokens + 1 > context {
        anyhow::bail!(
            "{} prompt + {} new tokens do not fit the model's context of {context}; use fewer",
            p.prompt_tokens,
            p.new_tokens
        );
    }
    let ids = prompt_ids(&tokenizer, p.prompt_tokens)?;
    let base = speed(&model, &ids, p)?;
    let lora = LoraConfig {
        rank: opts.rank,
        alpha: 2.0 * opts.rank as f64,
        ..Default::default()
    };
    model.attach_lora(&lora, 0)?;
    let with_lora = speed(&model, &ids, p)?;
    Ok(GenerateReport {
        engine: "finetune".into(),
        model: PathBuf::from(&opts.model).display().to_string(),
        device: backend.name,
        dtype: dtype_name(backend.dtype).into(),
        cpu: cpu_name(),
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        prompt_tokens: ids.len(),
        new_tokens: p.new_tokens,
        base,
        lora: with_lora,
        rank: opts.rank,
        random_weights: !has_weights,
    })
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "other",
    }
}

impl std::fmt::Display for GenerateReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "model      {}{}",
            self.model,
            if self.random_weights {
                " (random weights)"
            } else {
                ""
            }
        )?;
        writeln!(
            f,
            "device     {} ({}), {}",
            self.device, self.dtype, self.cpu
        )?;
        writeln!(
            f,
            "prompt     {} tokens, then {} greedy steps",
            self.prompt_tokens, self.new_tokens
        )?;
        writeln!(
            f,
            "base       prefill {:8.1} tok/s   decode {:7.1} tok/s",
            self.base.prefill_tok_s, self.base.decode_tok_s
        )?;
        write!(
            f,
            "LoRA r{:<3}  prefill {:8.1} tok/s   decode {:7.1} tok/s (unmerged)",
            self.rank, self.lora.prefill_tok_s, self.lora.decode_tok_s
        )
    }
}
