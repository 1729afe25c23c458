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
use crate::generate::{
    self, prompt, prompt::Prompt, GenerateOptions, Generation, GenerationDefaults, SamplingParams,
};
use crate::model::{Model, PreparedModel};

/// The model to load: shared by `generate` and `chat`.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// The model: a Hugging Face folder (safetensors or PyTorch .bin), a .gguf file, or a Hub id
    /// in the cache (anything `train` takes).
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT adapter folder to apply (e.g. OUT/adapter).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Compute device.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Compute dtype of the base model (auto: bf16 on GPUs, f32 on the CPU).
    #[arg(long, value_enum, default_value_t = DtypeArg::Auto)]
    pub dtype: DtypeArg,
}

/// How tokens are chosen: shared by `generate` and `chat`.
#[derive(Debug, Args)]
pub struct SamplingArgs {
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
}

/// `finetune generate` flags.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The model and adapter.
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt: raw text (tokenized with the tokenizer's special tokens, e.g. BOS), or the
    /// user's message with --chat.
    #[arg(long)]
    pub prompt: String,
    /// Render the prompt as a user turn with the model's chat template (ChatML when it has none).
    #[arg(long)]
    pub chat: bool,
    /// System message and template variables (with --chat).
    #[command(flatten)]
    pub template: TemplateArgs,
    /// Sampling.
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// What a chat prompt is rendered with besides the messages: shared by `generate` and `chat`.
#[derive(Debug, Args)]
pub struct TemplateArgs {
    /// A system message at the start of the conversation.
    #[arg(long)]
    pub system: Option<String>,
    /// The chat template's `enable_thinking` (Qwen3), passed only when given.
    #[arg(long)]
    pub enable_thinking: Option<bool>,
}

impl TemplateArgs {
    /// A chat prompt of `text` after `history`, with these settings.
    pub fn chat_prompt(&self, text: &str, history: Vec<prompt::Turn>) -> Prompt {
        Prompt {
            text: text.to_owned(),
            chat: true,
            system: self.system.clone(),
            enable_thinking: self.enable_thinking,
            history,
        }
    }
}

impl SamplingArgs {
    /// The sampling settings: `defaults` overridden by the flags given.
    pub fn params(&self, defaults: &SamplingParams) -> SamplingParams {
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

/// A loaded model (with its adapter, if any) and what generating from it needs.
pub struct Loaded {
    /// Where the model came from and its prepared folder.
    pub prepared: PreparedModel,
    /// The device and dtype it runs on.
    pub backend: Backend,
    /// The model.
    pub model: Model,
    /// Its tokenizer.
    pub tokenizer: ModelTokenizer,
    /// `generation_config.json`'s settings.
    pub defaults: GenerationDefaults,
}

impl ModelArgs {
    /// The model (with the adapter), on the device the flags pick, and its tokenizer.
    pub fn load(&self) -> anyhow::Result<Loaded> {
        let prepared = crate::model::source::prepare(&self.model)?;
        if let Some(message) = &prepared.message {
            eprintln!("{message}");
        }
        let backend = crate::backend::pick_with(self.device.into(), self.dtype.into())?;
        let mut model = Model::load(&prepared.dir, backend.dtype, &backend.device)?;
        if let Some(adapter) = &self.adapter {
            crate::model::adapter::load(adapter, &mut model)?;
        }
        let tokenizer = ModelTokenizer::from_dir(&prepared.dir)?;
        let defaults = GenerationDefaults::from_dir(&prepared.dir);
        Ok(Loaded {
            prepared,
            backend,
            model,
            tokenizer,
            defaults,
        })
    }
}

impl Loaded {
    /// The generation settings: the model's defaults overridden by the flags.
    pub fn options(&self, sampling: &SamplingArgs) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens: sampling
                .max_new_tokens
                .or(self.defaults.max_new_tokens)
                .unwrap_or(256),
            sampling: sampling.params(&self.defaults.sampling),
            seed: sampling.seed,
            stop_ids: generate::stop_ids(&self.defaults.eos_ids, &self.tokenizer),
        }
    }

    /// Generates after `ids`, writing the text to `out` as it comes; ends early when `stop` is
    /// set (Ctrl-C). Returns the generation and its whole text.
    pub fn stream(
        &self,
        ids: &[u32],
        options: &GenerateOptions,
        stop: &AtomicBool,
        out: &mut dyn Write,
    ) -> anyhow::Result<(Generation, String)> {
        let mut stream = generate::TextStream::new(&self.tokenizer);
        let mut text = String::new();
        let mut failed: Option<anyhow::Error> = None;
        let mut emit = |id: u32| -> ControlFlow<()> {
            let written = stream
                .push(id)
                .map_err(anyhow::Error::from)
                .and_then(|piece| {
                    if let Some(piece) = piece {
                        out.write_all(piece.as_bytes())?;
                        out.flush()?;
                        text.push_str(&piece);
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
        let done = generate::generate(&self.model, ids, options, &mut emit)?;
        if let Some(e) = failed {
            return Err(e);
        }
        if let Some(rest) = stream.finish()? {
            out.write_all(rest.as_bytes())?;
            text.push_str(&rest);
        }
        out.flush()?;
        Ok((done, text))
    }

    /// The statistics line of a generation (for stderr).
    pub fn stats(&self, done: &Generation) -> String {
        let finish = match done.finish {
            generate::Finish::Stop(id) => format!("stopped at token {id}"),
            generate::Finish::Length => "reached the token limit".to_owned(),
            generate::Finish::Cancelled => "cancelled".to_owned(),
        };
        format!(
            "[{} on {}] prompt {} tokens, prefill {:.1} tok/s; generated {} tokens, decode {:.1} tok/s; {finish}",
            self.prepared.config.architecture,
            self.backend.name,
            done.prompt_tokens,
            done.prefill_tokens_per_sec(),
            done.tokens.len(),
            done.decode_tokens_per_sec(),
        )
    }
}

/// A flag Ctrl-C sets: the answer ends after the current token and the statistics still print.
pub fn ctrl_c_flag() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let on_ctrl_c = stop.clone();
    if let Err(e) = ctrlc::set_handler(move || on_ctrl_c.store(true, Ordering::Relaxed)) {
        eprintln!("note: Ctrl-C will kill without the statistics ({e})");
    }
    stop
}

/// Runs `finetune generate`.
pub fn run(args: &GenerateArgs) -> anyhow::Result<ExitCode> {
    let loaded = args.model.load()?;
    let prompt = Prompt {
        text: args.prompt.clone(),
        chat: args.chat,
        system: args.template.system.clone(),
        enable_thinking: args.template.enable_thinking,
        history: Vec::new(),
    };
    let ids = generate::prompt::ids(&loaded.tokenizer, &prompt)?;
    let options = loaded.options(&args.sampling);
    let stop = ctrl_c_flag();
    let (done, _) = loaded.stream(&ids, &options, &stop, &mut std::io::stdout().lock())?;
    eprintln!("\n{}", loaded.stats(&done));
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
        assert_eq!(args(&[]).sampling.params(&sampled), sampled);
        assert!(args(&["--temperature", "0"])
            .sampling
            .params(&sampled)
            .is_greedy());
        assert!(args(&[]).sampling.params(&greedy).is_greedy());
        let s = args(&["--top-k", "5"]).sampling.params(&greedy);
        assert!(!s.is_greedy() && s.top_k == 5 && s.temperature == 1.0);
        let s = args(&[
            "--temperature",
            "0.5",
            "--min-p",
            "0.1",
            "--repetition-penalty",
            "1.2",
        ])
        .sampling
        .params(&greedy);
        assert!(!s.is_greedy() && s.temperature == 0.5 && s.min_p == 0.1);
        assert_eq!(s.repetition_penalty, 1.2);
    }
}
