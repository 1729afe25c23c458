//! Composed ops: every kernel choice's differentiable twin, built from Candle ops that its autograd
//! differentiates (the gradient parity tests in tests/parity.rs prove it). They run on any device
//! and dtype, and are the reference the fused kernels are tested against.
//!
//! Candle's fused `rms_norm`, `layer_norm`, `softmax_last_dim` and `rotary_emb::rope*` record no
//! backward op, so gradients through them are silently zero; nothing here uses them. Reductions
//! run in f32 when the compute dtype is half precision, as transformers does.
//!
//! Shapes follow the legend in `model/mod.rs` (B, T, D, H, KV, Dh, V, I).

use candle_core::{DType, Result, Tensor, D};

use crate::model::config::Activation;

/// Upcasts half-precision activations for reductions; returns the original dtype to go back to.
pub(crate) fn upcast(x: &Tensor) -> Result<(Tensor, DType)> {
    let dtype = x.dtype();
    if dtype == DType::F32 || dtype == DType::F64 {
        Ok((x.clone(), dtype))
    } else {
        Ok((x.to_dtype(DType::F32)?, dtype))
    }
}

/// RMSNorm over the last dim: `x / sqrt(mean(x²) + eps) * weight` (Llama, Qwen).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let (xf, dtype) = upcast(x)?;
    let inv_rms = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    xf.broadcast_mul(&inv_rms)?
        .to_dtype(dtype)?
        .broadcast_mul(weight)
}

/// RMSNorm of `x` (bf16/f16) by an f32 `weight`, as Gemma computes it: normalized and scaled in
/// f32, rounded to `x`'s dtype once.
pub fn rms_norm_f32_weight(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let (xf, dtype) = upcast(x)?;
    let inv_rms = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    xf.broadcast_mul(&inv_rms)?
        .broadcast_mul(weight)?
        .to_dtype(dtype)
}

/// LayerNorm over the last dim with affine weight and bias (GPT-2).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let (xf, dtype) = upcast(x)?;
    let centered = xf.broadcast_sub(&xf.mean_keepdim(D::Minus1)?)?;
    let inv_std = (centered.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    centered
        .broadcast_mul(&inv_std)?
        .to_dtype(dtype)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

/// Softmax over the last dim. The max is detached: softmax is shift-invariant, so this changes
/// nothing mathematically and keeps the max's (sub)gradient out of the graph.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Log-softmax over the last dim, computed in f32.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let (x, _) = upcast(x)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// RoPE on `x` `(B, H, T, Dh)` with `cos`/`sin` already gathered for the positions, shaped
/// `(B, 1, T, Dh)` (or broadcastable): `x·cos + rotate_half(x)·sin`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let dh = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, dh / 2)?;
    let x2 = x.narrow(D::Minus1, dh / 2, dh / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// Mean cross-entropy over positions whose label is not -100, as transformers' causal-LM loss
/// defines it: `logits` `(N, V)` at the positions that predict `targets` `(N,)` (already shifted and
/// filtered by the caller, see `model::Model::loss`). Returns a scalar f32.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let n = targets.dim(0)?;
    let logp = log_softmax_last_dim(logits)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    picked.sum_all()?.neg()? / n as f64
}

/// gelu with the tanh approximation (`gelu_new`). Candle's `gelu` op is exactly this formula and
/// has a backward.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    x.gelu()
}

/// The MLP activation of `x`, with Candle's unary ops (each has a backward).
pub fn activation(x: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        Activation::Silu => x.silu(),
        Activation::GeluTanh => gelu_tanh(x),
        Activation::Gelu => x.gelu_erf(),
        Activation::Relu => x.relu(),
    }
}

/// The gated MLP product `act(gate) ⊙ up` `(B, T, I)` (SwiGLU for silu).
/// The tanh GELU, composed of several ops, runs in f32 and rounds once (as PyTorch's fused
/// `gelu(approximate="tanh")` does in bf16/f16); the others are single Candle ops.
pub fn gated(gate: &Tensor, up: &Tensor, act: Activation) -> Result<Tensor> {
    let activated = match act {
        Activation::GeluTanh if gate.dtype() != DType::F32 => {
            let (gf, dtype) = upcast(gate)?;
            activation(&gf, act)?.to_dtype(dtype)?
        }
        _ => activation(gate, act)?,
    };
    activated * up
}

/// Repeats each of the `KV` heads in `x` `(B, KV, T, Dh)` `n_rep` times → `(B, KV·n_rep, T, Dh)`
/// (GQA).
pub fn repeat_kv(x: Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x);
    }
    let (b, kv, t, dh) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kv, n_rep, t, dh))?
        .reshape((b, kv * n_rep, t, dh))
}

/// Scaled dot-product attention over `(B, H, T, Dh)` tensors (k and v already repeated to H
/// heads) with an additive bias broadcastable to `(B, H, T, T)`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    attention_with(q, k, v, bias, scale, &softmax_last_dim)
}

/// As [`attention`], with the probabilities from `softmax` (over f32 scores): the dispatcher
/// passes its own choice (`kernels::softmax_last_dim`).
pub fn attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
    softmax: &dyn Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(bias)?;
    let (scores, dtype) = upcast(&scores)?;
    softmax(&scores)?.to_dtype(dtype)?.matmul(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rms_norm_matches_candle_fused_forward_and_has_gradient() {
        let dev = Device::Cpu;
        let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, 8), &dev).unwrap())
            .unwrap();
        let w = Tensor::randn(0f32, 1., 8, &dev).unwrap();
        let ours = rms_norm(x.as_tensor(), &w, 1e-5).unwrap();
        let fused = candle_nn::ops::rms_norm(x.as_tensor(), &w, 1e-5).unwrap();
        let diff = (ours.clone() - fused)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
        let grads = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads.get(&x).unwrap();
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0);
    }

    #[test]
    fn softmax_matches_fused() {
        let x = Tensor::randn(0f32, 3., (4, 7), &Device::Cpu).unwrap();
        let a = softmax_last_dim(&x).unwrap();
        let b = candle_nn::ops::softmax_last_dim(&x).unwrap();
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-6);
    }
}
