//! One decoder layer of the llama family, with the [`Variant`](super::super::config::Variant)
//! features: fused projections, sandwich norms, soft-capped or sliding-window attention, partial
//! or skipped RoPE.

use candle_core::{Result, Tensor};

use super::LayerCtx;
use crate::model::cache::LayerKv;
use crate::model::config::ModelConfig;
use crate::model::kernels;
use crate::model::lora::{lora_input_f32, LoraLinear};
use crate::model::quant::Frozen;
use crate::model::weights::Weights;
use crate::model::ModelError;

/// A norm weight `name` of `n` values; Gemma's norms scale by 1 + w, so the stored weights are
/// shifted once here (and kept in f32, as Gemma computes them).
pub(super) fn norm(
    w: &Weights,
    cfg: &ModelConfig,
    name: &str,
    n: usize,
) -> std::result::Result<Tensor, ModelError> {
    let t = w.get(name, &[n])?;
    // Kept in f32: Gemma multiplies the normalized f32 rows by 1 + w in f32 and rounds once
    // (kernels::rms_norm takes that path for an f32 weight and bf16/f16 rows).
    Ok(if cfg.variant.norm_plus_one {
        t.to_dtype(candle_core::DType::F32)?.affine(1.0, 1.0)?
    } else {
        t
    })
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
    pub(super) input_norm: Tensor,
    qkv: Qkv,
    pub(super) o_proj: LoraLinear,
    pub(super) q_norm: Option<Tensor>,
    pub(super) k_norm: Option<Tensor>,
    /// Gemma: the norm of the attention output (`post_attention_layernorm`).
    pub(super) post_attn_norm: Option<Tensor>,
    /// The MLP's input norm (`post_attention_layernorm`; Gemma `pre_feedforward_layernorm`).
    pub(super) post_norm: Tensor,
    /// Gemma: the norm of the MLP output (`post_feedforward_layernorm`).
    pub(super) post_mlp_norm: Option<Tensor>,
    gate_up: GateUp,
    pub(super) down_proj: LoraLinear,
    /// Whether RoPE turns q and k (SmolLM3 skips it on some layers).
    pub(super) rope: bool,
    /// Whether the layer attends through the sliding window.
    pub(super) sliding: bool,
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
    /// Layer `l` of checkpoint `w` as `cfg` describes it (no LoRA attached).
    pub(super) fn load(
        w: &Weights,
        cfg: &ModelConfig,
        l: usize,
    ) -> std::result::Result<Self, ModelError> {
        let (d, i, dh) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let var = &cfg.variant;
        // Widths of the q and of the k/v projections: H·Dh and KV·Dh.
        let (q, kv) = (cfg.num_heads * dh, cfg.num_kv_heads * dh);
        let norm = |name: &str, n: usize| norm(w, cfg, name, n);
        let p = format!("model.layers.{l}");
        let qk_norm = |name: &str| -> std::result::Result<Option<Tensor>, ModelError> {
            cfg.qk_norm
                .then(|| norm(&format!("{p}.self_attn.{name}.weight"), dh))
                .transpose()
        };
        // Phi-3 keeps q/k/v and gate/up fused.
        let lin = |name: &str, out_f: usize, in_f: usize, bias: bool| {
            linear(w, &format!("{p}.{name}"), l, out_f, in_f, bias)
        };
        let qkv = if var.fused_qkv {
            Qkv::Fused(lin("self_attn.qkv_proj", q + 2 * kv, d, cfg.qkv_bias)?)
        } else {
            Qkv::Split(Box::new([
                lin("self_attn.q_proj", q, d, cfg.qkv_bias)?,
                lin("self_attn.k_proj", kv, d, cfg.qkv_bias)?,
                lin("self_attn.v_proj", kv, d, cfg.qkv_bias)?,
            ]))
        };
        let gate_up = if var.fused_gate_up {
            GateUp::Fused(lin("mlp.gate_up_proj", 2 * i, d, cfg.mlp_bias)?)
        } else {
            GateUp::Split([
                lin("mlp.gate_proj", i, d, cfg.mlp_bias)?,
                lin("mlp.up_proj", i, d, cfg.mlp_bias)?,
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
        Ok(Self {
            input_norm: norm(&format!("{p}.input_layernorm.weight"), d)?,
            qkv,
            o_proj: lin("self_attn.o_proj", d, q, cfg.o_bias)?,
            q_norm: qk_norm("q_norm")?,
            k_norm: qk_norm("k_norm")?,
            post_attn_norm,
            post_norm,
            post_mlp_norm,
            gate_up,
            down_proj: lin("mlp.down_proj", d, i, cfg.mlp_bias)?,
            rope: var.rope_layers.get(l).copied().unwrap_or(true),
            sliding: var.sliding_window.is_some()
                && var.sliding_layers.get(l).copied().unwrap_or(false),
        })
    }

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

    pub(super) fn linears_mut(&mut self) -> Vec<&mut LoraLinear> {
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
        let lin = |l: &LoraLinear, x: &Tensor| l.forward_opts(x, ctx.train, detach_lora);
        let normed = kernels::rms_norm(x, &self.input_norm, cfg.norm_eps)?;
        let (q, k, val) = self.project_qkv(&normed, ctx, detach_lora)?;
        let tables = match (&ctx.local, self.sliding) {
            _ if !self.rope => None,
            (Some((c, s)), true) => Some((c, s)),
            _ => Some((&ctx.cos, &ctx.sin)),
        };
        // (B, T, heads·Dh) → (B, heads, T, Dh), q and k rotated on the way.
        let heads = |y: Tensor, n: usize, norm: &Option<Tensor>, turn: bool| -> Result<Tensor> {
            let y = y.reshape((b, t, n, dh))?;
            let y = match norm {
                Some(w) => kernels::rms_norm(&y, w, cfg.norm_eps)?,
                None => y,
            };
            match tables {
                Some((cos, sin)) if turn => rope_heads(&y, cos, sin),
                _ => kernels::swap_heads(&y),
            }
        };
        let q = heads(q, h, &self.q_norm, true)?;
        let k = heads(k, kv, &self.k_norm, true)?;
        let val = heads(val, kv, &None, false)?;
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
            None => {
                let products = kernels::Products::of(self.o_proj.weight.as_dense(), &q);
                kernels::attention_with(&q, &k, &val, bias, scale, products)?
            }
        };
        let att = kernels::swap_heads(&att)?.reshape((b, t, h * dh))?;
        let mut y = lin(&self.o_proj, &att)?;
        if let Some(w) = &self.post_attn_norm {
            y = kernels::rms_norm(&y, w, cfg.norm_eps)?;
        }
        let x = kernels::add(x, &y)?;
        let y = self.mlp(&x, ctx, detach_lora)?;
        kernels::add(&x, &y)
    }

    /// q, k and v `(B, T, heads·Dh)` of the normed input: three projections sharing one f32 LoRA
    /// input, or Phi-3's one, split.
    fn project_qkv(
        &self,
        normed: &Tensor,
        ctx: &LayerCtx,
        detach_lora: bool,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let cfg = &ctx.cfg;
        let (h, kv, dh) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        Ok(match &self.qkv {
            Qkv::Split(p) => {
                let n32 = lora_input_f32(normed, &[&p[0], &p[1], &p[2]], ctx.train)?;
                let lin =
                    |l: &LoraLinear| l.forward_shared(normed, n32.as_ref(), ctx.train, detach_lora);
                (lin(&p[0])?, lin(&p[1])?, lin(&p[2])?)
            }
            Qkv::Fused(p) => {
                let y = p.forward_opts(normed, ctx.train, detach_lora)?;
                (
                    y.narrow(2, 0, h * dh)?,
                    y.narrow(2, h * dh, kv * dh)?,
                    y.narrow(2, (h + kv) * dh, kv * dh)?,
                )
            }
        })
    }

    /// The MLP branch on the residual `x`: its norm, gate and up (or Phi-3's fused gate_up), the
    /// gated activation, down, and Gemma's post-norm.
    fn mlp(&self, x: &Tensor, ctx: &LayerCtx, detach_lora: bool) -> Result<Tensor> {
        let cfg = &ctx.cfg;
        let normed = kernels::rms_norm(x, &self.post_norm, cfg.norm_eps)?;
        let (gate, up) = match &self.gate_up {
            GateUp::Split(p) => {
                let n32 = lora_input_f32(&normed, &[&p[0], &p[1]], ctx.train)?;
                let lin = |l: &LoraLinear| {
                    l.forward_shared(&normed, n32.as_ref(), ctx.train, detach_lora)
                };
                (lin(&p[0])?, lin(&p[1])?)
            }
            GateUp::Fused(p) => {
                let y = p.forward_opts(&normed, ctx.train, detach_lora)?;
                let i = cfg.intermediate_size;
                (y.narrow(2, 0, i)?, y.narrow(2, i, i)?)
            }
        };
        let y = gated_down(
            &self.down_proj,
            (&gate, &up),
            cfg.activation,
            ctx.train,
            detach_lora,
        )?;
        match &self.post_mlp_norm {
            Some(w) => kernels::rms_norm(&y, w, cfg.norm_eps),
            None => Ok(y),
        }
    }
}

/// RoPE on the first `cos.dim(-1)` dims of each head of `x` `(B, heads, T, Dh)` (all of them
/// unless Phi-3's partial rotary factor leaves the rest as they are).
/// RoPE of `y` `(B, T, H, Dh)` returned `(B, H, T, Dh)`: the transpose and the rotation in one
/// op where all of Dh turns, else [`rope_part`] after the transpose.
fn rope_heads(y: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if cos.dim(3)? == y.dim(3)? {
        return kernels::rope_heads(y, cos, sin);
    }
    rope_part(&kernels::swap_heads(y)?, cos, sin)
}

fn rope_part(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (dh, rd) = (x.dim(3)?, cos.dim(3)?);
    if rd == dh {
        return kernels::rope(x, cos, sin);
    }
    let turned = kernels::rope(&x.narrow(3, 0, rd)?.contiguous()?, cos, sin)?;
    Tensor::cat(&[&turned, &x.narrow(3, rd, dh - rd)?], 3)?.contiguous()
}

/// `down(act(gate) ⊙ up)`: as one op where the kernels have it (CUDA: the product of gate and up
/// is not kept for backward, `kernels::swiglu_linear`), else the gated activation, then the
/// projection.
fn gated_down(
    down: &LoraLinear,
    (gate, up): (&Tensor, &Tensor),
    act: crate::model::config::Activation,
    train: bool,
    detach_lora: bool,
) -> Result<Tensor> {
    let lora = down.active();
    let plain = lora.is_none_or(|l| l.magnitude.is_none());
    let dropout = train && lora.is_some_and(|l| l.dropout > 0.0);
    let weight = match &down.weight {
        Frozen::Dense(w) => kernels::FrozenRef::Dense(w),
        Frozen::Quant(q) => kernels::FrozenRef::Quant(q.qtensor()),
    };
    if plain && down.bias.is_none() && kernels::swiglu_linear_fused(gate, act, &weight, dropout) {
        let dims = gate.dims().to_vec();
        let i = down.in_features();
        let (gate2, up2) = (gate.reshape(((), i))?, up.reshape(((), i))?);
        let factors = lora.map(|l| {
            let (a, b) = (l.a.as_tensor(), l.b.as_tensor());
            match detach_lora {
                true => (a.detach(), b.detach(), l.scale),
                false => (a.clone(), b.clone(), l.scale),
            }
        });
        let lora = factors.as_ref().map(|(a, b, s)| (a, b, *s));
        let y = kernels::swiglu_linear(&gate2.contiguous()?, &up2.contiguous()?, weight, lora)?;
        let mut out = dims;
        if let Some(last) = out.last_mut() {
            *last = down.out_features();
        }
        return y.reshape(out);
    }
    let h = kernels::gated(&gate.contiguous()?, &up.contiguous()?, act)?;
    down.forward_opts(&h, train, detach_lora)
}
