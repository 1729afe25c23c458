//! Differentiable building blocks for the training forward pass.
//!
//! Candle's fused `rms_norm`, `layer_norm`, `softmax_last_dim` and `rotary_emb::rope*` record no
//! backward op, so gradients through them are silently zero. Everything here is composed from ops
//! that Candle's autograd differentiates (the gradient parity tests in tests/parity.rs prove it).
//! Reductions run in f32 when the compute dtype is half precision, as transformers does.

use candle_core::{DType, Device, Result, Tensor, D};

use super::config::RopeScaling;

/// Upcasts half-precision activations for reductions; returns the original dtype to go back to.
fn upcast(x: &Tensor) -> Result<(Tensor, DType)> {
    let dtype = x.dtype();
    if dtype == DType::F32 || dtype == DType::F64 {
        Ok((x.clone(), dtype))
    } else {
        Ok((x.to_dtype(DType::F32)?, dtype))
    }
}

/// RMSNorm over the last dim: `x / sqrt(mean(x²) + eps) * weight` (Llama, Qwen), from
/// differentiable elementary ops (any device/dtype; see `model::fused` for the CPU kernel).
pub fn rms_norm_composed(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let (xf, dtype) = upcast(x)?;
    let inv_rms = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    xf.broadcast_mul(&inv_rms)?
        .to_dtype(dtype)?
        .broadcast_mul(weight)
}

/// RMSNorm over the last dim, differentiable (fused kernel on CPU f32).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::cuda::applies(x) && weight.dtype() == x.dtype() {
        return super::cuda::rms_norm(x, weight, eps);
    }
    if !x.device().is_cpu() && weight.dtype() == x.dtype() {
        return super::gpu::rms_norm(x, weight, eps);
    }
    let (xf, dtype) = upcast(x)?;
    if dtype == DType::F32 {
        return super::fused::rms_norm(&xf, weight, eps);
    }
    rms_norm_composed(x, weight, eps)
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
pub fn softmax_last_dim_composed(x: &Tensor) -> Result<Tensor> {
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

/// Rotary embedding tables `(cos, sin)`, each `(max_positions, head_dim)` in f32, laid out as
/// transformers does (`cat(freqs, freqs)`, rotate-half convention).
pub fn rope_tables(
    head_dim: usize,
    theta: f64,
    scaling: &RopeScaling,
    max_positions: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let mut inv_freq: Vec<f64> = (0..half)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64))
        .collect();
    match scaling {
        RopeScaling::Default => {}
        RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_ctx,
        } => {
            // transformers `_compute_llama3_parameters`: long wavelengths are divided by `factor`,
            // short ones kept, and the band between interpolated smoothly.
            let low_freq_wavelen = old_ctx / low_freq_factor;
            let high_freq_wavelen = old_ctx / high_freq_factor;
            for f in inv_freq.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                if wavelen > low_freq_wavelen {
                    *f /= factor;
                } else if wavelen >= high_freq_wavelen {
                    let smooth = (old_ctx / wavelen - low_freq_factor)
                        / (high_freq_factor - low_freq_factor);
                    *f = (1.0 - smooth) * *f / factor + smooth * *f;
                }
            }
        }
    }
    // transformers computes inv_freq in f32; round it the same way so angles match at long context.
    let inv_freq: Vec<f32> = inv_freq.iter().map(|&f| f as f32).collect();
    let mut cos = Vec::with_capacity(max_positions * head_dim);
    let mut sin = Vec::with_capacity(max_positions * head_dim);
    for p in 0..max_positions {
        for _ in 0..2 {
            for &f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    Ok((
        Tensor::from_vec(cos, (max_positions, head_dim), device)?,
        Tensor::from_vec(sin, (max_positions, head_dim), device)?,
    ))
}

/// Applies RoPE to `x` `(B, H, T, D)` with `cos`/`sin` already gathered for the positions,
/// shaped `(B, 1, T, D)` (or broadcastable). `x·cos + rotate_half(x)·sin`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::cuda::applies(x) {
        return super::cuda::rope(x, cos, sin);
    }
    if !x.device().is_cpu() {
        return super::gpu::rope(x, cos, sin);
    }
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// Additive attention bias `(B, 1, T, T)`: 0 where query i may see key j (j ≤ i and both in the
/// same segment), -inf elsewhere. Segment 0 (padding) tokens see only themselves, so no row is
/// all -inf. `segment_ids` is `B*T` row-major; `None` means one segment per row (plain causal).
pub fn attention_bias(
    batch: usize,
    seq_len: usize,
    segment_ids: Option<&[u32]>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let t = seq_len;
    let rows = if segment_ids.is_some() { batch } else { 1 };
    let mut bias = vec![f32::NEG_INFINITY; rows * t * t];
    for b in 0..rows {
        for i in 0..t {
            for j in 0..=i {
                let visible = match segment_ids {
                    None => true,
                    Some(seg) => {
                        let (si, sj) = (seg[b * t + i], seg[b * t + j]);
                        si == sj && (si != 0 || i == j)
                    }
                };
                if visible {
                    bias[(b * t + i) * t + j] = 0.0;
                }
            }
        }
    }
    Tensor::from_vec(bias, (rows, 1, t, t), device)?.to_dtype(dtype)
}

/// Mean cross-entropy over positions whose label is not -100, as transformers' causal-LM loss
/// defines it: `logits` `(N, V)` at the positions that predict `targets` `(N,)` (already shifted and
/// filtered by the caller, see `model::Model::loss`). Returns a scalar f32.
pub fn cross_entropy_composed(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
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

/// Repeats each of the `kv_heads` in `x` `(B, KV, T, D)` `n_rep` times → `(B, KV·n_rep, T, D)` (GQA).
pub fn repeat_kv(x: Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x);
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kv, n_rep, t, d))?
        .reshape((b, kv * n_rep, t, d))
}

/// Scaled dot-product attention over `(B, H, T, D)` tensors with an additive bias broadcastable to
/// `(B, H, T, T)`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(bias)?;
    let (scores, dtype) = upcast(&scores)?;
    super::fused::softmax_last_dim(&scores)?
        .to_dtype(dtype)?
        .matmul(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_matches_candle_fused_forward_and_has_gradient() {
        let dev = Device::Cpu;
        let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, 8), &dev).unwrap())
            .unwrap();
        let w = Tensor::randn(0f32, 1., 8, &dev).unwrap();
        let ours = rms_norm_composed(x.as_tensor(), &w, 1e-5).unwrap();
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
        let a = softmax_last_dim_composed(&x).unwrap();
        let b = candle_nn::ops::softmax_last_dim(&x).unwrap();
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-6);
    }

    #[test]
    fn packed_bias_keeps_attention_inside_segments() {
        let seg = [1u32, 1, 2, 2, 0];
        let bias = attention_bias(1, 5, Some(&seg), DType::F32, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let visible = |i: usize, j: usize| bias[i * 5 + j] == 0.0;
        assert!(visible(1, 0) && visible(3, 2) && visible(4, 4));
        assert!(!visible(2, 1) && !visible(0, 1) && !visible(4, 3));
    }

    #[test]
    fn llama3_scaling_keeps_high_frequencies() {
        let s = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        // sin, not cos: at position 1 the low-frequency angles are ~1e-6 and cos rounds to 1.
        let (_, c0) = rope_tables(64, 500000.0, &RopeScaling::Default, 2, &Device::Cpu).unwrap();
        let (_, c1) = rope_tables(64, 500000.0, &s, 2, &Device::Cpu).unwrap();
        let (c0, c1) = (c0.to_vec2::<f32>().unwrap(), c1.to_vec2::<f32>().unwrap());
        // position 1, first frequency (short wavelength): unchanged; last: scaled by 1/8.
        assert_eq!(c0[1][0], c1[1][0]);
        assert!((c0[1][31] / c1[1][31] - 8.0).abs() < 1e-3);
    }
}
