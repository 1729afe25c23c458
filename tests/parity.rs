//! Parity with the reference stack. The fixtures were made by transformers 5.24 + PEFT 0.21.2
//! (float32, CPU; see tests/fixtures/README.md): base and LoRA logits, the masked loss, and the
//! gradient of that loss w.r.t. every LoRA tensor. Set `FINETUNE_FIXTURES=dir1:dir2` to check other
//! folders in the same format: `cargo test --release --test parity`.
// Tests panic on purpose: unwrap/expect are how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use finetune::model::{adapter, ModelInput};

include!("common/parity_checks.rs");
