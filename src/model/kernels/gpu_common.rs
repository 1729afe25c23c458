//! What every GPU can run, and so what Metal runs: RMSNorm and RoPE with the value from
//! candle-nn's fused kernels (one launch each, but no backward) and the gradient through a
//! zero-valued op that carries what backward needs (`model::grad`); the frozen linear projection
//! as a detached matmul with the input gradient routed the same way. On a GPU the composed forms
//! cost 8–9 kernel launches per call and it is the per-op cost, not arithmetic, that bounds a LoRA
//! step; these cost three (fused value, zeros, add). candle-nn's kernels exist on the CPU too, so
//! `FINETUNE_KERNELS=composed` runs this graph there (its RMSNorm takes f32, bf16 and f16 only).

use candle_core::{DType, Result, Tensor, D};

use crate::model::grad::with_grad;

/// RMSNorm over the last dim with a frozen `weight` (same dtype as `x`).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    let value = candle_nn::ops::rms_norm(&x.detach(), weight, eps as f32)?;
    let w = weight.clone();
    with_grad(
        value,
        &x,
        Box::new(move |x, g| rms_norm_input_grad(x, &w, eps, g)),
    )
}

/// d(x·r·w)/dx applied to `g`, r = 1/√(mean(x²)+eps):
/// `dx = r·(g⊙w) − x·r³·mean(g⊙w⊙x)`, in f32.
fn rms_norm_input_grad(x: &Tensor, w: &Tensor, eps: f64, g: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let gw = g
        .to_dtype(DType::F32)?
        .broadcast_mul(&w.to_dtype(DType::F32)?)?;
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let dot = (&gw * &x)?.mean_keepdim(D::Minus1)?;
    let dx = (gw.broadcast_mul(&r)? - x.broadcast_mul(&(dot * r.powf(3.0)?)?)?)?;
    dx.to_dtype(dtype)
}

/// True when candle-nn's RMSNorm kernel takes `dtype` (f32, bf16, f16; no f64).
pub(crate) fn rms_norm_takes(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}

/// RoPE (rotate-half convention) on `x` `(B, H, T, Dh)` with `cos`/`sin` gathered for the
/// positions as `(B or 1, 1, T, Dh)` (`cat(freqs, freqs)` halves). Backward is the inverse
/// rotation: RoPE with `−sin`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let dh = x.dim(D::Minus1)?;
    let half = |t: &Tensor| -> Result<Tensor> {
        let t = t.narrow(D::Minus1, 0, dh / 2)?.squeeze(1)?;
        let t = if t.dim(0)? == 1 { t.squeeze(0)? } else { t };
        t.to_dtype(x.dtype())?.contiguous()
    };
    let (c, s) = (half(cos)?, half(sin)?);
    let x = x.contiguous()?;
    let value = candle_nn::rotary_emb::rope(&x.detach(), &c, &s)?;
    let minus_s = s.neg()?;
    with_grad(
        value,
        &x,
        Box::new(move |_x, g| candle_nn::rotary_emb::rope(&g.contiguous()?, &c, &minus_s)),
    )
}

/// `x · Wᵀ (+ update)` for a frozen `weight` (out, in), 2-D `x` (N, in) and an optional (N, out)
/// `update` (the LoRA term): the value from a detached matmul, the gradient `g · W` to `x` alone
/// and `g` to `update`. Candle's matmul backward would also compute `xᵀ · g` for `W` (as many
/// flops as the forward) and keep that unused weight-sized gradient until backward ends. A
/// weight in another dtype than `x` is widened first.
pub fn frozen_linear_plus(x: &Tensor, weight: &Tensor, update: Option<&Tensor>) -> Result<Tensor> {
    let weight = if weight.dtype() != x.dtype() {
        weight.to_dtype(x.dtype())?
    } else {
        weight.clone()
    };
    let y = x.detach().matmul(&weight.t()?)?;
    let y = with_grad(y, x, Box::new(move |_x, g| g.matmul(&weight)))?;
    match update {
        Some(u) => y + u,
        None => Ok(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The value and the input gradient match the composed ops (run here on the CPU, where the
    /// candle-nn kernels also exist).
    #[test]
    fn rms_norm_and_rope_match_the_composed_ops() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, 5, 8), &dev).unwrap()).unwrap();
        let w = Tensor::randn(1f32, 0.2, 8, &dev).unwrap();
        let up = Tensor::randn(0f32, 1., (2, 3, 5, 8), &dev).unwrap();
        let check = |f: &dyn Fn(&Tensor) -> Tensor, reference: &dyn Fn(&Tensor) -> Tensor| {
            let (a, b) = (f(x.as_tensor()), reference(x.as_tensor()));
            assert!(max_diff(&a, &b) < 1e-5);
            let ga = (a * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (b * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let d = max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap());
            assert!(d < 1e-5, "gradient differs by {d}");
        };
        check(&|x| rms_norm(x, &w, 1e-6).unwrap(), &|x| {
            super::super::composed::rms_norm(x, &w, 1e-6).unwrap()
        });
        let (cos, sin) = crate::model::ops::rope_tables(
            8,
            10000.0,
            &crate::model::config::RopeScaling::Default,
            16,
            &dev,
        )
        .unwrap();
        // Positions 3..8 for batch row 0 and 0..5 for row 1: (B, 1, T, Dh).
        let pos = Tensor::new(&[3u32, 4, 5, 6, 7, 0, 1, 2, 3, 4], &dev).unwrap();
        let gather = |t: &Tensor| {
            t.index_select(&pos, 0)
                .unwrap()
                .reshape((2, 1, 5, 8))
                .unwrap()
        };
        let (c, s) = (gather(&cos), gather(&sin));
        check(&|x| rope(x, &c, &s).unwrap(), &|x| {
            super::super::composed::rope(x, &c, &s).unwrap()
        });
        // One row of positions for every batch row: (1, 1, T, Dh).
        let c1 = cos.narrow(0, 0, 5).unwrap().reshape((1, 1, 5, 8)).unwrap();
        let s1 = sin.narrow(0, 0, 5).unwrap().reshape((1, 1, 5, 8)).unwrap();
        check(&|x| rope(x, &c1, &s1).unwrap(), &|x| {
            super::super::composed::rope(x, &c1, &s1).unwrap()
        });
    }

    /// Here in f64 on the CPU: same value and input gradient as a plain matmul, no gradient for
    /// the weight.
    #[test]
    fn frozen_linear_routes_the_gradient_to_x_only() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1., (5, 8), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f64, 1., (3, 8), &dev).unwrap();
        let up = Tensor::randn(0f64, 1., (5, 3), &dev).unwrap();
        let y = frozen_linear_plus(x.as_tensor(), &w, None).unwrap();
        let want = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let diff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        assert!(diff(&y, &want) < 1e-12);
        let store = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(diff(store.get(&x).unwrap(), &up.matmul(&w).unwrap()) < 1e-12);
        assert!(store.get(&w).is_none());
    }
}
