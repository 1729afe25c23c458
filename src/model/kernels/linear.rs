//! The entry points of the linear projections: the frozen product (with the LoRA term added),
//! the one-op LoRA and QLoRA projections where a backend has them, and dequantization.

use candle_core::{DType, Result, Tensor};

use super::*;

/// `x · Wᵀ (+ update)` for a frozen `weight` (out, in), 2-D `x` (N, in) and an optional (N, out)
/// `update` (the LoRA term): gradients flow to `x` and `update`, never to `weight`.
pub fn frozen_linear_plus(x: &Tensor, weight: &Tensor, update: Option<&Tensor>) -> Result<Tensor> {
    match plan_for(x).frozen_linear {
        c if c.is_cpu() && cpu::fits(x) && cpu::linear_weight_fits(weight) => {
            cpu::frozen_linear_plus(x, weight, update)
        }
        #[cfg(feature = "cuda")]
        Impl::Cuda if weight.dtype() == x.dtype() && x.rank() == 2 => {
            let y = cuda::frozen_linear(x, weight)?;
            match update {
                Some(u) => y + u,
                None => Ok(y),
            }
        }
        _ => gpu_common::frozen_linear_plus(x, weight, update),
    }
}

/// `x · Wᵀ` for a frozen `weight` (out, in) and 2-D `x` (N, in): gradient to `x` only.
pub fn frozen_linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    frozen_linear_plus(x, weight, None)
}

/// Whether a LoRA projection of the 2-D `x` runs as one op ([`lora_linear`]): the plan says so,
/// the pass draws no dropout mask and the frozen `weight` is in `x`'s dtype. Otherwise the
/// projection adds the composed f32 LoRA term through [`frozen_linear_plus`].
pub fn lora_linear_fused(x: &Tensor, weight: &Tensor, dropout_in_pass: bool) -> bool {
    !dropout_in_pass
        && match plan_for(x).lora_linear {
            Impl::Cuda => weight.dtype() == x.dtype(),
            Impl::CpuFused => cpu::fits(x) && cpu::linear_weight_fits(weight),
            _ => false,
        }
}

/// `x · Wᵀ + scale · (x · Aᵀ) · Bᵀ` as one op where [`lora_linear_fused`] holds; an error on a
/// device without such an op.
pub fn lora_linear(
    x: &Tensor,
    weight: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if plan_for(x).lora_linear == Impl::Cuda {
        return cuda::lora_linear(x, weight, a, b, scale);
    }
    if lora_linear_fused(x, weight, false) && [a, b].iter().all(|t| cpu::fits(t)) {
        return cpu::lora_linear(x, weight, a, b, scale);
    }
    candle_core::bail!(
        "no single-op LoRA linear on {:?} in {:?}; check lora_linear_fused first",
        DeviceKind::of(x.device()),
        x.dtype()
    )
}

/// A quantized weight as a float tensor of `dtype` on its device: on CUDA (the plan's LoRA linear
/// `cuda`) in bf16 straight from its blocks by FineTune's kernel where the type has one, else
/// Candle's f32 dequantization cast to `dtype`.
pub fn dequantize(q: &candle_core::quantized::QTensor, dtype: DType) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if dtype == DType::BF16 && q.device().is_cuda() && Mode::current() == Mode::Auto {
        if let Some(t) = cuda::dequantize_bf16(q)? {
            return Ok(t);
        }
    }
    q.dequantize(&q.device())?.to_dtype(dtype)
}

/// Whether a LoRA projection of the 2-D `x` over a quantized frozen weight (QLoRA) runs as one
/// op ([`qlora_linear`]): the plan's LoRA linear is the device's own op, the pass draws no dropout
/// mask, and `x` is in a dtype the op computes in.
pub fn qlora_linear_fused(x: &Tensor, dropout_in_pass: bool) -> bool {
    plan_for(x).lora_linear == Impl::Cuda
        && !dropout_in_pass
        && matches!(x.dtype(), DType::BF16 | DType::F32)
}

/// [`lora_linear`] over a quantized frozen `weight`, where [`qlora_linear_fused`] holds; an error
/// on a device without such an op.
pub fn qlora_linear(
    x: &Tensor,
    weight: &std::sync::Arc<candle_core::quantized::QTensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if plan_for(x).lora_linear == Impl::Cuda {
        return cuda::qlora_linear(x, weight, a, b, scale);
    }
    let _ = (weight, a, b, scale);
    candle_core::bail!(
        "no single-op QLoRA linear on {:?} in {:?}; check qlora_linear_fused first",
        DeviceKind::of(x.device()),
        x.dtype()
    )
}

/// A frozen weight as the one-op projections take it.
pub enum FrozenRef<'a> {
    /// In the activations' dtype.
    Dense(&'a Tensor),
    /// Quantized.
    Quant(&'a std::sync::Arc<candle_core::quantized::QTensor>),
}

/// Whether the MLP's `act(gate) ⊙ up` and its down projection (frozen `weight`, with or without
/// a LoRA term) run as one op ([`swiglu_linear`]): CUDA's SwiGLU and LoRA ops are planned, the
/// activation is silu, the pass draws no dropout mask and the weight is in `gate`'s dtype (or
/// quantized). `FINETUNE_CUDA_SWIGLU_LINEAR=0` turns it off (to compare the two).
pub fn swiglu_linear_fused(
    gate: &Tensor,
    act: Activation,
    weight: &FrozenRef<'_>,
    dropout_in_pass: bool,
) -> bool {
    let plan = plan_for(gate);
    let weight_fits = match weight {
        FrozenRef::Dense(w) => w.dtype() == gate.dtype(),
        FrozenRef::Quant(_) => matches!(gate.dtype(), DType::BF16 | DType::F32),
    };
    cfg!(feature = "cuda")
        && act == Activation::Silu
        && plan.swiglu == Impl::Cuda
        && plan.lora_linear == Impl::Cuda
        && !dropout_in_pass
        && weight_fits
        && swiglu_linear_on()
}

fn swiglu_linear_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("FINETUNE_CUDA_SWIGLU_LINEAR").map_or(true, |v| v != "0"))
}

/// `(act(gate) ⊙ up) · Wᵀ (+ s·(…)·Aᵀ·Bᵀ)` for 2-D `gate` and `up` (N, I) as one op where
/// [`swiglu_linear_fused`] holds (the product of gate and up is not kept for backward); an error
/// on a device without such an op.
pub fn swiglu_linear(
    gate: &Tensor,
    up: &Tensor,
    weight: FrozenRef<'_>,
    lora: Option<(&Tensor, &Tensor, f64)>,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if plan_for(gate).lora_linear == Impl::Cuda {
        return match weight {
            FrozenRef::Dense(w) => cuda::swiglu_linear(gate, up, w, lora),
            FrozenRef::Quant(q) => cuda::swiglu_qlinear(gate, up, q, lora),
        };
    }
    let _ = (up, weight, lora);
    candle_core::bail!(
        "no single-op SwiGLU projection on {:?} in {:?}; check swiglu_linear_fused first",
        DeviceKind::of(gate.device()),
        gate.dtype()
    )
}
