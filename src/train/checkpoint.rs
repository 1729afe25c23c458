//! Checkpoints: a folder holding the adapter (PEFT layout), the optimizer state
//! (`optimizer.safetensors`) and `trainer_state.json` (step, epoch, position in the epoch, best val
//! loss, the full config). Written into `<name>.tmp` and renamed into place, so a checkpoint folder
//! is either complete or absent. Resume reads all three and continues exactly where it stopped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::model::{adapter, LoraState, Model};
use crate::train::config::TrainConfig;
use crate::train::optim::AdamW;

/// File in a checkpoint folder holding the AdamW moments and step (safetensors).
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// File in a checkpoint folder holding the [`TrainerState`] (JSON).
pub const STATE_FILE: &str = "trainer_state.json";

/// Where training stands, saved with every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    /// Optimizer steps the whole run takes.
    pub total_steps: usize,
    /// Epoch of the next batch (0-based).
    pub epoch: u64,
    /// Batches of that epoch already consumed (resume skips them).
    pub batch_in_epoch: usize,
    /// Best validation loss so far (None before the first evaluation).
    pub best_val_loss: Option<f64>,
    /// Evaluations since the best one improved (early stopping counts these).
    pub evals_since_best: usize,
    /// Training loss of the last step.
    pub last_loss: Option<f64>,
    /// The run's full config; resume continues with it.
    pub config: TrainConfig,
    /// FineTune version that wrote the checkpoint (`CARGO_PKG_VERSION`).
    pub finetune_version: String,
}

impl TrainerState {
    /// The state of a run that starts at step 0.
    pub fn start(config: &TrainConfig, total_steps: usize) -> Self {
        Self {
            step: 0,
            total_steps,
            epoch: 0,
            batch_in_epoch: 0,
            best_val_loss: None,
            evals_since_best: 0,
            last_loss: None,
            config: config.clone(),
            finetune_version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }
}

/// Errors writing or reading checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Creating, writing or renaming a checkpoint file or folder failed.
    #[error("cannot write checkpoint ({reason}); check free disk space and permissions: {path}")]
    Write {
        /// The file or folder being written.
        path: PathBuf,
        /// The underlying error, as text.
        reason: String,
    },
    /// A checkpoint file is missing or cannot be parsed.
    #[error("cannot read checkpoint ({reason}); pick a folder under <out>/checkpoints: {path}")]
    Read {
        /// The file or folder being read.
        path: PathBuf,
        /// The underlying error, as text.
        reason: String,
    },
}

fn write_err(path: &Path) -> impl Fn(String) -> CheckpointError + '_ {
    move |reason| CheckpointError::Write {
        path: path.to_path_buf(),
        reason,
    }
}

/// Writes a full checkpoint to `dir` (replacing an older one there).
pub fn save(
    dir: &Path,
    model: &Model,
    lora: &LoraState,
    opt: &AdamW,
    state: &TrainerState,
    base_model: Option<&str>,
) -> Result<(), CheckpointError> {
    let err = write_err(dir);
    let tmp = dir.with_extension("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| err(e.to_string()))?;
    }
    let written = (|| -> Result<(), CheckpointError> {
        std::fs::create_dir_all(&tmp).map_err(|e| err(e.to_string()))?;
        adapter::save(&tmp, lora, model, base_model).map_err(|e| err(e.to_string()))?;
        let moments = opt.state_tensors().map_err(|e| err(e.to_string()))?;
        let opt_bytes =
            safetensors::tensor::serialize(moments, None).map_err(|e| err(e.to_string()))?;
        std::fs::write(tmp.join(OPTIMIZER_FILE), opt_bytes).map_err(|e| err(e.to_string()))?;
        let json = serde_json::to_string_pretty(state).map_err(|e| err(e.to_string()))?;
        std::fs::write(tmp.join(STATE_FILE), json).map_err(|e| err(e.to_string()))
    })();
    if let Err(e) = written {
        // A full disk leaves no half-written checkpoint behind (and frees what it took).
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| err(e.to_string()))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// Reads `trainer_state.json` of the checkpoint in `dir`.
pub fn load_state(dir: &Path) -> Result<TrainerState, CheckpointError> {
    let path = dir.join(STATE_FILE);
    let read = |reason: String| CheckpointError::Read {
        path: path.clone(),
        reason,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| read(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| read(e.to_string()))
}

/// Reads the optimizer moments of the checkpoint in `dir`.
pub fn load_optimizer(
    dir: &Path,
    device: &Device,
) -> Result<HashMap<String, Tensor>, CheckpointError> {
    let path = dir.join(OPTIMIZER_FILE);
    candle_core::safetensors::load(&path, device).map_err(|e| CheckpointError::Read {
        path,
        reason: e.to_string(),
    })
}
