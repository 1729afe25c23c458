//! Linear projections on CUDA as single ops: the frozen linear and the frozen linear plus its
//! LoRA term.

use std::sync::Arc;

use candle_core::quantized::QTensor;

use super::lora_split::Kept;
use super::*;
use crate::model::kernels::cpu::Saved;

// ---------------------------------------------------------------- frozen linear

/// `x · Wᵀ` for a frozen `weight` (out, in) and 2-D `x` (N, in) of the same dtype: one cuBLAS
/// call (Candle's own matmul on the storages), with the gradient `g · W` to `x` alone. The
/// zero-valued route of other GPUs (`model::grad`) costs a zeros tensor, kept until backward,
/// and an add per projection.
pub fn frozen_linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, FrozenLinear)
}

struct FrozenLinear;

impl CustomOp2 for FrozenLinear {
    fn name(&self) -> &'static str {
        "ft-cuda-frozen-linear"
    }

    cuda_only!(2);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        w: &CudaStorage,
        lw: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, i) = lx.shape().dims2()?;
        let (o, wi) = lw.shape().dims2()?;
        if wi != i || x.dtype() != w.dtype() {
            candle_core::bail!(
                "{}: {:?} {:?} · {:?} {:?}ᵀ do not fit",
                self.name(),
                lx.dims(),
                x.dtype(),
                lw.dims(),
                w.dtype()
            );
        }
        let wt = lw.transpose(0, 1)?;
        let out = x.matmul(w, (1, n, o, i), lx, &wt)?;
        Ok((out, Shape::from_dims(&[n, o])))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(g.matmul(w)?), None))
    }
}

// ---------------------------------------------------------------- LoRA linear

/// `x · Wᵀ + s · (x · Aᵀ) · Bᵀ` for 2-D `x` (N, in) and a frozen `weight` (out, in) of `x`'s
/// dtype, with f32 LoRA factors `a` (r, in) and `b` (out, r): the LoRA product in f32 as PEFT
/// computes it, added to the frozen output with one rounding. As one op, Candle keeps only `x`,
/// A and B for backward; composed, it kept the f32 update, its cast and the frozen output of
/// every projection (about half of the activation memory). Backward recomputes the (N, r)
/// product, a chunk of rows at a time (`lora_bwd`). Gradients go to `x`, A and B; no dropout (the
/// composed path applies it).
pub fn lora_linear(
    x: &Tensor,
    weight: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    lora_linear_in_chunks(x, weight, a, b, scale, None)
}

/// [`lora_linear`] whose backward takes `rows` rows at a time (`None`: its own choice, chunks of
/// about 32 MB of f32); for the tests, which compare several chunks against one.
pub fn lora_linear_in_chunks(
    x: &Tensor,
    weight: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    rows: Option<usize>,
) -> Result<Tensor> {
    let op = LoraLinearOp {
        w: Weight::Dense(weight.contiguous()?),
        scale: scale as f32,
        rows,
        kept: Saved::new(),
    };
    x.contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

/// [`lora_linear`] with the frozen weight kept quantized (QLoRA): the weight is dequantized to
/// `x`'s dtype for the forward product and again for the input gradient, and dropped each time,
/// so the graph keeps what the float op keeps (`x`, A, B) and no float copy of the weight.
pub fn qlora_linear(
    x: &Tensor,
    weight: &Arc<QTensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let op = LoraLinearOp {
        w: Weight::Quant(weight.clone()),
        scale: scale as f32,
        rows: None,
        kept: Saved::new(),
    };
    x.contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

/// The frozen weight (out, in) of a LoRA op.
pub(super) enum Weight {
    /// In the activations' dtype.
    Dense(Tensor),
    /// Quantized; dequantized per product.
    Quant(Arc<QTensor>),
}

impl Weight {
    /// The weight as a float tensor of `dtype` (a fresh one when quantized).
    pub(super) fn in_dtype(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Weight::Dense(w) => Ok(w.clone()),
            Weight::Quant(q) => super::super::dequantize(q, dtype),
        }
    }
}

struct LoraLinearOp {
    w: Weight,
    scale: f32,
    /// Rows per chunk of the backward (`None`: `lora_bwd::chunk_rows`).
    rows: Option<usize>,
    /// The forward's splits for the backward (bf16, `lora_split`), taken by it.
    kept: Saved<Kept>,
}

impl CustomOp3 for LoraLinearOp {
    fn name(&self) -> &'static str {
        "ft-cuda-lora-linear"
    }

    cuda_only!(3);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        a: &CudaStorage,
        la: &Layout,
        b: &CudaStorage,
        lb: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let ab = ((a, la), (b, lb));
        lora_forward(self.name(), &self.w, self.scale, (x, lx), ab, &self.kept)
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Detached: A and B are leaves, so Candle stores these gradients as they are; computed from
        // tracked inputs they would carry (and keep alive) the whole step's graph.
        let w = self.w.in_dtype(g.dtype())?;
        let (dx, da, db) = lora_grads(
            &x.detach(),
            &g.detach(),
            &w,
            (&a.detach(), &b.detach()),
            self.scale,
            self.rows,
            self.kept.take(),
        )?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

/// The LoRA op's forward `x·Wᵀ + s·(x·Aᵀ)·Bᵀ` on the storages: the frozen product by cuBLAS in
/// x's dtype, the LoRA product in f32, added with one rounding. For bf16 x, what the backward can
/// use goes into `kept`.
pub(super) fn lora_forward(
    op: &str,
    w: &Weight,
    scale: f32,
    (x, lx): (&CudaStorage, &Layout),
    ((a, la), (b, lb)): ((&CudaStorage, &Layout), (&CudaStorage, &Layout)),
    kept: &Saved<Kept>,
) -> Result<(CudaStorage, Shape)> {
    let (n, i) = lx.shape().dims2()?;
    let (r, ai) = la.shape().dims2()?;
    let (o, br) = lb.shape().dims2()?;
    let w_t = w.in_dtype(x.dtype())?;
    let (w_ref, lw) = w_t.storage_and_layout();
    let candle_core::Storage::Cuda(w) = &*w_ref else {
        candle_core::bail!("{op}: the weight is not on the GPU");
    };
    if ai != i || br != r || lw.dims() != [o, i] || w.dtype() != x.dtype() {
        candle_core::bail!(
            "{op}: x {:?} {:?}, W {:?} {:?}, A {:?}, B {:?} do not fit",
            lx.dims(),
            x.dtype(),
            lw.dims(),
            w.dtype(),
            la.dims(),
            lb.dims()
        );
    }
    if a.dtype() != DType::F32 || b.dtype() != DType::F32 {
        candle_core::bail!("{op}: LoRA factors must be f32");
    }
    let y = x.matmul(w, (1, n, o, i), lx, &lw.transpose(0, 1)?)?;
    if x.dtype() == DType::BF16 && super::lora_split::on() {
        // The LoRA term on bf16 tensor cores in f32-exact parts, added onto y in place.
        let mut y = y;
        let (xv, av, bv) = (
            view::<half::bf16>(x, lx, op)?,
            view::<f32>(a, la, op)?,
            view::<f32>(b, lb, op)?,
        );
        let d = super::lora_split::Shapes { n, i, o, r };
        let ys = y.as_cuda_slice_mut::<half::bf16>()?;
        if let Some(k) = super::lora_split::forward(x.device(), (&xv, &av, &bv), ys, d, scale)? {
            kept.set(k);
        }
        return Ok((y, Shape::from_dims(&[n, o])));
    }
    let x32 = if x.dtype() == DType::F32 {
        None
    } else {
        Some(x.to_dtype(lx, DType::F32)?)
    };
    let (x32, lx32) = match &x32 {
        Some(s) => (s, Layout::contiguous((n, i))),
        None => (x, lx.clone()),
    };
    let mid = x32.matmul(a, (1, n, r, i), &lx32, &la.transpose(0, 1)?)?;
    let u = mid.matmul(
        b,
        (1, n, o, r),
        &Layout::contiguous((n, r)),
        &lb.transpose(0, 1)?,
    )?;
    let len = (n * o) as i64;
    let dev = x.device();
    let lyu = Layout::contiguous((n, o));
    let uv = view::<f32>(&u, &lyu, op)?;
    let out = by_dtype!(x.dtype(), op, T => {
        let yv = view::<T>(&y, &lyu, op)?;
        let out = alloc::<T>(dev, n * o)?;
        let name = format!("ft_add_scaled_{}", T::SUFFIX);
        let f = dev.get_or_load_custom_func(&name, MODULE, ptx()?)?;
        let mut bl = f.builder();
        bl.arg(&yv).arg(&uv).arg(&out).arg(&len).arg(&scale);
        // SAFETY: the arguments match `ft_add_scaled`; one thread per element.
        unsafe { bl.launch(rows_cfg(elem_blocks(n * o, op)?, 256)) }.w()?;
        CudaStorage::wrap_cuda_slice(out, dev.clone())
    });
    Ok((out, Shape::from_dims(&[n, o])))
}

/// `(dx, dA, dB)` of the LoRA op for the upstream gradient `g`, from detached tensors: on cuBLAS
/// in chunks of `rows` rows (`None`: `lora_bwd::chunk_rows`), or composed from Candle's ops with
/// `FINETUNE_CUDA_LORA_BWD=composed` (to compare the two); with the forward's `kept` splits
/// where the bf16 path runs.
pub(super) fn lora_grads(
    x: &Tensor,
    g: &Tensor,
    w: &Tensor,
    (a, b): (&Tensor, &Tensor),
    scale: f32,
    rows: Option<usize>,
    kept: Option<Kept>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let ((n, i), o) = (x.dims2()?, w.dim(0)?);
    let rows = match (rows, super::lora_bwd::chunked()) {
        (Some(rows), _) => rows,
        (None, true) => super::lora_bwd::chunk_rows(i, o),
        (None, false) => {
            let s = scale as f64;
            let g = g.contiguous()?;
            let g32 = g.to_dtype(DType::F32)?;
            let x32 = x.to_dtype(DType::F32)?;
            let mid = x32.matmul(&a.t()?)?;
            let gb = (g32.matmul(b)? * s)?;
            let da = gb.t()?.matmul(&x32)?;
            let db = (g32.t()?.matmul(&mid)? * s)?;
            let dx = (g.matmul(w)? + gb.matmul(a)?.to_dtype(x.dtype())?)?;
            return Ok((dx, da, db));
        }
    };
    super::lora_bwd::lora_backward(x, g, w, (a, b), scale, rows.clamp(1, n.max(1)), kept)
}

// ---------------------------------------------------------------- dequantization

/// A quantized weight on the GPU as a bf16 tensor, by one kernel reading its blocks (Q4_0, Q8_0,
/// Q4_K, Q5_K, Q6_K); `None` for other types or a weight not on the GPU. Candle's own path
/// writes f32 and casts: 10.5 bytes of traffic per Q4_K weight instead of 2.6, which was a third
/// of an 8B QLoRA step on the H100.
pub fn dequantize_bf16(q: &QTensor) -> Result<Option<Tensor>> {
    use candle_core::quantized::{GgmlDType, QStorage};
    // The kernel's type number and the weights one thread decodes (kernels.cu).
    let (ty, group): (i32, usize) = match q.dtype() {
        GgmlDType::Q4_0 => (0, 8),
        GgmlDType::Q8_0 => (1, 4),
        GgmlDType::Q4K => (2, 8),
        GgmlDType::Q5K => (3, 8),
        GgmlDType::Q6K => (4, 16),
        _ => return Ok(None),
    };
    let QStorage::Cuda(s) = q.storage() else {
        return Ok(None);
    };
    let op = "ft-dequant-bf16";
    let n = q.shape().elem_count();
    let blocks_of = q.dtype().block_size();
    let bytes = n / blocks_of * q.dtype().type_size();
    if !n.is_multiple_of(blocks_of) || s.as_cuda_slice().len() < bytes {
        candle_core::bail!("{op}: {n} weights do not fill the {bytes} bytes of blocks");
    }
    let dev = s.device();
    let out = alloc::<half::bf16>(dev, n)?;
    let f = dev.get_or_load_custom_func("ft_dequant_bf16", MODULE, ptx()?)?;
    let groups = n / group;
    let len = groups as i64;
    let mut bl = f.builder();
    bl.arg(s.as_cuda_slice()).arg(&out).arg(&len).arg(&ty);
    // SAFETY: the arguments match `ft_dequant_bf16`; the blocks hold `n` weights (checked above;
    // a block is a whole number of groups) and the grid-stride loop writes each output once.
    unsafe { bl.launch(rows_cfg(elem_blocks(groups, op)?.min(1 << 20), 256)) }.w()?;
    let storage = candle_core::Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone()));
    Ok(Some(Tensor::from_storage(
        storage,
        q.shape().clone(),
        candle_core::op::BackpropOp::none(),
        false,
    )))
}
