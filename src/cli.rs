//! The command line: `finetune train|info …` run headless on the same engine as the app; with no
//! subcommand (or just paths) the app window opens.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;

use crate::train::{format_duration, Event, TrainConfig};

mod args;
mod chat;
mod export;
mod generate;
mod job;
pub use args::*;
pub use generate::GenerateArgs;

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

/// The base model of `adapter`: the run's model (trainer_state.json beside it), else the
/// adapter's `base_model_name_or_path` when that opens as a model.
fn adapter_base(adapter: &Path) -> Option<PathBuf> {
    if let Some(s) = trainer_state_near(adapter) {
        return Some(s.config.model_dir);
    }
    let text = std::fs::read_to_string(adapter.join("adapter_config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let base = PathBuf::from(v.get("base_model_name_or_path")?.as_str()?);
    crate::model::ModelSource::open(&base).ok().map(|_| base)
}

/// The base model for an export: `--model`, else [`adapter_base`].
fn export_base(adapter: &Path, model: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    model.or_else(|| adapter_base(adapter)).ok_or_else(|| {
        anyhow::anyhow!(
            "cannot tell which base model {} was trained on; pass it with --model",
            adapter.display()
        )
    })
}

fn export_gguf_lora(
    adapter: &Path,
    output: &Path,
    model: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let base = export_base(adapter, model)?;
    let g = crate::export::gguf_lora::export_gguf_lora(adapter, &base, output)?;
    println!(
        "wrote a GGUF LoRA ({} modules, {}) to {}",
        g.modules,
        g.architecture,
        g.path.display()
    );
    let gguf_base = base
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if gguf_base {
        // Trained on this very file: it runs as it is.
        println!(
            "run it: llama-cli -m {} --lora {}",
            base.display(),
            g.path.display()
        );
    } else {
        println!(
            "run it: llama-cli -m <{} as GGUF: finetune export ... --format gguf --base-only> --lora {}",
            base.display(),
            g.path.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn export_mlx(adapter: &Path, output: &Path, model: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let base = export_base(adapter, model)?;
    let m = crate::export::mlx::export_mlx(adapter, &base, output)?;
    println!(
        "wrote an mlx-lm adapter ({} modules, last {} layers) to {}",
        m.modules,
        m.num_layers,
        m.dir.display()
    );
    println!(
        "run it: mlx_lm.generate --model <{}> --adapter-path {}",
        base.display(),
        m.dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn export_merged(
    adapter: &Path,
    output: &Path,
    model: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let base = export_base(adapter, model)?;
    let start = std::time::Instant::now();
    let m = crate::export::merged::export_merged(
        adapter,
        &base,
        output,
        crate::export::merged::MAX_SHARD_BYTES,
    )?;
    println!(
        "merged {} weights of {} into {} ({} file(s), {:.1} MB) in {:.1} s",
        m.merged,
        base.display(),
        m.dir.display(),
        m.shards,
        m.bytes as f64 / 1e6,
        start.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
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
    let options = crate::bench::BenchOptions {
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
        quantize: args.quantize.map(Into::into),
        dora: args.dora,
    };
    if args.generate {
        let params = crate::bench::generate::GenerateParams {
            prompt_tokens: args.prompt_tokens,
            new_tokens: args.new_tokens,
            runs: args.steps,
        };
        let report = crate::bench::generate::run(&options, &params)?;
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            println!("{report}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let report = crate::bench::run(&options)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{report}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The `finetune` binary: parses the arguments and runs the command, or opens the app when
/// there is none. Errors print as `error: …` with their causes and exit 1.
pub fn main() -> ExitCode {
    crate::memory::tune_allocator();
    crate::backend::tune_cpu_threads();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Info { model }) => info(&model),
        Some(Command::Train(args)) => train(&args),
        Some(Command::Bench(args)) => bench(&args),
        Some(Command::Generate(args)) => generate::run(&args),
        Some(Command::Chat(args)) => chat::run(&args),
        Some(Command::InspectData(args)) => inspect_data(&args),
        Some(Command::Job(cmd)) => job::run(&cmd),
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
        Some(Command::Export {
            adapter,
            output,
            format: format @ (ExportFormat::Gguf | ExportFormat::Ollama),
            model,
            quant,
            base_only,
        }) => export_base(&adapter, model).and_then(|base| {
            export::gguf(&export::GgufRequest {
                base,
                adapter,
                output,
                quant,
                base_only,
                ollama: format == ExportFormat::Ollama,
            })
        }),
        Some(Command::Export {
            adapter,
            output,
            format: ExportFormat::Merged,
            model,
            ..
        }) => export_merged(&adapter, &output, model),
        Some(Command::Export {
            adapter,
            output,
            format: ExportFormat::Mlx,
            model,
            ..
        }) => export_mlx(&adapter, &output, model),
        Some(Command::Export {
            adapter,
            output,
            format: ExportFormat::GgufLora,
            model,
            ..
        }) => export_gguf_lora(&adapter, &output, model),
        Some(Command::Export {
            adapter, output, ..
        }) => export(&adapter, &output),
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

fn info(model: &Path) -> anyhow::Result<ExitCode> {
    let prepared = crate::model::source::prepare(model)?;
    if let Some(message) = &prepared.message {
        eprintln!("{message}");
    }
    let cfg = prepared.config;
    println!("architecture   {}", cfg.architecture);
    println!("parameters     {}", cfg.parameter_count());
    println!("layers         {}", cfg.num_layers);
    println!("hidden size    {}", cfg.hidden_size);
    println!("vocab          {}", cfg.vocab_size);
    println!("context        {}", cfg.max_position_embeddings);
    println!("LoRA targets   {}", cfg.linear_names().join(", "));
    Ok(ExitCode::SUCCESS)
}

/// Reading progress on stderr: a line redrawn in place on a terminal, a line per tenth otherwise
/// (logs stay short).
fn print_reading(done: u64, total: u64) {
    use std::io::IsTerminal;
    let pct = |d: u64| (d * 100).checked_div(total).unwrap_or(100);
    let mb = |b: u64| b as f64 / 1e6;
    let text = format!(
        "reading data: {:3}% ({:.0} of {:.0} MB)",
        pct(done),
        mb(done),
        mb(total)
    );
    if std::io::stderr().is_terminal() {
        eprint!("\r{text}{}", if done >= total { "\n" } else { "" });
    } else if done >= total || pct(done) / 10 != pct(done.saturating_sub(1 << 20)) / 10 {
        eprintln!("{text}");
    }
}

/// Prints one event the way a terminal user wants it.
pub fn print_event(event: &Event, log_every: usize) {
    match event {
        Event::Started { .. } => print_started(event),
        Event::Log(line) => println!("{line}"),
        Event::Reading { done, total } => print_reading(*done, *total),
        Event::Step(s) => {
            if s.step % log_every == 0 || s.step == s.total_steps {
                print_step(s);
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
        Event::Samples { step, answers } => print_samples(*step, answers),
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
            print_best(best.as_deref());
        }
        Event::Stopped {
            adapter,
            best,
            step,
            reason,
        } => {
            println!("{reason}");
            println!("adapter of step {step} saved: {}", adapter.display());
            print_best(best.as_deref());
        }
        Event::Failed { error } => eprintln!("error: {error}"),
    }
}

/// One line of a sample's text: newlines shown as ⏎, cut at 160 characters.
fn one_line(text: &str) -> String {
    let flat = text.replace('\n', " ⏎ ");
    match flat.char_indices().nth(160) {
        Some((cut, _)) => format!("{}…", &flat[..cut]),
        None => flat,
    }
}

fn print_samples(step: usize, answers: &[crate::train::SampleAnswer]) {
    for a in answers {
        println!("sample at step {step} (validation line {}):", a.line);
        println!("  prompt    {}", one_line(&a.prompt));
        println!("  expected  {}", one_line(&a.expected));
        println!("  answer    {}", one_line(&a.answer));
    }
}

fn print_started(event: &Event) {
    let Event::Started {
        model,
        architecture,
        device,
        base_params,
        trainable_params,
        total_steps,
        start_step,
        train,
        valid,
    } = event
    else {
        return;
    };
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

fn print_step(s: &crate::train::StepStats) {
    println!(
        "step {:>5}/{} | epoch {:.2} | loss {:.4} | lr {:.2e} | grad norm {:.3} | {:.0} tok/s | {} elapsed, {} left{}",
        s.step,
        s.total_steps,
        s.epoch,
        s.loss,
        s.lr,
        s.grad_norm,
        s.tokens_per_sec,
        format_duration(s.elapsed_secs),
        format_duration(s.eta_secs),
        s.rss_bytes
            .map(|b| format!(" | RSS {:.0} MB", b as f64 / 1e6))
            .unwrap_or_default()
    );
}

fn print_best(best: Option<&Path>) {
    if let Some(b) = best {
        println!("best adapter (lowest val loss): {}", b.display());
    }
}

fn inspect_data(args: &InspectDataArgs) -> anyhow::Result<ExitCode> {
    let prepared = crate::model::source::prepare(&args.model)?;
    let tokenizer = crate::data::ModelTokenizer::from_dir(&prepared.dir)?;
    let options = crate::data::DataOptions {
        max_seq_len: args.max_seq_len,
        mask_prompt: !args.no_mask_prompt,
        valid_fraction: 0.0,
        ..Default::default()
    };
    match crate::data::load_with_progress(&args.file, None, &tokenizer, &options, &print_reading) {
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

/// `finetune train`: one more consumer of a session's events (progress lines, or one JSON object
/// per event). Ctrl-C stops the session cleanly; the exit code is the last event's
/// ([`Event::exit_code`]).
fn train(args: &TrainArgs) -> anyhow::Result<ExitCode> {
    let config = args.to_config()?;
    let log_every = config.log_every;
    let show = |event: &Event| -> anyhow::Result<()> {
        if args.json {
            println!("{}", serde_json::to_string(event)?);
        } else {
            print_event(event, log_every);
        }
        Ok(())
    };
    let config = match config.validate() {
        Ok(config) => config,
        Err(problems) => {
            let lines: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
            let failed = Event::Failed {
                error: format!("settings need attention:\n{}", lines.join("\n")),
            };
            show(&failed)?;
            return Ok(ExitCode::FAILURE);
        }
    };
    let mut session = crate::session::start(config, None);
    // Ctrl-C asks for a clean stop: the current step finishes and everything is saved.
    let stop = session.stop_handle();
    if let Err(e) = ctrlc::set_handler(move || {
        stop.stop();
        eprintln!("\nstopping after this step (Ctrl-C again to kill)…");
    }) {
        eprintln!("note: Ctrl-C will kill without saving ({e})");
    }
    let mut code = 1;
    while let Some(event) = session.recv() {
        show(&event)?;
        code = event.exit_code().unwrap_or(code);
    }
    session.join();
    Ok(ExitCode::from(code))
}
