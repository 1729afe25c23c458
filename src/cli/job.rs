//! `finetune job export|import` (issue 21): the run's job for TRL, Axolotl or mlx-lm, and the
//! adapter such a run wrote taken back.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use super::TrainArgs;

/// `finetune job` subcommands.
#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Write the training job (model, data, template and mask, LoRA, optimizer, schedule) for
    /// another trainer into DIR.
    Export {
        /// The trainer: trl (TRL + accelerate), axolotl or mlx-lm.
        #[arg(long, value_enum)]
        to: crate::export::job::JobTarget,
        /// The bundle folder to write.
        dir: PathBuf,
        /// The run's settings, as for `finetune train`.
        #[command(flatten)]
        train: Box<TrainArgs>,
    },
    /// Find the adapter a job run wrote under DIR (PEFT or mlx-lm) and make it loadable here.
    Import {
        /// The job's output folder.
        dir: PathBuf,
    },
}

/// `finetune job export|import`.
pub fn run(cmd: &JobCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        JobCommand::Export { to, dir, train } => {
            let config = train.to_config()?;
            let done = crate::export::job::export_job(&config, *to, dir)?;
            for note in &done.notes {
                eprintln!("not carried over: {note}");
            }
            println!("job written: {}", done.dir.display());
        }
        JobCommand::Import { dir } => {
            let found = crate::export::job::import_adapter(dir)?;
            if found.from_mlx {
                println!("converted the mlx-lm adapter to PEFT's layout");
            }
            println!("adapter: {}", found.dir.display());
            println!(
                "try it: finetune chat --model BASE --adapter {0}\nexport it: finetune export {0} OUT --model BASE --format gguf",
                found.dir.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
