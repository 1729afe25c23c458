//! Hugging Face `config.json` → [`ModelConfig`], the plain internal config every model file reads.
//!
//! Both conventions are read: transformers ≥ 5 keeps RoPE settings under `rope_parameters`; older
//! checkpoints put `rope_theta` at the top level and scaling under `rope_scaling` (`type` or
//! `rope_type`). Unknown keys are ignored; `quantization_config: null` is accepted.

use std::path::Path;

use serde::Deserialize;

use super::ModelError;

mod limits;
mod variant;
use limits::check_sizes;
pub use variant::Variant;

/// Architectures FineTune can train, as `architectures[0]` names them in config.json.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Gemma3ForConditionalGeneration",
    "Phi3ForCausalLM",
    "SmolLM3ForCausalLM",
    "GPT2LMHeadModel",
];

/// Which forward pass a checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Llama 2/3.x, Mistral, SmolLM, Qwen2/2.5, Qwen3: pre-norm RMSNorm, RoPE, GQA, SwiGLU.
    Llama,
    /// GPT-2: LayerNorm, learned positions, Conv1D weights stored (in, out), gelu_new.
    Gpt2,
}

/// How RoPE frequencies are rescaled for long context.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// No rescaling (also what GPT-2's learned positions use).
    Default,
    /// Positions divided by `factor`.
    Linear {
        /// Divisor of the positions.
        factor: f64,
    },
    /// Phi-3's LongRoPE: per-frequency divisors, `short_factor` while a pass's positions stay
    /// within `original_max_position_embeddings`, `long_factor` past it; cos and sin are scaled
    /// by `attention_factor` either way.
    LongRope {
        /// Divisors of the inverse frequencies within the original context.
        short_factor: Vec<f64>,
        /// Divisors past it.
        long_factor: Vec<f64>,
        /// The context length the model was pretrained with.
        original_max_position_embeddings: f64,
        /// Scale of cos and sin (`attention_factor`, default √(1 + ln s / ln original)).
        attention_factor: f64,
    },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        /// Overall context extension factor (`factor`).
        factor: f64,
        /// Wavelengths longer than `original / low_freq_factor` are divided by `factor`.
        low_freq_factor: f64,
        /// Wavelengths shorter than `original / high_freq_factor` are kept; between the two,
        /// interpolated.
        high_freq_factor: f64,
        /// The context length the model was pretrained with.
        original_max_position_embeddings: f64,
    },
}

/// The activation of the MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU / swish (`silu`), the gate of SwiGLU.
    Silu,
    /// tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// exact erf gelu (`gelu`).
    Gelu,
    /// `relu`.
    Relu,
}

/// Normalized model description, independent of the config.json convention it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// `architectures[0]`, e.g. `LlamaForCausalLM`.
    pub architecture: String,
    /// `model_type`, e.g. `llama`, `qwen2`, `gpt2` (empty when absent).
    pub model_type: String,
    /// Which forward pass runs.
    pub family: Family,
    /// Tokens in the vocabulary: rows of the embedding and of `lm_head`.
    pub vocab_size: usize,
    /// Width of the residual stream (`hidden_size`, GPT-2 `n_embd`).
    pub hidden_size: usize,
    /// Width of the MLP's inner layer (`intermediate_size`; GPT-2 `n_inner`, default 4 × hidden).
    pub intermediate_size: usize,
    /// Transformer blocks (`num_hidden_layers`, GPT-2 `n_layer`).
    pub num_layers: usize,
    /// Query heads (`num_attention_heads`, GPT-2 `n_head`).
    pub num_heads: usize,
    /// Key/value heads (`num_key_value_heads`, default `num_heads`); fewer than `num_heads` is GQA.
    pub num_kv_heads: usize,
    /// Width of one head (`head_dim`, default hidden / heads).
    pub head_dim: usize,
    /// Longest context the model was trained for, in tokens (`max_position_embeddings`, default
    /// 2048; GPT-2 `n_positions`).
    pub max_position_embeddings: usize,
    /// Epsilon of the norms (`rms_norm_eps`, default 1e-6; GPT-2 `layer_norm_epsilon`, default
    /// 1e-5).
    pub norm_eps: f64,
    /// RoPE base frequency (`rope_theta` or `rope_parameters.rope_theta`); 0 for GPT-2.
    pub rope_theta: f64,
    /// How RoPE frequencies are rescaled for long context.
    pub rope_scaling: RopeScaling,
    /// Whether `lm_head` reuses the embedding matrix (`tie_word_embeddings`; default off, on for
    /// GPT-2).
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub o_bias: bool,
    /// Bias on the MLP projections (`mlp_bias`; always on for GPT-2).
    pub mlp_bias: bool,
    /// Qwen3: RMSNorm on each head of q and k before RoPE.
    pub qk_norm: bool,
    /// The MLP's activation (`hidden_act`, GPT-2 `activation_function`).
    pub activation: Activation,
    /// GPT-2: divide attention scores by (layer index + 1) as well.
    pub scale_attn_by_inverse_layer_idx: bool,
    /// Stored dtype as the config declares it (`dtype` or `torch_dtype`), if any.
    pub stored_dtype: Option<String>,
    /// `bos_token_id` (the first one when config.json gives a list).
    pub bos_token_id: Option<u32>,
    /// `eos_token_id` (the first one when config.json gives a list).
    pub eos_token_id: Option<u32>,
    /// What Gemma 2/3, Phi-3 and SmolLM3 add to the llama layer (all off for the others).
    pub variant: Variant,
}

/// config.json as written by transformers 4 or 5; only the keys FineTune reads.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: Option<usize>,
    // llama family
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    // gemma, phi3, smollm3
    hidden_activation: Option<String>,
    query_pre_attn_scalar: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    layer_types: Option<Vec<String>>,
    sliding_window_pattern: Option<usize>,
    rope_local_base_freq: Option<f64>,
    no_rope_layers: Option<Vec<u8>>,
    no_rope_layer_interval: Option<usize>,
    partial_rotary_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
    /// Gemma3ForConditionalGeneration: the language model's config.
    text_config: Option<serde_json::Value>,
    // gpt2
    n_embd: Option<usize>,
    n_layer: Option<usize>,
    n_head: Option<usize>,
    n_inner: Option<usize>,
    n_positions: Option<usize>,
    layer_norm_epsilon: Option<f64>,
    activation_function: Option<String>,
    scale_attn_weights: Option<bool>,
    scale_attn_by_inverse_layer_idx: Option<bool>,
    // common
    dtype: Option<String>,
    torch_dtype: Option<String>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
    quantization_config: Option<serde_json::Value>,
}

fn first_id(v: &Option<serde_json::Value>) -> Option<u32> {
    match v.as_ref()? {
        serde_json::Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        serde_json::Value::Array(a) => a
            .first()
            .and_then(|n| n.as_u64())
            .and_then(|n| u32::try_from(n).ok()),
        _ => None,
    }
}

fn activation(name: &str) -> Result<Activation, String> {
    match name {
        "silu" | "swish" => Ok(Activation::Silu),
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
        "gelu" => Ok(Activation::Gelu),
        "relu" => Ok(Activation::Relu),
        other => Err(format!("activation {other:?} is not supported")),
    }
}

/// The RoPE parameters object: `rope_parameters` (transformers ≥ 5; Gemma 3 nests one per layer
/// type, `layer_type` picks it) or `rope_scaling` (older).
fn rope_params<'a>(raw: &'a RawConfig, layer_type: &str) -> Option<&'a serde_json::Value> {
    let nested = |v: &'a serde_json::Value| match v.get(layer_type) {
        Some(inner) if inner.is_object() => Some(inner),
        _ => Some(v),
    };
    raw.rope_parameters
        .as_ref()
        .filter(|v| v.is_object())
        .and_then(nested)
        .or(raw.rope_scaling.as_ref().filter(|v| v.is_object()))
}

/// Reads RoPE θ and scaling from `rope_parameters` (transformers ≥ 5) or top-level
/// `rope_theta` + `rope_scaling` (older); `layer_type` picks Gemma 3's nested entry. A scaling type
/// FineTune cannot reproduce is an error, never silently ignored, since training with the wrong
/// frequencies quietly ruins a model.
fn rope(raw: &RawConfig, layer_type: &str) -> Result<(f64, RopeScaling), String> {
    let params = rope_params(raw, layer_type);
    let theta = params
        .and_then(|p| p.get("rope_theta"))
        .and_then(|t| t.as_f64())
        .or(raw.rope_theta)
        .unwrap_or(10_000.0);
    let Some(p) = params else {
        return Ok((theta, RopeScaling::Default));
    };
    let kind = p
        .get("rope_type")
        .or_else(|| p.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let num = |key: &str| p.get(key).and_then(|v| v.as_f64());
    let need = |key: &str| num(key).ok_or_else(|| format!("rope_type {kind:?} needs {key:?}"));
    let list = |key: &str| -> Result<Vec<f64>, String> {
        p.get(key)
            .and_then(|v| v.as_array())
            .and_then(|a| a.iter().map(|x| x.as_f64()).collect::<Option<Vec<f64>>>())
            .ok_or_else(|| format!("rope_type {kind:?} needs a list of numbers {key:?}"))
    };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: need("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: need("original_max_position_embeddings")?,
        },
        // Phi-3 writes `longrope` (older checkpoints `su`); transformers' _compute_longrope_parameters.
        "longrope" | "su" => {
            let original = raw
                .original_max_position_embeddings
                .or(num("original_max_position_embeddings"))
                .or(raw.max_position_embeddings.map(|m| m as f64))
                .ok_or("rope_type \"longrope\" needs \"original_max_position_embeddings\"")?;
            let factor = num("factor")
                .or(raw.max_position_embeddings.map(|m| m as f64 / original))
                .unwrap_or(1.0);
            let attention_factor = num("attention_factor").unwrap_or(if factor <= 1.0 {
                1.0
            } else {
                (1.0 + factor.ln() / original.ln()).sqrt()
            });
            RopeScaling::LongRope {
                short_factor: list("short_factor")?,
                long_factor: list("long_factor")?,
                original_max_position_embeddings: original,
                attention_factor,
            }
        }
        other => {
            return Err(format!(
            "rope_type {other:?} is not supported (supported: default, linear, llama3, longrope)"
        ))
        }
    };
    Ok((theta, scaling))
}

/// `architectures[0]`, else the one `model_type` implies; an error unless FineTune trains it.
fn architecture_of(raw: &RawConfig) -> Result<String, String> {
    let architecture = raw
        .architectures
        .as_ref()
        .and_then(|a| a.first().cloned())
        .or_else(|| {
            // Fall back to model_type when `architectures` is missing.
            Some(
                match raw.model_type.as_deref()? {
                    "llama" => "LlamaForCausalLM",
                    "mistral" => "MistralForCausalLM",
                    "qwen2" => "Qwen2ForCausalLM",
                    "qwen3" => "Qwen3ForCausalLM",
                    "gemma2" => "Gemma2ForCausalLM",
                    "gemma3_text" => "Gemma3ForCausalLM",
                    "gemma3" => "Gemma3ForConditionalGeneration",
                    "phi3" => "Phi3ForCausalLM",
                    "smollm3" => "SmolLM3ForCausalLM",
                    "gpt2" => "GPT2LMHeadModel",
                    _ => return None,
                }
                .to_owned(),
            )
        })
        .ok_or_else(|| {
            format!(
                "no `architectures` entry and an unknown model_type {:?}; supported: {}",
                raw.model_type.as_deref().unwrap_or(""),
                SUPPORTED_ARCHITECTURES.join(", ")
            )
        })?;
    if !SUPPORTED_ARCHITECTURES.contains(&architecture.as_str()) {
        return Err(format!(
            "architecture {architecture} is not supported; supported: {}",
            SUPPORTED_ARCHITECTURES.join(", ")
        ));
    }
    Ok(architecture)
}

/// `v`, or an error naming the missing `key`.
fn need(v: Option<usize>, key: &str) -> Result<usize, String> {
    v.ok_or_else(|| format!("missing {key:?}"))
}

/// A GPT-2 config.json (`n_embd`, `n_head`, ...; the llama names are accepted too).
fn gpt2_config(raw: &RawConfig, architecture: String) -> Result<ModelConfig, String> {
    let vocab_size = need(raw.vocab_size, "vocab_size")?;
    let hidden_size = need(raw.n_embd.or(raw.hidden_size), "n_embd")?;
    let num_heads = need(raw.n_head.or(raw.num_attention_heads), "n_head")?;
    if num_heads == 0 || hidden_size % num_heads != 0 {
        return Err(format!(
            "n_embd {hidden_size} is not divisible by n_head {num_heads}"
        ));
    }
    if raw.scale_attn_weights == Some(false) {
        return Err("scale_attn_weights=false is not supported".into());
    }
    Ok(ModelConfig {
        architecture,
        model_type: raw.model_type.clone().unwrap_or_else(|| "gpt2".into()),
        family: Family::Gpt2,
        vocab_size,
        hidden_size,
        intermediate_size: raw.n_inner.unwrap_or(4 * hidden_size),
        num_layers: need(raw.n_layer.or(raw.num_hidden_layers), "n_layer")?,
        num_heads,
        num_kv_heads: num_heads,
        head_dim: hidden_size / num_heads,
        max_position_embeddings: need(raw.n_positions, "n_positions")?,
        norm_eps: raw.layer_norm_epsilon.unwrap_or(1e-5),
        rope_theta: 0.0,
        rope_scaling: RopeScaling::Default,
        tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(true),
        qkv_bias: true,
        o_bias: true,
        mlp_bias: true,
        qk_norm: false,
        activation: activation(raw.activation_function.as_deref().unwrap_or("gelu_new"))?,
        scale_attn_by_inverse_layer_idx: raw.scale_attn_by_inverse_layer_idx.unwrap_or(false),
        stored_dtype: raw.dtype.clone().or(raw.torch_dtype.clone()),
        bos_token_id: first_id(&raw.bos_token_id),
        eos_token_id: first_id(&raw.eos_token_id),
        variant: Variant::default(),
    })
}

/// A llama-family config.json (Llama, Mistral, Qwen2, Qwen3).
fn llama_config(raw: &RawConfig, architecture: String) -> Result<ModelConfig, String> {
    if architecture.starts_with("Gemma3") {
        // Gemma 3's multimodal configs leave most text keys at Gemma3TextConfig's defaults.
        let mut r = raw.clone();
        r.vocab_size = r.vocab_size.or(Some(262_208));
        r.num_attention_heads = r.num_attention_heads.or(Some(8));
        r.num_key_value_heads = r.num_key_value_heads.or(Some(4));
        r.head_dim = r.head_dim.or(Some(256));
        r.max_position_embeddings = r.max_position_embeddings.or(Some(131_072));
        r.rope_theta = r.rope_theta.or(Some(1_000_000.0));
        r.tie_word_embeddings = r.tie_word_embeddings.or(Some(true));
        r.hidden_activation = r.hidden_activation.or(Some("gelu_pytorch_tanh".into()));
        return llama_config_filled(&r, architecture);
    }
    llama_config_filled(raw, architecture)
}

fn llama_config_filled(raw: &RawConfig, architecture: String) -> Result<ModelConfig, String> {
    let vocab_size = need(raw.vocab_size, "vocab_size")?;
    let hidden_size = need(raw.hidden_size, "hidden_size")?;
    let num_heads = need(raw.num_attention_heads, "num_attention_heads")?;
    let num_kv_heads = raw.num_key_value_heads.unwrap_or(num_heads);
    if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        return Err(format!(
            "num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
        ));
    }
    let head_dim = match raw.head_dim {
        Some(d) => d,
        None if hidden_size % num_heads == 0 => hidden_size / num_heads,
        None => return Err(format!("hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads} and no head_dim is given")),
    };
    let (rope_theta, rope_scaling) = rope(raw, "full_attention")?;
    let num_layers = need(raw.num_hidden_layers, "num_hidden_layers")?;
    let variant = variant::variant(raw, &architecture, num_layers, hidden_size, head_dim)?;
    let attention_bias = raw.attention_bias.unwrap_or(false);
    let is_qwen2 = architecture == "Qwen2ForCausalLM";
    Ok(ModelConfig {
        model_type: raw.model_type.clone().unwrap_or_default(),
        family: Family::Llama,
        vocab_size,
        hidden_size,
        intermediate_size: need(raw.intermediate_size, "intermediate_size")?,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
        norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
        rope_theta,
        rope_scaling,
        // transformers' defaults: Gemma and SmolLM3 tie, the rest do not.
        tie_word_embeddings: raw
            .tie_word_embeddings
            .unwrap_or(architecture.starts_with("Gemma") || architecture == "SmolLM3ForCausalLM"),
        // Qwen2 always has q/k/v biases and no o_proj bias; Llama/Mistral/Qwen3 follow
        // `attention_bias` for all four projections.
        qkv_bias: is_qwen2 || attention_bias,
        o_bias: !is_qwen2 && attention_bias,
        mlp_bias: raw.mlp_bias.unwrap_or(false),
        qk_norm: architecture == "Qwen3ForCausalLM" || architecture.starts_with("Gemma3"),
        // Gemma names it `hidden_activation`.
        activation: activation(
            raw.hidden_activation
                .as_deref()
                .or(raw.hidden_act.as_deref())
                .unwrap_or("silu"),
        )?,
        scale_attn_by_inverse_layer_idx: false,
        stored_dtype: raw.dtype.clone().or(raw.torch_dtype.clone()),
        bos_token_id: first_id(&raw.bos_token_id),
        eos_token_id: first_id(&raw.eos_token_id),
        variant,
        architecture,
    })
}

impl ModelConfig {
    /// Reads and normalizes `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        if !path.is_file() {
            return Err(ModelError::MissingConfig(path));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::Io {
            path: path.clone(),
            source: e,
        })?;
        Self::from_json(&text).map_err(|reason| ModelError::InvalidConfig { path, reason })
    }

    /// Parses config.json text; the error is a sentence without the path.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| format!("not valid JSON ({e})"))?;
        if let Some(q) = raw.quantization_config.as_ref().filter(|q| !q.is_null()) {
            let method = q
                .get("quant_method")
                .and_then(|m| m.as_str())
                .unwrap_or("?");
            return Err(format!(
                "quantized checkpoints ({method}) cannot be trained directly; pick the unquantized model"
            ));
        }
        let architecture = architecture_of(&raw)?;
        let cfg = Self::from_raw(&raw, architecture)?;
        check_sizes(&cfg)?;
        Ok(cfg)
    }

    fn from_raw(raw: &RawConfig, architecture: String) -> Result<Self, String> {
        if architecture == "Gemma3ForConditionalGeneration" {
            // The language model's config; its weights are read under `language_model.`.
            let text = raw.text_config.clone().unwrap_or_default();
            let mut text: RawConfig = serde_json::from_value(text)
                .map_err(|e| format!("text_config is not valid ({e})"))?;
            text.dtype = text.dtype.or(raw.dtype.clone());
            text.torch_dtype = text.torch_dtype.or(raw.torch_dtype.clone());
            text.bos_token_id = text.bos_token_id.or(raw.bos_token_id.clone());
            text.eos_token_id = text.eos_token_id.or(raw.eos_token_id.clone());
            return llama_config(&text, architecture);
        }
        if architecture == "GPT2LMHeadModel" {
            gpt2_config(raw, architecture)
        } else {
            llama_config(raw, architecture)
        }
    }

    /// Every linear projection name in one layer, in checkpoint order (the default LoRA targets).
    pub fn linear_names(&self) -> &'static [&'static str] {
        match self.family {
            Family::Llama if self.variant.fused_qkv => {
                &["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
            }
            Family::Llama => &[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
            Family::Gpt2 => &["c_attn", "c_proj", "c_fc"],
        }
    }

    /// Linear modules in one layer: one per [`ModelConfig::linear_names`] name, except GPT-2's
    /// `c_proj`, which stands in both attention and MLP.
    pub fn linears_per_layer(&self) -> usize {
        match self.family {
            Family::Llama => self.linear_names().len(),
            Family::Gpt2 => self.linear_names().len() + 1,
        }
    }

    /// Number of parameters implied by the config (weights, biases, norms; tied head counted once).
    pub fn parameter_count(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let (q, kv) = (
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        );
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        match self.family {
            Family::Llama => {
                let attn = h * q + 2 * h * kv + q * h;
                let attn_bias =
                    if self.qkv_bias { q + 2 * kv } else { 0 } + if self.o_bias { h } else { 0 };
                let mlp = 3 * h * i + if self.mlp_bias { 2 * i + h } else { 0 };
                let sandwich = if self.variant.sandwich_norms { 4 } else { 2 };
                let norms = sandwich * h + if self.qk_norm { 2 * self.head_dim } else { 0 };
                v * h + self.num_layers * (attn + attn_bias + mlp + norms) + h + head
            }
            Family::Gpt2 => {
                let layer = (h * 3 * h + 3 * h) + (h * h + h) + (h * i + i) + (i * h + h) + 4 * h;
                v * h + self.max_position_embeddings * h + self.num_layers * layer + 2 * h + head
            }
        }
    }
}

#[cfg(test)]
mod tests;
