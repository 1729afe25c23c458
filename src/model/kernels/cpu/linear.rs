//! The frozen linear projection `x · Wᵀ (+ u)` on the CPU: gradients go to `x` and the LoRA term
//! `u`, never to the frozen `W` (Candle's matmul backward would compute and keep a weight-sized
//! gradient nobody uses). One gemm writes straight into the output, with `W` in f32 (`gemm`) or
//! bf16 (the mixed-precision kernel, [`crate::model::bf16`], AVX512-BF16 or portable); a few rows
//! (decoding) go through [`gemv`], which reads each weight once.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::{gemv, slice};
use crate::model::bf16;

/// CPU kernel for `x · Wᵀ (+ u)`: one gemm straight into the output, so the graph keeps a single
/// (N, out) tensor per projection instead of one per elementary op (and no zeros tensor).
/// Backward: `g · W` to `x`, `g` to `u`, nothing to `W`.
pub(super) struct FrozenLinearCpu;

/// Inner-dimension block of the f32 products ([`FrozenLinearCpu::gemm`]).
const K_BLOCK: usize = 128;

impl FrozenLinearCpu {
    /// out (n, o) = x (n, i) · wᵀ, accumulated onto `out`'s current contents when `accumulate`.
    ///
    /// The `gemm` crate sums each output over the whole of `i` in one chain of FMAs (up to its
    /// cache block), whose rounding error grows with the running sum: 3–10× that of PyTorch's f32
    /// products on SmolLM2's projections, which its massive activations (residuals of ~25,000
    /// that a later MLP cancels) carry to the logits. Summing blocks of [`K_BLOCK`] and adding
    /// the blocks keeps the chains short, at one more pass over `out` per block (f32 mode
    /// trains ~4% slower; the bf16 mode's products are not these).
    pub(super) fn gemm(
        x: &[f32],
        w: &[f32],
        out: &mut [f32],
        n: usize,
        i: usize,
        o: usize,
        accumulate: bool,
    ) {
        #[cfg(target_os = "macos")]
        if super::accelerate::enabled()
            && super::accelerate::sgemm_xwt(x, w, out, (n, i, o), accumulate)
        {
            return;
        }
        let threads = rayon::current_num_threads();
        let par = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        let mut k0 = 0;
        while k0 < i {
            let kb = K_BLOCK.min(i - k0);
            let acc = accumulate || k0 > 0;
            // SAFETY: the slices hold exactly n·i, o·i and n·o f32 (checked by the callers), the
            // strides describe row-major x and out and the transposed view of row-major w, the
            // block's columns k0..k0+kb lie inside both x's and w's rows, and `out` does not
            // alias the inputs.
            unsafe {
                gemm::gemm(
                    n,
                    o,
                    kb,
                    out.as_mut_ptr(),
                    1,
                    o as isize,
                    acc,
                    x.as_ptr().add(k0),
                    1,
                    i as isize,
                    w.as_ptr().add(k0),
                    i as isize,
                    1,
                    if acc { 1.0 } else { 0.0 },
                    1.0,
                    false,
                    false,
                    false,
                    par,
                );
            }
            k0 += kb;
        }
    }

    /// `w` is f32 (gemm) or bf16 (the mixed-precision kernel, [`crate::model::bf16`]).
    fn run(
        x: &[f32],
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        u: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let out = Self::product(x, lx, w, lw, u.map(<[f32]>::to_vec))?;
        let (n, o) = (lx.dims()[0], lw.dims()[0]);
        Ok((CpuStorage::F32(out), Shape::from_dims(&[n, o])))
    }

    /// `x · wᵀ` (n, o), added onto `init` when given (which it then holds).
    pub(super) fn product(
        x: &[f32],
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        init: Option<Vec<f32>>,
    ) -> Result<Vec<f32>> {
        let (n, i) = lx.shape().dims2()?;
        let (o, wi) = lw.shape().dims2()?;
        if wi != i || x.len() != n * i || init.as_ref().is_some_and(|u| u.len() != n * o) {
            candle_core::bail!(
                "frozen linear: shapes {:?} · {:?}ᵀ do not fit",
                lx.dims(),
                lw.dims()
            );
        }
        let accumulate = init.is_some();
        let product = |out: &mut [f32]| -> Result<()> {
            match w {
                CpuStorage::BF16(_) if n <= gemv::MAX_ROWS => {
                    let w = bf16_slice(w, lw, "ft-frozen-linear")?;
                    gemv::gemv(x, w, out, n, i, o, accumulate);
                }
                CpuStorage::BF16(_) => {
                    let w = bf16_slice(w, lw, "ft-frozen-linear")?;
                    // out (n, o) = x (n, i) · wᵀ: B = wᵀ is (i, o), rows 1 apart, columns i apart.
                    bf16::matmul_f32_bf16(n, o, i, x, i, 1, w, 1, i, out, o, accumulate)
                        .map_err(|e| candle_core::Error::Msg(format!("frozen linear: {e}")))?;
                }
                _ => {
                    let w = slice(w, lw, "ft-frozen-linear")?;
                    if w.len() != o * i {
                        candle_core::bail!("frozen linear: weight is not {o}×{i}");
                    }
                    if n <= gemv::MAX_ROWS {
                        gemv::gemv(x, w, out, n, i, o, accumulate);
                    } else {
                        Self::gemm(x, w, out, n, i, o, accumulate);
                    }
                }
            }
            Ok(())
        };
        let out = match init {
            Some(mut u) => {
                product(&mut u)?;
                u
            }
            // An empty sum: zeros (`gemm` would write nothing).
            None if i == 0 => vec![0f32; n * o],
            // SAFETY: without `init` every product runs in overwrite mode (`accumulate` false):
            // gemv, the bf16 matmuls and `gemm` write each of the n·o outputs, reading none.
            None => unsafe { super::written_by(n * o, product)? },
        };
        Ok(out)
    }
}

/// The contiguous bf16 slice of a storage/layout pair, or an error.
pub(super) fn bf16_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [half::bf16]> {
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

/// `out (n, i) = g (n, o) · W (o, i)` with f32 `g` and bf16 `W`.
pub(super) fn mixed_grad_x(
    g: &[f32],
    w: &[half::bf16],
    (n, o, i): (usize, usize, usize),
    out: &mut [f32],
) -> Result<()> {
    // B = W is (o, i) row-major.
    bf16::matmul_f32_bf16(n, i, o, g, o, 1, w, i, 1, out, i, false)
        .map_err(|e| candle_core::Error::Msg(format!("ft-mixed-grad-x: {e}")))
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
        // SAFETY: `mixed_grad_x` writes every element (the bf16 matmul in overwrite mode, zeros
        // for an empty sum) and reads none.
        let out = unsafe { super::written_by(n * i, |out| mixed_grad_x(g, w, (n, o, i), out))? };
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

/// `x · Wᵀ (+ update)` for a frozen `weight` (out, in) in f32 or bf16, a CPU f32 2-D `x` (N, in)
/// and an optional (N, out) `update` (the LoRA term): gradients flow to `x` and `update`, never
/// to `weight`.
pub fn frozen_linear_plus(x: &Tensor, weight: &Tensor, update: Option<&Tensor>) -> Result<Tensor> {
    let (x, w) = (x.contiguous()?, weight.contiguous()?);
    match update {
        Some(u) => x.apply_op3(&w, &u.contiguous()?, FrozenLinearCpu),
        None => x.apply_op2(&w, FrozenLinearCpu),
    }
}

/// True when the kernel takes `weight` (on the CPU, f32 or bf16).
pub(crate) fn weight_fits(weight: &Tensor) -> bool {
    weight.device().is_cpu() && matches!(weight.dtype(), DType::F32 | DType::BF16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::cpu::tests::{close, grad_of};
    use candle_core::{Device, Var};

    /// The f32 product sums its inner dimension in short chains. Rows as a model's massive
    /// activations make them (SmolLM2's MLP inputs: a few entries in the thousands among ones
    /// near 1), where one chain of FMAs over the whole row (the `gemm` crate's) carries a large
    /// running sum through every addition. Against an f64 sum, on fixed pseudo-random data: 8.4e-5
    /// in blocks of 128, 1.6e-4 in one chain (measured with `K_BLOCK = usize::MAX`). On SmolLM2
    /// itself the blocks took the f32 logits from 1.2e-3 to 6.3e-5 off a float64 transformers
    /// run (PyTorch's f32: 6.9e-5), the massive activations amplifying each product's error.
    #[test]
    fn f32_products_sum_in_short_chains() {
        let (n, i, o) = (8, 1536, 64);
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let mut x: Vec<f32> = (0..n * i).map(|_| next()).collect();
        let w: Vec<f32> = (0..o * i).map(|_| next() * 0.05).collect();
        for r in 0..n {
            for (k, v) in [(40, 2500.0), (400, -1800.0), (1000, 3000.0)] {
                x[r * i + k] = v;
            }
        }
        let dev = Device::Cpu;
        let y = frozen_linear_plus(
            &Tensor::from_vec(x.clone(), (n, i), &dev).unwrap(),
            &Tensor::from_vec(w.clone(), (o, i), &dev).unwrap(),
            None,
        )
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
        let mut worst = 0f64;
        for (r, xr) in x.chunks(i).enumerate() {
            for (j, wr) in w.chunks(i).enumerate() {
                let want: f64 = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
                worst = worst.max((y[r * o + j] as f64 - want).abs());
            }
        }
        assert!(worst < 1.2e-4, "error {worst:.2e}");
    }

    #[test]
    fn frozen_linear_gives_the_input_gradient_only() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (5, 8), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1., (3, 8), &dev).unwrap();
        let up = Tensor::randn(0f32, 1., (5, 3), &dev).unwrap();
        let frozen_linear = |x: &Tensor, w: &Tensor| frozen_linear_plus(x, w, None);
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
}
