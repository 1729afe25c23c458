//! FineTune's own CUDA kernels (`cuda/kernels.cu`, compiled once per process with NVRTC) as
//! differentiable ops: the attention softmax (scale and mask folded in), per-row cross-entropy,
//! RMSNorm and RoPE, each one launch forward and one backward. Composed from Candle's ops these
//! cost 8 to 25 launches each, with broadcast kernels that reach a third of the memory bandwidth;
//! on a GPU the LoRA step is bound by that per-op cost (`bench/cuda_kernel_profile.py`).
//! bf16 and f32 only; other dtypes and devices take the composed path (see [`applies`]).

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda::{CudaDType, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};

const SOURCE: &str = include_str!("cuda/kernels.cu");
const MODULE: &str = "finetune_kernels";

/// True when these kernels apply to `t`: on a CUDA device, in bf16 or f32.
pub fn applies(t: &Tensor) -> bool {
    t.device().is_cuda() && matches!(t.dtype(), DType::BF16 | DType::F32) && !disabled()
}

/// `FINETUNE_NO_CUDA_KERNELS=1` takes the composed path (for comparison).
fn disabled() -> bool {
    static OFF: OnceLock<bool> = OnceLock::new();
    *OFF.get_or_init(|| std::env::var_os("FINETUNE_NO_CUDA_KERNELS").is_some_and(|v| v != "0"))
}

/// The PTX of `kernels.cu`, compiled on first use.
fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    let compiled = PTX.get_or_init(|| {
        let ptx = candle_core::cuda::cudarc::nvrtc::compile_ptx(SOURCE)
            .map_err(|e| format!("compiling FineTune's CUDA kernels with NVRTC: {e}"))?;
        let bytes = ptx
            .as_bytes()
            .ok_or_else(|| "NVRTC returned no PTX".to_string())?;
        let text = std::str::from_utf8(bytes).map_err(|e| format!("PTX is not text: {e}"))?;
        Ok(text.trim_end_matches('\0').to_string())
    });
    match compiled {
        Ok(p) => Ok(p),
        Err(e) => candle_core::bail!("{e}"),
    }
}

/// The contiguous data of a storage/layout pair.
fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, op: &str) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

fn rows_cfg(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn check_rows(rows: usize, op: &str) -> Result<()> {
    if rows == 0 || rows > i32::MAX as usize {
        candle_core::bail!("{op}: {rows} rows is out of range");
    }
    Ok(())
}

fn to_i32(v: usize, op: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{op}: {v} is out of range")))
}

/// An element type the kernels are built for.
trait Elem: CudaDType + DeviceRepr {
    const SUFFIX: &'static str;
}

impl Elem for half::bf16 {
    const SUFFIX: &'static str = "bf16";
}

impl Elem for f32 {
    const SUFFIX: &'static str = "f32";
}

/// Runs `$body` with `$t` bound to the element type of `$dtype` (bf16 or f32).
macro_rules! by_dtype {
    ($dtype:expr, $op:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            DType::F32 => {
                type $t = f32;
                $body
            }
            d => candle_core::bail!("{}: no CUDA kernel for {d:?}", $op),
        }
    };
}

/// Uninitialised device memory for `n` elements, for a kernel to write in full.
fn alloc<T: Elem>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every caller launches a kernel that writes all `n` elements before the storage is
    // wrapped and read.
    unsafe { dev.alloc::<T>(n) }
}

/// Launches kernel `$name` (suffixed `_bf16`/`_f32` by `$dtype`) over `$blocks` blocks of
/// `$threads` with the arguments in kernels.cu's order: the `(storage, layout)` inputs (all of
/// `$dtype`, contiguous), a fresh output of `$n` elements, then the scalar locals. Evaluates to
/// the output storage.
macro_rules! launch {
    ($op:expr, $dev:expr, $dtype:expr, $name:literal, [$(($s:expr, $l:expr)),+], $n:expr,
     [$($arg:ident),*], $blocks:expr, $threads:expr) => {
        by_dtype!($dtype, $op, T => {
            let views = [$(view::<T>($s, $l, $op)?),+];
            let out = alloc::<T>($dev, $n)?;
            let f = $dev.get_or_load_custom_func(
                &format!("{}_{}", $name, T::SUFFIX),
                MODULE,
                ptx()?,
            )?;
            let mut b = f.builder();
            for v in &views {
                b.arg(v);
            }
            b.arg(&out);
            $(b.arg(&$arg);)*
            // SAFETY: the arguments are those of `$name` in kernels.cu, in its order and types;
            // the launch shape is the one its comment gives.
            unsafe { b.launch(rows_cfg($blocks, $threads)) }.w()?;
            CudaStorage::wrap_cuda_slice(out, $dev.clone())
        })
    };
}

/// The `cpu_fwd` of an op that runs on CUDA only, for 2 or 3 inputs.
macro_rules! cuda_only {
    (2) => {
        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("{} runs on CUDA only", self.name())
        }
    };
    (3) => {
        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("{} runs on CUDA only", self.name())
        }
    };
}

/// Rows of a contiguous layout's last dim: (rows, cols as i32), checked for a launch.
fn rows_cols(l: &Layout, op: &str) -> Result<(usize, i32)> {
    let c = l.dims().last().copied().unwrap_or(0);
    if c == 0 {
        candle_core::bail!("{op}: empty rows in {:?}", l.dims());
    }
    let rows = l.shape().elem_count() / c;
    check_rows(rows, op)?;
    Ok((rows, to_i32(c, op)?))
}

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
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.to_dtype(DType::F32)?.contiguous()?;
        let dx = x.apply_op3_no_bwd(targets, &g, &CrossEntropyBwd)?;
        Ok((Some(dx), None))
    }
}

/// `(softmax(x) − onehot(target)) · g[row]`.
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
        if lt.shape().elem_count() != n || lg.shape().elem_count() != n {
            candle_core::bail!("{op}: targets or gradient do not have {n} rows");
        }
        let dev = x.device();
        let (tv, gv) = (view::<u32>(tg, lt, op)?, view::<f32>(g, lg, op)?);
        let out = by_dtype!(x.dtype(), op, T => {
            let xv = view::<T>(x, lx, op)?;
            let out = alloc::<T>(dev, lx.shape().elem_count())?;
            let name = format!("ft_ce_bwd_{}", T::SUFFIX);
            let f = dev.get_or_load_custom_func(&name, MODULE, ptx()?)?;
            let mut b = f.builder();
            b.arg(&xv).arg(&tv).arg(&gv).arg(&out).arg(&cols);
            // SAFETY: the arguments match `ft_ce_bwd`; one block per row.
            unsafe { b.launch(rows_cfg(n, 1024)) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((out, lx.shape().clone()))
    }
}

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
        let eps = self.eps;
        let dev = x.device();
        let out = launch!(
            op,
            dev,
            x.dtype(),
            "ft_rms_fwd",
            [(x, lx), (w, lw)],
            lx.shape().elem_count(),
            [cols, eps],
            rows,
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
        let eps = self.eps;
        let dev = x.device();
        let out = launch!(
            op,
            dev,
            x.dtype(),
            "ft_rms_bwd",
            [(x, lx), (w, lw), (g, lg)],
            lx.shape().elem_count(),
            [cols, eps],
            rows,
            256
        );
        Ok((out, lx.shape().clone()))
    }
}

// ---------------------------------------------------------------- RoPE

/// RoPE (rotate-half) on `x` `(B, H, T, D)` with `cos`/`sin` `(B or 1, 1, T, D)` in `x`'s dtype;
/// gradient to `x` (the inverse rotation).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
    x.contiguous()?
        .apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope { sign: 1.0 })
}

struct Rope {
    sign: f32,
}

/// Blocks of 256 threads for one thread per element (or pair) of `n`.
fn elem_blocks(n: usize, op: &str) -> Result<usize> {
    let blocks = n / 256 + 1;
    check_rows(blocks, op)?;
    Ok(blocks)
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
        let (b, h, t, d) = lx.shape().dims4()?;
        let (tb, one, tt, td) = lc.shape().dims4()?;
        let fits = one == 1 && tt == t && td == d && (tb == 1 || tb == b) && d % 2 == 0;
        if !fits || ls.shape() != lc.shape() {
            candle_core::bail!("{op}: tables {:?} do not fit {:?}", lc.dims(), lx.dims());
        }
        let n = lx.shape().elem_count();
        let pairs = (n / 2) as i64;
        let (d, h, t, tb) = (
            to_i32(d, op)?,
            to_i32(h, op)?,
            to_i32(t, op)?,
            to_i32(tb, op)?,
        );
        let sign = self.sign;
        let dev = x.device();
        let out = launch!(
            op,
            dev,
            x.dtype(),
            "ft_rope",
            [(x, lx), (c, lc), (s, ls)],
            n,
            [pairs, d, h, t, tb, sign],
            elem_blocks(n / 2, op)?,
            256
        );
        Ok((out, lx.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = Rope { sign: -self.sign };
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

struct SwiGlu;

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
            elem_blocks(n, op)?,
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
struct SwiGluBwd;

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
            elem_blocks(n, op)?,
            256
        );
        let mut dims = vec![2];
        dims.extend_from_slice(lg.dims());
        Ok((out, Shape::from_dims(&dims)))
    }
}

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
/// product. Gradients go to `x`, A and B; no dropout (the composed path applies it).
pub fn lora_linear(
    x: &Tensor,
    weight: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let op = LoraLinearOp {
        w: weight.contiguous()?,
        scale: scale as f32,
    };
    x.contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

struct LoraLinearOp {
    /// (out, in), frozen.
    w: Tensor,
    scale: f32,
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
        let op = self.name();
        let (n, i) = lx.shape().dims2()?;
        let (r, ai) = la.shape().dims2()?;
        let (o, br) = lb.shape().dims2()?;
        let (w_ref, lw) = self.w.storage_and_layout();
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
        let scale = self.scale;
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
        let (x, a, b) = (x.detach(), a.detach(), b.detach());
        let s = self.scale as f64;
        let g = g.detach().contiguous()?;
        let g32 = g.to_dtype(DType::F32)?;
        let x32 = x.to_dtype(DType::F32)?;
        let mid = x32.matmul(&a.t()?)?;
        let gb = (g32.matmul(&b)? * s)?;
        let da = gb.t()?.matmul(&x32)?;
        let db = (g32.t()?.matmul(&mid)? * s)?;
        let dx = (g.matmul(&self.w)? + gb.matmul(&a)?.to_dtype(x.dtype())?)?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}
