//! What the GGUF export writes for Gemma 2/3, Phi-3 and SmolLM3 beyond the llama keys, the inverse
//! of the import (`convert::gguf_meta::arch_config`): the metadata llama.cpp's `gemma2`,
//! `gemma3`, `phi3` and `smollm3` read, Phi-3's LongRoPE factors as tensors, and a check that the
//! model follows the rules llama.cpp applies where the file has no key (the sliding-window
//! pattern, Gemma's attention scale, SmolLM3's no-RoPE layers), so an export that llama.cpp would
//! run differently is refused rather than written.

use candle_core::quantized::gguf_file::Value as GValue;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::model::config::{ModelConfig, RopeScaling};

/// The architecture's own keys.
pub(super) fn hparams(cfg: &ModelConfig, arch: &str) -> Vec<(String, GValue)> {
    let key = |k: &str| format!("{arch}.{k}");
    let v = &cfg.variant;
    let mut md = Vec::new();
    let f32v = |x: f64| GValue::F32(x as f32);
    match arch {
        "gemma2" | "gemma3" => {
            if let Some(w) = v.sliding_window {
                md.push((key("attention.sliding_window"), GValue::U32(w as u32)));
            }
            if let Some(cap) = v.attn_softcap {
                md.push((key("attn_logit_softcapping"), f32v(cap)));
            }
            if let Some(cap) = v.final_softcap {
                md.push((key("final_logit_softcapping"), f32v(cap)));
            }
            if let Some((theta, _)) = &v.local_rope {
                md.push((key("rope.freq_base_swa"), f32v(*theta)));
            }
        }
        "phi3" => {
            md.push((
                key("attention.sliding_window"),
                GValue::U32(v.sliding_window.unwrap_or(0) as u32),
            ));
            if let RopeScaling::LongRope {
                original_max_position_embeddings,
                attention_factor,
                ..
            } = &cfg.rope_scaling
            {
                md.push((
                    key("rope.scaling.original_context_length"),
                    GValue::U32(*original_max_position_embeddings as u32),
                ));
                md.push((key("rope.scaling.attn_factor"), f32v(*attention_factor)));
            }
        }
        _ => {}
    }
    md
}

/// Phi-3's `rope_factors_long` and `rope_factors_short` (f32), as convert_hf_to_gguf.py writes them.
pub(super) fn rope_factor_tensors(cfg: &ModelConfig) -> anyhow::Result<Vec<(String, QTensor)>> {
    let RopeScaling::LongRope {
        short_factor,
        long_factor,
        ..
    } = &cfg.rope_scaling
    else {
        return Ok(Vec::new());
    };
    let tensor = |f: &[f64]| -> anyhow::Result<QTensor> {
        let v: Vec<f32> = f.iter().map(|&x| x as f32).collect();
        let n = v.len();
        Ok(QTensor::quantize(
            &Tensor::from_vec(v, n, &Device::Cpu)?,
            GgmlDType::F32,
        )?)
    };
    Ok(vec![
        ("rope_factors_long.weight".into(), tensor(long_factor)?),
        ("rope_factors_short.weight".into(), tensor(short_factor)?),
    ])
}

/// An error when llama.cpp would run `cfg` differently from transformers: it derives these from
/// the layer count instead of reading them (llama.cpp's `gemma2.cpp`, `gemma3.cpp`, `smollm3.cpp`).
pub(super) fn check_llama_cpp_rules(cfg: &ModelConfig, arch: &str) -> anyhow::Result<()> {
    let v = &cfg.variant;
    let n = cfg.num_layers;
    let refuse = |what: String| {
        anyhow::bail!(
            "llama.cpp would run this {arch} model differently ({what}); export it merged (safetensors) instead"
        )
    };
    let pattern = |every: usize| -> Vec<bool> { (0..n).map(|i| (i + 1) % every != 0).collect() };
    let gemma_scalar = |big: usize| {
        if n == big {
            (cfg.hidden_size / cfg.num_heads) as f64
        } else {
            cfg.head_dim as f64
        }
    };
    match arch {
        "gemma2" | "gemma3" => {
            let (every, big) = if arch == "gemma2" { (2, 46) } else { (6, 62) };
            if v.sliding_window.is_some() && v.sliding_layers != pattern(every) {
                return refuse(format!(
                    "its sliding-window layers are not every layer but each {every}th"
                ));
            }
            let scalar = v.query_pre_attn_scalar.unwrap_or(cfg.head_dim as f64);
            if scalar != gemma_scalar(big) {
                return refuse(format!(
                    "query_pre_attn_scalar {scalar}, where llama.cpp assumes {}",
                    gemma_scalar(big)
                ));
            }
            if matches!(&v.local_rope, Some((_, s)) if *s != RopeScaling::Default) {
                return refuse("its sliding-window layers scale RoPE".into());
            }
        }
        "smollm3" => {
            let rope: Vec<bool> = if v.rope_layers.is_empty() {
                vec![true; n]
            } else {
                v.rope_layers.clone()
            };
            if rope != pattern(4) {
                return refuse("its no-RoPE layers are not every fourth layer".into());
            }
            if v.sliding_window.is_some() {
                return refuse("it uses a sliding window".into());
            }
        }
        _ => {}
    }
    Ok(())
}
