//! `finetune generate`: one answer from a model (and optionally an adapter), streamed to stdout as
//! it is generated; the statistics go to stderr.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Args;

use super::{DeviceArg, DtypeArg};
use crate::backend::Backend;
use crate::data::ModelTokenizer;
use crate::generate::{self, prompt::Prompt, GenerateOptions, GenerationDefaults, SamplingParams};
use crate::model::{Model, PreparedModel};

/// `finetune generate` flags.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The model: a Hugging Face folder (safetensors or PyTorch .bin), a .gguf file, or a Hub id
    /// in the cache (anything `train` takes).
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT adapter folder to apply (e.g. OUT/adapter).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The prompt: raw text (tokenized with the tokenizer's special tokens, e.g. BOS), or the
    /// user's message with --chat.
    #[arg(long)]
    pub prompt: String,
    /// Render the prompt as a user turn with the model's chat template (ChatML when it has none).
    #[arg(long)]
    pub chat: bool,
    /// A system message before the prompt (with --chat).
    #[arg(long)]
    pub system: Option<String>,
    /// The chat template's `enable_thinking` (Qwen3), passed only when given.
    #[arg(long)]
    pub enable_thinking: Option<bool>,
    /// Most tokens to generate [default: generation_config.json's max_new_tokens, else 256].
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Sampling temperature; 0 = greedy. Default: generation_config.json's (greedy unless it
    /// sets do_sample). Giving any sampling flag samples.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Keep the smallest set of likeliest tokens reaching this probability.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Keep the k likeliest tokens (0 = all).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Drop tokens below this fraction of the likeliest token's probability.
    #[arg(long)]
    pub min_p: Option<f64>,
    /// Penalise tokens already in the text (1 = off; transformers' semantics).
    #[arg(long)]
    pub repetition_penalty: Option<f64>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Compute device.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Compute dtype of the base model (auto: bf16 on GPUs, f32 on the CPU).
    #[arg(long, value_enum, default_value_t = DtypeArg::Auto)]
    pub dtype: DtypeArg,
}

impl GenerateArgs {
    /// The sampling settings: `defaults` overridden by the flags given.
    pub fn sampling(&self, defaults: &SamplingParams) -> SamplingParams {
        let mut s = defaults.clone();
        let asked = self.top_p.is_some() || self.top_k.is_some() || self.min_p.is_some();
        if asked {
            s.do_sample = true;
        }
        if let Some(t) = self.temperature {
            s.temperature = t;
            s.do_sample = t > 0.0;
        }
        s.top_p = self.top_p.unwrap_or(s.top_p);
        s.top_k = self.top_k.unwrap_or(s.top_k);
        s.min_p = self.min_p.unwrap_or(s.min_p);
        s.repetition_penalty = self.repetition_penalty.unwrap_or(s.repetition_penalty);
        s
    }
}

/// The model (with the adapter), on the device the flags pick, and its tokenizer.
fn load(args: &GenerateArgs) -> anyhow::Result<(PreparedModel, Backend, Model, ModelTokenizer)> {
    let prepared = crate::model::source::prepare(&args.model)?;
    if let Some(message) = &prepared.message {
        eprintln!("{message}");
    }
    let backend = crate::backend::pick_with(args.device.into(), args.dtype.into())?;
    let mut model = Model::load(&prepared.dir, backend.dtype, &backend.device)?;
    if let Some(adapter) = &args.adapter {
        crate::model::adapter::load(adapter, &mut model)?;
    }
    let tokenizer = ModelTokenizer::from_dir(&prepared.dir)?;
    Ok((prepared, backend, model, tokenizer))
}

/// A flag Ctrl-C sets: the answer ends after the current token and the statistics still print.
fn ctrl_c_flag() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let on_ctrl_c = stop.clone();
    if let Err(e) = ctrlc::set_handler(move || on_ctrl_c.store(true, Ordering::Relaxed)) {
        eprintln!("note: Ctrl-C will kill without the statistics ({e})");
    }
    stop
}

/// Runs `finetune generate`.
pub fn run(args: &GenerateArgs) -> anyhow::Result<ExitCode> {
    let (prepared, backend, model, tokenizer) = load(args)?;
    let prompt = Prompt {
        text: args.prompt.clone(),
        chat: args.chat,
        system: args.system.clone(),
        enable_thinking: args.enable_thinking,
    };
    let ids = generate::prompt::ids(&tokenizer, &prompt)?;
    let defaults = GenerationDefaults::from_dir(&prepared.dir);
    let options = GenerateOptions {
        max_new_tokens: args
            .max_new_tokens
            .or(defaults.max_new_tokens)
            .unwrap_or(256),
        sampling: args.sampling(&defaults.sampling),
        seed: args.seed,
        stop_ids: generate::stop_ids(&defaults.eos_ids, &tokenizer),
    };
    let stop = ctrl_c_flag();
    let mut stream = generate::TextStream::new(&tokenizer);
    let mut out = std::io::stdout().lock();
    let mut failed: Option<anyhow::Error> = None;
    let mut emit = |id: u32| -> ControlFlow<()> {
        let written = stream
            .push(id)
            .map_err(anyhow::Error::from)
            .and_then(|piece| {
                if let Some(piece) = piece {
                    out.write_all(piece.as_bytes())?;
                    out.flush()?;
                }
                Ok(())
            });
        match written {
            Ok(()) if stop.load(Ordering::Relaxed) => ControlFlow::Break(()),
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                failed = Some(e);
                ControlFlow::Break(())
            }
        }
    };
    let done = generate::generate(&model, &ids, &options, &mut emit)?;
    if let Some(e) = failed {
        return Err(e);
    }
    if let Some(rest) = stream.finish()? {
        out.write_all(rest.as_bytes())?;
    }
    out.flush()?;
    let finish = match done.finish {
        generate::Finish::Stop(id) => format!("stopped at token {id}"),
        generate::Finish::Length => "reached the token limit".to_owned(),
        generate::Finish::Cancelled => "cancelled".to_owned(),
    };
    eprintln!(
        "\n[{} on {}] prompt {} tokens, prefill {:.1} tok/s; generated {} tokens, decode {:.1} tok/s; {finish}",
        prepared.config.architecture,
        backend.name,
        done.prompt_tokens,
        done.prefill_tokens_per_sec(),
        done.tokens.len(),
        done.decode_tokens_per_sec(),
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(flags: &[&str]) -> GenerateArgs {
        let mut argv = vec!["finetune", "generate", "--model", "m", "--prompt", "p"];
        argv.extend_from_slice(flags);
        match crate::cli::Cli::parse_from(argv).command {
            Some(crate::cli::Command::Generate(a)) => *a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn sampling_flags_override_the_model_defaults() {
        let sampled = SamplingParams {
            do_sample: true,
            temperature: 0.7,
            ..Default::default()
        };
        let greedy = SamplingParams::default();
        assert_eq!(args(&[]).sampling(&sampled), sampled);
        assert!(args(&["--temperature", "0"]).sampling(&sampled).is_greedy());
        assert!(args(&[]).sampling(&greedy).is_greedy());
        let s = args(&["--top-k", "5"]).sampling(&greedy);
        assert!(!s.is_greedy() && s.top_k == 5 && s.temperature == 1.0);
        let s = args(&[
            "--temperature",
            "0.5",
            "--min-p",
            "0.1",
            "--repetition-penalty",
            "1.2",
        ])
        .sampling(&greedy);
        assert!(!s.is_greedy() && s.temperature == 0.5 && s.min_p == 0.1);
        assert_eq!(s.repetition_penalty, 1.2);
    }
}
