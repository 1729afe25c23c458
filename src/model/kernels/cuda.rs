//! FineTune's own CUDA kernels (`cuda/kernels.cu`, compiled once per process with NVRTC) as
//! differentiable ops: the attention softmax (scale and mask folded in) and per-row cross-entropy
//! (`softmax.rs`), RMSNorm, RoPE and SwiGLU (`layer.rs`), each one launch forward and one
//! backward; the frozen and LoRA linear projections as single ops (`linear.rs`). This file holds
//! what they share: the compiled module, launch helpers and macros. Composed from Candle's ops these
//! cost 8 to 25 launches each, with broadcast kernels that reach a third of the memory bandwidth;
//! on a GPU the LoRA step is bound by that per-op cost (`bench/cuda_kernel_profile.py`).
//! bf16 and f32 only; [`super::plan`] says when they run (`FINETUNE_KERNELS=auto` on a CUDA device).

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda::{CudaDType, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result,
    Shape, Tensor,
};

const SOURCE: &str = concat!(
    include_str!("cuda/kernels.cu"),
    include_str!("cuda/dequant.cu"),
    include_str!("cuda/lora_parts.cu")
);
const MODULE: &str = "finetune_kernels";

/// The PTX of `kernels.cu`, `dequant.cu` and `lora_parts.cu`, compiled on first use.
fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    compiled_ptx(&PTX, SOURCE, Default::default(), "FineTune's CUDA kernels")
}

/// `source` compiled by NVRTC with `opts` once per process into `cell`; the error names `what`.
fn compiled_ptx(
    cell: &'static OnceLock<std::result::Result<String, String>>,
    source: &str,
    opts: candle_core::cuda::cudarc::nvrtc::CompileOptions,
    what: &str,
) -> Result<&'static str> {
    let compiled = cell.get_or_init(|| {
        let ptx = candle_core::cuda::cudarc::nvrtc::compile_ptx_with_opts(source, opts)
            .map_err(|e| format!("compiling {what} with NVRTC: {e}"))?;
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
    const ZERO: Self;
    const ONE: Self;
}

impl Elem for half::bf16 {
    const SUFFIX: &'static str = "bf16";
    const ZERO: Self = half::bf16::ZERO;
    const ONE: Self = half::bf16::ONE;
}

impl Elem for f32 {
    const SUFFIX: &'static str = "f32";
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
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

/// Uninitialised device memory for `n` elements, for a kernel (or a cuBLAS product with β = 0) to
/// write in full.
fn alloc<T: Elem>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every caller launches a kernel (or a cuBLAS product with β = 0) that writes all `n`
    // elements before the storage is wrapped and read.
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

/// The `cpu_fwd` of an op that runs on CUDA only, for 1, 2 or 3 inputs.
macro_rules! cuda_only {
    (1) => {
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("{} runs on CUDA only", self.name())
        }
    };
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

/// Threads for the kernels that take 16 bytes of `n` elements of `dtype` a thread.
fn vec_units(n: usize, dtype: DType) -> usize {
    n.div_ceil(16 / dtype.size_in_bytes())
}

/// Blocks of 256 threads for one thread per element (or pair) of `n`.
fn elem_blocks(n: usize, op: &str) -> Result<usize> {
    let blocks = n / 256 + 1;
    check_rows(blocks, op)?;
    Ok(blocks)
}

mod adamw;
pub mod flash;
mod gated;
mod heads;
mod layer;
mod linear;
mod lora_bwd;
mod lora_parts;
mod lora_split;
mod softmax;

pub use adamw::{adamw, on as adamw_on, AdamWStep};
pub use gated::{swiglu_linear, swiglu_qlinear};
pub use heads::{add, add_bias, add_untracked, swap_heads};
pub use layer::{rms_norm, rope, rope_heads, swiglu};
pub use linear::{
    dequantize_bf16, frozen_linear, lora_linear, lora_linear_in_chunks, qlora_linear,
};
pub use softmax::{attention_softmax, attention_softmax_bwd, cross_entropy_rows};

/// Scaled dot-product attention over `(B, H, T, Dh)` q, k, v (k and v already repeated to H
/// heads) with a bias `(B or 1, 1, T, T)` in q's dtype: scores from cuBLAS, then one kernel for
/// scale, mask and softmax, then cuBLAS again.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let s = q.contiguous()?.matmul(&k.t()?)?;
    attention_softmax(&s, bias, scale)?.matmul(v)
}
