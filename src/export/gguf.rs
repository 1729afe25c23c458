//! The GGUF export: the base model, with the adapter merged in or not, as one GGUF file for
//! llama.cpp, Ollama and LM Studio, in the quantization the person picks ([`GgufQuant`]).
//!
//! - Weights: each adapted weight is `W + s·B·A` in f32 (as in the merged export), then renamed to
//!   llama.cpp's tensor names, q/k rows permuted for the `llama` architecture as
//!   `convert_hf_to_gguf.py` does (each head's rotary halves interleaved), GPT-2's Conv1D weights
//!   transposed to (out, in), and quantized: Q4_K, Q5_K and Q6_K by [`super::kquant`] (ggml's
//!   current reference algorithm, byte for byte what llama.cpp's quantizer writes), every other
//!   type by Candle's quantizer (identical to ggml's for Q8_0, Q4_0, Q5_0, Q5_1).
//! - Types per tensor as llama.cpp's quantizer assigns them ([`tensor_type`], in
//!   `gguf_types.rs`).
//! - Metadata: the architecture's hyper-parameters under llama.cpp's keys (Llama 3.1's RoPE
//!   scaling as the `rope_freqs` tensor), `general.file_type`, and the tokenizer
//!   ([`super::gguf_vocab`]) with the chat template.
//!
//! The file is written under a temporary name beside the destination and renamed when complete.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;
use candle_core::quantized::gguf_file::Value as GValue;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::gguf_lora::{gguf_architecture, gguf_module, permute};
pub use super::gguf_types::{tensor_type, GgufQuant};
use super::gguf_vocab;
use crate::model::adapter::{read_deltas, ModuleDelta};
use crate::model::config::{Family, ModelConfig, RopeScaling};

/// How a checkpoint tensor becomes the GGUF one.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Keep,
    /// llama.cpp's q/k row permutation, with this many heads.
    Permute(usize),
    /// GPT-2's Conv1D (in, out) → (out, in).
    Transpose,
    /// Gemma's norms: llama.cpp stores the `1 + w` they scale by.
    PlusOne,
}

/// One tensor of the file to write.
#[derive(Debug, Clone)]
struct Planned {
    hf: String,
    gguf: String,
    /// Shape in the file (rows, cols), after `op`.
    shape: Vec<usize>,
    op: Op,
    ty: GgmlDType,
}

/// The GGUF name of checkpoint tensor `hf`, with its layer; `None` for tensors llama.cpp does not
/// keep (GPT-2's attention-mask buffers, rotary caches, a tied `lm_head`).
fn gguf_name(hf: &str, cfg: &ModelConfig) -> anyhow::Result<Option<(String, Option<usize>)>> {
    let name = hf
        .strip_prefix("model.")
        .or_else(|| hf.strip_prefix("transformer."))
        .unwrap_or(hf);
    let top = match name {
        "embed_tokens.weight" | "wte.weight" => Some("token_embd.weight"),
        "wpe.weight" => Some("position_embd.weight"),
        "norm.weight" => Some("output_norm.weight"),
        "ln_f.weight" => Some("output_norm.weight"),
        "ln_f.bias" => Some("output_norm.bias"),
        "lm_head.weight" if cfg.tie_word_embeddings => return Ok(None),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Ok(Some((t.to_owned(), None)));
    }
    if name.ends_with(".attn.bias")
        || name.ends_with(".attn.masked_bias")
        || name.ends_with("rotary_emb.inv_freq")
    {
        return Ok(None);
    }
    let unknown = || {
        anyhow::anyhow!(
            "{hf}: llama.cpp's {} models have no tensor for this weight",
            gguf_architecture(&cfg.architecture).unwrap_or("?")
        )
    };
    let (module, kind) = hf.rsplit_once('.').ok_or_else(unknown)?;
    let parts: Vec<&str> = module.split('.').collect();
    let at = parts
        .iter()
        .position(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
        .ok_or_else(unknown)?;
    let layer: usize = parts[at].parse().map_err(|_| unknown())?;
    let gemma = cfg.variant.sandwich_norms;
    let norm = match parts[at + 1..].join(".").as_str() {
        "input_layernorm" | "ln_1" => Some("attn_norm"),
        "post_attention_layernorm" if gemma => Some("post_attention_norm"),
        "pre_feedforward_layernorm" if gemma => Some("ffn_norm"),
        "post_feedforward_layernorm" if gemma => Some("post_ffw_norm"),
        "post_attention_layernorm" | "ln_2" => Some("ffn_norm"),
        "self_attn.q_norm" => Some("attn_q_norm"),
        "self_attn.k_norm" => Some("attn_k_norm"),
        _ => None,
    };
    let base = match norm {
        Some(n) => format!("blk.{layer}.{n}"),
        None => gguf_module(module).ok_or_else(unknown)?,
    };
    Ok(Some((format!("{base}.{kind}"), Some(layer))))
}

/// The file's tensors, in llama.cpp's names and types, from the checkpoint's names and shapes.
fn plan(
    shapes: &[(String, Vec<usize>)],
    cfg: &ModelConfig,
    arch: &str,
    q: GgufQuant,
) -> anyhow::Result<Vec<Planned>> {
    let has_output = shapes
        .iter()
        .any(|(n, _)| n == "lm_head.weight" && !cfg.tie_word_embeddings);
    let mut out = Vec::new();
    for (hf, shape) in shapes {
        let Some((gguf, layer)) = gguf_name(hf, cfg)? else {
            continue;
        };
        let mut shape = shape.clone();
        let op = if cfg.family == Family::Gpt2
            && hf.ends_with(".weight")
            && shape.len() == 2
            && (gguf.contains("attn_qkv") || gguf.contains("attn_output") || gguf.contains("ffn_"))
        {
            shape.reverse();
            Op::Transpose
        } else if crate::convert::gguf::permutes_qk(arch) && gguf.contains(".attn_q.") {
            Op::Permute(cfg.num_heads)
        } else if crate::convert::gguf::permutes_qk(arch) && gguf.contains(".attn_k.") {
            Op::Permute(cfg.num_kv_heads)
        } else if cfg.variant.norm_plus_one && gguf.ends_with("norm.weight") {
            Op::PlusOne
        } else {
            Op::Keep
        };
        let output = gguf == "output.weight" || (!has_output && gguf == "token_embd.weight");
        let ty = tensor_type(q, &gguf, &shape, layer, cfg.num_layers, output);
        out.push(Planned {
            hf: hf.clone(),
            gguf,
            shape,
            op,
            ty,
        });
    }
    out.sort_by_key(|p| crate::convert::pytorch_natural_key(&p.gguf));
    Ok(out)
}

/// Bytes `p` takes in the file.
fn planned_bytes(p: &Planned) -> u64 {
    let n: usize = p.shape.iter().product();
    (n / p.ty.block_size() * p.ty.type_size()) as u64
}

/// Llama 3.1's RoPE frequency factors (`head_dim / 2` of them), as `convert_hf_to_gguf.py` bakes
/// them into `rope_freqs`: 1 for short wavelengths, `factor` for long ones, interpolated between.
pub(crate) fn llama3_factors(
    theta: f64,
    head_dim: usize,
    factor: f64,
    low: f64,
    high: f64,
    original: f64,
) -> Vec<f64> {
    let (low_wavelen, high_wavelen) = (original / low, original / high);
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

/// The `rope_freqs` tensor of a model with Llama 3.1 scaling.
fn llama3_rope_factors(cfg: &ModelConfig) -> Option<Vec<f32>> {
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings,
    } = cfg.rope_scaling
    else {
        return None;
    };
    let f = llama3_factors(
        cfg.rope_theta,
        cfg.head_dim,
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings,
    );
    Some(f.into_iter().map(|v| v as f32).collect())
}

/// The architecture's hyper-parameters under llama.cpp's keys.
fn hparams(cfg: &ModelConfig, arch: &str, vocab_rows: usize) -> Vec<(String, GValue)> {
    let u = |v: usize| GValue::U32(v as u32);
    let key = |k: &str| format!("{arch}.{k}");
    let mut md = vec![
        (key("vocab_size"), u(vocab_rows)),
        (key("context_length"), u(cfg.max_position_embeddings)),
        (key("embedding_length"), u(cfg.hidden_size)),
        (key("block_count"), u(cfg.num_layers)),
        (key("feed_forward_length"), u(cfg.intermediate_size)),
        (key("attention.head_count"), u(cfg.num_heads)),
    ];
    if cfg.family == Family::Gpt2 {
        md.push((
            key("attention.layer_norm_epsilon"),
            GValue::F32(cfg.norm_eps as f32),
        ));
        return md;
    }
    md.extend([
        (key("attention.head_count_kv"), u(cfg.num_kv_heads)),
        (
            key("attention.layer_norm_rms_epsilon"),
            GValue::F32(cfg.norm_eps as f32),
        ),
        (key("rope.freq_base"), GValue::F32(cfg.rope_theta as f32)),
        // Phi-3's partial rotary turns fewer dims than a head has.
        (
            key("rope.dimension_count"),
            u(cfg.variant.rotary_dim.unwrap_or(cfg.head_dim)),
        ),
    ]);
    // Written always (convert_hf_to_gguf.py writes them whenever config.json names head_dim);
    // llama.cpp needs them when heads are not hidden / head_count wide (Qwen3).
    md.push((key("attention.key_length"), u(cfg.head_dim)));
    md.push((key("attention.value_length"), u(cfg.head_dim)));
    if let RopeScaling::Linear { factor } = cfg.rope_scaling {
        md.push((key("rope.scaling.type"), GValue::String("linear".into())));
        md.push((key("rope.scaling.factor"), GValue::F32(factor as f32)));
    }
    md.extend(super::gguf_arch::hparams(cfg, arch));
    md
}

/// What a GGUF export wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufExport {
    /// The file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// Tensors written.
    pub tensors: usize,
    /// Weights that took the adapter's update.
    pub merged: usize,
    /// llama.cpp's architecture name.
    pub architecture: String,
}

/// The base model's weights, mapped.
struct Base {
    prepared: crate::model::source::PreparedModel,
    st: MmapedSafetensors,
    shapes: Vec<(String, Vec<usize>)>,
    arch: &'static str,
}

fn open_base(base: &Path) -> anyhow::Result<Base> {
    let prepared = crate::model::source::prepare(base)?;
    let arch = gguf_architecture(&prepared.config.architecture).with_context(|| {
        format!(
            "llama.cpp has no architecture for {}: export it merged instead",
            prepared.config.architecture
        )
    })?;
    let files = crate::model::weights::checkpoint_files(&prepared.dir)?;
    // SAFETY: the files are mapped read-only and not modified while mapped (the app never writes
    // into a model folder it reads).
    let st = unsafe { MmapedSafetensors::multi(&files) }
        .with_context(|| format!("reading the weights of {}", prepared.dir.display()))?;
    let shapes = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec()))
        .collect();
    Ok(Base {
        prepared,
        st,
        shapes,
        arch,
    })
}

/// The size of the GGUF file each type would give for `base` (tensor data; the metadata adds a
/// few MB), without writing anything.
pub fn estimate_sizes(base: &Path) -> anyhow::Result<Vec<(GgufQuant, u64)>> {
    let b = open_base(base)?;
    GgufQuant::ALL
        .iter()
        .map(|&q| {
            let p = plan(&b.shapes, &b.prepared.config, b.arch, q)?;
            Ok((q, p.iter().map(planned_bytes).sum()))
        })
        .collect()
}

/// The checkpoint tensor `p`, with the adapter's update folded in, transformed for the file.
fn load_tensor(
    b: &Base,
    p: &Planned,
    deltas: &HashMap<String, ModuleDelta>,
    fan_in_fan_out: bool,
) -> anyhow::Result<QTensor> {
    let mut t = b.st.load(&p.hf, &Device::Cpu)?.to_dtype(DType::F32)?;
    if let Some(d) = p.hf.strip_suffix(".weight").and_then(|m| deltas.get(m)) {
        t = super::merged::fold(&t, d, fan_in_fan_out, &p.hf)?;
    }
    t = match p.op {
        Op::Keep => t,
        Op::Permute(heads) => permute(&t, heads)?,
        Op::Transpose => t.t()?.contiguous()?,
        Op::PlusOne => t.affine(1.0, 1.0)?,
    };
    Ok(super::kquant::quantize(&t, p.ty)?)
}

/// Writes `base` (anything `train` takes) as a GGUF file `out` of type `q`, with the adapter in
/// `adapter` merged in when given. `progress(done, total)` is called as tensors are quantized,
/// from worker threads.
pub fn export_gguf(
    adapter: Option<&Path>,
    base: &Path,
    out: &Path,
    q: GgufQuant,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> anyhow::Result<GgufExport> {
    let b = open_base(base)?;
    let cfg = &b.prepared.config;
    super::gguf_arch::check_llama_cpp_rules(cfg, b.arch)?;
    let (deltas, fan_in_fan_out) = match adapter {
        Some(a) => read_deltas(a)?,
        None => (HashMap::new(), false),
    };
    let planned = plan(&b.shapes, cfg, b.arch, q)?;
    if let Some(missing) = deltas
        .keys()
        .find(|m| !planned.iter().any(|p| p.hf == format!("{m}.weight")))
    {
        anyhow::bail!(
            "the adapter changes {missing}, which {} does not have: it was trained on another model; pass the base it was trained on with --model",
            b.prepared.source.name()
        );
    }
    let vocab_rows = planned
        .iter()
        .find(|p| p.gguf == "token_embd.weight")
        .map_or(cfg.vocab_size, |p| p.shape[0]);
    let vocab = gguf_vocab::read(&b.prepared.dir, vocab_rows)?;

    let mut md: Vec<(String, GValue)> = vec![
        ("general.architecture".into(), GValue::String(b.arch.into())),
        ("general.type".into(), GValue::String("model".into())),
        (
            "general.name".into(),
            GValue::String(b.prepared.source.name()),
        ),
        ("general.file_type".into(), GValue::U32(q.file_type())),
        ("general.quantization_version".into(), GValue::U32(2)),
    ];
    md.extend(hparams(cfg, b.arch, vocab_rows));
    md.extend(vocab.metadata);

    let total = planned.len();
    let done = AtomicUsize::new(0);
    let mut tensors: Vec<(String, QTensor)> = planned
        .par_iter()
        .map(|p| {
            let t = load_tensor(&b, p, &deltas, fan_in_fan_out)
                .with_context(|| format!("{} → {} ({:?})", p.hf, p.gguf, p.ty))?;
            progress(done.fetch_add(1, Ordering::Relaxed) + 1, total);
            Ok((p.gguf.clone(), t))
        })
        .collect::<anyhow::Result<_>>()?;
    if let Some(factors) = llama3_rope_factors(cfg) {
        let n = factors.len();
        let t = Tensor::from_vec(factors, n, &Device::Cpu)?;
        tensors.push((
            "rope_freqs.weight".into(),
            QTensor::quantize(&t, GgmlDType::F32)?,
        ));
    }
    tensors.extend(super::gguf_arch::rope_factor_tensors(cfg)?);

    let meta: Vec<(&str, &GValue)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    write_gguf(out, &meta, &refs)?;
    let bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    Ok(GgufExport {
        path: out.to_path_buf(),
        bytes,
        tensors: tensors.len(),
        merged: deltas.len(),
        architecture: b.arch.into(),
    })
}

/// Candle's GGUF writer into `out.partial`, renamed to `out` when complete.
pub(crate) fn write_gguf(
    out: &Path,
    meta: &[(&str, &GValue)],
    tensors: &[(&str, &QTensor)],
) -> anyhow::Result<()> {
    if let Some(dir) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut tmp_name = out.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".partial");
    let tmp = out.with_file_name(tmp_name);
    let written = (|| -> anyhow::Result<()> {
        let file = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::new(file);
        gguf_file::write(&mut w, meta, tensors)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!(
            "writing {} (check the disk has space)",
            tmp.display()
        )));
    }
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}
