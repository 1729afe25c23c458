//! The llama family: Llama 2/3.x, Mistral, SmolLM, Qwen2/2.5 (q/k/v bias), Qwen3 (per-head
//! q/k RMSNorm, explicit head_dim), and the variants of [`Variant`]: Gemma 2/3 ((1 + w) norms
//! around attention and MLP, scaled embeddings, soft-capping, sliding-window layers, local RoPE),
//! Phi-3 (fused qkv and gate_up, LongRoPE, partial rotary) and SmolLM3 (layers without RoPE).
//! Follows transformers' `modeling_llama.py`, `modeling_qwen2.py`, `modeling_qwen3.py`,
//! `modeling_gemma2.py`, `modeling_gemma3.py`, `modeling_phi3.py` and `modeling_smollm3.py`;
//! tensor names mirror the checkpoint keys (`model.layers.N.self_attn.q_proj`). Every projection
//! is a [`LoraLinear`] and every op is differentiable, run by `model::kernels`.

use candle_core::{Result, Tensor};

use super::cache::KvCache;
use super::config::{ModelConfig, RopeScaling};
use super::kernels;
use super::lora::LoraLinear;
use super::ops;
use super::recompute;
use super::weights::Weights;
use super::{ModelError, ModelInput};

mod decode_cpu;
mod layer;
pub use decode_cpu::FastKv;
pub use layer::Layer;

/// What every layer of one forward pass shares.
#[derive(Debug, Clone)]
pub struct LayerCtx {
    /// The model's config.
    pub cfg: ModelConfig,
    /// RoPE cosines for this pass's positions: (B or 1, 1, T, Dh)
    pub cos: Tensor,
    /// RoPE sines, shaped as `cos`.
    pub sin: Tensor,
    /// Gemma 3's sliding-window layers' own RoPE (cos, sin), shaped as `cos`.
    pub local: Option<(Tensor, Tensor)>,
    /// Additive attention bias.
    pub bias: Tensor,
    /// The bias of sliding-window layers: `bias` with keys at or past the window masked.
    pub sliding_bias: Option<Tensor>,
    /// Training pass: LoRA dropout on.
    pub train: bool,
}

/// RoPE frequencies of `cfg`'s rotary dims for base `theta` and `scaling` (`long`: LongRoPE's long
/// factors).
fn rope_freqs(
    cfg: &ModelConfig,
    theta: f64,
    scaling: &RopeScaling,
    long: bool,
) -> std::result::Result<ops::RopeFreqs, ModelError> {
    let rotary = cfg.variant.rotary_dim.unwrap_or(cfg.head_dim);
    Ok(ops::RopeFreqs::new(rotary, theta, scaling, long)?)
}

/// A llama-family causal LM.
#[derive(Debug, Clone)]
pub struct Llama {
    cfg: ModelConfig,
    /// (V, D)
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    /// (V, D); the embedding when tied.
    lm_head: Tensor,
    /// Compute dtype of activations (and of the RoPE rows).
    dtype: candle_core::DType,
    /// RoPE's frequencies; each pass computes the rows of its positions.
    rope: ops::RopeFreqs,
    /// LongRoPE's long frequencies, for passes past the original context.
    long: Option<ops::RopeFreqs>,
    /// Gemma 3's sliding-window layers' frequencies.
    local: Option<ops::RopeFreqs>,
    /// Gradient checkpointing: where recomputed layers put their LoRA gradients.
    recompute: Option<recompute::GradSink>,
    /// With checkpointing, layers 0, k, 2k, … keep their activations (0 = none do).
    keep_every: usize,
}

impl Llama {
    /// Turns gradient checkpointing on (layers are recomputed in backward and their LoRA
    /// gradients collected for [`Llama::take_recomputed`]) or off.
    pub fn set_recompute(&mut self, on: bool, keep_every: usize) {
        self.recompute = on.then(recompute::GradSink::default);
        self.keep_every = keep_every;
    }

    /// The LoRA gradients recomputed layers produced in the last backward (then forgotten).
    pub fn take_recomputed(&self) -> Vec<(candle_core::Var, Tensor)> {
        self.recompute
            .as_ref()
            .map(recompute::GradSink::take)
            .unwrap_or_default()
    }

    /// Builds the model from checkpoint `w` as `cfg` describes it (no LoRA attached); the LM head
    /// is the embedding when tied and the checkpoint has no `lm_head.weight`.
    pub fn load(w: &Weights, cfg: &ModelConfig) -> std::result::Result<Self, ModelError> {
        let d = cfg.hidden_size;
        let embed = w.get_matrix("model.embed_tokens.weight", &[cfg.vocab_size, d])?;
        let layers = (0..cfg.num_layers)
            .map(|l| Layer::load(w, cfg, l))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let final_norm = layer::norm(w, cfg, "model.norm.weight", d)?;
        let lm_head = if cfg.tie_word_embeddings && !w.contains("lm_head.weight") {
            embed.clone()
        } else {
            w.get_matrix("lm_head.weight", &[cfg.vocab_size, d])?
        };
        let table =
            |theta: f64, scaling: &RopeScaling, long: bool| rope_freqs(cfg, theta, scaling, long);
        let rope = table(cfg.rope_theta, &cfg.rope_scaling, false)?;
        let long = match cfg.rope_scaling {
            RopeScaling::LongRope { .. } => Some(table(cfg.rope_theta, &cfg.rope_scaling, true)?),
            _ => None,
        };
        let local = match &cfg.variant.local_rope {
            Some((theta, scaling)) => Some(table(*theta, scaling, false)?),
            None => None,
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            layers,
            norm: final_norm,
            lm_head,
            dtype: w.dtype(),
            rope,
            long,
            local,
            recompute: None,
            keep_every: 0,
        })
    }

    /// Every linear projection, layer by layer, in checkpoint order.
    pub fn linears(&self) -> Vec<&LoraLinear> {
        self.layers.iter().flat_map(Layer::linears).collect()
    }

    /// As [`Llama::linears`], mutable.
    pub fn linears_mut(&mut self) -> Vec<&mut LoraLinear> {
        self.layers
            .iter_mut()
            .flat_map(Layer::linears_mut)
            .collect()
    }

    /// Gemma 2's final-logit soft-cap, if any.
    pub fn final_softcap(&self) -> Option<f64> {
        self.cfg.variant.final_softcap
    }

    /// The LM head weight `(V, D)` (the embedding when tied).
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    /// The token embeddings of `ids` `(B, T)` in the compute dtype, `(B, T, D)`, after checking
    /// that positions up to `end` exist. Gemma scales them by √D, rounded to the embedding's
    /// dtype as transformers does.
    fn embed(&self, ids: &Tensor, end: usize) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let positions = self.cfg.max_position_embeddings;
        if end > positions {
            candle_core::bail!(
                "a row of {end} tokens is longer than this model's context ({positions} positions); lower the max sequence length to {positions} or less"
            );
        }
        let x = self
            .embed
            .index_select(&ids.flatten_all()?, 0)?
            .to_dtype(self.dtype)?
            .reshape((b, t, self.cfg.hidden_size))?;
        match self.cfg.variant.embed_scale {
            Some(scale) => {
                let scale = match self.embed.dtype() {
                    candle_core::DType::BF16 => half::bf16::from_f64(scale).to_f64(),
                    candle_core::DType::F16 => half::f16::from_f64(scale).to_f64(),
                    _ => scale as f32 as f64,
                };
                x * scale
            }
            None => Ok(x),
        }
    }

    /// The RoPE frequencies a pass whose largest position is `last` uses: LongRoPE's long ones
    /// past the original context (transformers decides per pass, from the largest position).
    fn freqs(&self, last: usize) -> &ops::RopeFreqs {
        match (&self.long, &self.cfg.rope_scaling) {
            (
                Some(long),
                RopeScaling::LongRope {
                    original_max_position_embeddings,
                    ..
                },
            ) if (last + 1) as f64 > *original_max_position_embeddings => long,
            _ => &self.rope,
        }
    }

    /// The plain RoPE frequencies (what the fused CPU decoder turns q and k by).
    pub(crate) fn rope(&self) -> &ops::RopeFreqs {
        &self.rope
    }

    /// The layer context of a pass over `t` positions starting at `past` (or at `positions`,
    /// `(B, T)`), with the attention `bias` of its T queries.
    fn layer_ctx(
        &self,
        b: usize,
        t: usize,
        past: usize,
        positions: Option<&Tensor>,
        bias: Tensor,
        train: bool,
    ) -> Result<LayerCtx> {
        // The positions of each query, on the host: (B·T) given, or past..past+T for every row.
        let (rows, pos): (usize, Vec<u32>) = match positions {
            Some(p) => (
                b,
                p.flatten_all()?
                    .to_dtype(candle_core::DType::U32)?
                    .to_vec1()?,
            ),
            None => (1, (past as u32..(past + t) as u32).collect()),
        };
        let last = pos.iter().copied().max().unwrap_or(0) as usize;
        let device = bias.device().clone();
        let gather = |freqs: &ops::RopeFreqs| -> Result<(Tensor, Tensor)> {
            let (c, s) = match positions {
                Some(_) => freqs.tables(&pos, self.dtype, &device)?,
                None => freqs.range_tables(past, t, self.dtype, &device)?,
            };
            let shape = (rows, 1, t, freqs.dim());
            Ok((c.reshape(shape)?, s.reshape(shape)?))
        };
        let (cos, sin) = gather(self.freqs(last))?;
        let local = match &self.local {
            Some(f) => Some(gather(f)?),
            None => None,
        };
        let sliding_bias = match self.cfg.variant.sliding_window {
            Some(w) if self.layers.iter().any(|l| l.sliding) => Some(
                bias.broadcast_add(&ops::sliding_band(past, t, w, bias.dtype(), bias.device())?)?,
            ),
            _ => None,
        };
        Ok(LayerCtx {
            cfg: self.cfg.clone(),
            cos,
            sin,
            local,
            bias,
            sliding_bias,
            train,
        })
    }

    /// Final hidden states `(B, T, D)` after the last norm.
    pub fn hidden(&self, input: &ModelInput, train: bool) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t) = input.input_ids.dims2()?;
        let mut x = self.embed(&input.input_ids, t)?;
        let bias = input.bias(x.dtype())?;
        let ctx = self.layer_ctx(b, t, 0, input.position_ids.as_ref(), bias, train)?;
        for (index, layer) in self.layers.iter().enumerate() {
            let kept = self.keep_every > 0 && index.is_multiple_of(self.keep_every);
            x = match (&self.recompute, train) {
                (Some(sink), true) if !kept => recompute::checkpointed(layer, &x, &ctx, sink)?,
                _ => layer.forward(&x, &ctx, false)?,
            };
        }
        kernels::rms_norm(&x, &self.norm, cfg.norm_eps)
    }

    /// Final hidden states `(B, T, D)` of the new tokens `ids` `(B, T)`, continuing `cache` (at
    /// positions `S..S+T`, S = `cache.len()`) and appending to it. Inference only: no dropout,
    /// LoRA as constants, so no autograd graph is recorded.
    pub fn hidden_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (_, t) = ids.dims2()?;
        let past = cache.len();
        if cache.layers.len() != self.layers.len() {
            candle_core::bail!(
                "the KV cache is for another model ({} layers)",
                cache.layers.len()
            );
        }
        let mut x = self.embed(ids, past + t)?;
        let bias = ops::causal_bias_after(past, t, x.dtype(), x.device())?;
        let ctx = self.layer_ctx(1, t, past, None, bias, false)?;
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward_kv(&x, &ctx, true, Some(kv))?;
        }
        cache.advance(t);
        kernels::rms_norm(&x, &self.norm, cfg.norm_eps)
    }
}
