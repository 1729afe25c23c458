//! The llama family: Llama 2/3.x, Mistral, SmolLM, Qwen2/2.5 (q/k/v bias) and Qwen3 (per-head
//! q/k RMSNorm, explicit head_dim). Follows transformers' `modeling_llama.py`, `modeling_qwen2.py`
//! and `modeling_qwen3.py`; tensor names mirror the checkpoint keys (`model.layers.N.self_attn.q_proj`).
//! Every projection is a [`LoraLinear`] and every op is differentiable, run by `model::kernels`.

use candle_core::{Result, Tensor};

use super::cache::{KvCache, LayerKv};
use super::config::ModelConfig;
use super::kernels;
use super::lora::{lora_input_f32, LoraLinear};
use super::ops;
use super::recompute;
use super::weights::Weights;
use super::{ModelError, ModelInput};

mod decode_cpu;
pub use decode_cpu::FastKv;

/// What every layer of one forward pass shares.
#[derive(Debug, Clone)]
pub struct LayerCtx {
    /// The model's config.
    pub cfg: ModelConfig,
    /// RoPE cosines for this pass's positions: (B or 1, 1, T, Dh)
    pub cos: Tensor,
    /// RoPE sines, shaped as `cos`.
    pub sin: Tensor,
    /// Additive attention bias.
    pub bias: Tensor,
    /// Training pass: LoRA dropout on.
    pub train: bool,
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct Layer {
    input_norm: Tensor,
    q_proj: LoraLinear,
    k_proj: LoraLinear,
    v_proj: LoraLinear,
    o_proj: LoraLinear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    post_norm: Tensor,
    gate_proj: LoraLinear,
    up_proj: LoraLinear,
    down_proj: LoraLinear,
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
    /// RoPE tables (max_positions, Dh), compute dtype.
    cos: Tensor,
    sin: Tensor,
    /// Gradient checkpointing: where recomputed layers put their LoRA gradients.
    recompute: Option<recompute::GradSink>,
    /// With checkpointing, layers 0, k, 2k, … keep their activations (0 = none do).
    keep_every: usize,
}

/// Loads a linear projection `path` with weight (out, in) and an optional bias.
pub(super) fn linear(
    w: &Weights,
    path: &str,
    layer: usize,
    out_f: usize,
    in_f: usize,
    bias: bool,
) -> std::result::Result<LoraLinear, ModelError> {
    Ok(LoraLinear {
        path: path.to_owned(),
        layer,
        weight: w.get_linear(&format!("{path}.weight"), out_f, in_f, false)?,
        bias: if bias {
            Some(w.get(&format!("{path}.bias"), &[out_f])?)
        } else {
            None
        },
        lora: None,
    })
}

impl Layer {
    /// The layer's projections.
    pub fn linears(&self) -> [&LoraLinear; 7] {
        [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ]
    }

    /// `x` (B, T, D) → (B, T, D). `detach_lora` runs without recording LoRA in the graph (the
    /// value pass of gradient checkpointing).
    pub fn forward(&self, x: &Tensor, ctx: &LayerCtx, detach_lora: bool) -> Result<Tensor> {
        self.forward_kv(x, ctx, detach_lora, None)
    }

    /// As [`Layer::forward`]; with `cache`, the T new tokens' keys and values are appended to it
    /// and the queries attend to every cached key (`ctx` holds the new positions' RoPE rows and
    /// the causal bias after the cache, `(1, 1, T, S+T)`).
    pub fn forward_kv(
        &self,
        x: &Tensor,
        ctx: &LayerCtx,
        detach_lora: bool,
        cache: Option<&mut LayerKv>,
    ) -> Result<Tensor> {
        let cfg = &ctx.cfg;
        let (b, t, _) = x.dims3()?;
        let (h, kv, dh) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let train = ctx.train;
        let lin = |l: &LoraLinear, x: &Tensor| l.forward_opts(x, train, detach_lora);
        // q/k/v and gate/up read one input each: its f32 LoRA input is cast once.
        let lin_shared = |l: &LoraLinear, x: &Tensor, x32: &Option<Tensor>| -> Result<Tensor> {
            l.forward_shared(x, x32.as_ref(), train, detach_lora)
        };
        let normed = kernels::rms_norm(x, &self.input_norm, cfg.norm_eps)?;
        let n32 = lora_input_f32(&normed, &[&self.q_proj, &self.k_proj, &self.v_proj], train)?;
        // (B, T, heads·Dh) → (B, heads, T, Dh)
        let heads = |y: Tensor, n: usize, norm: &Option<Tensor>| -> Result<Tensor> {
            let y = y.reshape((b, t, n, dh))?;
            let y = match norm {
                Some(w) => kernels::rms_norm(&y, w, cfg.norm_eps)?,
                None => y,
            };
            y.transpose(1, 2)?.contiguous()
        };
        let q = heads(lin_shared(&self.q_proj, &normed, &n32)?, h, &self.q_norm)?;
        let k = heads(lin_shared(&self.k_proj, &normed, &n32)?, kv, &self.k_norm)?;
        let v = heads(lin_shared(&self.v_proj, &normed, &n32)?, kv, &None)?;
        let q = kernels::rope(&q, &ctx.cos, &ctx.sin)?;
        let k = kernels::rope(&k, &ctx.cos, &ctx.sin)?;
        let (k, v) = match cache {
            Some(cache) => cache.append(k, v)?,
            None => (k, v),
        };
        let scale = 1.0 / (dh as f64).sqrt();
        // k, v stay at KV heads: the fused op reads them per group (the fallback repeats them).
        let att = kernels::attention(&q, &k, &v, &ctx.bias, scale)?
            .transpose(1, 2)?
            .reshape((b, t, h * dh))?;
        let x = (x + lin(&self.o_proj, &att)?)?;
        let normed = kernels::rms_norm(&x, &self.post_norm, cfg.norm_eps)?;
        let n32 = lora_input_f32(&normed, &[&self.gate_proj, &self.up_proj], train)?;
        let gate = lin_shared(&self.gate_proj, &normed, &n32)?;
        let up = lin_shared(&self.up_proj, &normed, &n32)?;
        let mlp = kernels::gated(&gate, &up, cfg.activation)?;
        x + lin(&self.down_proj, &mlp)?
    }
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
        let (d, i, dh) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        // Widths of the q and of the k/v projections: H·Dh and KV·Dh.
        let (q, kv) = (cfg.num_heads * dh, cfg.num_kv_heads * dh);
        let embed = w.get_matrix("model.embed_tokens.weight", &[cfg.vocab_size, d])?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            let at = format!("{p}.self_attn");
            let mlp = format!("{p}.mlp");
            let qk_norm = |name: &str| -> std::result::Result<Option<Tensor>, ModelError> {
                if cfg.qk_norm {
                    Ok(Some(w.get(&format!("{at}.{name}.weight"), &[dh])?))
                } else {
                    Ok(None)
                }
            };
            layers.push(Layer {
                input_norm: w.get(&format!("{p}.input_layernorm.weight"), &[d])?,
                q_proj: linear(w, &format!("{at}.q_proj"), l, q, d, cfg.qkv_bias)?,
                k_proj: linear(w, &format!("{at}.k_proj"), l, kv, d, cfg.qkv_bias)?,
                v_proj: linear(w, &format!("{at}.v_proj"), l, kv, d, cfg.qkv_bias)?,
                o_proj: linear(w, &format!("{at}.o_proj"), l, d, q, cfg.o_bias)?,
                q_norm: qk_norm("q_norm")?,
                k_norm: qk_norm("k_norm")?,
                post_norm: w.get(&format!("{p}.post_attention_layernorm.weight"), &[d])?,
                gate_proj: linear(w, &format!("{mlp}.gate_proj"), l, i, d, cfg.mlp_bias)?,
                up_proj: linear(w, &format!("{mlp}.up_proj"), l, i, d, cfg.mlp_bias)?,
                down_proj: linear(w, &format!("{mlp}.down_proj"), l, d, i, cfg.mlp_bias)?,
            });
        }
        let norm = w.get("model.norm.weight", &[d])?;
        let lm_head = if cfg.tie_word_embeddings && !w.contains("lm_head.weight") {
            embed.clone()
        } else {
            w.get_matrix("lm_head.weight", &[cfg.vocab_size, d])?
        };
        let (cos, sin) = ops::rope_tables(
            dh,
            cfg.rope_theta,
            &cfg.rope_scaling,
            cfg.max_position_embeddings,
            w.device(),
        )?;
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
            cos: cos.to_dtype(w.dtype())?,
            sin: sin.to_dtype(w.dtype())?,
            recompute: None,
            keep_every: 0,
        })
    }

    /// Every linear projection, layer by layer (q, k, v, o, gate, up, down).
    pub fn linears(&self) -> Vec<&LoraLinear> {
        self.layers
            .iter()
            .flat_map(|l| {
                [
                    &l.q_proj,
                    &l.k_proj,
                    &l.v_proj,
                    &l.o_proj,
                    &l.gate_proj,
                    &l.up_proj,
                    &l.down_proj,
                ]
            })
            .collect()
    }

    /// As [`Llama::linears`], mutable.
    pub fn linears_mut(&mut self) -> Vec<&mut LoraLinear> {
        self.layers
            .iter_mut()
            .flat_map(|l| {
                [
                    &mut l.q_proj,
                    &mut l.k_proj,
                    &mut l.v_proj,
                    &mut l.o_proj,
                    &mut l.gate_proj,
                    &mut l.up_proj,
                    &mut l.down_proj,
                ]
            })
            .collect()
    }

    /// The LM head weight `(V, D)` (the embedding when tied).
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    /// The token embeddings of `ids` `(B, T)` in the compute dtype, `(B, T, D)`, after checking
    /// that positions up to `end` exist.
    fn embed(&self, ids: &Tensor, end: usize) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let positions = self.cos.dim(0)?;
        if end > positions {
            candle_core::bail!(
                "a row of {end} tokens is longer than this model's context ({positions} positions); lower the max sequence length to {positions} or less"
            );
        }
        self.embed
            .index_select(&ids.flatten_all()?, 0)?
            .to_dtype(self.cos.dtype())?
            .reshape((b, t, self.cfg.hidden_size))
    }

    /// Final hidden states `(B, T, D)` after the last norm.
    pub fn hidden(&self, input: &ModelInput, train: bool) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t) = input.input_ids.dims2()?;
        let dh = cfg.head_dim;
        let mut x = self.embed(&input.input_ids, t)?;
        // cos/sin for each position: (B or 1, 1, T, Dh)
        let (cos, sin) = match &input.position_ids {
            Some(pos) => {
                let flat = pos.flatten_all()?;
                (
                    self.cos.index_select(&flat, 0)?.reshape((b, 1, t, dh))?,
                    self.sin.index_select(&flat, 0)?.reshape((b, 1, t, dh))?,
                )
            }
            None => (
                self.cos.narrow(0, 0, t)?.reshape((1, 1, t, dh))?,
                self.sin.narrow(0, 0, t)?.reshape((1, 1, t, dh))?,
            ),
        };
        let ctx = LayerCtx {
            cfg: cfg.clone(),
            cos,
            sin,
            bias: input.bias(x.dtype())?,
            train,
        };
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
        let dh = cfg.head_dim;
        let mut x = self.embed(ids, past + t)?;
        let ctx = LayerCtx {
            cfg: cfg.clone(),
            cos: self.cos.narrow(0, past, t)?.reshape((1, 1, t, dh))?,
            sin: self.sin.narrow(0, past, t)?.reshape((1, 1, t, dh))?,
            bias: ops::causal_bias_after(past, t, x.dtype(), x.device())?,
            train: false,
        };
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward_kv(&x, &ctx, true, Some(kv))?;
        }
        cache.advance(t);
        kernels::rms_norm(&x, &self.norm, cfg.norm_eps)
    }
}
