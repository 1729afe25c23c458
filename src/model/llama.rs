//! The llama family: Llama 2/3.x, Mistral, SmolLM, Qwen2/2.5 (q/k/v bias), Qwen3 (per-head
//! q/k RMSNorm, explicit head_dim), and the variants of [`Variant`]: Gemma 2/3 ((1 + w) norms
//! around attention and MLP, scaled embeddings, soft-capping, sliding-window layers, local RoPE),
//! Phi-3 (fused qkv and gate_up, LongRoPE, partial rotary) and SmolLM3 (layers without RoPE).
//! Follows transformers' `modeling_llama.py`, `modeling_qwen2.py`, `modeling_qwen3.py`,
//! `modeling_gemma2.py`, `modeling_gemma3.py`, `modeling_phi3.py` and `modeling_smollm3.py`;
//! tensor names mirror the checkpoint keys (`model.layers.N.self_attn.q_proj`). Every projection
//! is a [`LoraLinear`] and every op is differentiable, run by `model::kernels`.

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
    /// Gemma 3's sliding-window layers' own RoPE (cos, sin), shaped as `cos`.
    pub local: Option<(Tensor, Tensor)>,
    /// Additive attention bias.
    pub bias: Tensor,
    /// The bias of sliding-window layers: `bias` with keys at or past the window masked.
    pub sliding_bias: Option<Tensor>,
    /// Training pass: LoRA dropout on.
    pub train: bool,
}

/// q, k and v: three projections, or Phi-3's one `qkv_proj` (q, then k, then v).
#[derive(Debug, Clone)]
enum Qkv {
    Split(Box<[LoraLinear; 3]>),
    Fused(LoraLinear),
}

/// gate and up: two projections, or Phi-3's one `gate_up_proj` (gate, then up).
#[derive(Debug, Clone)]
enum GateUp {
    Split([LoraLinear; 2]),
    Fused(LoraLinear),
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct Layer {
    input_norm: Tensor,
    qkv: Qkv,
    o_proj: LoraLinear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    /// Gemma: the norm of the attention output (`post_attention_layernorm`).
    post_attn_norm: Option<Tensor>,
    /// The MLP's input norm (`post_attention_layernorm`; Gemma `pre_feedforward_layernorm`).
    post_norm: Tensor,
    /// Gemma: the norm of the MLP output (`post_feedforward_layernorm`).
    post_mlp_norm: Option<Tensor>,
    gate_up: GateUp,
    down_proj: LoraLinear,
    /// Whether RoPE turns q and k (SmolLM3 skips it on some layers).
    rope: bool,
    /// Whether the layer attends through the sliding window.
    sliding: bool,
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
    /// RoPE tables (max_positions, rotary dims), compute dtype.
    cos: Tensor,
    sin: Tensor,
    /// LongRoPE's tables for passes past the original context.
    long: Option<(Tensor, Tensor)>,
    /// Gemma 3's sliding-window layers' tables.
    local: Option<(Tensor, Tensor)>,
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
    /// The layer's projections in checkpoint order (q, k, v or qkv; o; gate, up or gate_up; down).
    pub fn linears(&self) -> Vec<&LoraLinear> {
        let mut v: Vec<&LoraLinear> = match &self.qkv {
            Qkv::Split(p) => p.iter().collect(),
            Qkv::Fused(p) => vec![p],
        };
        v.push(&self.o_proj);
        match &self.gate_up {
            GateUp::Split(p) => v.extend(p.iter()),
            GateUp::Fused(p) => v.push(p),
        }
        v.push(&self.down_proj);
        v
    }

    fn linears_mut(&mut self) -> Vec<&mut LoraLinear> {
        let mut v: Vec<&mut LoraLinear> = match &mut self.qkv {
            Qkv::Split(p) => p.iter_mut().collect(),
            Qkv::Fused(p) => vec![p],
        };
        v.push(&mut self.o_proj);
        match &mut self.gate_up {
            GateUp::Split(p) => v.extend(p.iter_mut()),
            GateUp::Fused(p) => v.push(p),
        }
        v.push(&mut self.down_proj);
        v
    }

    /// q, k, v as separate projections (the fused CPU decoder reads them so).
    pub(crate) fn split_qkv(&self) -> Option<&[LoraLinear; 3]> {
        match &self.qkv {
            Qkv::Split(p) => Some(&**p),
            Qkv::Fused(_) => None,
        }
    }

    /// gate, up as separate projections.
    pub(crate) fn split_gate_up(&self) -> Option<&[LoraLinear; 2]> {
        match &self.gate_up {
            GateUp::Split(p) => Some(p),
            GateUp::Fused(_) => None,
        }
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
        let v = &cfg.variant;
        let (b, t, _) = x.dims3()?;
        let (h, kv, dh) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let train = ctx.train;
        let lin = |l: &LoraLinear, x: &Tensor| l.forward_opts(x, train, detach_lora);
        // q/k/v and gate/up read one input each: its f32 LoRA input is cast once.
        let lin_shared = |l: &LoraLinear, x: &Tensor, x32: &Option<Tensor>| -> Result<Tensor> {
            l.forward_shared(x, x32.as_ref(), train, detach_lora)
        };
        let normed = kernels::rms_norm(x, &self.input_norm, cfg.norm_eps)?;
        let (q, k, val) = match &self.qkv {
            Qkv::Split(p) => {
                let n32 = lora_input_f32(&normed, &[&p[0], &p[1], &p[2]], train)?;
                (
                    lin_shared(&p[0], &normed, &n32)?,
                    lin_shared(&p[1], &normed, &n32)?,
                    lin_shared(&p[2], &normed, &n32)?,
                )
            }
            Qkv::Fused(p) => {
                let y = lin(p, &normed)?;
                (
                    y.narrow(2, 0, h * dh)?,
                    y.narrow(2, h * dh, kv * dh)?,
                    y.narrow(2, (h + kv) * dh, kv * dh)?,
                )
            }
        };
        // (B, T, heads·Dh) → (B, heads, T, Dh)
        let heads = |y: Tensor, n: usize, norm: &Option<Tensor>| -> Result<Tensor> {
            let y = y.reshape((b, t, n, dh))?;
            let y = match norm {
                Some(w) => kernels::rms_norm(&y, w, cfg.norm_eps)?,
                None => y,
            };
            y.transpose(1, 2)?.contiguous()
        };
        let q = heads(q, h, &self.q_norm)?;
        let k = heads(k, kv, &self.k_norm)?;
        let val = heads(val, kv, &None)?;
        let (q, k) = if self.rope {
            let (cos, sin) = match (&ctx.local, self.sliding) {
                (Some((c, s)), true) => (c, s),
                _ => (&ctx.cos, &ctx.sin),
            };
            (rope_part(&q, cos, sin)?, rope_part(&k, cos, sin)?)
        } else {
            (q, k)
        };
        let (k, val) = match cache {
            Some(cache) => cache.append(k, val)?,
            None => (k, val),
        };
        let scale = 1.0 / v.query_pre_attn_scalar.unwrap_or(dh as f64).sqrt();
        let bias = match (&ctx.sliding_bias, self.sliding) {
            (Some(sb), true) => sb,
            _ => &ctx.bias,
        };
        // k, v stay at KV heads: the fused op reads them per group (the fallback repeats them).
        let att = match v.attn_softcap {
            Some(cap) => kernels::attention_softcap(&q, &k, &val, bias, scale, cap)?,
            None => kernels::attention(&q, &k, &val, bias, scale)?,
        }
        .transpose(1, 2)?
        .reshape((b, t, h * dh))?;
        let mut y = lin(&self.o_proj, &att)?;
        if let Some(w) = &self.post_attn_norm {
            y = kernels::rms_norm(&y, w, cfg.norm_eps)?;
        }
        let x = (x + y)?;
        let normed = kernels::rms_norm(&x, &self.post_norm, cfg.norm_eps)?;
        let (gate, up) = match &self.gate_up {
            GateUp::Split(p) => {
                let n32 = lora_input_f32(&normed, &[&p[0], &p[1]], train)?;
                (
                    lin_shared(&p[0], &normed, &n32)?,
                    lin_shared(&p[1], &normed, &n32)?,
                )
            }
            GateUp::Fused(p) => {
                let y = lin(p, &normed)?;
                let i = cfg.intermediate_size;
                (y.narrow(2, 0, i)?, y.narrow(2, i, i)?)
            }
        };
        let mlp = kernels::gated(&gate.contiguous()?, &up.contiguous()?, cfg.activation)?;
        let mut y = lin(&self.down_proj, &mlp)?;
        if let Some(w) = &self.post_mlp_norm {
            y = kernels::rms_norm(&y, w, cfg.norm_eps)?;
        }
        x + y
    }
}

/// RoPE on the first `cos.dim(-1)` dims of each head of `x` `(B, heads, T, Dh)` (all of them
/// unless Phi-3's partial rotary factor leaves the rest as they are).
fn rope_part(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (dh, rd) = (x.dim(3)?, cos.dim(3)?);
    if rd == dh {
        return kernels::rope(x, cos, sin);
    }
    let turned = kernels::rope(&x.narrow(3, 0, rd)?.contiguous()?, cos, sin)?;
    Tensor::cat(&[&turned, &x.narrow(3, rd, dh - rd)?], 3)?.contiguous()
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
        let var = &cfg.variant;
        // Widths of the q and of the k/v projections: H·Dh and KV·Dh.
        let (q, kv) = (cfg.num_heads * dh, cfg.num_kv_heads * dh);
        let embed = w.get_matrix("model.embed_tokens.weight", &[cfg.vocab_size, d])?;
        // Gemma's norms scale by 1 + w: the stored weights are shifted once here.
        let norm = |name: &str, n: usize| -> std::result::Result<Tensor, ModelError> {
            let t = w.get(name, &[n])?;
            Ok(if var.norm_plus_one {
                t.to_dtype(candle_core::DType::F32)?
                    .affine(1.0, 1.0)?
                    .to_dtype(t.dtype())?
            } else {
                t
            })
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            let at = format!("{p}.self_attn");
            let mlp = format!("{p}.mlp");
            let qk_norm = |name: &str| -> std::result::Result<Option<Tensor>, ModelError> {
                if cfg.qk_norm {
                    Ok(Some(norm(&format!("{at}.{name}.weight"), dh)?))
                } else {
                    Ok(None)
                }
            };
            let qkv = if var.fused_qkv {
                Qkv::Fused(linear(
                    w,
                    &format!("{at}.qkv_proj"),
                    l,
                    q + 2 * kv,
                    d,
                    cfg.qkv_bias,
                )?)
            } else {
                Qkv::Split(Box::new([
                    linear(w, &format!("{at}.q_proj"), l, q, d, cfg.qkv_bias)?,
                    linear(w, &format!("{at}.k_proj"), l, kv, d, cfg.qkv_bias)?,
                    linear(w, &format!("{at}.v_proj"), l, kv, d, cfg.qkv_bias)?,
                ]))
            };
            let gate_up = if var.fused_gate_up {
                GateUp::Fused(linear(
                    w,
                    &format!("{mlp}.gate_up_proj"),
                    l,
                    2 * i,
                    d,
                    cfg.mlp_bias,
                )?)
            } else {
                GateUp::Split([
                    linear(w, &format!("{mlp}.gate_proj"), l, i, d, cfg.mlp_bias)?,
                    linear(w, &format!("{mlp}.up_proj"), l, i, d, cfg.mlp_bias)?,
                ])
            };
            let sandwich = |name: &str| -> std::result::Result<Option<Tensor>, ModelError> {
                var.sandwich_norms
                    .then(|| norm(&format!("{p}.{name}.weight"), d))
                    .transpose()
            };
            let (post_attn_norm, post_norm, post_mlp_norm) = if var.sandwich_norms {
                (
                    sandwich("post_attention_layernorm")?,
                    norm(&format!("{p}.pre_feedforward_layernorm.weight"), d)?,
                    sandwich("post_feedforward_layernorm")?,
                )
            } else {
                (
                    None,
                    norm(&format!("{p}.post_attention_layernorm.weight"), d)?,
                    None,
                )
            };
            layers.push(Layer {
                input_norm: norm(&format!("{p}.input_layernorm.weight"), d)?,
                qkv,
                o_proj: linear(w, &format!("{at}.o_proj"), l, d, q, cfg.o_bias)?,
                q_norm: qk_norm("q_norm")?,
                k_norm: qk_norm("k_norm")?,
                post_attn_norm,
                post_norm,
                post_mlp_norm,
                gate_up,
                down_proj: linear(w, &format!("{mlp}.down_proj"), l, d, i, cfg.mlp_bias)?,
                rope: var.rope_layers.get(l).copied().unwrap_or(true),
                sliding: var.sliding_window.is_some()
                    && var.sliding_layers.get(l).copied().unwrap_or(false),
            });
        }
        let final_norm = norm("model.norm.weight", d)?;
        let lm_head = if cfg.tie_word_embeddings && !w.contains("lm_head.weight") {
            embed.clone()
        } else {
            w.get_matrix("lm_head.weight", &[cfg.vocab_size, d])?
        };
        let rotary = var.rotary_dim.unwrap_or(dh);
        let table = |theta: f64,
                     scaling: &super::config::RopeScaling,
                     long: bool|
         -> std::result::Result<(Tensor, Tensor), ModelError> {
            let (c, s) = ops::rope_tables_for(
                rotary,
                theta,
                scaling,
                long,
                cfg.max_position_embeddings,
                w.device(),
            )?;
            Ok((c.to_dtype(w.dtype())?, s.to_dtype(w.dtype())?))
        };
        let (cos, sin) = table(cfg.rope_theta, &cfg.rope_scaling, false)?;
        let long = match cfg.rope_scaling {
            super::config::RopeScaling::LongRope { .. } => {
                Some(table(cfg.rope_theta, &cfg.rope_scaling, true)?)
            }
            _ => None,
        };
        let local = match &var.local_rope {
            Some((theta, scaling)) => Some(table(*theta, scaling, false)?),
            None => None,
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            layers,
            norm: final_norm,
            lm_head,
            cos,
            sin,
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
        let positions = self.cos.dim(0)?;
        if end > positions {
            candle_core::bail!(
                "a row of {end} tokens is longer than this model's context ({positions} positions); lower the max sequence length to {positions} or less"
            );
        }
        let x = self
            .embed
            .index_select(&ids.flatten_all()?, 0)?
            .to_dtype(self.cos.dtype())?
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

    /// The RoPE tables a pass whose largest position is `last` uses: LongRoPE's long ones past
    /// the original context (transformers decides per pass, from the largest position).
    fn tables(&self, last: usize) -> (&Tensor, &Tensor) {
        match (&self.long, &self.cfg.rope_scaling) {
            (
                Some((c, s)),
                super::config::RopeScaling::LongRope {
                    original_max_position_embeddings,
                    ..
                },
            ) if (last + 1) as f64 > *original_max_position_embeddings => (c, s),
            _ => (&self.cos, &self.sin),
        }
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
        let last = match positions {
            Some(p) => p
                .max_all()?
                .to_dtype(candle_core::DType::U32)?
                .to_scalar::<u32>()? as usize,
            None => past + t - 1,
        };
        let gather = |table: &Tensor| -> Result<Tensor> {
            let rd = table.dim(1)?;
            match positions {
                Some(pos) => table
                    .index_select(&pos.flatten_all()?, 0)?
                    .reshape((b, 1, t, rd)),
                None => table.narrow(0, past, t)?.reshape((1, 1, t, rd)),
            }
        };
        let (cos, sin) = self.tables(last);
        let local = match &self.local {
            Some((c, s)) => Some((gather(c)?, gather(s)?)),
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
            cos: gather(cos)?,
            sin: gather(sin)?,
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
