//! The GGUF LoRA export: a PEFT adapter as llama.cpp's `convert_lora_to_gguf.py` writes it, to
//! use with the base model's GGUF (`llama-cli -m base.gguf --lora adapter.gguf`, Ollama's
//! `ADAPTER`, LM Studio). Checked with llama.cpp itself by tools/gguf_lora_check.py.
//!
//! - metadata: `general.architecture` (llama.cpp's name of the base), `general.type = adapter`,
//!   `adapter.type = lora`, `adapter.lora.alpha` (rsLoRA folded in: llama.cpp scales by
//!   alpha / r, so alpha·√r gives alpha / √r);
//! - tensors: `blk.{i}.{attn_q,…,ffn_down}.weight.lora_a` (r, in) and `.lora_b` (out, r) in f32,
//!   under the base GGUF's names; for the llama architecture the rows of q's and k's `lora_b` are
//!   permuted as `convert_hf_to_gguf.py` permutes those weights (each head's rotary halves
//!   interleaved), so the update lands on the rows llama.cpp's weights have.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Tensor;

use crate::model::adapter::read_deltas;

/// What a GGUF LoRA export wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufLora {
    /// The file.
    pub path: PathBuf,
    /// The modules it adapts.
    pub modules: usize,
    /// llama.cpp's architecture name.
    pub architecture: String,
}

/// llama.cpp's architecture name for a transformers `architectures[0]`.
pub fn gguf_architecture(hf: &str) -> Option<&'static str> {
    Some(match hf {
        "LlamaForCausalLM" | "MistralForCausalLM" => "llama",
        "Qwen2ForCausalLM" => "qwen2",
        "Qwen3ForCausalLM" => "qwen3",
        "Gemma2ForCausalLM" => "gemma2",
        "Gemma3ForCausalLM" => "gemma3",
        "Phi3ForCausalLM" => "phi3",
        "SmolLM3ForCausalLM" => "smollm3",
        "GPT2LMHeadModel" => "gpt2",
        _ => return None,
    })
}

/// A transformers module path → llama.cpp's tensor name (without `.weight`), e.g.
/// `model.layers.3.self_attn.q_proj` → `blk.3.attn_q`.
pub fn gguf_module(path: &str) -> Option<String> {
    let parts: Vec<&str> = path.split('.').collect();
    let at = parts
        .iter()
        .position(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))?;
    let key = parts[at + 1..].join(".");
    let name = match key.as_str() {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.qkv_proj" => "attn_qkv",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.gate_up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "attn.c_attn" => "attn_qkv",
        "attn.c_proj" => "attn_output",
        "mlp.c_fc" => "ffn_up",
        "mlp.c_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{}.{name}", parts[at]))
}

/// llama.cpp's `permute(w, n_head)` of `convert_hf_to_gguf.py`: each head's rows `(2, dim/2)`
/// interleaved to `(dim/2, 2)`. The inverse of the converter's `unpermute`.
pub fn permute(t: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
        candle_core::bail!("{rows} rows do not split into {n_head} heads");
    }
    let rest: usize = dims[1..].iter().product();
    t.reshape((n_head, 2, rows / n_head / 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// Writes the adapter in `adapter` (PEFT layout) as a GGUF LoRA file `out`; `base` is the model
/// it was trained on (its architecture and head counts).
pub fn export_gguf_lora(adapter: &Path, base: &Path, out: &Path) -> anyhow::Result<GgufLora> {
    let prepared = crate::model::source::prepare(base)?;
    let cfg = &prepared.config;
    let arch = gguf_architecture(&cfg.architecture).with_context(|| {
        format!(
            "llama.cpp has no architecture for {}: export it merged instead",
            cfg.architecture
        )
    })?;
    let (deltas, _) = read_deltas(adapter)?;
    if deltas.values().any(|d| d.magnitude.is_some()) {
        anyhow::bail!(
            "{} is a DoRA adapter, and llama.cpp's LoRA files have no place for DoRA's magnitude: export it merged (--format gguf) instead, which folds it into the weights",
            adapter.display()
        );
    }
    let mut tensors: BTreeMap<String, QTensor> = BTreeMap::new();
    let (mut ranks, mut scales) = (BTreeSet::new(), Vec::new());
    for (path, d) in &deltas {
        let name = gguf_module(path).with_context(|| {
            format!("{path}: llama.cpp's LoRA names have no place for this module")
        })?;
        let r = d.a.dim(0)?;
        ranks.insert(r);
        scales.push(d.scale * r as f64);
        let mut b = d.b.clone();
        if crate::convert::gguf::permutes_qk(arch) && name.ends_with(".attn_q") {
            b = permute(&b, cfg.num_heads)?;
        } else if crate::convert::gguf::permutes_qk(arch) && name.ends_with(".attn_k") {
            b = permute(&b, cfg.num_kv_heads)?;
        }
        let q = |t: &Tensor| QTensor::quantize(&t.contiguous()?, GgmlDType::F32);
        tensors.insert(format!("{name}.weight.lora_a"), q(&d.a)?);
        tensors.insert(format!("{name}.weight.lora_b"), q(&b)?);
    }
    // llama.cpp scales every module by alpha / (its rank): one alpha must give each module's
    // scale, i.e. scale · r must agree.
    let alpha = scales.first().copied().unwrap_or(0.0);
    if scales
        .iter()
        .any(|a| (a - alpha).abs() > 1e-9 * alpha.abs().max(1.0))
    {
        anyhow::bail!(
            "the adapter's modules need different alphas (ranks {ranks:?}); one GGUF LoRA has one: export it merged instead"
        );
    }
    let metadata = [
        (
            "general.architecture",
            gguf_file::Value::String(arch.into()),
        ),
        ("general.type", gguf_file::Value::String("adapter".into())),
        (
            "general.name",
            gguf_file::Value::String(format!("{} LoRA", prepared.source.name())),
        ),
        ("adapter.type", gguf_file::Value::String("lora".into())),
        ("adapter.lora.alpha", gguf_file::Value::F32(alpha as f32)),
    ];
    let meta: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    if let Some(dir) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = out.with_extension("gguf.partial");
    {
        let file =
            std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        let mut w = std::io::BufWriter::new(file);
        gguf_file::write(&mut w, &meta, &refs)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::io::Write::flush(&mut w)?;
    }
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    Ok(GgufLora {
        path: out.to_path_buf(),
        modules: deltas.len(),
        architecture: arch.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn names_follow_llama_cpp() {
        assert_eq!(
            gguf_module("model.layers.3.self_attn.q_proj").as_deref(),
            Some("blk.3.attn_q")
        );
        assert_eq!(
            gguf_module("model.layers.0.mlp.down_proj").as_deref(),
            Some("blk.0.ffn_down")
        );
        assert_eq!(
            gguf_module("transformer.h.1.attn.c_attn").as_deref(),
            Some("blk.1.attn_qkv")
        );
        assert_eq!(
            gguf_module("transformer.h.1.mlp.c_proj").as_deref(),
            Some("blk.1.ffn_down")
        );
        assert_eq!(gguf_module("lm_head"), None);
    }

    #[test]
    fn permute_interleaves_each_heads_halves() {
        let t = Tensor::from_vec((0..8).map(|r| r as f32).collect(), (8, 1), &Device::Cpu).unwrap();
        let p: Vec<f32> = permute(&t, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(p, [0., 2., 1., 3., 4., 6., 5., 7.]);
    }
}
