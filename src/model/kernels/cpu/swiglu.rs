//! SwiGLU, `silu(g) ⊙ u`, on the CPU with its backward: one pass over the elements on every
//! core, exp through the vectorized row loop ([`super::exp`]). The composed form is three Candle
//! ops forward (silu, its exp inside, the product) on one core and five backward, each a full
//! (N, I) tensor.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{exp, slice};

/// Elements per task: large enough to amortise the split, small enough for a scratch buffer on
/// the stack of each task to stay in L1/L2.
const CHUNK: usize = 4096;

/// `silu(gate) ⊙ up` for f32 CPU tensors of one shape; gradients to both.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

/// `e⁻ˣ` of each element of `x` into `out`.
fn exp_neg(x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = -v;
    }
    exp::exp_in_place(out, 0.0);
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "ft-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        if g.len() != u.len() {
            candle_core::bail!("swiglu: gate {:?} and up {:?} differ", l1.dims(), l2.dims());
        }
        let fill = |out: &mut [f32]| {
            out.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
                .for_each(|(o, (g, u))| {
                    exp_neg(g, o);
                    for (o, (&g, &u)) in o.iter_mut().zip(g.iter().zip(u)) {
                        *o = g * u / (1.0 + *o);
                    }
                });
            Ok(())
        };
        // SAFETY: g, u and out have the same length, so the chunks pair up whole; `exp_neg`
        // writes each chunk of `out` before the loop reads it back.
        let out = unsafe { super::written_by(g.len(), fill)? };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        da: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = g.apply_op3_no_bwd(u, &da.contiguous()?, &SwiGluBwd)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// Both gradients in one pass, stacked `(2, ...)`: with σ = sigmoid(g),
/// `dg = da·u·σ·(1 + g·(1 − σ))` and `du = da·g·σ`.
struct SwiGluBwd;

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "ft-swiglu-bwd"
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
        let (g, u, da) = (slice(s1, l1, op)?, slice(s2, l2, op)?, slice(s3, l3, op)?);
        if g.len() != u.len() || g.len() != da.len() {
            candle_core::bail!("{op}: inputs differ in size");
        }
        let n = g.len();
        let fill = |out: &mut [f32]| {
            let (dg, du) = out.split_at_mut(n);
            dg.par_chunks_mut(CHUNK)
                .zip(du.par_chunks_mut(CHUNK))
                .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
                .zip(da.par_chunks(CHUNK))
                .for_each(|(((dg, du), (g, u)), da)| {
                    exp_neg(g, dg);
                    for (i, (&g, (&u, &da))) in g.iter().zip(u.iter().zip(da)).enumerate() {
                        let sg = 1.0 / (1.0 + dg[i]);
                        dg[i] = da * u * sg * (1.0 + g * (1.0 - sg));
                        du[i] = da * g * sg;
                    }
                });
            Ok(())
        };
        // SAFETY: every input has n elements, so the chunks pair up whole; `exp_neg` writes each
        // chunk of dg before the loop reads it, and the loop writes every element of dg and du.
        let out = unsafe { super::written_by(2 * n, fill)? };
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((CpuStorage::F32(out), Shape::from_dims(&dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::close;
    use super::*;
    use crate::model::config::Activation;
    use crate::model::kernels::composed;
    use candle_core::{Device, Var};

    /// Values and both gradients equal the composed ops', over a range that reaches exp's
    /// saturation (|g| up to 120) and a length that is not a multiple of the chunk.
    #[test]
    fn swiglu_matches_composed_forward_and_backward() {
        let dev = Device::Cpu;
        let shape = (3, 7, 1001);
        let g = Tensor::randn(0f32, 4., shape, &dev).unwrap();
        let small = g.abs().unwrap().lt(10f32).unwrap();
        let g = small.where_cond(&g, &(&g * 12.0).unwrap()).unwrap();
        let g = Var::from_tensor(&g).unwrap();
        let u = Var::from_tensor(&Tensor::randn(0f32, 1., shape, &dev).unwrap()).unwrap();
        let up = Tensor::randn(0f32, 1., shape, &dev).unwrap();
        let run = |fused: bool| {
            let y = if fused {
                swiglu(g.as_tensor(), u.as_tensor()).unwrap()
            } else {
                composed::gated(g.as_tensor(), u.as_tensor(), Activation::Silu).unwrap()
            };
            let grads = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let gg = grads.get(&g).unwrap().clone();
            let gu = grads.get(&u).unwrap().clone();
            (y, gg, gu)
        };
        let (a, b) = (run(true), run(false));
        // Largest difference relative to the largest magnitude.
        let rel = |x: &Tensor, y: &Tensor| {
            let top = y.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            close(x, y) / top.to_scalar::<f32>().unwrap()
        };
        for (what, x, y) in [
            ("value", &a.0, &b.0),
            ("dg", &a.1, &b.1),
            ("du", &a.2, &b.2),
        ] {
            let e = rel(x, y);
            assert!(e < 1e-6, "{what}: {e}");
        }
    }
}
