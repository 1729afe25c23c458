//! FineTune's CPU kernels with a backward pass for the hottest ops of training: softmax over the
//! last dim (attention), RMSNorm, RoPE ([`rope`]), SwiGLU ([`swiglu`]), the cross-entropy of the
//! loss (every softmax row through the vectorized exp of `exp`), and the frozen linear projection
//! ([`linear`]: f32 weights through `gemm`, bf16 weights through the mixed-precision kernel of
//! `model::bf16`, AVX512-BF16 or portable). The flash attention kernel with its backward lives
//! beside its backward in `model::attention`. Candle's own fused versions record no backward op;
//! the composed versions (`kernels::composed`) are differentiable but allocate a full tensor per
//! elementary op. These are `CustomOp`s: a forward kernel and a `bwd` that is itself a fused
//! kernel, proven against the composed ops by the tests below and the parity fixtures.
//! f32 activations on the CPU only: [`super::plan`] says when they run.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D,
};
use rayon::prelude::*;

#[cfg(target_os = "macos")]
pub mod accelerate;
mod exp;
pub mod gemv;
mod rope;
pub(crate) mod strided;
mod swiglu;

pub(crate) use exp::{exp_in_place, max as row_max};
pub use rope::rope;
pub use swiglu::swiglu;
mod linear;
mod lora;
mod lowrank;

pub use linear::frozen_linear_plus;
pub(crate) use linear::weight_fits as linear_weight_fits;
pub use lora::lora_linear;

/// True when `t` is what these kernels take: an f32 tensor on the CPU.
pub(crate) fn fits(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
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

pub(crate) fn last_dim(l: &Layout) -> Result<usize> {
    l.dims()
        .last()
        .copied()
        .ok_or_else(|| candle_core::Error::Msg("scalar input".into()))
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
                let max = exp::max(x);
                o.copy_from_slice(x);
                let inv = 1.0 / exp::exp_in_place(o, max);
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

/// Softmax over the last dim of a CPU f32 `x`, differentiable.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
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

/// RMSNorm over the last dim of a CPU f32 `x` with an f32 `w`, differentiable.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
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
                let max = exp::max(x);
                let lse = exp::sum_exp(x, max).ln() + max;
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
        let rows = x.len() / v.max(1);
        if rows * v != x.len() || g.len() != rows || self.targets.len() != rows {
            candle_core::bail!(
                "{}: {rows} rows, {} gradients, {} targets",
                self.name(),
                g.len(),
                self.targets.len()
            );
        }
        let fill = |out: &mut [f32]| -> Result<()> {
            out.par_chunks_mut(v.max(1))
                .zip(
                    x.par_chunks(v.max(1))
                        .zip(g.par_iter().zip(self.targets.par_iter())),
                )
                .for_each(|(o, (x, (&g, &t)))| {
                    // d/dx (lse − x_t) = softmax(x) − onehot(t)
                    let max = exp::max(x);
                    o.copy_from_slice(x);
                    let scale = g / exp::exp_in_place(o, max);
                    o.iter_mut().for_each(|o| *o *= scale);
                    if let Some(o) = o.get_mut(t as usize) {
                        *o -= g;
                    }
                });
            Ok(())
        };
        // SAFETY: x is `rows` whole rows of v, and every row has its gradient and target
        // (checked), so each row of out is written whole by `copy_from_slice` before it is read.
        let out = unsafe { written_by(x.len(), fill)? };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Mean cross-entropy of CPU f32 (N, V) `logits` against `targets` (N), as a scalar.
pub fn cross_entropy(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let op = CrossEntropy {
        targets: std::sync::Arc::new(targets.to_vec()),
    };
    logits.contiguous()?.apply_op1(op)?.sum_all()? / targets.len() as f64
}

/// `n` f32 written by `fill`, with no zeroing pass first. Zeroing every kernel output
/// (`vec![0.0; n]`, which glibc's `calloc` fills with `memset` once memory is recycled) was ~8% of
/// a CPU training step's samples. The buffer becomes a `Vec<f32>` only after `fill` returns `Ok`;
/// on an error it is dropped unread.
///
/// # Safety
/// `fill` must write every element of its slice, and read none before writing it (a kernel in
/// overwrite mode).
pub(crate) unsafe fn written_by(
    n: usize,
    fill: impl FnOnce(&mut [f32]) -> Result<()>,
) -> Result<Vec<f32>> {
    let mut buf: Vec<std::mem::MaybeUninit<f32>> = Vec::with_capacity(n);
    // SAFETY: `MaybeUninit` needs no initialisation and the capacity is `n`.
    unsafe { buf.set_len(n) };
    // SAFETY: the pointer and length are the buffer's own, f32 and MaybeUninit<f32> share their
    // layout, and (the caller's contract) no element is read before it is written.
    fill(unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<f32>(), n) })?;
    let mut buf = std::mem::ManuallyDrop::new(buf);
    // SAFETY: `fill` wrote all `n` elements; the allocation moves to a Vec of the same layout.
    Ok(unsafe { Vec::from_raw_parts(buf.as_mut_ptr().cast::<f32>(), n, buf.capacity()) })
}

/// Runs `f` on a CPU tensor's storage and layout (inside an op that holds the tensor); errs,
/// naming `op`, for a tensor on another device.
pub(crate) fn with_cpu<R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&CpuStorage, &Layout) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(s) = &*storage else {
        candle_core::bail!("{op}: expected a CPU tensor");
    };
    f(s, layout)
}

/// [`with_cpu`] for a contiguous f32 tensor: its values and layout.
pub(crate) fn with_f32<R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&[f32], &Layout) -> Result<R>,
) -> Result<R> {
    with_cpu(t, op, |s, l| f(slice(s, l, op)?, l))
}

/// A value an op's forward keeps for its backward (a poisoned lock still holds it).
pub(crate) struct Saved<T>(std::sync::Mutex<Option<T>>);

impl<T> Saved<T> {
    /// Nothing saved yet.
    pub(crate) fn new() -> Self {
        Self(std::sync::Mutex::new(None))
    }

    /// The slot, whether or not a holder panicked.
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<T>> {
        match self.0.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        }
    }

    /// Keeps `value`, replacing what was kept.
    pub(crate) fn set(&self, value: T) {
        *self.slot() = Some(value);
    }

    /// What is kept, leaving nothing (its memory goes when the caller drops it).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn take(&self) -> Option<T> {
        self.slot().take()
    }
}

impl<T: Clone> Saved<T> {
    /// What is kept, if anything.
    pub(crate) fn get(&self) -> Option<T> {
        self.slot().clone()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::composed;
    use super::*;
    use candle_core::{Device, Var};

    pub(crate) fn close(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
        d.max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    pub(crate) fn grad_of(
        f: impl Fn(&Tensor) -> Result<Tensor>,
        x: &Var,
        upstream: &Tensor,
    ) -> Tensor {
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
    fn softmax_matches_composed_forward_and_backward() {
        let x =
            Var::from_tensor(&Tensor::randn(0f32, 2., (3, 5, 17), &Device::Cpu).unwrap()).unwrap();
        let up = Tensor::randn(0f32, 1., (3, 5, 17), &Device::Cpu).unwrap();
        let a = softmax_last_dim(x.as_tensor()).unwrap();
        let b = composed::softmax_last_dim(x.as_tensor()).unwrap();
        assert!(close(&a, &b) < 1e-6);
        let ga = grad_of(softmax_last_dim, &x, &up);
        let gb = grad_of(composed::softmax_last_dim, &x, &up);
        assert!(close(&ga, &gb) < 1e-5);
    }

    #[test]
    fn rms_norm_matches_composed_forward_and_backward() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, 24), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.1, 24, &dev).unwrap()).unwrap();
        let up = Tensor::randn(0f32, 1., (2, 3, 24), &dev).unwrap();
        let fused = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        let composed = composed::rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
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
        let b = composed::cross_entropy(x.as_tensor(), &t).unwrap();
        let (a_val, b_val) = (a.to_scalar::<f32>().unwrap(), b.to_scalar::<f32>().unwrap());
        assert!((a_val - b_val).abs() < 1e-5);
        let ga = a.backward().unwrap();
        let gb = b.backward().unwrap();
        assert!(close(ga.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-6);
    }
}
