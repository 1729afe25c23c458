//! The Gemma 2/3, Phi-3 and SmolLM3 features of a llama-family config.json ([`Variant`]), read
//! as transformers' `configuration_gemma2.py`, `configuration_gemma3.py`, `configuration_phi3.py`
//! and `configuration_smollm3.py` fill them in (their defaults included).

use super::{rope, RawConfig, RopeScaling};

/// The llama-family features of Gemma 2/3, Phi-3 and SmolLM3; the default is plain Llama.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Variant {
    /// Gemma: RMSNorm scales by `1 + w` (weights stored around 0).
    pub norm_plus_one: bool,
    /// Gemma 2/3: RMSNorm on the attention and MLP outputs too (`post_attention_layernorm`,
    /// `post_feedforward_layernorm`); the MLP's input norm is `pre_feedforward_layernorm`.
    pub sandwich_norms: bool,
    /// Gemma: embeddings multiplied by √hidden (the tied LM head is not).
    pub embed_scale: Option<f64>,
    /// Gemma: attention scores scaled by `query_pre_attn_scalar^-½` instead of `head_dim^-½`.
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 2: attention scores become `cap · tanh(s / cap)` before the mask.
    pub attn_softcap: Option<f64>,
    /// Gemma 2: logits become `cap · tanh(z / cap)`.
    pub final_softcap: Option<f64>,
    /// Keys a sliding-window layer's query sees, itself included (key > query − window).
    pub sliding_window: Option<usize>,
    /// Per layer: whether it attends through the sliding window (empty: none does).
    pub sliding_layers: Vec<bool>,
    /// Per layer: whether RoPE is applied (SmolLM3's `no_rope_layers`; empty: every layer).
    pub rope_layers: Vec<bool>,
    /// Gemma 3: RoPE base and scaling of the sliding-window layers.
    pub local_rope: Option<(f64, RopeScaling)>,
    /// Phi-3 `partial_rotary_factor`: RoPE turns the first `rotary_dim` of each head only.
    pub rotary_dim: Option<usize>,
    /// Phi-3: q, k and v come from one `qkv_proj`.
    pub fused_qkv: bool,
    /// Phi-3: gate and up come from one `gate_up_proj` (gate first).
    pub fused_gate_up: bool,
}

/// Per-layer flags from `layer_types` (`sliding_attention` / `full_attention`), or, when a config
/// predates that key, the pattern `is_sliding(i)` transformers derives.
fn sliding_layers(
    raw: &RawConfig,
    layers: usize,
    is_sliding: impl Fn(usize) -> bool,
) -> Result<Vec<bool>, String> {
    match &raw.layer_types {
        Some(types) => {
            if types.len() != layers {
                return Err(format!(
                    "layer_types has {} entries for {layers} layers",
                    types.len()
                ));
            }
            types
                .iter()
                .map(|t| match t.as_str() {
                    "sliding_attention" => Ok(true),
                    "full_attention" => Ok(false),
                    other => Err(format!("layer type {other:?} is not supported")),
                })
                .collect()
        }
        None => Ok((0..layers).map(is_sliding).collect()),
    }
}

/// The window, which must be at least one key.
fn window(raw: &RawConfig, default: Option<usize>) -> Result<Option<usize>, String> {
    match raw.sliding_window.or(default) {
        Some(0) => Err("sliding_window 0 lets a token see nothing".into()),
        w => Ok(w),
    }
}

/// The [`Variant`] of `architecture` (plain Llama, Mistral and Qwen get the default).
pub(super) fn variant(
    raw: &RawConfig,
    architecture: &str,
    layers: usize,
    hidden: usize,
    head_dim: usize,
) -> Result<Variant, String> {
    let gemma = |sliding_layers: Vec<bool>, window: Option<usize>| Variant {
        norm_plus_one: true,
        sandwich_norms: true,
        embed_scale: Some((hidden as f64).sqrt()),
        query_pre_attn_scalar: Some(raw.query_pre_attn_scalar.unwrap_or(head_dim as f64)),
        attn_softcap: raw.attn_logit_softcapping,
        final_softcap: raw.final_logit_softcapping,
        sliding_window: window,
        sliding_layers,
        ..Variant::default()
    };
    Ok(match architecture {
        "Gemma2ForCausalLM" => gemma(
            sliding_layers(raw, layers, |i| (i + 1) % 2 != 0)?,
            window(raw, Some(4096))?,
        ),
        "Gemma3ForCausalLM" | "Gemma3ForConditionalGeneration" => {
            let pattern = raw.sliding_window_pattern.unwrap_or(6).max(1);
            let mut v = gemma(
                sliding_layers(raw, layers, |i| (i + 1) % pattern != 0)?,
                window(raw, Some(4096))?,
            );
            let (theta, scaling) = rope(raw, "sliding_attention")?;
            // Older configs give the local base as `rope_local_base_freq` beside a global
            // `rope_theta`/`rope_scaling` that belongs to the full-attention layers only.
            let nested = raw
                .rope_parameters
                .as_ref()
                .is_some_and(|p| p.get("sliding_attention").is_some());
            v.local_rope = Some(if nested {
                (theta, scaling)
            } else {
                (
                    raw.rope_local_base_freq.unwrap_or(10_000.0),
                    RopeScaling::Default,
                )
            });
            v
        }
        "Phi3ForCausalLM" => phi3(raw, layers, head_dim)?,
        "SmolLM3ForCausalLM" => smollm3(raw, layers)?,
        _ => {
            // Mistral's window applies to every layer.
            let window = match architecture {
                "MistralForCausalLM" => window(raw, None)?,
                _ => None,
            };
            Variant {
                sliding_layers: vec![window.is_some(); if window.is_some() { layers } else { 0 }],
                sliding_window: window,
                ..Variant::default()
            }
        }
    })
}

/// Phi-3: fused projections, partial rotary, a window on every layer when one is set.
fn phi3(raw: &RawConfig, layers: usize, head_dim: usize) -> Result<Variant, String> {
    let factor = super::rope_params(raw, "")
        .and_then(|p| p.get("partial_rotary_factor"))
        .and_then(|f| f.as_f64())
        .or(raw.partial_rotary_factor)
        .unwrap_or(1.0);
    let rotary = (head_dim as f64 * factor) as usize;
    if rotary == 0 || rotary > head_dim || !rotary.is_multiple_of(2) {
        return Err(format!(
            "partial_rotary_factor {factor} gives {rotary} rotary dims of {head_dim}"
        ));
    }
    let window = window(raw, None)?;
    Ok(Variant {
        sliding_layers: vec![window.is_some(); layers],
        sliding_window: window,
        rotary_dim: (rotary < head_dim).then_some(rotary),
        fused_qkv: true,
        fused_gate_up: true,
        ..Variant::default()
    })
}

/// SmolLM3: RoPE skipped on `no_rope_layers` (every `no_rope_layer_interval`-th by default).
fn smollm3(raw: &RawConfig, layers: usize) -> Result<Variant, String> {
    let interval = raw.no_rope_layer_interval.unwrap_or(4).max(1);
    let rope_layers: Vec<bool> = match &raw.no_rope_layers {
        Some(l) if l.len() == layers => l.iter().map(|&x| x != 0).collect(),
        Some(l) => {
            return Err(format!(
                "no_rope_layers has {} entries for {layers} layers",
                l.len()
            ))
        }
        None => (0..layers).map(|i| (i + 1) % interval != 0).collect(),
    };
    let window = if raw.use_sliding_window.unwrap_or(false) {
        window(raw, None)?
    } else {
        None
    };
    let sliding_layers = match window {
        Some(_) => sliding_layers(raw, layers, |i| !rope_layers[i])?,
        None => Vec::new(),
    };
    Ok(Variant {
        sliding_window: window,
        sliding_layers,
        rope_layers,
        ..Variant::default()
    })
}
