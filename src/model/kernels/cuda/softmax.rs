//! Row softmaxes on CUDA: the attention probabilities (scale and mask folded in) and the
//! per-row cross-entropy, each with its own backward kernel.

use super::*;

// ---------------------------------------------------------------- attention softmax

/// `softmax(s·scale + bias)` over the last dim of `s` `(B, H, T, C)`, with `bias` `(R, 1, T, C)`
/// (R = 1 or B) in the same dtype. Gradient to `s` only (the mask is a constant).
pub fn attention_softmax(s: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, _, t, c) = s.dims4()?;
    let (r, one, bt, bc) = bias.dims4()?;
    if one != 1 || bt != t || bc != c || !(r == 1 || r == b) || bias.dtype() != s.dtype() {
        candle_core::bail!(
            "attention softmax: bias {:?} {:?} does not fit scores {:?} {:?}",
            bias.dims(),
            bias.dtype(),
            s.dims(),
            s.dtype()
        );
    }
    let op = Softmax {
        scale: scale as f32,
    };
    s.contiguous()?.apply_op2(&bias.contiguous()?, op)
}

struct Softmax {
    scale: f32,
}

impl CustomOp2 for Softmax {
    fn name(&self) -> &'static str {
        "ft-cuda-softmax"
    }

    cuda_only!(2);

    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        ls: &Layout,
        bias: &CudaStorage,
        lb: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let (_, h, t, _) = ls.shape().dims4()?;
        let (rows, cols) = rows_cols(ls, op)?;
        let (per_batch, t_len) = (to_i32(h * t, op)?, to_i32(t, op)?);
        let bias_batches = to_i32(lb.shape().dims4()?.0, op)?;
        let scale = self.scale;
        let n = ls.shape().elem_count();
        let dev = s.device();
        let out = launch!(
            op,
            dev,
            s.dtype(),
            "ft_softmax_fwd",
            [(s, ls), (bias, lb)],
            n,
            [cols, per_batch, t_len, bias_batches, scale],
            rows,
            256
        );
        Ok((out, ls.shape().clone()))
    }

    fn bwd(
        &self,
        _s: &Tensor,
        _bias: &Tensor,
        p: &Tensor,
        dp: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let op = SoftmaxBwd { scale: self.scale };
        let ds = p.apply_op2_no_bwd(&dp.contiguous()?, &op)?;
        Ok((Some(ds), None))
    }
}

/// The gradient of [`attention_softmax`]'s scores given its probabilities `p` and their gradient
/// `dp` (same shape and dtype): `scale · p ⊙ (dp − Σ p⊙dp)`, no graph.
pub fn attention_softmax_bwd(p: &Tensor, dp: &Tensor, scale: f64) -> Result<Tensor> {
    let op = SoftmaxBwd {
        scale: scale as f32,
    };
    p.contiguous()?.apply_op2_no_bwd(&dp.contiguous()?, &op)
}

/// `scale · p ⊙ (dp − Σ p⊙dp)`.
struct SoftmaxBwd {
    scale: f32,
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "ft-cuda-softmax-bwd"
    }

    cuda_only!(2);

    fn cuda_fwd(
        &self,
        p: &CudaStorage,
        lp: &Layout,
        dp: &CudaStorage,
        ldp: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        if lp.shape() != ldp.shape() || p.dtype() != dp.dtype() {
            candle_core::bail!("{op}: probabilities and gradient differ in shape or dtype");
        }
        let (rows, cols) = rows_cols(lp, op)?;
        let scale = self.scale;
        let dev = p.device();
        let out = launch!(
            op,
            dev,
            p.dtype(),
            "ft_softmax_bwd",
            [(p, lp), (dp, ldp)],
            lp.shape().elem_count(),
            [cols, scale],
            rows,
            256
        );
        Ok((out, lp.shape().clone()))
    }
}

// ---------------------------------------------------------------- cross-entropy

/// Per-row cross-entropy of `logits` `(N, V)` against `targets` `(N,)` u32 (each < V), f32 `(N,)`.
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let targets = targets.to_dtype(DType::U32)?.contiguous()?;
    logits.contiguous()?.apply_op2(&targets, CrossEntropy)
}

struct CrossEntropy;

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "ft-cuda-cross-entropy"
    }

    cuda_only!(2);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        tg: &CudaStorage,
        lt: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let (n, cols) = rows_cols(lx, op)?;
        if lx.dims().len() != 2 || lt.shape().elem_count() != n {
            candle_core::bail!(
                "{op}: logits {:?} and targets {:?} do not fit",
                lx.dims(),
                lt.dims()
            );
        }
        let dev = x.device();
        let tv = view::<u32>(tg, lt, op)?;
        let loss = alloc::<f32>(dev, n)?;
        by_dtype!(x.dtype(), op, T => {
            let xv = view::<T>(x, lx, op)?;
            let name = format!("ft_ce_fwd_{}", T::SUFFIX);
            let f = dev.get_or_load_custom_func(&name, MODULE, ptx()?)?;
            let mut b = f.builder();
            b.arg(&xv).arg(&tv).arg(&loss).arg(&cols);
            // SAFETY: the arguments match `ft_ce_fwd`; one block per row, thread 0 writes it.
            unsafe { b.launch(rows_cfg(n, 1024)) }.w()?;
        });
        Ok((
            CudaStorage::wrap_cuda_slice(loss, dev.clone()),
            Shape::from_dims(&[n]),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        targets: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // The rows' losses (whence their log-sum-exp) and upstream gradients, (2, N).
        let lg = Tensor::stack(&[res.to_dtype(DType::F32)?, g.to_dtype(DType::F32)?], 0)?;
        let dx = x.apply_op3_no_bwd(targets, &lg, &CrossEntropyBwd)?;
        Ok((Some(dx), None))
    }
}

/// `(softmax(x) − onehot(target)) · g[row]`, the third input `(2, N)`: each row's forward loss
/// (log-sum-exp − x[target], so the row is read once) and its upstream gradient.
struct CrossEntropyBwd;

impl CustomOp3 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "ft-cuda-cross-entropy-bwd"
    }

    cuda_only!(3);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        tg: &CudaStorage,
        lt: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let (n, cols) = rows_cols(lx, op)?;
        if lt.shape().elem_count() != n || lg.shape().elem_count() != 2 * n {
            candle_core::bail!("{op}: targets or losses and gradients do not have {n} rows");
        }
        let dev = x.device();
        let tv = view::<u32>(tg, lt, op)?;
        let both = view::<f32>(g, lg, op)?;
        let (lv, gv) = (both.slice(0..n), both.slice(n..2 * n));
        let out = by_dtype!(x.dtype(), op, T => {
            let xv = view::<T>(x, lx, op)?;
            let out = alloc::<T>(dev, lx.shape().elem_count())?;
            let name = format!("ft_ce_bwd_{}", T::SUFFIX);
            let f = dev.get_or_load_custom_func(&name, MODULE, ptx()?)?;
            let mut b = f.builder();
            b.arg(&xv).arg(&tv).arg(&lv).arg(&gv).arg(&out).arg(&cols);
            // SAFETY: the arguments match `ft_ce_bwd`; one block per row.
            unsafe { b.launch(rows_cfg(n, 1024)) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((out, lx.shape().clone()))
    }
}
