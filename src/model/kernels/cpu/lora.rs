//! The LoRA projection `x · Wᵀ + s · (x · Aᵀ) · Bᵀ` as one op on the CPU, with its own backward:
//! a frozen `W` (out, in) in f32 or bf16, f32 `x` (N, in), `A` (r, in) and `B` (out, r).
//!
//! The graph keeps x, A, B and the output; the op keeps `h = s · x · Aᵀ` (N, r, a few KB) for its
//! backward, which writes every gradient straight into one buffer, with no tensor between:
//! `gb = s · g · B` (N, r), `dx = g · W + gb · A`, `dA = gbᵀ · x`, `dB = gᵀ · h`. The forward adds
//! the LoRA term onto the frozen product's own output. (Composed, the term and the gradients took
//! eight Candle ops, each with its output buffer, and x was read once more to recompute h.)

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::gemv;
use super::linear::{bf16_slice, mixed_grad_x, FrozenLinearCpu};
use super::lowrank::{dots, reduce, transposed, update};
use super::strided::gemm;
use super::{slice, with_cpu, with_f32, Saved};
use crate::model::bf16;

/// `x · Wᵀ + scale · (x · Aᵀ) · Bᵀ` as one op (see the module doc). Gradients to x, A and B,
/// never to W.
pub fn lora_linear(
    x: &Tensor,
    weight: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let op = LoraLinearCpu {
        weight: weight.contiguous()?,
        scale: scale as f32,
        h: Saved::new(),
    };
    x.contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

struct LoraLinearCpu {
    weight: Tensor,
    scale: f32,
    /// `scale · x · Aᵀ` (N, r) from the forward.
    h: Saved<Arc<Vec<f32>>>,
}

/// The sizes of one projection: rows, in, out, rank.
#[derive(Clone, Copy)]
struct Dims {
    n: usize,
    i: usize,
    o: usize,
    r: usize,
}

impl Dims {
    /// Checks x (n, i), A (r, i), B (o, r) against their slices.
    fn of(
        op: &str,
        (x, lx): (&[f32], &Layout),
        a: (&[f32], &Layout),
        b: (&[f32], &Layout),
    ) -> Result<Self> {
        let (n, i) = lx.shape().dims2()?;
        let (r, ai) = a.1.shape().dims2()?;
        let (o, br) = b.1.shape().dims2()?;
        if ai != i || br != r || x.len() != n * i || a.0.len() != r * i || b.0.len() != o * r {
            candle_core::bail!(
                "{op}: x {:?}, A {:?}, B {:?} do not fit",
                lx.dims(),
                a.1.dims(),
                b.1.dims()
            );
        }
        Ok(Self { n, i, o, r })
    }
}

/// `h = scale · x · Aᵀ` (n, r).
fn low_rank_input(x: &[f32], a: &[f32], d: Dims, scale: f32) -> Result<Vec<f32>> {
    let mut h = vec![0f32; d.n * d.r];
    dots(x, a, &mut h, (d.n, d.i, d.r), scale)?;
    Ok(h)
}

/// `out (n, o) = x (n, k) · B` on the bf16 kernel, with the rank-r work done on each block of
/// rows while it is in cache (`bf16::matmul_f32_bf16_rows`): `packed(first row, x's rows, side's
/// rows)`, then `done(first row, side's rows, out's rows)`; side holds r values a row.
fn low_rank_into(
    (n, o, k): (usize, usize, usize),
    (x, b): (&[f32], (&[half::bf16], usize, usize)),
    out: &mut [f32],
    (side, r): (&mut [f32], usize),
    packed: impl Fn(usize, &[f32], &mut [f32]) -> Result<()> + Sync,
    done: impl Fn(usize, &[f32], &mut [f32]) -> Result<()> + Sync,
) -> Result<()> {
    let packed = |i0, x: &[f32], s: &mut [f32]| packed(i0, x, s).map_err(|e| e.to_string());
    let done = |i0, s: &[f32], out: &mut [f32]| done(i0, s, out).map_err(|e| e.to_string());
    let mut work = bf16::RowWork {
        side,
        width: r,
        packed: &packed,
        done: &done,
    };
    bf16::matmul_f32_bf16_rows((n, o, k), x, b, out, false, &mut work)
        .map_err(|e| candle_core::Error::Msg(format!("ft-lora-linear: {e}")))
}

impl CustomOp3 for LoraLinearCpu {
    fn name(&self) -> &'static str {
        "ft-lora-linear"
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
        let (x, a, b) = (slice(s1, l1, op)?, slice(s2, l2, op)?, slice(s3, l3, op)?);
        let d = Dims::of(op, (x, l1), (a, l2), (b, l3))?;
        let (n, o, r) = (d.n, d.o, d.r);
        let bt = transposed(b, o, r);
        let (out, h) = with_cpu(&self.weight, op, |w, lw| match w {
            CpuStorage::BF16(_) if n > gemv::MAX_ROWS && r > 0 => {
                // h = s · x · Aᵀ as x's rows are packed, out += h · Bᵀ as out's rows are done.
                let w = bf16_slice(w, lw, op)?;
                let mut h = vec![0f32; n * r];
                let fill = |out: &mut [f32]| {
                    low_rank_into(
                        (n, o, d.i),
                        (x, (w, 1, d.i)),
                        out,
                        (&mut h, r),
                        |_, x, h| dots(x, a, h, (h.len() / r, d.i, r), self.scale),
                        |_, h, out| update(h, &bt, out, (h.len() / r, r, o), 1.0, true),
                    )
                };
                // SAFETY: the product runs in overwrite mode (zeros for an empty sum) and writes
                // each row before `update` adds onto it.
                let out = unsafe { super::written_by(n * o, fill)? };
                Ok((out, h))
            }
            _ => {
                let h = low_rank_input(x, a, d, self.scale)?;
                let mut out = FrozenLinearCpu::product(x, l1, w, lw, None)?;
                // out += h · Bᵀ
                update(&h, &bt, &mut out, (n, r, o), 1.0, true)?;
                Ok((out, h))
            }
        })?;
        self.h.set(Arc::new(h));
        Ok((CpuStorage::F32(out), Shape::from_dims(&[n, o])))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = self.h.get();
        let op = LoraLinearBwd {
            weight: self.weight.clone(),
            a: a.contiguous()?,
            b: b.contiguous()?,
            scale: self.scale,
            h,
        };
        let all = x.contiguous()?.apply_op2_no_bwd(&g.contiguous()?, &op)?;
        let (nx, na, nb) = (x.elem_count(), a.elem_count(), b.elem_count());
        let dx = all.narrow(0, 0, nx)?.reshape(x.shape())?;
        // A's and B's gradients (kept until the optimizer's step) get storages of their own, so
        // that they do not keep x's buffer alive (`Tensor::copy` would clone the whole storage).
        let own = |start: usize, len: usize, like: &Tensor| {
            let v = all.narrow(0, start, len)?.to_vec1::<f32>()?;
            Tensor::from_vec(v, like.shape(), like.device())
        };
        let (da, db) = (own(nx, na, a)?, own(nx + na, nb, b)?);
        Ok((Some(dx), Some(da), Some(db)))
    }
}

/// The backward over (x, g): dx, dA and dB concatenated into one flat buffer.
struct LoraLinearBwd {
    weight: Tensor,
    a: Tensor,
    b: Tensor,
    scale: f32,
    /// The forward's `scale · x · Aᵀ`, recomputed if absent.
    h: Option<Arc<Vec<f32>>>,
}

impl CustomOp2 for LoraLinearBwd {
    fn name(&self) -> &'static str {
        "ft-lora-linear-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let (x, g) = (slice(s1, l1, op)?, slice(s2, l2, op)?);
        with_f32(&self.a, op, |a, la| {
            with_f32(&self.b, op, |b, lb| {
                let d = Dims::of(op, (x, l1), (a, la), (b, lb))?;
                if g.len() != d.n * d.o {
                    candle_core::bail!("{op}: the output gradient is not {}×{}", d.n, d.o);
                }
                let fresh;
                let h = match &self.h {
                    Some(h) if h.len() == d.n * d.r => h.as_slice(),
                    _ => {
                        fresh = low_rank_input(x, a, d, self.scale)?;
                        &fresh
                    }
                };
                let all = self.gradients(d, (x, g), (a, b), h)?;
                let len = all.len();
                Ok((CpuStorage::F32(all), Shape::from_dims(&[len])))
            })
        })
    }
}

impl LoraLinearBwd {
    /// [dx | dA | dB] for x (n, i), g (n, o), A (r, i), B (o, r) and h (n, r).
    fn gradients(
        &self,
        d: Dims,
        (x, g): (&[f32], &[f32]),
        (a, b): (&[f32], &[f32]),
        h: &[f32],
    ) -> Result<Vec<f32>> {
        let op = self.name();
        let Dims { n, i, o, r } = d;
        let fill = |all: &mut [f32]| -> Result<()> {
            let (dx, rest) = all.split_at_mut(n * i);
            let (da, db) = rest.split_at_mut(r * i);
            // gb = s · g · B (n, r): dot products of g's rows with Bᵀ's.
            let bt = transposed(b, o, r);
            let mut gb = vec![0f32; n * r];
            // dx = g · W (W (o, i) row-major), then + gb · A
            with_cpu(&self.weight, op, |w, lw| match w {
                CpuStorage::BF16(_) if r > 0 => {
                    // gb as g's rows are packed, dx += gb · A as dx's rows are done.
                    let w = bf16_slice(w, lw, op)?;
                    low_rank_into(
                        (n, i, o),
                        (g, (w, i, 1)),
                        dx,
                        (&mut gb, r),
                        |_, g, gb| dots(g, &bt, gb, (gb.len() / r, o, r), self.scale),
                        |_, gb, dx| update(gb, a, dx, (gb.len() / r, r, i), 1.0, true),
                    )
                }
                // Rank 0: no LoRA term.
                CpuStorage::BF16(_) => mixed_grad_x(g, bf16_slice(w, lw, op)?, (n, o, i), dx),
                _ => {
                    dots(g, &bt, &mut gb, (n, o, r), self.scale)?;
                    let w = slice(w, lw, op)?;
                    gemm(
                        op,
                        (n, i, o),
                        (&mut *dx, i),
                        false,
                        (g, o, 1),
                        (w, i, 1),
                        1.0,
                        true,
                    )?;
                    update(&gb, a, dx, (n, r, i), 1.0, true)
                }
            })?;
            // dA = gbᵀ · x (r, i); dB = gᵀ · h (o, r), as (hᵀ · g)ᵀ
            reduce(&gb, x, da, (n, r, i), 1.0)?;
            let mut dbt = vec![0f32; r * o];
            reduce(h, g, &mut dbt, (n, r, o), 1.0)?;
            db.copy_from_slice(&transposed(&dbt, r, o));
            Ok(())
        };
        // SAFETY: dx is written whole by the product (overwrite mode; zeros for an empty sum)
        // before `update` adds onto it, dA whole by `reduce`, dB by the copy at the end.
        let all = unsafe { super::written_by(n * i + r * i + o * r, fill)? };
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::cpu::frozen_linear_plus;
    use crate::model::kernels::cpu::tests::close;
    use candle_core::{DType, Device, Var};

    /// The one-op LoRA projection against the frozen kernel plus the composed LoRA term (the
    /// path it replaces), with f32 and bf16 weights and many rows (the products' own kernels):
    /// value and the gradients of x, A and B; none for W.
    #[test]
    fn lora_linear_equals_frozen_plus_composed_update() {
        let dev = Device::Cpu;
        let (i, o, r, s) = (48, 40, 4, 2.5);
        // Few rows (the frozen product's gemv) and many (its gemm), both weight dtypes.
        for (n, wdt) in [3, 300]
            .into_iter()
            .flat_map(|n| [DType::F32, DType::BF16].map(|w| (n, w)))
        {
            let var = |shape: (usize, usize), sd: f32| {
                Var::from_tensor(&Tensor::randn(0f32, sd, shape, &dev).unwrap()).unwrap()
            };
            let (x, a, b) = (var((n, i), 1.0), var((r, i), 0.3), var((o, r), 0.3));
            let w = Tensor::randn(0f32, 0.2, (o, i), &dev)
                .unwrap()
                .to_dtype(wdt)
                .unwrap();
            let up = Tensor::randn(0f32, 1., (n, o), &dev).unwrap();
            let run = |fused: bool| {
                let (xt, at, bt) = (x.as_tensor(), a.as_tensor(), b.as_tensor());
                let y = if fused {
                    lora_linear(xt, &w, at, bt, s).unwrap()
                } else {
                    let u = xt.matmul(&at.t()?)?.matmul(&(bt.t()? * s)?)?;
                    frozen_linear_plus(xt, &w, Some(&u)).unwrap()
                };
                let g = (&y * &up)?.sum_all()?.backward()?;
                assert!(g.get(&w).is_none(), "no gradient for the frozen weight");
                let grads = [&x, &a, &b].map(|v| g.get(v).unwrap().clone());
                Ok::<_, candle_core::Error>((y, grads))
            };
            let ((y, g), (y0, g0)) = (run(true).unwrap(), run(false).unwrap());
            let top = |t: &Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            let rel = |p: &Tensor, q: &Tensor| close(p, q) / top(q).to_scalar::<f32>().unwrap();
            assert!(rel(&y, &y0) < 1e-6, "{n} {wdt:?} value {}", rel(&y, &y0));
            for (name, (p, q)) in ["x", "A", "B"].iter().zip(g.iter().zip(&g0)) {
                assert!(rel(p, q) < 1e-5, "{n} {wdt:?} d{name}: {}", rel(p, q));
            }
        }
    }
}
