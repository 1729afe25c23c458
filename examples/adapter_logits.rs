//! Writes the logits of a model folder with a PEFT adapter applied (and without it) for fixed
//! token ids, for `tools/peft_check.py` to compare with transformers + PEFT loading the same
//! folders. Usage: `cargo run --example adapter_logits -- MODEL_DIR ADAPTER_DIR OUT.safetensors`.
//! MODEL_DIR may be a GGUF file: then its linear weights stay as the file quantizes them (QLoRA).

use std::path::PathBuf;
use std::process::ExitCode;

use candle_core::{DType, Device, Tensor};
use finetune::model::{adapter, Model, ModelInput};

/// Token ids every check uses (below every fixture's vocabulary size).
const IDS: [u32; 12] = [1, 15, 27, 3, 99, 42, 7, 64, 120, 5, 88, 31];

fn run(model_dir: PathBuf, adapter_dir: PathBuf, out: PathBuf) -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let ids = Tensor::new(&IDS, &dev)?.unsqueeze(0)?;
    let input = ModelInput::causal(ids.clone());
    // A GGUF file: its converted folder, with the file's own quantized linear weights (QLoRA).
    let gguf = model_dir
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    let mut model = if gguf {
        let prepared = finetune::model::source::prepare(&model_dir)?;
        let quant = finetune::model::qload::LinearQuant::Gguf(model_dir.clone());
        Model::load_with(&prepared.dir, DType::F32, &dev, &quant)?
    } else {
        Model::load(&model_dir, DType::F32, &dev)?
    };
    let base = model.logits(&input)?;
    adapter::load(&adapter_dir, &mut model)?;
    let tuned = model.logits(&input)?;
    let tensors = [
        ("input_ids".to_owned(), ids.to_dtype(DType::I64)?),
        ("base".to_owned(), base),
        ("tuned".to_owned(), tuned),
    ];
    candle_core::safetensors::save(&tensors.into_iter().collect(), out)?;
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [model, adapter, out] = args.as_slice() else {
        eprintln!("usage: adapter_logits MODEL_DIR ADAPTER_DIR OUT.safetensors");
        return ExitCode::from(2);
    };
    match run(model.clone(), adapter.clone(), out.clone()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
