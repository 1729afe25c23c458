//! Compute backend choice: Metal (macOS, feature `metal`) → CUDA (feature `cuda`) → CPU, or a user
//! override, with the reason in words for the status bar and the CLI, and the compute dtype that
//! suits it (bf16 frozen base weights on GPUs, f32 on CPU; LoRA and optimizer state always f32).

use candle_core::{DType, Device};

use crate::train::DeviceChoice;

/// The chosen device and why.
#[derive(Debug, Clone)]
pub struct Backend {
    pub device: Device,
    /// Dtype of the frozen base weights and activations.
    pub dtype: DType,
    /// E.g. "CPU (2 cores)" or "CUDA 0".
    pub name: String,
    /// Why this one was picked.
    pub reason: String,
}

/// Errors choosing a device.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{0} was requested but this build has no {0} support; rebuild with `--features {1}` or choose CPU")]
    NotBuilt(&'static str, &'static str),
    #[error(
        "{name} is not available ({reason}); choose another device in Settings or with --device"
    )]
    Unavailable { name: &'static str, reason: String },
}

fn cpu(reason: String) -> Backend {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    Backend {
        device: Device::Cpu,
        dtype: DType::F32,
        name: format!("CPU ({cores} cores)"),
        reason,
    }
}

#[cfg(feature = "metal")]
fn metal() -> Result<Backend, BackendError> {
    Device::new_metal(0)
        .map(|device| Backend {
            device,
            dtype: DType::BF16,
            name: "Metal (Apple GPU)".into(),
            reason: "Apple GPU found".into(),
        })
        .map_err(|e| BackendError::Unavailable {
            name: "Metal",
            reason: e.to_string(),
        })
}

#[cfg(not(feature = "metal"))]
fn metal() -> Result<Backend, BackendError> {
    Err(BackendError::NotBuilt("Metal", "metal"))
}

#[cfg(feature = "cuda")]
fn cuda() -> Result<Backend, BackendError> {
    Device::new_cuda(0)
        .map(|device| Backend {
            device,
            dtype: DType::BF16,
            name: "CUDA 0".into(),
            reason: "CUDA GPU found".into(),
        })
        .map_err(|e| BackendError::Unavailable {
            name: "CUDA",
            reason: e.to_string(),
        })
}

#[cfg(not(feature = "cuda"))]
fn cuda() -> Result<Backend, BackendError> {
    Err(BackendError::NotBuilt("CUDA", "cuda"))
}

/// Picks the device for `choice`: `Auto` tries Metal, then CUDA, then falls back to CPU.
pub fn pick(choice: DeviceChoice) -> Result<Backend, BackendError> {
    match choice {
        DeviceChoice::Cpu => Ok(cpu("chosen in settings".into())),
        DeviceChoice::Metal => metal(),
        DeviceChoice::Cuda => cuda(),
        DeviceChoice::Auto => {
            let mut why = Vec::new();
            for attempt in [metal as fn() -> Result<Backend, BackendError>, cuda] {
                match attempt() {
                    Ok(b) => return Ok(b),
                    Err(e) => why.push(e.to_string()),
                }
            }
            let reason = if cfg!(any(feature = "metal", feature = "cuda")) {
                format!("no GPU available: {}", why.join("; "))
            } else {
                "this build has no GPU backend".into()
            };
            Ok(cpu(reason))
        }
    }
}
