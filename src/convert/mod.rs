//! Turning checkpoints FineTune cannot load directly into Hugging Face safetensors folders:
//! PyTorch `pytorch_model.bin` (single or sharded with its index) read without executing pickle
//! code, and llama-family GGUF files (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K
//! quants) dequantized, with llama.cpp's Q/K row permutation undone, config.json rebuilt from the
//! GGUF metadata and tokenizer.json from its vocabulary. Outputs can change dtype and are sharded
//! past a size limit. [`prepare_source`] does this once per input into a cache folder so a
//! `.bin`-only folder or a `.gguf` loads like any model, and says that it did; the way in for a
//! model is [`crate::model::source::ModelSource`].
//!
//! Name maps where layouts differ (documented where applied):
//! - PyTorch: keys are kept as stored, except non-parameter buffers (`*.attn.bias`,
//!   `*.attn.masked_bias`, `*.rotary_emb.inv_freq`) are dropped, old GPT-2 checkpoints without the
//!   `transformer.` prefix get it, and a tied `lm_head.weight` copy is dropped when config.json
//!   ties embeddings (safetensors cannot share storage; the loader reads the embedding).
//! - GGUF → HF: `token_embd` → `model.embed_tokens`, `output_norm` → `model.norm`, `output` →
//!   `lm_head`, `blk.N.attn_{q,k,v,output}` → `model.layers.N.self_attn.{q,k,v,o}_proj`,
//!   `attn_{q,k}_norm` → `self_attn.{q,k}_norm`, `attn_norm` → `input_layernorm`, `ffn_norm` →
//!   `post_attention_layernorm`, `ffn_{gate,up,down}` → `mlp.{gate,up,down}_proj`.

pub(crate) mod gguf;
pub(crate) mod gguf_meta;
mod gguf_tokenizer;
mod prepare;
mod pytorch;
pub(crate) mod write;

use std::path::{Path, PathBuf};

use candle_core::DType;

pub(crate) use gguf_tokenizer::{byte_level_pre, BYTE_LEVEL_PRE_NAMES};
pub use prepare::{cached_conversion, converted_cache_dir, prepare_source, Prepared};
pub(crate) use pytorch::natural_key as pytorch_natural_key;

/// Outputs larger than this are split into `model-0000k-of-0000n.safetensors` shards
/// (transformers' default `max_shard_size`).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// Why a conversion failed. The text says what to do next; the path comes last.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The input is neither a `pytorch_model.bin` (or its index) nor a `.gguf` file, nor a folder
    /// holding one (a folder with several `.gguf` files is ambiguous and lands here too).
    #[error(
        "nothing to convert: expected pytorch_model.bin (or its shard index) or a .gguf file: {0}"
    )]
    UnknownInput(PathBuf),
    /// The input folder already loads as it is (config.json beside safetensors weights).
    #[error("the folder already holds safetensors weights; load it directly: {0}")]
    AlreadySafetensors(PathBuf),
    /// A `.bin` file or its shard index cannot be read (not a torch.save zip, truncated, a shard
    /// the index names is missing, no tensors in the pickle).
    #[error("cannot read the PyTorch checkpoint ({reason}); it may be truncated or not a torch.save zip file (legacy tar/pickle-only .bin files are not read): {path}")]
    Pytorch {
        /// The `.bin` file or index.
        path: PathBuf,
        /// What the reader found wrong.
        reason: String,
    },
    /// The GGUF file cannot be read (bad magic or version, truncated, metadata missing, an
    /// unsupported tensor type).
    #[error("cannot read the GGUF file ({reason}): {path}")]
    Gguf {
        /// The `.gguf` file.
        path: PathBuf,
        /// What the reader found wrong.
        reason: String,
    },
    /// The GGUF file holds an architecture the converter cannot map to Hugging Face names.
    #[error("GGUF architecture {arch:?} is not supported (supported: llama, mistral, qwen2, qwen3); convert the original Hugging Face model instead: {path}")]
    GgufArchitecture {
        /// `general.architecture` from the metadata.
        arch: String,
        /// The `.gguf` file.
        path: PathBuf,
    },
    /// The GGUF vocabulary cannot be turned into a `tokenizer.json` (a tokenizer model it does
    /// not know, missing or inconsistent token lists).
    #[error("the GGUF tokenizer cannot be rebuilt ({reason}); copy tokenizer.json from the original model into the output folder: {path}")]
    Tokenizer {
        /// The `.gguf` file.
        path: PathBuf,
        /// What is missing or not understood.
        reason: String,
    },
    /// `--dtype` names no dtype the converter writes; holds the text given.
    #[error("unknown dtype {0:?}; use f32, f16 or bf16")]
    Dtype(String),
    /// The output folder exists and is not empty.
    #[error("the output folder is not empty; pick a new folder or empty it: {0}")]
    OutputNotEmpty(PathBuf),
    /// One tensor cannot be read, converted or placed (no data, listed in two shards, a dtype
    /// conversion failing).
    #[error("tensor {name}: {reason}: {path}")]
    Tensor {
        /// The tensor's name.
        name: String,
        /// What went wrong.
        reason: String,
        /// The file it was read from, or the output folder.
        path: PathBuf,
    },
    /// Reading the input or writing the output failed.
    #[error("{source}: {path}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ConvertError + '_ {
    move |source| ConvertError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What `convert` reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    /// `pytorch_model.bin` or the shards its index names (paths of the .bin files).
    PytorchBin(Vec<PathBuf>),
    /// One `.gguf` file.
    Gguf(PathBuf),
}

/// Settings of one conversion.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertOptions {
    /// Output dtype (`F32`, `F16`, `BF16`); `None` keeps .bin dtypes, and for GGUF writes F16
    /// (BF16 if the file stores BF16, F32 if it stores only F32).
    pub dtype: Option<DType>,
    /// Shard the output past this many bytes.
    pub max_shard_bytes: u64,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        Self {
            dtype: None,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
        }
    }
}

/// `"f16"` / `"float16"` / `"bf16"` / `"f32"` … → a dtype (for `--dtype`).
pub fn parse_dtype(text: &str) -> Result<DType, ConvertError> {
    match text.to_ascii_lowercase().as_str() {
        "f32" | "float32" | "fp32" => Ok(DType::F32),
        "f16" | "float16" | "fp16" | "half" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(ConvertError::Dtype(other.to_owned())),
    }
}

/// What a conversion wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertReport {
    /// What was converted.
    pub source: SourceKind,
    /// The Hugging Face folder written.
    pub out: PathBuf,
    /// Tensors written.
    pub tensors: usize,
    /// Weight files written (1 = `model.safetensors`).
    pub shards: usize,
    /// Bytes of the weight files written.
    pub weight_bytes: u64,
    /// Things the person should know (dropped buffers, tokenizer guesses, …).
    pub notes: Vec<String>,
}

impl ConvertReport {
    /// One line for the CLI.
    pub fn summary(&self) -> String {
        let what = match &self.source {
            SourceKind::PytorchBin(files) => format!("{} PyTorch .bin file(s)", files.len()),
            SourceKind::Gguf(_) => "GGUF".to_owned(),
        };
        format!(
            "converted {what} → {} tensors in {} safetensors file(s), {}: {}",
            self.tensors,
            self.shards,
            crate::inspect::format_bytes(self.weight_bytes),
            self.out.display()
        )
    }
}

/// What `input` (a folder or a file) holds that [`convert`] can read.
pub fn detect(input: &Path) -> Result<SourceKind, ConvertError> {
    if input.is_file() {
        let name = input
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        if name.ends_with(".gguf") {
            return Ok(SourceKind::Gguf(input.to_path_buf()));
        }
        if name.ends_with(".bin.index.json") {
            return pytorch::shards_of_index(input).map(SourceKind::PytorchBin);
        }
        if name.ends_with(".bin") || name.ends_with(".pt") || name.ends_with(".pth") {
            return Ok(SourceKind::PytorchBin(vec![input.to_path_buf()]));
        }
        return Err(ConvertError::UnknownInput(input.to_path_buf()));
    }
    if !input.is_dir() {
        return Err(ConvertError::UnknownInput(input.to_path_buf()));
    }
    if crate::model::weights::checkpoint_files(input).is_ok() {
        return Err(ConvertError::AlreadySafetensors(input.to_path_buf()));
    }
    let index = input.join("pytorch_model.bin.index.json");
    if index.is_file() {
        return pytorch::shards_of_index(&index).map(SourceKind::PytorchBin);
    }
    let single = input.join("pytorch_model.bin");
    if single.is_file() {
        return Ok(SourceKind::PytorchBin(vec![single]));
    }
    let mut ggufs: Vec<PathBuf> = std::fs::read_dir(input)
        .map_err(io_err(input))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
        })
        .collect();
    ggufs.sort();
    match ggufs.len() {
        1 => Ok(SourceKind::Gguf(ggufs.remove(0))),
        _ => Err(ConvertError::UnknownInput(input.to_path_buf())),
    }
}

/// Converts `input` (a model folder, a `.bin`, a shard index or a `.gguf`) into the HF folder
/// `out` (created; must be empty if it exists).
pub fn convert(
    input: &Path,
    out: &Path,
    options: &ConvertOptions,
) -> Result<ConvertReport, ConvertError> {
    let source = detect(input)?;
    if out.is_dir()
        && std::fs::read_dir(out)
            .map_err(io_err(out))?
            .next()
            .is_some()
    {
        return Err(ConvertError::OutputNotEmpty(out.to_path_buf()));
    }
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    match &source {
        SourceKind::PytorchBin(files) => pytorch::convert(files, out, options, source.clone()),
        SourceKind::Gguf(file) => gguf::convert(file, out, options, source.clone()),
    }
}
