//! The copies around attention on CUDA as single coalesced passes: the projections' bias added
//! (Candle's broadcast add indexes both operands generically, 57 µs for a 4096 × 896 bf16 add
//! on an H100 where the bytes take 5), and the head transposes `(B, T, H, Dh)` ↔ `(B, H, T, Dh)`
//! (Candle's strided copy, about five times the bytes' time). With them the plain sum of two
//! tensors, 16 bytes a thread (Candle's takes an element a thread: 18 µs for a 4096 × 896 bf16
//! add), for the residual adds and the backward's gradient sums. Exact: a sum rounded once,
//! copies.

use super::*;

// ---------------------------------------------------------------- bias

/// `y + bias` for `y` `(…, O)` and a constant `bias` `(O)` of `y`'s dtype: one launch, the same
/// values as `y.broadcast_add(bias)`; the gradient goes to `y` alone (a bias that is trained takes
/// Candle's add, which also gives it its gradient).
pub fn add_bias(y: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let fits = bias.rank() == 1
        && y.dims().last() == Some(&bias.dim(0)?)
        && y.dtype() == bias.dtype()
        && matches!(y.dtype(), DType::BF16 | DType::F32);
    if !fits || bias.track_op() {
        return y.broadcast_add(bias);
    }
    y.contiguous()?.apply_op2(&bias.contiguous()?, AddBias)
}

struct AddBias;

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "ft-cuda-add-bias"
    }

    cuda_only!(2);

    fn cuda_fwd(
        &self,
        y: &CudaStorage,
        ly: &Layout,
        b: &CudaStorage,
        lb: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let (_, cols) = rows_cols(ly, op)?;
        let n = ly.shape().elem_count();
        let count = n as i64;
        let dev = y.device();
        let out = launch!(
            op,
            dev,
            y.dtype(),
            "ft_add_bias",
            [(y, ly), (b, lb)],
            n,
            [count, cols],
            elem_blocks(vec_units(n, y.dtype()), op)?,
            256
        );
        Ok((out, ly.shape().clone()))
    }

    fn bwd(
        &self,
        _y: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(g.clone()), None))
    }
}

// ---------------------------------------------------------------- sums

/// `a + b` for two tensors of one shape and dtype (bf16 or f32): one launch, the same values as
/// `a.add(b)`; the gradient goes to both. Other shapes or dtypes take Candle's add.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !summable(a, b) {
        return a.add(b);
    }
    a.apply_op2(b, Add)
}

/// As [`add`], recording nothing for autograd: the backward pass's gradient sums (Candle's
/// `GradStore`, through `candle_core::backprop::set_grad_add`), on CUDA tensors only.
pub fn add_untracked(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !summable(a, b) || !a.device().is_cuda() {
        return a.add(b);
    }
    a.apply_op2_no_bwd(b, &Add)
}

/// Two contiguous tensors of one shape and a dtype the kernel takes (a strided one takes Candle's
/// add, which reads it in place, rather than a copy and this).
fn summable(a: &Tensor, b: &Tensor) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // `FINETUNE_CUDA_ADD=0`: Candle's add everywhere (to compare).
    let on = *ON.get_or_init(|| std::env::var("FINETUNE_CUDA_ADD").map_or(true, |v| v != "0"));
    on && a.shape() == b.shape()
        && a.is_contiguous()
        && b.is_contiguous()
        && a.dtype() == b.dtype()
        && matches!(a.dtype(), DType::BF16 | DType::F32)
        && a.elem_count() > 0
}

struct Add;

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "ft-cuda-add"
    }

    cuda_only!(2);

    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        la: &Layout,
        b: &CudaStorage,
        lb: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let n = la.shape().elem_count();
        if lb.shape().elem_count() != n {
            candle_core::bail!("{op}: {:?} and {:?} differ", la.dims(), lb.dims());
        }
        let count = n as i64;
        let dev = a.device();
        let out = launch!(
            op,
            dev,
            a.dtype(),
            "ft_add",
            [(a, la), (b, lb)],
            n,
            [count],
            elem_blocks(vec_units(n, a.dtype()), op)?,
            256
        );
        Ok((out, la.shape().clone()))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(g.clone()), Some(g.clone())))
    }
}

// ---------------------------------------------------------------- head transposes

/// `x` `(B, A, C, D)` → `(B, C, A, D)` contiguous (dims 1 and 2 swapped: heads first or back),
/// rows of D moved whole; the gradient swaps back. Rows that are not a whole number of 4-byte
/// words (or other dtypes than bf16 and f32) take Candle's copy.
pub fn swap_heads(x: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    let bytes = x.dtype().size_in_bytes();
    let words = x.rank() == 4
        && matches!(x.dtype(), DType::BF16 | DType::F32)
        && (x.dim(3)? * bytes).is_multiple_of(4)
        && (x.layout().start_offset() * bytes).is_multiple_of(4);
    if !words {
        return x.transpose(1, 2)?.contiguous();
    }
    x.apply_op1(SwapHeads)
}

struct SwapHeads;

impl CustomOp1 for SwapHeads {
    fn name(&self) -> &'static str {
        "ft-cuda-swap-heads"
    }

    cuda_only!(1);

    fn cuda_fwd(&self, x: &CudaStorage, lx: &Layout) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let (n0, a, c, d) = lx.shape().dims4()?;
        let (start, end) = match lx.contiguous_offsets() {
            Some(range) => range,
            None => candle_core::bail!("{op}: input must be contiguous"),
        };
        let bytes = x.dtype().size_in_bytes();
        let row = d * bytes;
        // 16-byte units where rows and the start allow, else 4-byte words.
        let unit = if row.is_multiple_of(16) && (start * bytes).is_multiple_of(16) {
            16
        } else {
            4
        };
        let units = (end - start) * bytes / unit;
        let (a32, c32, w) = (to_i32(a, op)?, to_i32(c, op)?, to_i32(row / unit, op)?);
        let count = units as i64;
        let dev = x.device();
        let name = if unit == 16 {
            "ft_swap12_16"
        } else {
            "ft_swap12_4"
        };
        let f = dev.get_or_load_custom_func(name, MODULE, ptx()?)?;
        let out = by_dtype!(x.dtype(), op, T => {
            let src = view::<T>(x, lx, op)?;
            let out = alloc::<T>(dev, end - start)?;
            let mut b = f.builder();
            b.arg(&src);
            b.arg(&out);
            b.arg(&count);
            b.arg(&a32);
            b.arg(&c32);
            b.arg(&w);
            // SAFETY: `ft_swap12_*` reads `units` units of the input and writes as many of the
            // output, both `units · unit` bytes long; one thread per unit.
            unsafe { b.launch(rows_cfg(elem_blocks(units, op)?, 256)) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((out, Shape::from_dims(&[n0, c, a, d])))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&SwapHeads)?))
    }
}
