//! Per-layer element and row ops on CUDA: RMSNorm, RoPE and SwiGLU, each with its own backward.

use super::*;

// ---------------------------------------------------------------- RMSNorm

/// RMSNorm over the last dim with a frozen `weight` (same dtype); gradient to `x` only.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let op = RmsNorm { eps: eps as f32 };
    x.contiguous()?.apply_op2(&weight.contiguous()?, op)
}

struct RmsNorm {
    eps: f32,
}

/// (rows, cols) of an RMSNorm input whose weight has one entry per column.
fn rms_dims(lx: &Layout, lw: &Layout, op: &str) -> Result<(usize, i32)> {
    let (rows, cols) = rows_cols(lx, op)?;
    if lw.shape().elem_count() != cols as usize {
        candle_core::bail!(
            "{op}: weight {:?} does not fit input {:?}",
            lw.dims(),
            lx.dims()
        );
    }
    Ok((rows, cols))
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "ft-cuda-rms-norm"
    }

    cuda_only!(2);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        w: &CudaStorage,
        lw: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let (rows, cols) = rms_dims(lx, lw, op)?;
        // A warp per row, eight a block (kernels.cu).
        let (rows_l, eps) = (rows as i64, self.eps);
        let dev = x.device();
        let out = launch!(
            op,
            dev,
            x.dtype(),
            "ft_rms_fwd",
            [(x, lx), (w, lw)],
            lx.shape().elem_count(),
            [rows_l, cols, eps],
            rows.div_ceil(8),
            256
        );
        Ok((out, lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let op = RmsNormBwd { eps: self.eps };
        let dx = x.apply_op3_no_bwd(w, &g.contiguous()?, &op)?;
        Ok((Some(dx), None))
    }
}

/// `r·(g⊙w) − x·r³·mean(g⊙w⊙x)`.
struct RmsNormBwd {
    eps: f32,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "ft-cuda-rms-norm-bwd"
    }

    cuda_only!(3);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        w: &CudaStorage,
        lw: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let (rows, cols) = rms_dims(lx, lw, op)?;
        if lg.shape() != lx.shape() || g.dtype() != x.dtype() {
            candle_core::bail!("{op}: gradient does not match the input");
        }
        let (rows_l, eps) = (rows as i64, self.eps);
        let dev = x.device();
        let out = launch!(
            op,
            dev,
            x.dtype(),
            "ft_rms_bwd",
            [(x, lx), (w, lw), (g, lg)],
            lx.shape().elem_count(),
            [rows_l, cols, eps],
            rows.div_ceil(8),
            256
        );
        Ok((out, lx.shape().clone()))
    }
}

// ---------------------------------------------------------------- RoPE

/// RoPE (rotate-half) on `x` `(B, H, T, Dh)` with `cos`/`sin` `(B or 1, 1, T, Dh)` in `x`'s dtype;
/// gradient to `x` (the inverse rotation).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope_as(x, cos, sin, false)
}

/// RoPE on `x` `(B, T, H, Dh)` (a projection's rows split into heads), written `(B, H, T, Dh)`:
/// the head transpose and the rotation in one pass, as [`rope`] of the transposed `x` bit for
/// bit; the gradient comes back `(B, T, H, Dh)` the same way.
pub fn rope_heads(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope_as(x, cos, sin, true)
}

fn rope_as(x: &Tensor, cos: &Tensor, sin: &Tensor, from_bthd: bool) -> Result<Tensor> {
    let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
    let op = Rope {
        sign: 1.0,
        from_bthd,
        to_bthd: false,
    };
    x.contiguous()?
        .apply_op3(&cos.contiguous()?, &sin.contiguous()?, op)
}

/// `from_bthd` / `to_bthd`: the input / output rows in `(B, T, H, Dh)` order.
struct Rope {
    sign: f32,
    from_bthd: bool,
    to_bthd: bool,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "ft-cuda-rope"
    }

    cuda_only!(3);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        c: &CudaStorage,
        lc: &Layout,
        s: &CudaStorage,
        ls: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let (b, h, t, d) = match lx.shape().dims4()? {
            (b, t, h, d) if self.from_bthd => (b, h, t, d),
            dims => dims,
        };
        let (tb, one, tt, td) = lc.shape().dims4()?;
        let fits = one == 1 && tt == t && td == d && (tb == 1 || tb == b) && d % 2 == 0;
        if !fits || ls.shape() != lc.shape() {
            candle_core::bail!("{op}: tables {:?} do not fit {:?}", lc.dims(), lx.dims());
        }
        let out_shape = match self.to_bthd {
            true => Shape::from_dims(&[b, t, h, d]),
            false => Shape::from_dims(&[b, h, t, d]),
        };
        let n = lx.shape().elem_count();
        // A thread per 16 bytes of a half row where the halves hold whole units, else per pair.
        let unit = 16 / x.dtype().size_in_bytes();
        let per = if (d / 2).is_multiple_of(unit) {
            unit
        } else {
            1
        };
        let threads = n / 2 / per;
        let (threads_l, per_i) = (threads as i64, to_i32(per, op)?);
        let (d, h, t, tb) = (
            to_i32(d, op)?,
            to_i32(h, op)?,
            to_i32(t, op)?,
            to_i32(tb, op)?,
        );
        let (sign, from, to) = (self.sign, self.from_bthd as i32, self.to_bthd as i32);
        let dev = x.device();
        let out = launch!(
            op,
            dev,
            x.dtype(),
            "ft_rope",
            [(x, lx), (c, lc), (s, ls)],
            n,
            [threads_l, per_i, d, h, t, tb, sign, from, to],
            elem_blocks(threads, op)?,
            256
        );
        Ok((out, out_shape))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = Rope {
            sign: -self.sign,
            from_bthd: self.to_bthd,
            to_bthd: self.from_bthd,
        };
        let dx = g.contiguous()?.apply_op3_no_bwd(cos, sin, &op)?;
        Ok((Some(dx), None, None))
    }
}

// ---------------------------------------------------------------- SwiGLU

/// `silu(gate) · up` (same shape and dtype); gradients to both.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() || gate.dtype() != up.dtype() {
        candle_core::bail!(
            "swiglu: gate {:?} and up {:?} differ",
            gate.dims(),
            up.dims()
        );
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

pub(super) struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "ft-cuda-swiglu"
    }

    cuda_only!(2);

    fn cuda_fwd(
        &self,
        g: &CudaStorage,
        lg: &Layout,
        u: &CudaStorage,
        lu: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let n = lg.shape().elem_count();
        let len = n as i64;
        let dev = g.device();
        let out = launch!(
            op,
            dev,
            g.dtype(),
            "ft_swiglu_fwd",
            [(g, lg), (u, lu)],
            n,
            [len],
            elem_blocks(vec_units(n, g.dtype()), op)?,
            256
        );
        Ok((out, lg.shape().clone()))
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

/// Both SwiGLU gradients in one launch, stacked `(2, ...)`.
pub(super) struct SwiGluBwd;

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "ft-cuda-swiglu-bwd"
    }

    cuda_only!(3);

    fn cuda_fwd(
        &self,
        g: &CudaStorage,
        lg: &Layout,
        u: &CudaStorage,
        lu: &Layout,
        da: &CudaStorage,
        lda: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        if lu.shape() != lg.shape() || lda.shape() != lg.shape() || da.dtype() != g.dtype() {
            candle_core::bail!("{op}: inputs differ in shape or dtype");
        }
        let n = lg.shape().elem_count();
        let len = n as i64;
        let dev = g.device();
        let out = launch!(
            op,
            dev,
            g.dtype(),
            "ft_swiglu_bwd",
            [(g, lg), (u, lu), (da, lda)],
            2 * n,
            [len],
            elem_blocks(vec_units(n, g.dtype()), op)?,
            256
        );
        let mut dims = vec![2];
        dims.extend_from_slice(lg.dims());
        Ok((out, Shape::from_dims(&dims)))
    }
}
