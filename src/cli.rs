//! The command line: `finetune info|train|…` run headless on the same engine as the app.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// FineTune: LoRA fine-tuning of Hugging Face language models.
#[derive(Debug, Parser)]
#[command(name = "finetune", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Describe a local Hugging Face model folder (architecture, sizes, LoRA targets).
    Info {
        /// Model folder (config.json + safetensors).
        model: PathBuf,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Info { model }) => info(&model),
        None => {
            eprintln!("the app window is not built yet; try `finetune --help`");
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn info(dir: &std::path::Path) -> anyhow::Result<()> {
    let cfg = crate::model::ModelConfig::from_dir(dir)?;
    println!("architecture   {}", cfg.architecture);
    println!("parameters     {}", cfg.parameter_count());
    println!("layers         {}", cfg.num_layers);
    println!("hidden size    {}", cfg.hidden_size);
    println!("vocab          {}", cfg.vocab_size);
    println!("context        {}", cfg.max_position_embeddings);
    println!("LoRA targets   {}", cfg.linear_names().join(", "));
    Ok(())
}
