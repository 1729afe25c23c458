//! FineTune: LoRA fine-tuning of Hugging Face causal language models with Candle, on Metal, CUDA or
//! CPU. The engine (model, data, train) runs headless from the CLI or under the egui app.

pub mod backend;
pub mod bench;
pub mod cli;
pub mod convert;
pub mod data;
pub mod export;
#[doc(hidden)]
pub mod fuzzing;
pub mod generate;
pub mod hub;
pub mod inspect;
pub mod macos;
pub mod memory;
pub mod model;
pub mod session;
pub mod train;
pub mod ui;
