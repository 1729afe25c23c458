//! RoPE (rotate-half, as transformers applies it) on the CPU with its backward: one pass over q
//! or k on every core, the inner loop compiled for AVX-512, AVX2+FMA or the portable form as the
//! CPU allows ([`super::exp::path`]). With `x = [x₁, x₂]` (halves of the head dim) and the tables
//! `c = [c₁, c₂]`, `s = [s₁, s₂]`:
//!
//! `y = [x₁c₁ − x₂s₁, x₂c₂ + x₁s₂]`, and its gradient `dx = [g₁c₁ + g₂s₂, g₂c₂ − g₁s₁]`.
//!
//! The graph keeps the op's output and input only (the composed form kept five tensors per call
//! and Candle stored gradients for the broadcast tables).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::exp::path;
#[cfg(target_arch = "x86_64")]
use super::exp::Path;
use super::slice;

/// RoPE on `x` `(B, H, T, Dh)` f32 with `cos`/`sin` `(B or 1, 1, T, Dh)`; gradient to `x`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        Rope { inverse: false },
    )
}

/// The forward (`inverse: false`) or its transpose, the backward.
struct Rope {
    inverse: bool,
}

/// One row of `d` values: `out` from `x` and the row's tables.
#[inline(always)]
fn row(x: &[f32], c: &[f32], s: &[f32], out: &mut [f32], inverse: bool) {
    let h = x.len() / 2;
    let (x1, x2) = x.split_at(h);
    let (c1, c2) = c.split_at(h);
    let (s1, s2) = s.split_at(h);
    let (o1, o2) = out.split_at_mut(h);
    // Every slice cut to h: the loops below then run without bounds checks, in vector lanes.
    let (x1, x2, c1, c2, s1, s2) = (&x1[..h], &x2[..h], &c1[..h], &c2[..h], &s1[..h], &s2[..h]);
    let (o1, o2) = (&mut o1[..h], &mut o2[..h]);
    if inverse {
        for i in 0..h {
            o1[i] = x1[i] * c1[i] + x2[i] * s2[i];
            o2[i] = x2[i] * c2[i] - x1[i] * s1[i];
        }
    } else {
        for i in 0..h {
            o1[i] = x1[i] * c1[i] - x2[i] * s1[i];
            o2[i] = x2[i] * c2[i] + x1[i] * s2[i];
        }
    }
}

/// One head's `(T, Dh)` slab.
#[inline(always)]
fn slab(x: &[f32], c: &[f32], s: &[f32], out: &mut [f32], d: usize, inverse: bool) {
    for (((x, c), s), o) in x
        .chunks_exact(d)
        .zip(c.chunks_exact(d))
        .zip(s.chunks_exact(d))
        .zip(out.chunks_exact_mut(d))
    {
        row(x, c, s, o, inverse);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn slab_avx512(x: &[f32], c: &[f32], s: &[f32], out: &mut [f32], d: usize, inverse: bool) {
    slab(x, c, s, out, d, inverse)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn slab_avx2(x: &[f32], c: &[f32], s: &[f32], out: &mut [f32], d: usize, inverse: bool) {
    slab(x, c, s, out, d, inverse)
}

fn slab_on(x: &[f32], c: &[f32], s: &[f32], out: &mut [f32], d: usize, inverse: bool) {
    match path() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F (checked here; std caches the answer).
        Path::Avx512 if is_x86_feature_detected!("avx512f") => unsafe {
            slab_avx512(x, c, s, out, d, inverse)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2 and FMA (checked here).
        Path::Avx2 if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") => unsafe {
            slab_avx2(x, c, s, out, d, inverse)
        },
        _ => slab(x, c, s, out, d, inverse),
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "ft-rope"
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
        let op = self.name();
        let (x, c, s) = (slice(s1, l1, op)?, slice(s2, l2, op)?, slice(s3, l3, op)?);
        let (b, h, t, d) = l1.shape().dims4()?;
        let (tb, one, tt, td) = l2.shape().dims4()?;
        let fits = one == 1 && tt == t && td == d && (tb == 1 || tb == b) && d % 2 == 0;
        if !fits || l3.shape() != l2.shape() {
            candle_core::bail!("{op}: tables {:?} do not fit {:?}", l2.dims(), l1.dims());
        }
        let slab_len = t * d;
        if x.len() != b * h * slab_len || c.len() != tb * slab_len || s.len() != c.len() {
            candle_core::bail!("{op}: x or the tables do not hold their shapes' values");
        }
        if x.is_empty() {
            return Ok((CpuStorage::F32(Vec::new()), l1.shape().clone()));
        }
        let inverse = self.inverse;
        let fill = |out: &mut [f32]| -> Result<()> {
            out.par_chunks_mut(slab_len)
                .zip(x.par_chunks(slab_len))
                .enumerate()
                .for_each(|(i, (o, x))| {
                    // Slab i is batch row i / h; the tables have one slab per batch row or one.
                    let tab = if tb == 1 { 0 } else { i / h } * slab_len;
                    let (c, s) = (&c[tab..tab + slab_len], &s[tab..tab + slab_len]);
                    slab_on(x, c, s, o, d, inverse);
                });
            Ok(())
        };
        // SAFETY: out and x have the same length, a whole number of slabs (checked); each slab is
        // whole rows of d (even) values, and `row` writes both halves of every row.
        let out = unsafe { super::written_by(x.len(), fill)? };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let inverse = Rope {
            inverse: !self.inverse,
        };
        let dx = g.contiguous()?.apply_op3_no_bwd(cos, sin, &inverse)?;
        Ok((Some(dx), None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::close;
    use super::*;
    use crate::model::kernels::composed;
    use candle_core::{Device, Var};

    /// Value and gradient equal the composed form's, with per-batch tables whose halves differ
    /// (so a swapped half of the table would show).
    #[test]
    fn rope_matches_composed_forward_and_backward() {
        let dev = Device::Cpu;
        for tb in [1, 2] {
            let (b, h, t, d) = (2, 3, 7, 10);
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1., (b, h, t, d), &dev).unwrap()).unwrap();
            let cos = Tensor::randn(0f32, 1., (tb, 1, t, d), &dev).unwrap();
            let sin = Tensor::randn(0f32, 1., (tb, 1, t, d), &dev).unwrap();
            let up = Tensor::randn(0f32, 1., (b, h, t, d), &dev).unwrap();
            let run = |fused: bool| {
                let y = if fused {
                    rope(x.as_tensor(), &cos, &sin).unwrap()
                } else {
                    composed::rope(x.as_tensor(), &cos, &sin).unwrap()
                };
                let g = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
                (y, g.get(&x).unwrap().clone())
            };
            let (a, want) = (run(true), run(false));
            assert!(close(&a.0, &want.0) < 1e-6, "tables {tb}: value");
            assert!(close(&a.1, &want.1) < 1e-6, "tables {tb}: gradient");
        }
    }
}
