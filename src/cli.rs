//! The command line: `finetune train|info …` run headless on the same engine as the app; with no
//! subcommand (or just paths) the app window opens.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::data::{OverLong, PromptCompletionStyle};
use crate::train::{DeviceChoice, DtypeChoice, Duration, Event, Schedule, TrainConfig};

/// FineTune: LoRA fine-tuning of Hugging Face language models.
#[derive(Debug, Parser)]
#[command(name = "finetune", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Open the app with these loaded: a model folder and/or a .jsonl dataset.
    pub paths: Vec<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a LoRA adapter headless.
    Train(Box<TrainArgs>),
    /// Measure training speed and memory: timed LoRA steps after a warm-up.
    Bench(BenchArgs),
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
        #[arg(long, default_value_t = 5.0)]
        max_shard_gb: f64,
    },
    /// Export a trained adapter (PEFT layout) with a README.md model card.
    Export {
        /// The adapter folder (e.g. out/adapter or out/best).
        adapter: PathBuf,
        /// Destination folder.
        output: PathBuf,
    },
    /// Check a dataset: its summary and every problem (exit 1 when there are problems).
    InspectData(InspectDataArgs),
    /// Describe a local Hugging Face model folder (architecture, sizes, LoRA targets).
    Info {
        /// Model folder (config.json + safetensors).
        model: PathBuf,
    },
}

/// `finetune bench` flags.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model folder (a config.json alone benchmarks random weights).
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// JSONL whose records fill the batches (default random tokens).
    #[arg(long)]
    pub data: Option<PathBuf>,
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
    /// The device's peak TFLOP/s in the compute dtype, to report model FLOP utilisation.
    #[arg(long)]
    pub peak_tflops: Option<f64>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ScheduleArg {
    Cosine,
    Linear,
    Constant,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DtypeArg {
    Auto,
    F32,
    Bf16,
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

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
    Metal,
}

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
    /// Hugging Face model folder (or a .gguf file).
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
    /// Peak learning rate [default 2e-4].
    #[arg(long)]
    pub lr: Option<f64>,
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
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub grad_accum: Option<usize>,
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// Loss on completions / assistant turns only [default true]; `--mask-prompt false` trains on
    /// prompts too.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub mask_prompt: Option<bool>,
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
    #[arg(long)]
    pub valid_fraction: Option<f64>,
    /// Evaluate every N steps (0 = only at start and end) [default 50].
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Max validation batches per evaluation (0 = all).
    #[arg(long)]
    pub eval_batches: Option<usize>,
    /// Save a checkpoint every N steps (0 = only at the end) [default 100].
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Clip the global gradient norm (0 = off) [default 1].
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    #[arg(long)]
    pub beta1: Option<f64>,
    #[arg(long)]
    pub beta2: Option<f64>,
    /// Stop after N evaluations without val-loss improvement (0 = off).
    #[arg(long)]
    pub early_stop: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long, value_enum)]
    pub device: Option<DeviceArg>,
    /// Compute dtype of the base model (auto: bf16 on GPUs, f32 on the CPU).
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
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

impl TrainArgs {
    /// The run's settings: `--config` (or the defaults), then every flag given.
    pub fn to_config(&self) -> anyhow::Result<TrainConfig> {
        let mut c = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading the settings file {}", path.display()))?;
                toml::from_str::<TrainConfig>(&text).map_err(|e| {
                    anyhow::anyhow!(
                        "{e}settings file fields are TrainConfig's (see README#command-line): {}",
                        path.display()
                    )
                })?
            }
            None => TrainConfig::default(),
        };
        fn set<T: Clone>(slot: &mut T, v: &Option<T>) {
            if let Some(v) = v {
                *slot = v.clone();
            }
        }
        set(&mut c.model_dir, &self.model);
        set(&mut c.train_data, &self.data);
        if self.valid.is_some() {
            c.valid_data = self.valid.clone();
        }
        set(&mut c.out_dir, &self.out);
        set(&mut c.lora.rank, &self.rank);
        set(&mut c.lora.alpha, &self.alpha);
        set(&mut c.lora.dropout, &self.dropout);
        set(&mut c.lora.targets, &self.targets);
        if let Some(l) = &self.layers {
            c.lora.layers = (!l.is_empty()).then(|| l.clone());
        }
        set(&mut c.lora.use_rslora, &self.rslora);
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
        set(&mut c.eval_every, &self.eval_every);
        set(&mut c.eval_batches, &self.eval_batches);
        set(&mut c.save_every, &self.save_every);
        set(&mut c.max_grad_norm, &self.max_grad_norm);
        set(&mut c.adamw.weight_decay, &self.weight_decay);
        set(&mut c.adamw.beta1, &self.beta1);
        set(&mut c.adamw.beta2, &self.beta2);
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
        if self.resume.is_some() {
            c.resume_from = self.resume.clone();
        }
        if let Some(n) = self.log_every {
            c.log_every = n.max(1);
        }
        Ok(c)
    }
}

/// `finetune inspect-data` flags.
#[derive(Debug, Args)]
pub struct InspectDataArgs {
    /// The JSONL file to check.
    pub file: PathBuf,
    /// Model folder whose tokenizer and chat template are used.
    #[arg(long)]
    pub model: PathBuf,
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

fn hub() -> anyhow::Result<crate::hub::Hub> {
    let token = crate::hub::keychain_token().ok().flatten();
    Ok(crate::hub::Hub::from_env(token.as_deref())?)
}

fn search(
    text: String,
    sort: &str,
    author: Option<String>,
    limit: usize,
    all: bool,
) -> anyhow::Result<ExitCode> {
    let rows = hub()?.search(&crate::hub::SearchQuery {
        text,
        sort: sort.parse().map_err(anyhow::Error::msg)?,
        author,
        supported_only: !all,
        limit,
    })?;
    print!("{}", crate::hub::format_rows(&rows));
    Ok(ExitCode::SUCCESS)
}

fn download(repo: &str, revision: Option<&str>) -> anyhow::Result<ExitCode> {
    let hub = hub()?;
    let cancel = crate::hub::Cancel::default();
    let on_ctrl_c = cancel.clone();
    if let Err(e) = ctrlc::set_handler(move || on_ctrl_c.cancel()) {
        eprintln!("note: Ctrl-C will kill without cleaning up ({e})");
    }
    let mut last_progress = std::time::Instant::now() - std::time::Duration::from_secs(1);
    let dir = hub.download(
        repo,
        revision,
        &mut |event| {
            let is_progress = matches!(event, crate::hub::DownloadEvent::Progress { .. });
            if is_progress && last_progress.elapsed().as_millis() < 500 {
                return;
            }
            if is_progress {
                last_progress = std::time::Instant::now();
            }
            if let Some(line) = event.describe() {
                eprintln!("{line}");
            }
        },
        &cancel,
    )?;
    println!("{}", dir.display());
    Ok(ExitCode::SUCCESS)
}

fn convert(
    input: &Path,
    output: &Path,
    dtype: Option<&str>,
    max_shard_gb: f64,
) -> anyhow::Result<ExitCode> {
    let report = crate::convert::convert(
        input,
        output,
        &crate::convert::ConvertOptions {
            dtype: dtype.map(crate::convert::parse_dtype).transpose()?,
            max_shard_bytes: (max_shard_gb * 1e9) as u64,
        },
    )?;
    println!("{}", report.summary());
    for note in &report.notes {
        println!("note: {note}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The trainer state saved next to an adapter: `out/checkpoints/<latest>/trainer_state.json`
/// for `out/adapter` or `out/best`, or the adapter folder's own when it is a checkpoint.
fn trainer_state_near(adapter: &Path) -> Option<crate::train::checkpoint::TrainerState> {
    if let Ok(s) = crate::train::checkpoint::load_state(adapter) {
        return Some(s);
    }
    let ckpts = adapter.parent()?.join("checkpoints");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(ckpts)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    crate::train::checkpoint::load_state(dirs.last()?).ok()
}

fn export(adapter: &Path, output: &Path) -> anyhow::Result<ExitCode> {
    let state = trainer_state_near(adapter);
    let name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let card = match &state {
        Some(s) => crate::export::CardInfo {
            base_model: name(&s.config.model_dir),
            dataset: name(&s.config.train_data),
            valid_dataset: s.config.valid_data.as_deref().map(name),
            config: s.config.clone(),
            steps_done: s.step,
            total_steps: s.total_steps,
            final_loss: s.last_loss,
            final_val_loss: None,
            best_val_loss: s.best_val_loss,
            date: crate::export::today(),
        },
        None => {
            eprintln!("note: no trainer_state.json near the adapter; the model card will lack run details");
            crate::export::CardInfo {
                base_model: String::new(),
                dataset: String::new(),
                valid_dataset: None,
                config: TrainConfig::default(),
                steps_done: 0,
                total_steps: 0,
                final_loss: None,
                final_val_loss: None,
                best_val_loss: None,
                date: crate::export::today(),
            }
        }
    };
    let exported = crate::export::export_adapter(adapter, output, &card)?;
    for f in &exported.files {
        println!("{}", f.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn bench(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let report = crate::bench::run(&crate::bench::BenchOptions {
        model: args.model.clone(),
        batch: args.batch,
        seq_len: args.seq_len,
        rank: args.rank,
        steps: args.steps,
        warmup: args.warmup,
        data: args.data.clone(),
        device: args.device.into(),
        dtype: args.dtype.into(),
        random_dir: args.random_dir.clone(),
        checkpointing: args.checkpointing,
        keep_every: args.checkpoint_keep_every,
        peak_tflops: args.peak_tflops,
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{report}");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn main() -> ExitCode {
    crate::memory::tune_allocator();
    crate::backend::tune_cpu_threads();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Info { model }) => info(&model),
        Some(Command::Train(args)) => train(&args),
        Some(Command::Bench(args)) => bench(&args),
        Some(Command::InspectData(args)) => inspect_data(&args),
        Some(Command::Search {
            query,
            sort,
            author,
            limit,
            all,
        }) => search(query, &sort, author, limit, all),
        Some(Command::Download { repo, revision }) => download(&repo, revision.as_deref()),
        Some(Command::Convert {
            input,
            output,
            dtype,
            max_shard_gb,
        }) => convert(&input, &output, dtype.as_deref(), max_shard_gb),
        Some(Command::Export { adapter, output }) => export(&adapter, &output),
        None => open_app(cli.paths),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn open_app(paths: Vec<PathBuf>) -> anyhow::Result<ExitCode> {
    crate::ui::run_app(paths)?;
    Ok(ExitCode::SUCCESS)
}

fn info(dir: &Path) -> anyhow::Result<ExitCode> {
    let cfg = crate::model::ModelConfig::from_dir(dir)?;
    println!("architecture   {}", cfg.architecture);
    println!("parameters     {}", cfg.parameter_count());
    println!("layers         {}", cfg.num_layers);
    println!("hidden size    {}", cfg.hidden_size);
    println!("vocab          {}", cfg.vocab_size);
    println!("context        {}", cfg.max_position_embeddings);
    println!("LoRA targets   {}", cfg.linear_names().join(", "));
    Ok(ExitCode::SUCCESS)
}

fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0) as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// Prints one event the way a terminal user wants it; returns the exit code for terminal events.
pub fn print_event(event: &Event, log_every: usize) -> Option<ExitCode> {
    match event {
        Event::Started {
            model,
            architecture,
            device,
            base_params,
            trainable_params,
            total_steps,
            start_step,
            train,
            valid,
        } => {
            println!("model      {model} ({architecture}, {base_params} parameters) on {device}");
            println!(
                "LoRA       {trainable_params} trainable parameters ({:.3}%)",
                100.0 * *trainable_params as f64 / (*base_params).max(1) as f64
            );
            println!("training data\n{train}");
            if let Some(v) = valid {
                println!("validation data\n{v}");
            }
            println!("steps      {start_step} → {total_steps}");
        }
        Event::Log(line) => println!("{line}"),
        Event::Step(s) => {
            if s.step % log_every == 0 || s.step == s.total_steps {
                println!(
                    "step {:>5}/{} | epoch {:.2} | loss {:.4} | lr {:.2e} | grad norm {:.3} | {:.0} tok/s | {} elapsed, {} left{}",
                    s.step,
                    s.total_steps,
                    s.epoch,
                    s.loss,
                    s.lr,
                    s.grad_norm,
                    s.tokens_per_sec,
                    fmt_secs(s.elapsed_secs),
                    fmt_secs(s.eta_secs),
                    s.rss_bytes
                        .map(|b| format!(" | RSS {:.0} MB", b as f64 / 1e6))
                        .unwrap_or_default()
                );
            }
        }
        Event::Eval {
            step,
            val_loss,
            best,
        } => println!(
            "eval at step {step}: val loss {val_loss:.4}{}",
            if *best { " (best)" } else { "" }
        ),
        Event::Saved { step, path } => println!("saved step {step}: {}", path.display()),
        Event::Finished {
            adapter,
            best,
            final_loss,
            final_val_loss,
        } => {
            println!(
                "finished: train loss {} | val loss {}",
                final_loss.map_or("-".into(), |l| format!("{l:.4}")),
                final_val_loss.map_or("-".into(), |l| format!("{l:.4}"))
            );
            println!("adapter: {}", adapter.display());
            if let Some(b) = best {
                println!("best adapter (lowest val loss): {}", b.display());
            }
            return Some(ExitCode::SUCCESS);
        }
        Event::Stopped {
            adapter,
            best,
            step,
            reason,
        } => {
            println!("{reason}");
            println!("adapter of step {step} saved: {}", adapter.display());
            if let Some(b) = best {
                println!("best adapter (lowest val loss): {}", b.display());
            }
            return Some(ExitCode::SUCCESS);
        }
        Event::Failed { error } => {
            eprintln!("error: {error}");
            return Some(ExitCode::FAILURE);
        }
    }
    None
}

fn inspect_data(args: &InspectDataArgs) -> anyhow::Result<ExitCode> {
    let tokenizer = crate::data::ModelTokenizer::from_dir(&args.model)?;
    let options = crate::data::DataOptions {
        max_seq_len: args.max_seq_len,
        mask_prompt: !args.no_mask_prompt,
        valid_fraction: 0.0,
        ..Default::default()
    };
    match crate::data::load(&args.file, None, &tokenizer, &options) {
        Ok(loaded) => {
            println!("{}", loaded.train.summary);
            Ok(ExitCode::SUCCESS)
        }
        Err(problems) => {
            println!("{problems}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn train(args: &TrainArgs) -> anyhow::Result<ExitCode> {
    let config = args.to_config()?;
    let json = args.json;
    let (reporter, events, stop) = crate::session::Reporter::channel();
    // Ctrl-C asks for a clean stop: the current step finishes and everything is saved.
    let flag = stop.clone();
    if let Err(e) = ctrlc::set_handler(move || {
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        eprintln!("\nstopping after this step (Ctrl-C again to kill)…");
    }) {
        eprintln!("note: Ctrl-C will kill without saving ({e})");
    }
    let log_every = config.log_every;
    let worker = std::thread::spawn(move || crate::train::run(config, reporter));
    let mut code = ExitCode::FAILURE;
    for event in events.iter() {
        let end = if json {
            println!("{}", serde_json::to_string(&event)?);
            match &event {
                Event::Finished { .. } | Event::Stopped { .. } => Some(ExitCode::SUCCESS),
                Event::Failed { .. } => Some(ExitCode::FAILURE),
                _ => None,
            }
        } else {
            print_event(&event, log_every)
        };
        if let Some(c) = end {
            code = c;
        }
        // A stop the person asked for (Ctrl-C) is a success; a NaN stop is not.
        if let Event::Stopped { .. } = &event {
            if !stop.load(std::sync::atomic::Ordering::SeqCst) {
                code = ExitCode::from(3);
            }
        }
    }
    let _ = worker.join();
    Ok(code)
}
