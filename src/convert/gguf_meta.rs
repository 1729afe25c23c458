//! Reading GGUF metadata (llama.cpp's key names, `gguf-py/gguf/constants.py`) and rebuilding a
//! Hugging Face `config.json` from it for the llama family (llama, mistral, qwen2, qwen3).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use serde_json::json;

use super::ConvertError;

/// Typed access to one GGUF file's metadata.
pub(crate) struct Meta<'a> {
    md: &'a HashMap<String, Value>,
    /// `general.architecture`, e.g. `llama`.
    pub arch: String,
    pub path: PathBuf,
}

fn num(v: &Value) -> Option<f64> {
    Some(match v {
        Value::U8(x) => f64::from(*x),
        Value::I8(x) => f64::from(*x),
        Value::U16(x) => f64::from(*x),
        Value::I16(x) => f64::from(*x),
        Value::U32(x) => f64::from(*x),
        Value::I32(x) => f64::from(*x),
        Value::U64(x) => *x as f64,
        Value::I64(x) => *x as f64,
        // Through the shortest decimal text, so 1e-5 stored as f32 reads back as 1e-5.
        Value::F32(x) => x.to_string().parse().unwrap_or(f64::from(*x)),
        Value::F64(x) => *x,
        Value::Bool(b) => f64::from(u8::from(*b)),
        _ => return None,
    })
}

impl<'a> Meta<'a> {
    pub fn new(md: &'a HashMap<String, Value>, path: &Path) -> Self {
        let arch = match md.get("general.architecture") {
            Some(Value::String(s)) => s.clone(),
            _ => String::new(),
        };
        Self {
            md,
            arch,
            path: path.to_path_buf(),
        }
    }

    pub fn f64(&self, key: &str) -> Option<f64> {
        num(self.md.get(key)?)
    }

    pub fn u64(&self, key: &str) -> Option<u64> {
        self.f64(key).filter(|v| *v >= 0.0).map(|v| v as u64)
    }

    pub fn bool(&self, key: &str) -> Option<bool> {
        match self.md.get(key)? {
            Value::Bool(b) => Some(*b),
            v => num(v).map(|x| x != 0.0),
        }
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        match self.md.get(key)? {
            Value::String(s) => Some(s.as_str()),
            _ => None,
        }
    }

    /// `{arch}.{suffix}` as a number.
    pub fn arch_u64(&self, suffix: &str) -> Option<u64> {
        self.u64(&format!("{}.{suffix}", self.arch))
    }

    pub fn arch_f64(&self, suffix: &str) -> Option<f64> {
        self.f64(&format!("{}.{suffix}", self.arch))
    }

    pub fn strings(&self, key: &str) -> Option<Vec<String>> {
        match self.md.get(key)? {
            Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Some(s.clone()),
                    _ => None,
                })
                .collect(),
            _ => None,
        }
    }

    pub fn numbers(&self, key: &str) -> Option<Vec<f64>> {
        match self.md.get(key)? {
            Value::Array(items) => items.iter().map(num).collect(),
            _ => None,
        }
    }

    fn missing(&self, key: &str) -> ConvertError {
        ConvertError::Gguf {
            path: self.path.clone(),
            reason: format!("metadata {}.{key} is missing", self.arch),
        }
    }
}

/// The HF architecture and model_type for a GGUF architecture, if FineTune trains it.
pub(crate) fn hf_architecture(arch: &str) -> Option<(&'static str, &'static str)> {
    Some(match arch {
        "llama" => ("LlamaForCausalLM", "llama"),
        "mistral" => ("MistralForCausalLM", "mistral"),
        "qwen2" => ("Qwen2ForCausalLM", "qwen2"),
        "qwen3" => ("Qwen3ForCausalLM", "qwen3"),
        "gemma2" => ("Gemma2ForCausalLM", "gemma2"),
        "gemma3" => ("Gemma3ForCausalLM", "gemma3_text"),
        "phi3" => ("Phi3ForCausalLM", "phi3"),
        "smollm3" => ("SmolLM3ForCausalLM", "smollm3"),
        _ => return None,
    })
}

/// What the tensors say that the metadata may not.
pub(crate) struct TensorFacts {
    pub has_output: bool,
    pub has_q_bias: bool,
    /// `token_embd.weight` rows.
    pub embed_rows: Option<usize>,
    /// `rope_freqs.weight` (Llama 3.1+ frequency factors), dequantized.
    pub rope_freqs: Option<Vec<f32>>,
    /// Phi-3's LongRoPE factors (`rope_factors_long.weight`, `rope_factors_short.weight`).
    pub rope_long: Option<Vec<f32>>,
    /// See `rope_long`.
    pub rope_short: Option<Vec<f32>>,
}

/// Llama 3.1's frequency-dependent RoPE scaling, recovered from the `rope_freqs` factors that
/// llama.cpp bakes into the file: the factor is their maximum; the other three settings are the
/// ones every Llama 3.x release uses, checked against the factors rather than assumed.
fn llama3_scaling(freqs: &[f32], theta: f64, head_dim: usize) -> Option<serde_json::Value> {
    // One factor per rotated pair; a header's head size is checked before anything is sized by it.
    if head_dim / 2 != freqs.len() {
        return None;
    }
    let factor = freqs.iter().copied().fold(1.0f32, f32::max) as f64;
    let (low, high, original) = (1.0, 4.0, 8192.0);
    let expected =
        crate::export::gguf::llama3_factors(theta, head_dim, factor, low, high, original);
    if expected.len() != freqs.len()
        || expected
            .iter()
            .zip(freqs)
            .any(|(e, f)| (e - f64::from(*f)).abs() > 1e-3 * e.abs().max(1.0))
    {
        return None;
    }
    Some(json!({
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original as u64,
    }))
}

/// config.json for the model in this GGUF. `dtype` is the output dtype's name (`float16`…).
pub(crate) fn hf_config(
    meta: &Meta<'_>,
    facts: &TensorFacts,
    special: &SpecialIds,
    dtype: &str,
    notes: &mut Vec<String>,
) -> Result<serde_json::Value, ConvertError> {
    let (architecture, model_type) =
        hf_architecture(&meta.arch).ok_or_else(|| ConvertError::GgufArchitecture {
            arch: meta.arch.clone(),
            path: meta.path.clone(),
        })?;
    let need = |k: &str| meta.arch_u64(k).ok_or_else(|| meta.missing(k));
    let hidden = need("embedding_length")?;
    let heads = need("attention.head_count")?;
    let kv_heads = meta.arch_u64("attention.head_count_kv").unwrap_or(heads);
    let head_dim = meta
        .arch_u64("attention.key_length")
        .unwrap_or(hidden / heads.max(1));
    let vocab = meta
        .arch_u64("vocab_size")
        .or_else(|| {
            meta.strings("tokenizer.ggml.tokens")
                .map(|t| t.len() as u64)
        })
        .or(facts.embed_rows.map(|r| r as u64))
        .ok_or_else(|| meta.missing("vocab_size"))?;
    let theta = meta.arch_f64("rope.freq_base").unwrap_or(10_000.0);
    let mut cfg = json!({
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length")?,
        "num_hidden_layers": need("block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": meta.arch_u64("context_length").unwrap_or(4096),
        "rms_norm_eps": meta.arch_f64("attention.layer_norm_rms_epsilon").unwrap_or(1e-6),
        "rope_theta": theta,
        "vocab_size": vocab,
        "hidden_act": "silu",
        "tie_word_embeddings": !facts.has_output,
        "torch_dtype": dtype,
    });
    let obj = cfg.as_object_mut();
    if let Some(obj) = obj {
        if architecture == "LlamaForCausalLM" || architecture == "MistralForCausalLM" {
            obj.insert("attention_bias".into(), json!(facts.has_q_bias));
            obj.insert("mlp_bias".into(), json!(false));
        }
        for (key, id) in [
            ("bos_token_id", special.bos),
            ("eos_token_id", special.eos),
            ("pad_token_id", special.pad),
        ] {
            if let Some(id) = id {
                obj.insert(key.into(), json!(id));
            }
        }
        if let Some(scaling) = rope_scaling(meta, facts, theta, head_dim as usize, notes) {
            obj.insert("rope_scaling".into(), scaling);
        }
        let layers = need("block_count")?;
        arch_config(meta, facts, obj, (hidden, heads, head_dim, layers), notes);
    }
    Ok(cfg)
}

/// What Gemma 2/3, Phi-3 and SmolLM3 need beyond the llama keys, as llama.cpp reads the file:
/// where the metadata is silent (the sliding-window pattern, Gemma's attention scale, SmolLM3's
/// no-RoPE layers) llama.cpp's own rule for the architecture is written out.
fn arch_config(
    meta: &Meta<'_>,
    facts: &TensorFacts,
    obj: &mut serde_json::Map<String, serde_json::Value>,
    (hidden, heads, head_dim, layers): (u64, u64, u64, u64),
    notes: &mut Vec<String>,
) {
    let window = meta.arch_u64("attention.sliding_window").filter(|&w| w > 0);
    let pattern = |default: u64| swa_layer_types(meta, layers, default);
    // llama.cpp: the 27B Gemmas scale attention by (hidden / heads)^-½, the others by head_dim^-½.
    let gemma_scalar = |big_layers: u64| {
        if layers == big_layers {
            hidden / heads.max(1)
        } else {
            head_dim
        }
    };
    match meta.arch.as_str() {
        "gemma2" => {
            obj.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
            obj.insert("query_pre_attn_scalar".into(), json!(gemma_scalar(46)));
            obj.insert("sliding_window".into(), json!(window.unwrap_or(4096)));
            obj.insert("layer_types".into(), pattern(2));
            for key in ["attn_logit_softcapping", "final_logit_softcapping"] {
                if let Some(cap) = meta.arch_f64(key) {
                    obj.insert(key.into(), json!(cap));
                }
            }
        }
        "gemma3" => {
            obj.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
            obj.insert("query_pre_attn_scalar".into(), json!(gemma_scalar(62)));
            obj.insert(
                "rope_local_base_freq".into(),
                json!(meta.arch_f64("rope.freq_base_swa").unwrap_or(10_000.0)),
            );
            if let Some(cap) = meta.arch_f64("final_logit_softcapping") {
                obj.insert("final_logit_softcapping".into(), json!(cap));
            }
            match window {
                Some(w) => {
                    obj.insert("sliding_window".into(), json!(w));
                    obj.insert("layer_types".into(), pattern(6));
                }
                None => {
                    obj.insert(
                        "layer_types".into(),
                        json!(vec!["full_attention"; layers as usize]),
                    );
                }
            }
        }
        "phi3" => phi3_config(meta, facts, obj, head_dim, window, notes),
        "smollm3" => {
            // llama.cpp leaves RoPE out of every fourth layer (n_no_rope_layer_step = 4).
            obj.insert("no_rope_layer_interval".into(), json!(4));
        }
        _ => {}
    }
}

/// config.json's `rope_scaling`: linear as the metadata says, or Llama 3's when the file's
/// `rope_freqs` match it; a scaling that cannot be carried over is said in `notes`.
fn rope_scaling(
    meta: &Meta<'_>,
    facts: &TensorFacts,
    theta: f64,
    head_dim: usize,
    notes: &mut Vec<String>,
) -> Option<serde_json::Value> {
    let mut scaling = None;
    match meta.str(&format!("{}.rope.scaling.type", meta.arch)) {
        None | Some("none") => {}
        Some("linear") => {
            let factor = meta.arch_f64("rope.scaling.factor").unwrap_or(1.0);
            scaling = Some(json!({"rope_type": "linear", "type": "linear", "factor": factor}));
        }
        Some(other) => {
            notes.push(format!("RoPE scaling {other:?} is not carried over; long contexts will differ from the original"));
        }
    }
    if let Some(freqs) = &facts.rope_freqs {
        match llama3_scaling(freqs, theta, head_dim) {
            Some(s) => scaling = Some(s),
            None => notes.push(
                "rope_freqs does not match Llama 3 scaling; it was ignored, so contexts past 8k will differ".into(),
            ),
        }
    }
    scaling
}

/// `layer_types` for llama.cpp's sliding-window pattern: an explicit per-layer list wins, else
/// every n-th layer is global (its `set_swa_pattern`, n = the key or `default`).
fn swa_layer_types(meta: &Meta<'_>, layers: u64, default: u64) -> serde_json::Value {
    let key = format!("{}.attention.sliding_window_pattern", meta.arch);
    let flags: Vec<bool> = match meta.numbers(&key) {
        Some(v) if v.len() == layers as usize => v.iter().map(|&x| x != 0.0).collect(),
        _ => {
            let n = meta
                .arch_u64("attention.sliding_window_pattern")
                .unwrap_or(default);
            (0..layers)
                .map(|i| n == 0 || (i + 1) % n.max(1) != 0)
                .collect()
        }
    };
    let name = |s: bool| {
        if s {
            "sliding_attention"
        } else {
            "full_attention"
        }
    };
    json!(flags.iter().map(|&s| name(s)).collect::<Vec<_>>())
}

/// Phi-3's partial rotary, window and LongRoPE (its factors are tensors of the file).
fn phi3_config(
    meta: &Meta<'_>,
    facts: &TensorFacts,
    obj: &mut serde_json::Map<String, serde_json::Value>,
    head_dim: u64,
    window: Option<u64>,
    notes: &mut Vec<String>,
) {
    let rotary = meta.arch_u64("rope.dimension_count").unwrap_or(head_dim);
    obj.insert(
        "partial_rotary_factor".into(),
        json!(rotary as f64 / head_dim as f64),
    );
    obj.insert("sliding_window".into(), json!(window));
    let original = meta.arch_u64("rope.scaling.original_context_length");
    if let Some(o) = original {
        obj.insert("original_max_position_embeddings".into(), json!(o));
    }
    match (&facts.rope_long, &facts.rope_short, original) {
        (Some(long), Some(short), Some(o)) => {
            let mut scaling = json!({
                "rope_type": "longrope", "type": "longrope",
                "long_factor": long, "short_factor": short,
                "original_max_position_embeddings": o,
            });
            if let (Some(f), Some(s)) =
                (meta.arch_f64("rope.scaling.attn_factor"), scaling.as_object_mut())
            {
                s.insert("attention_factor".into(), json!(f));
            }
            obj.insert("rope_scaling".into(), scaling);
        }
        (None, None, _) => {}
        _ => notes.push(
            "the LongRoPE factors or the original context length are missing; contexts past the original one will differ".into(),
        ),
    }
}

/// Special token ids as the HF files should name them.
#[derive(Debug, Clone, Default)]
pub(crate) struct SpecialIds {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
    pub unk: Option<u32>,
    /// Extra ids that end a turn (generation_config's `eos_token_id` list).
    pub stop: Vec<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_factors_round_trip() {
        // Llama 3.1 8B: theta 500000, head_dim 128, factor 8.
        let (theta, dim, factor) = (500_000.0f64, 128usize, 8.0f64);
        let freqs: Vec<f32> = (0..dim / 2)
            .map(|i| {
                let freq = 1.0 / theta.powf((2 * i) as f64 / dim as f64);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                let f = if wavelen < 2048.0 {
                    1.0
                } else if wavelen > 8192.0 {
                    factor
                } else {
                    let smooth = (8192.0 / wavelen - 1.0) / 3.0;
                    1.0 / ((1.0 - smooth) / factor + smooth)
                };
                f as f32
            })
            .collect();
        let s = llama3_scaling(&freqs, theta, dim).unwrap();
        assert_eq!(s["factor"], 8.0);
        assert!(llama3_scaling(&[1.0, 3.0, 2.0], theta, 6).is_none());
    }
}
