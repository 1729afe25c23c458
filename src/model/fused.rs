//! Fused CPU kernels with a backward pass for the hottest ops of training: softmax over the last
//! dim (attention), RMSNorm, and the cross-entropy of the loss. Candle's own fused versions record
//! no backward op; the composed versions in `model::ops` are differentiable but allocate a full
//! tensor per elementary op. These are `CustomOp`s: a forward kernel and a `bwd` that is itself a
//! fused kernel, proven against the composed ops by the tests below and the parity fixtures.
//! f32 on CPU only; other devices and dtypes use the composed ops (GPUs have bandwidth to spare).

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D,
};
use rayon::prelude::*;

use super::ops;

/// `FINETUNE_NO_FUSED=1` turns the kernels off (for measuring what they buy with `bench`).
pub(crate) fn disabled() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var_os("FINETUNE_NO_FUSED").is_some_and(|v| v != "0"))
}

/// True when the fused CPU kernels apply to `t`.
pub(crate) fn fusable(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && !disabled()
}

/// The contiguous f32 slice of a storage/layout pair, or an error.
pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("{op}: expected f32");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

fn last_dim(l: &Layout) -> Result<usize> {
    l.dims()
        .last()
        .copied()
        .ok_or_else(|| candle_core::Error::Msg("scalar input".into()))
}

// ---------------------------------------------------------------- frozen linear

/// The gradient path of `x · Wᵀ` for a frozen `W`: forward yields zeros (the value comes from a
/// detached matmul), backward yields `g · W`. Candle's matmul backward would also compute
/// `xᵀ · g` for `W` — as many flops as the forward — and keep that unused weight-sized gradient
/// until backward ends; routing the value and the gradient separately skips both. Works on every
/// backend (the forward only allocates zeros).
struct FrozenLinearGrad {
    /// (out, in)
    weight: Tensor,
}

impl FrozenLinearGrad {
    fn out_shape(&self, l: &Layout) -> Result<Shape> {
        let mut dims = l.dims().to_vec();
        match dims.last_mut() {
            Some(d) => *d = self.weight.dim(0)?,
            None => candle_core::bail!("frozen linear: scalar input"),
        }
        Ok(Shape::from_dims(&dims))
    }
}

impl CustomOp1 for FrozenLinearGrad {
    fn name(&self) -> &'static str {
        "ft-frozen-linear-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        let shape = self.out_shape(l)?;
        Ok((s.device().zeros_impl(&shape, s.dtype())?, shape))
    }

    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        let shape = self.out_shape(l)?;
        Ok((s.device().zeros_impl(&shape, s.dtype())?, shape))
    }

    fn metal_fwd(
        &self,
        s: &candle_core::MetalStorage,
        l: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        let shape = self.out_shape(l)?;
        Ok((s.device().zeros_impl(&shape, s.dtype())?, shape))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.weight)?))
    }
}

/// CPU kernel for `x · Wᵀ (+ u)`: one gemm straight into the output, so the graph keeps a single
/// (N, out) tensor per projection instead of one per elementary op (and no zeros tensor).
/// Backward: `g · W` to `x`, `g` to `u`, nothing to `W`.
struct FrozenLinearCpu;

impl FrozenLinearCpu {
    /// out (n, o) = x (n, i) · wᵀ, accumulated onto `out`'s current contents when `accumulate`.
    fn gemm(x: &[f32], w: &[f32], out: &mut [f32], n: usize, i: usize, o: usize, accumulate: bool) {
        let threads = rayon::current_num_threads();
        let par = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: the slices hold exactly n·i, o·i and n·o f32 (checked by the callers), the
        // strides describe row-major x and out and the transposed view of row-major w, and `out`
        // does not alias the inputs.
        unsafe {
            gemm::gemm(
                n,
                o,
                i,
                out.as_mut_ptr(),
                1,
                o as isize,
                accumulate,
                x.as_ptr(),
                1,
                i as isize,
                w.as_ptr(),
                i as isize,
                1,
                if accumulate { 1.0 } else { 0.0 },
                1.0,
                false,
                false,
                false,
                par,
            );
        }
    }

    /// `w` is f32 (gemm) or bf16 (the mixed-precision kernel, [`super::bf16`]).
    fn run(
        x: &[f32],
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        u: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, i) = lx.shape().dims2()?;
        let (o, wi) = lw.shape().dims2()?;
        if wi != i || x.len() != n * i || u.is_some_and(|u| u.len() != n * o) {
            candle_core::bail!(
                "frozen linear: shapes {:?} · {:?}ᵀ do not fit",
                lx.dims(),
                lw.dims()
            );
        }
        let mut out = match u {
            Some(u) => u.to_vec(),
            None => vec![0f32; n * o],
        };
        match w {
            CpuStorage::BF16(_) => {
                let w = bf16_slice(w, lw, "ft-frozen-linear")?;
                // out (n, o) = x (n, i) · wᵀ: B = wᵀ is (i, o) with rows 1 apart, columns i apart.
                super::bf16::matmul_f32_bf16(n, o, i, x, i, 1, w, 1, i, &mut out, o, u.is_some())
                    .map_err(|e| candle_core::Error::Msg(format!("frozen linear: {e}")))?;
            }
            _ => {
                let w = slice(w, lw, "ft-frozen-linear")?;
                if w.len() != o * i {
                    candle_core::bail!("frozen linear: weight is not {o}×{i}");
                }
                Self::gemm(x, w, &mut out, n, i, o, u.is_some());
            }
        }
        Ok((CpuStorage::F32(out), Shape::from_dims(&[n, o])))
    }
}

/// The contiguous bf16 slice of a storage/layout pair, or an error.
fn bf16_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [half::bf16]> {
    let CpuStorage::BF16(data) = s else {
        candle_core::bail!("{op}: expected bf16");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// `g · W` for the gradient of a frozen linear's input: candle's matmul for f32 weights, the
/// mixed-precision kernel for bf16 weights with an f32 gradient on the CPU.
fn input_grad(grad: &Tensor, w: &Tensor) -> Result<Tensor> {
    if w.dtype() == DType::BF16 && grad.dtype() == DType::F32 && grad.device().is_cpu() {
        grad.contiguous()?.apply_op2(w, MixedGradX)
    } else {
        grad.matmul(w)
    }
}

/// `g (n, o) · W (o, i)` with f32 `g` and bf16 `W`, f32 out.
struct MixedGradX;

impl CustomOp2 for MixedGradX {
    fn name(&self) -> &'static str {
        "ft-mixed-grad-x"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = slice(s1, l1, self.name())?;
        let w = bf16_slice(s2, l2, self.name())?;
        let (n, o) = l1.shape().dims2()?;
        let (wo, i) = l2.shape().dims2()?;
        if wo != o || g.len() != n * o {
            candle_core::bail!(
                "{}: shapes {:?} · {:?} do not fit",
                self.name(),
                l1.dims(),
                l2.dims()
            );
        }
        let mut out = vec![0f32; n * i];
        // B = W is (o, i) row-major.
        super::bf16::matmul_f32_bf16(n, i, o, g, o, 1, w, i, 1, &mut out, i, false)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", self.name())))?;
        Ok((CpuStorage::F32(out), Shape::from_dims(&[n, i])))
    }
}

impl CustomOp2 for FrozenLinearCpu {
    fn name(&self) -> &'static str {
        "ft-frozen-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Self::run(slice(s1, l1, "ft-frozen-linear")?, l1, s2, l2, None)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(input_grad(grad, w)?), None))
    }
}

impl CustomOp3 for FrozenLinearCpu {
    fn name(&self) -> &'static str {
        "ft-frozen-linear-plus"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let u = slice(s3, l3, "ft-frozen-linear-plus")?;
        Self::run(slice(s1, l1, "ft-frozen-linear-plus")?, l1, s2, l2, Some(u))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((Some(input_grad(grad, w)?), None, Some(grad.clone())))
    }
}

/// `x · Wᵀ (+ update)` for a frozen `weight` (out, in), 2-D `x` (N, in) and an optional (N, out)
/// `update` (the LoRA term): gradients flow to `x` and `update`, never to `weight`.
pub fn frozen_linear_plus(x: &Tensor, weight: &Tensor, update: Option<&Tensor>) -> Result<Tensor> {
    // Mixed precision (bf16 weights, f32 activations) has no composed fallback: the weight is
    // widened for the reference path.
    let widened;
    let weight = if weight.dtype() != x.dtype() && (disabled() || !x.device().is_cpu()) {
        widened = weight.to_dtype(x.dtype())?;
        &widened
    } else {
        weight
    };
    if disabled() {
        let y = x.matmul(&weight.t()?)?;
        return match update {
            Some(u) => y + u,
            None => Ok(y),
        };
    }
    let weight_ok = weight.device().is_cpu() && matches!(weight.dtype(), DType::F32 | DType::BF16);
    if fusable(x) && weight_ok {
        let (x, w) = (x.contiguous()?, weight.contiguous()?);
        return match update {
            Some(u) => x.apply_op3(&w, &u.contiguous()?, FrozenLinearCpu),
            None if x.track_op() || w.dtype() != x.dtype() => x.apply_op2(&w, FrozenLinearCpu),
            None => x.matmul(&w.t()?),
        };
    }
    let y = x.detach().matmul(&weight.t()?)?;
    let y = if x.track_op() {
        (y + x.apply_op1(FrozenLinearGrad {
            weight: weight.clone(),
        })?)?
    } else {
        y
    };
    match update {
        Some(u) => y + u,
        None => Ok(y),
    }
}

/// `x · Wᵀ` for a frozen `weight` (out, in) and 2-D `x` (N, in): gradient to `x` only.
pub fn frozen_linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    frozen_linear_plus(x, weight, None)
}

// ---------------------------------------------------------------- softmax

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "ft-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let d = last_dim(l)?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(o, x)| {
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for (o, &v) in o.iter_mut().zip(x) {
                    *o = (v - max).exp();
                    sum += *o;
                }
                let inv = 1.0 / sum;
                o.iter_mut().for_each(|o| *o *= inv);
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // dx = y ⊙ (g − Σ g⊙y)
        Ok(Some(
            res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBwd)?,
        ))
    }
}

struct SoftmaxBwd;

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "ft-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = slice(s1, l1, self.name())?;
        let g = slice(s2, l2, self.name())?;
        let d = last_dim(l1)?;
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(d)
            .zip(y.par_chunks(d).zip(g.par_chunks(d)))
            .for_each(|(o, (y, g))| {
                let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
                for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
                    *o = y * (g - dot);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Softmax over the last dim, differentiable.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fusable(x) {
        x.contiguous()?.apply_op1(Softmax)
    } else {
        ops::softmax_last_dim_composed(x)
    }
}

// ---------------------------------------------------------------- RMSNorm

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "ft-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let w = slice(s2, l2, self.name())?;
        let d = last_dim(l1)?;
        let eps = self.eps;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(o, x)| {
                let ms = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
                let r = 1.0 / (ms + eps).sqrt();
                for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
                    *o = x * r * w;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let x = x.contiguous()?;
        let g = grad.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &g, &RmsNormBwdX { eps: self.eps })?;
        // dw = Σ_rows g ⊙ x·r: only needed when the weight itself is trained (never for frozen
        // base norms, but Candle asks for every input's gradient that it tracks).
        let dw = if w.is_variable() || w.track_op() {
            let d = x.dim(D::Minus1)?;
            let r = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps as f64)?
                .sqrt()?
                .recip()?;
            Some((g * x.broadcast_mul(&r)?)?.reshape(((), d))?.sum(0)?)
        } else {
            None
        };
        Ok((Some(dx), dw))
    }
}

struct RmsNormBwdX {
    eps: f32,
}

impl CustomOp3 for RmsNormBwdX {
    fn name(&self) -> &'static str {
        "ft-rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let w = slice(s2, l2, self.name())?;
        let g = slice(s3, l3, self.name())?;
        let d = last_dim(l1)?;
        let eps = self.eps;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d).zip(g.par_chunks(d)))
            .for_each(|(o, (x, g))| {
                // y = x·r·w, r = (mean x² + eps)^-½
                // dx = r·(w⊙g) − x·r³·(Σ w⊙g⊙x)/d
                let ms = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
                let r = 1.0 / (ms + eps).sqrt();
                let dot: f32 = x.iter().zip(g).zip(w).map(|((x, g), w)| x * g * w).sum();
                let c = r * r * r * dot / d as f32;
                for (((o, &x), &g), &w) in o.iter_mut().zip(x).zip(g).zip(w) {
                    *o = r * w * g - x * c;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// RMSNorm over the last dim, differentiable.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if fusable(x) && fusable(w) {
        x.contiguous()?
            .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
    } else {
        ops::rms_norm_composed(x, w, eps)
    }
}

// ---------------------------------------------------------------- cross-entropy

/// Per-row −log softmax(logits)[target] for (N, V) logits.
struct CrossEntropy {
    targets: std::sync::Arc<Vec<u32>>,
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "ft-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let v = last_dim(l)?;
        let n = x.len() / v;
        if n != self.targets.len() {
            candle_core::bail!("cross-entropy: {n} rows for {} targets", self.targets.len());
        }
        let mut out = vec![0f32; n];
        out.par_iter_mut()
            .zip(x.par_chunks(v).zip(self.targets.par_iter()))
            .for_each(|(o, (x, &t))| {
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let lse = x.iter().map(|&v| (v - max).exp()).sum::<f32>().ln() + max;
                *o = lse - x.get(t as usize).copied().unwrap_or(f32::NAN);
            });
        Ok((CpuStorage::F32(out), Shape::from_dims(&[n])))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = CrossEntropyBwd {
            targets: self.targets.clone(),
        };
        Ok(Some(
            arg.contiguous()?
                .apply_op2_no_bwd(&grad.contiguous()?, &op)?,
        ))
    }
}

struct CrossEntropyBwd {
    targets: std::sync::Arc<Vec<u32>>,
}

impl CustomOp2 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "ft-cross-entropy-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let g = slice(s2, l2, self.name())?;
        let v = last_dim(l1)?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(v)
            .zip(
                x.par_chunks(v)
                    .zip(g.par_iter().zip(self.targets.par_iter())),
            )
            .for_each(|(o, (x, (&g, &t)))| {
                // d/dx (lse − x_t) = softmax(x) − onehot(t)
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for (o, &v) in o.iter_mut().zip(x) {
                    *o = (v - max).exp();
                    sum += *o;
                }
                let scale = g / sum;
                o.iter_mut().for_each(|o| *o *= scale);
                if let Some(o) = o.get_mut(t as usize) {
                    *o -= g;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Mean cross-entropy of (N, V) `logits` against `targets` (N), as a scalar.
pub fn cross_entropy(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let n = targets.len();
    if fusable(logits) {
        let op = CrossEntropy {
            targets: std::sync::Arc::new(targets.to_vec()),
        };
        return logits.contiguous()?.apply_op1(op)?.sum_all()? / n as f64;
    }
    let t = Tensor::from_vec(targets.to_vec(), n, logits.device())?;
    ops::cross_entropy_composed(logits, &t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
        d.max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    fn grad_of(f: impl Fn(&Tensor) -> Result<Tensor>, x: &Var, upstream: &Tensor) -> Tensor {
        let y = f(x.as_tensor()).unwrap();
        let g = (y * upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        g.get(x).unwrap().clone()
    }

    #[test]
    fn frozen_linear_gives_the_input_gradient_only() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (5, 8), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1., (3, 8), &dev).unwrap();
        let up = Tensor::randn(0f32, 1., (5, 3), &dev).unwrap();
        let a = frozen_linear(x.as_tensor(), &w).unwrap();
        let b = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        assert_eq!(close(&a, &b), 0.0);
        let ga = grad_of(|t| frozen_linear(t, &w), &x, &up);
        let gb = grad_of(|t| t.matmul(&w.t()?), &x, &up);
        assert!(close(&ga, &gb) < 1e-5);
        let store = (a * &up).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(
            store.get(&w).is_none(),
            "no gradient is computed for the frozen weight"
        );
        // With an update term: value x·Wᵀ + u, gradient g to u.
        let u = Var::from_tensor(&Tensor::randn(0f32, 1., (5, 3), &dev).unwrap()).unwrap();
        let c = frozen_linear_plus(x.as_tensor(), &w, Some(u.as_tensor())).unwrap();
        let want = (b + u.as_tensor()).unwrap();
        assert!(close(&c, &want) < 1e-5);
        let store = (c * &up).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(close(store.get(&u).unwrap(), &up) < 1e-6);
        assert!(close(store.get(&x).unwrap(), &gb) < 1e-5);
    }

    #[test]
    fn softmax_matches_composed_forward_and_backward() {
        let x =
            Var::from_tensor(&Tensor::randn(0f32, 2., (3, 5, 17), &Device::Cpu).unwrap()).unwrap();
        let up = Tensor::randn(0f32, 1., (3, 5, 17), &Device::Cpu).unwrap();
        let a = softmax_last_dim(x.as_tensor()).unwrap();
        let b = ops::softmax_last_dim_composed(x.as_tensor()).unwrap();
        assert!(close(&a, &b) < 1e-6);
        let ga = grad_of(softmax_last_dim, &x, &up);
        let gb = grad_of(ops::softmax_last_dim_composed, &x, &up);
        assert!(close(&ga, &gb) < 1e-5);
    }

    #[test]
    fn rms_norm_matches_composed_forward_and_backward() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, 24), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.1, 24, &dev).unwrap()).unwrap();
        let up = Tensor::randn(0f32, 1., (2, 3, 24), &dev).unwrap();
        let fused = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        let composed = ops::rms_norm_composed(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        assert!(close(&fused, &composed) < 1e-5);
        let ga = (fused * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gb = (composed * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(close(ga.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-4);
        assert!(close(ga.get(&w).unwrap(), gb.get(&w).unwrap()) < 1e-4);
    }

    #[test]
    fn cross_entropy_matches_composed_forward_and_backward() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 3., (6, 50), &dev).unwrap()).unwrap();
        let targets = [3u32, 0, 49, 7, 7, 12];
        let t = Tensor::new(&targets, &dev).unwrap();
        let a = cross_entropy(x.as_tensor(), &targets).unwrap();
        let b = ops::cross_entropy_composed(x.as_tensor(), &t).unwrap();
        let (a_val, b_val) = (a.to_scalar::<f32>().unwrap(), b.to_scalar::<f32>().unwrap());
        assert!((a_val - b_val).abs() < 1e-5);
        let ga = a.backward().unwrap();
        let gb = b.backward().unwrap();
        assert!(close(ga.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-6);
    }
}
