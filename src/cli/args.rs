//! The command line's arguments (clap) and their conversion into a [`TrainConfig`]; `cli.rs` runs
//! the commands.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::data::{OverLong, PromptCompletionStyle};
use crate::model::qload::QuantChoice;
use crate::train::{DeviceChoice, DtypeChoice, Duration, Schedule, TrainConfig};

/// FineTune: LoRA fine-tuning of Hugging Face language models.
#[derive(Debug, Parser)]
#[command(name = "finetune", version, about)]
pub struct Cli {
    /// The command to run; without one, the app opens.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Open the app with these loaded: a model folder and/or a .jsonl dataset.
    pub paths: Vec<PathBuf>,
}

/// The `finetune` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a LoRA adapter headless.
    Train(Box<TrainArgs>),
    /// Measure training speed and memory: timed LoRA steps after a warm-up.
    Bench(BenchArgs),
    /// Generate text from a model (and optionally an adapter): the answer on stdout.
    Generate(Box<super::generate::GenerateArgs>),
    /// Chat with a model (and optionally an adapter) in the terminal; /base and /tuned compare.
    Chat(Box<super::chat::ChatArgs>),
    /// Search the Hugging Face Hub for text-generation models FineTune can train.
    Search {
        /// Words to search for.
        query: String,
        /// downloads | trending | likes | updated
        #[arg(long, default_value = "downloads")]
        sort: String,
        /// Only models of this organization or user.
        #[arg(long)]
        author: Option<String>,
        /// Most models to list.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Also list architectures FineTune cannot train.
        #[arg(long)]
        all: bool,
    },
    /// Download what training needs from a Hub model into the shared Hugging Face cache.
    Download {
        /// `org/name` on the Hub.
        repo: String,
        /// Branch, tag or commit [default: main].
        #[arg(long)]
        revision: Option<String>,
    },
    /// Convert PyTorch .bin (single or sharded) or a GGUF file into a safetensors model folder.
    Convert {
        /// A folder with pytorch_model*.bin, or a .gguf file.
        input: PathBuf,
        /// Output folder.
        output: PathBuf,
        /// f32 | f16 | bf16 (default: keep the stored dtype; GGUF is dequantized to f16).
        #[arg(long)]
        dtype: Option<String>,
        /// Largest output shard, in GB.
        #[arg(long, default_value_t = 5.0)]
        max_shard_gb: f64,
    },
    /// Export a trained adapter: the PEFT files with a README.md model card, or the base model
    /// with the adapter merged in (a Hugging Face folder).
    Export {
        /// The adapter folder (e.g. out/adapter or out/best).
        adapter: PathBuf,
        /// Destination folder (new or empty for `merged`).
        output: PathBuf,
        /// peft | merged | gguf | gguf-lora | ollama | mlx (for gguf and gguf-lora, OUTPUT may
        /// be the .gguf file)
        #[arg(long, value_enum, default_value_t = ExportFormat::Peft)]
        format: ExportFormat,
        /// For gguf and ollama: F32, F16, BF16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0
        #[arg(long, default_value = "Q4_K_M")]
        quant: String,
        /// For gguf: write the base model alone, without the adapter (the base for a GGUF LoRA).
        /// For ollama: the base GGUF plus the adapter as a GGUF LoRA (Modelfile `ADAPTER`)
        /// instead of one merged GGUF
        #[arg(long)]
        base_only: bool,
        /// The base model for `merged`, `mlx` and `gguf-lora` [default: the run's model, from the checkpoint's
        /// trainer_state.json, else the adapter's base_model_name_or_path].
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// Check a dataset: its summary and every problem (exit 1 when there are problems).
    InspectData(InspectDataArgs),
    /// Run elsewhere: write the job for TRL, Axolotl or mlx-lm, or take back the adapter it made.
    #[command(subcommand)]
    Job(super::job::JobCommand),
    /// Describe a model (architecture, sizes, LoRA targets).
    Info {
        /// A Hugging Face model folder (safetensors or .bin), a .gguf file, or a Hub id in the cache.
        model: PathBuf,
    },
}

/// `finetune bench` flags.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model folder (a config.json alone benchmarks random weights).
    #[arg(long)]
    pub model: PathBuf,
    /// Records per batch.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per record (--data records are cut or padded to it).
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Untimed steps before the timed ones.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// JSONL whose records fill the batches (default random tokens).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Compute device.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Compute dtype of the base model (auto: bf16 on GPUs, f32 on the CPU).
    #[arg(long, value_enum, default_value_t = DtypeArg::Auto)]
    pub dtype: DtypeArg,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Keep the random weights (for a config-only model folder) here between runs.
    #[arg(long)]
    pub random_dir: Option<PathBuf>,
    /// Recompute activations in backward (gradient checkpointing).
    #[arg(long)]
    pub checkpointing: bool,
    /// With --checkpointing, every k-th layer keeps its activations (0 = all recomputed).
    #[arg(long, default_value_t = 0)]
    pub checkpoint_keep_every: usize,
    /// QLoRA: keep the linear weights quantized (bench: float unless given).
    #[arg(long, value_enum)]
    pub quantize: Option<QuantArg>,
    /// DoRA instead of plain LoRA.
    #[arg(long)]
    pub dora: bool,
    /// The device's peak TFLOP/s in the compute dtype, to report model FLOP utilisation.
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Measure generation instead: prefill and decode tokens/s with the KV cache (greedy), the
    /// base model and with a rank --rank adapter unmerged; --steps timed runs.
    #[arg(long)]
    pub generate: bool,
    /// With --generate: prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// With --generate: decode steps per run.
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
}

/// `finetune export --format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// The PEFT adapter (adapter_model.safetensors + adapter_config.json) and a model card
    Peft,
    /// The base model with the adapter folded into its weights (Hugging Face folder)
    Merged,
    /// mlx-lm's adapter layout (adapters.safetensors + adapter_config.json)
    Mlx,
    /// A GGUF LoRA for llama.cpp, Ollama and LM Studio, beside the base model's GGUF
    GgufLora,
    /// The model with the adapter merged in as one GGUF file (llama.cpp, LM Studio), --quant
    Gguf,
    /// A folder for Ollama: the GGUF and a Modelfile with the chat template and stop tokens
    Ollama,
}

/// `--schedule` values: the learning-rate shape after warmup.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ScheduleArg {
    /// Cosine decay from --lr to --min-lr-ratio × --lr
    Cosine,
    /// Linear decay from --lr to --min-lr-ratio × --lr
    Linear,
    /// --lr throughout
    Constant,
}

/// `--dtype` values: the compute dtype of the base model.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DtypeArg {
    /// bf16 on GPUs, f32 on the CPU
    Auto,
    /// 32-bit float: full precision, twice the memory
    F32,
    /// bfloat16: half the memory, f32's range
    Bf16,
    /// IEEE half: half the memory, a narrower range than bf16
    F16,
}

impl From<DtypeArg> for DtypeChoice {
    fn from(d: DtypeArg) -> Self {
        match d {
            DtypeArg::Auto => DtypeChoice::Auto,
            DtypeArg::F32 => DtypeChoice::F32,
            DtypeArg::Bf16 => DtypeChoice::Bf16,
            DtypeArg::F16 => DtypeChoice::F16,
        }
    }
}

/// `--quantize` values: how the frozen linear weights are kept (QLoRA).
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum QuantArg {
    /// float weights (a GGUF model is dequantized; --dtype decides)
    None,
    /// 8-bit, nearly lossless: ~0.53× the memory of bf16
    #[value(name = "q8_0")]
    Q8_0,
    /// 6-bit K-quant: ~0.41× bf16
    #[value(name = "q6_k")]
    Q6K,
    /// 5-bit K-quant: ~0.34× bf16
    #[value(name = "q5_k")]
    Q5K,
    /// 4-bit K-quant: ~0.28× bf16 (rows not a multiple of 256 fall back to q5_0)
    #[value(name = "q4_k")]
    Q4K,
    /// 4-bit, one scale per 32: ~0.28× bf16
    #[value(name = "q4_0")]
    Q4_0,
}

impl From<QuantArg> for QuantChoice {
    fn from(q: QuantArg) -> Self {
        match q {
            QuantArg::None => QuantChoice::None,
            QuantArg::Q8_0 => QuantChoice::Q8_0,
            QuantArg::Q6K => QuantChoice::Q6K,
            QuantArg::Q5K => QuantChoice::Q5K,
            QuantArg::Q4K => QuantChoice::Q4K,
            QuantArg::Q4_0 => QuantChoice::Q4_0,
        }
    }
}

/// `--device` values: where the run computes.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DeviceArg {
    /// Metal, then CUDA, then the CPU: the first one present
    Auto,
    /// The CPU
    Cpu,
    /// The first CUDA GPU (a build with the cuda feature)
    Cuda,
    /// The Apple GPU (a build with the metal feature)
    Metal,
}

/// `--prompt-style` values: how prompt/completion records are rendered.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PromptStyleArg {
    /// The chat template when the model has one, else plain concatenation.
    Auto,
    /// `prompt + completion` as written.
    Plain,
    /// Always the chat template (ChatML fallback).
    Chat,
}

/// `finetune train` flags; every TrainConfig setting has one. Unset flags take the value from
/// `--config` (a TOML file with `TrainConfig`'s field names), else the default.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Settings file (TOML, TrainConfig field names, e.g. `lr = 1e-4`, `[lora] rank = 16`);
    /// flags given here override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The base model: a Hugging Face folder (safetensors or PyTorch .bin), a .gguf file, or a
    /// Hub id already in the cache (`finetune download`). .bin and GGUF are converted once.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training JSONL.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Validation JSONL (default: hold out --valid-fraction of the training records).
    #[arg(long)]
    pub valid: Option<PathBuf>,
    /// Output folder (adapter/, best/, checkpoints/).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// LoRA rank [default 8].
    #[arg(long)]
    pub rank: Option<usize>,
    /// LoRA alpha [default 16].
    #[arg(long)]
    pub alpha: Option<f64>,
    /// LoRA dropout [default 0].
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Comma-separated module names [default: every linear projection].
    #[arg(long, value_delimiter = ',')]
    pub targets: Option<Vec<String>>,
    /// Comma-separated layer indices [default: all].
    #[arg(long, value_delimiter = ',')]
    pub layers: Option<Vec<usize>>,
    /// rsLoRA scaling alpha/√r.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub rslora: Option<bool>,
    /// DoRA: train a magnitude per output row besides A and B (PEFT's use_dora).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub dora: Option<bool>,
    /// Peak learning rate [default 2e-4].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Learning-rate shape after warmup [default cosine].
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleArg>,
    /// Final lr as a fraction of --lr (cosine/linear) [default 0].
    #[arg(long)]
    pub min_lr_ratio: Option<f64>,
    /// Warmup steps [default 0].
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Optimizer steps (conflicts with --epochs).
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<usize>,
    /// Passes over the data [default 1].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Records per batch [default 4].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Batches per optimizer step [default 1].
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Longest record in tokens, capped at the model's context; longer records are truncated
    /// (or dropped, --drop-long) [default 1024].
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// Loss on completions / assistant turns only [default true]; `--mask-prompt false` trains on
    /// prompts too.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub mask_prompt: Option<bool>,
    /// How prompt/completion records are rendered [default auto].
    #[arg(long, value_enum)]
    pub prompt_style: Option<PromptStyleArg>,
    /// Pack short records into full rows.
    #[arg(long, alias = "pack", num_args = 0..=1, default_missing_value = "true")]
    pub packing: Option<bool>,
    /// Drop over-long records instead of truncating them.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub drop_long: Option<bool>,
    /// Skip bad JSONL lines (reported) instead of refusing to start.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub skip_bad_lines: Option<bool>,
    /// Share of the training records held out for validation without --valid [default 0.1].
    #[arg(long)]
    pub valid_fraction: Option<f64>,
    /// Evaluate every N steps (0 = only at start and end) [default 50].
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Max validation batches per evaluation (0 = all).
    #[arg(long)]
    pub eval_batches: Option<usize>,
    /// Validation prompts answered greedily at each evaluation, to watch the answers change
    /// (0 = none) [default 3].
    #[arg(long)]
    pub samples: Option<usize>,
    /// Most tokens of each sample answer [default 64].
    #[arg(long)]
    pub sample_tokens: Option<usize>,
    /// Save a checkpoint every N steps (0 = only at the end) [default 100].
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Clip the global gradient norm (0 = off) [default 1].
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// AdamW decoupled weight decay [default 0].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// AdamW first-moment decay [default 0.9].
    #[arg(long)]
    pub beta1: Option<f64>,
    /// AdamW second-moment decay [default 0.999].
    #[arg(long)]
    pub beta2: Option<f64>,
    /// Stop after N evaluations without val-loss improvement (0 = off).
    #[arg(long)]
    pub early_stop: Option<usize>,
    /// Seed for LoRA init, dropout, shuffling and the hold-out split [default 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Compute device [default auto].
    #[arg(long, value_enum)]
    pub device: Option<DeviceArg>,
    /// Compute dtype of the base model (auto: bf16 on GPUs, f32 on the CPU).
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// QLoRA: keep the frozen linear weights quantized [default: a GGUF model keeps its own
    /// quantization unless --dtype is given; other models stay float].
    #[arg(long, value_enum)]
    pub quantize: Option<QuantArg>,
    /// Resume from a checkpoint folder (OUT/checkpoints/step-N).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Recompute activations in backward: much less memory, ~1/3 more compute.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub gradient_checkpointing: Option<bool>,
    /// With gradient checkpointing, every k-th layer keeps its activations (0 = all recomputed;
    /// 3 = two layers in three recomputed).
    #[arg(long)]
    pub checkpoint_keep_every: Option<usize>,
    /// Print every N steps.
    #[arg(long)]
    pub log_every: Option<usize>,
    /// One JSON object per event instead of progress lines.
    #[arg(long)]
    pub json: bool,
}

/// Puts a flag's value, when given, into its slot.
fn set<T: Clone>(slot: &mut T, v: &Option<T>) {
    if let Some(v) = v {
        *slot = v.clone();
    }
}

impl TrainArgs {
    /// The run's settings: `--config` (or the defaults), then every flag given. Not yet checked:
    /// [`TrainConfig::validate`] is the way to a run.
    pub fn to_config(&self) -> anyhow::Result<TrainConfig> {
        let mut c = self.settings_file()?;
        self.set_paths(&mut c);
        self.set_lora(&mut c);
        self.set_schedule(&mut c);
        self.set_data(&mut c);
        self.set_run(&mut c);
        Ok(c)
    }

    /// `--config`'s settings, or the defaults.
    fn settings_file(&self) -> anyhow::Result<TrainConfig> {
        let Some(path) = &self.config else {
            return Ok(TrainConfig::default());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the settings file {}", path.display()))?;
        toml::from_str::<TrainConfig>(&text).map_err(|e| {
            anyhow::anyhow!(
                "{e}settings file fields are TrainConfig's (see README#command-line): {}",
                path.display()
            )
        })
    }

    fn set_paths(&self, c: &mut TrainConfig) {
        set(&mut c.model_dir, &self.model);
        set(&mut c.train_data, &self.data);
        if self.valid.is_some() {
            c.valid_data = self.valid.clone();
        }
        set(&mut c.out_dir, &self.out);
        if self.resume.is_some() {
            c.resume_from = self.resume.clone();
        }
    }

    fn set_lora(&self, c: &mut TrainConfig) {
        set(&mut c.lora.rank, &self.rank);
        set(&mut c.lora.alpha, &self.alpha);
        set(&mut c.lora.dropout, &self.dropout);
        set(&mut c.lora.targets, &self.targets);
        if let Some(l) = &self.layers {
            c.lora.layers = (!l.is_empty()).then(|| l.clone());
        }
        set(&mut c.lora.use_rslora, &self.rslora);
        set(&mut c.lora.use_dora, &self.dora);
    }

    /// Learning rate, schedule, length and the optimizer.
    fn set_schedule(&self, c: &mut TrainConfig) {
        set(&mut c.lr, &self.lr);
        if let Some(s) = self.schedule {
            c.schedule = match s {
                ScheduleArg::Cosine => Schedule::Cosine,
                ScheduleArg::Linear => Schedule::Linear,
                ScheduleArg::Constant => Schedule::Constant,
            };
        }
        set(&mut c.min_lr_ratio, &self.min_lr_ratio);
        set(&mut c.warmup_steps, &self.warmup);
        if let Some(s) = self.steps {
            c.duration = Duration::Steps(s);
        }
        if let Some(e) = self.epochs {
            c.duration = Duration::Epochs(e);
        }
        set(&mut c.max_grad_norm, &self.max_grad_norm);
        set(&mut c.adamw.weight_decay, &self.weight_decay);
        set(&mut c.adamw.beta1, &self.beta1);
        set(&mut c.adamw.beta2, &self.beta2);
    }

    /// Batches and how records become rows.
    fn set_data(&self, c: &mut TrainConfig) {
        set(&mut c.batch_size, &self.batch_size);
        set(&mut c.grad_accum, &self.grad_accum);
        set(&mut c.max_seq_len, &self.max_seq_len);
        set(&mut c.mask_prompt, &self.mask_prompt);
        if let Some(p) = self.prompt_style {
            c.prompt_completion = match p {
                PromptStyleArg::Auto => PromptCompletionStyle::Auto,
                PromptStyleArg::Plain => PromptCompletionStyle::Plain,
                PromptStyleArg::Chat => PromptCompletionStyle::ChatTemplate,
            };
        }
        set(&mut c.packing, &self.packing);
        if let Some(d) = self.drop_long {
            c.over_long = if d {
                OverLong::Drop
            } else {
                OverLong::Truncate
            };
        }
        set(&mut c.skip_bad_lines, &self.skip_bad_lines);
        set(&mut c.valid_fraction, &self.valid_fraction);
    }

    /// Evaluation, saving, stopping, seed, device and logging.
    fn set_run(&self, c: &mut TrainConfig) {
        set(&mut c.eval_every, &self.eval_every);
        set(&mut c.eval_batches, &self.eval_batches);
        set(&mut c.samples, &self.samples);
        set(&mut c.sample_tokens, &self.sample_tokens);
        set(&mut c.save_every, &self.save_every);
        set(&mut c.early_stop_patience, &self.early_stop);
        set(&mut c.seed, &self.seed);
        set(&mut c.gradient_checkpointing, &self.gradient_checkpointing);
        set(&mut c.checkpoint_keep_every, &self.checkpoint_keep_every);
        if let Some(d) = self.device {
            c.device = d.into();
        }
        if let Some(d) = self.dtype {
            c.dtype = d.into();
        }
        if let Some(q) = self.quantize {
            c.quantize = Some(q.into());
        }
        if let Some(n) = self.log_every {
            c.log_every = n.max(1);
        }
    }
}

/// `finetune inspect-data` flags.
#[derive(Debug, Args)]
pub struct InspectDataArgs {
    /// The JSONL file to check.
    pub file: PathBuf,
    /// The model whose tokenizer and chat template are used (folder, .gguf or Hub id).
    #[arg(long)]
    pub model: PathBuf,
    /// Longest record in tokens; the summary counts longer ones as truncated.
    #[arg(long, default_value_t = 1024)]
    pub max_seq_len: usize,
    /// Train on prompts too (affects the masked-fraction figures).
    #[arg(long)]
    pub no_mask_prompt: bool,
}

impl From<DeviceArg> for DeviceChoice {
    fn from(d: DeviceArg) -> Self {
        match d {
            DeviceArg::Auto => DeviceChoice::Auto,
            DeviceArg::Cpu => DeviceChoice::Cpu,
            DeviceArg::Cuda => DeviceChoice::Cuda,
            DeviceArg::Metal => DeviceChoice::Metal,
        }
    }
}
