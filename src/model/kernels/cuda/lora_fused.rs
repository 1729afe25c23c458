//! The LoRA op's skinny products and their splits in one kernel each (`lora_fused.cu`): the
//! forward's `x·Aᵀ` and the backward's `s·g·B`, three part-products side by side, summed and
//! split into bf16 parts by the block that computed them, from shared memory. On cuBLAS these
//! are a product into an (N, 3r) f32 tensor and a split launch (`lora_split::row_parts`):
//! 336 launches of about 5 µs and 8 µs in a Qwen2.5-0.5B step (`bench/results/
//! h100-eighteenth-2026-12-07.log`). GPUs with bf16 `mma.sync` (compute capability 8.0 and
//! later), ranks up to 64, even widths; off unless `FINETUNE_CUDA_LORA_FUSED=1` ([`BY_DEFAULT`]:
//! not yet measured faster than cuBLAS and the split launch).

use std::sync::OnceLock;

use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda::WrapErr;
use candle_core::{CudaDevice, Result};
use half::bf16;

const SOURCE: &str = concat!(include_str!("flash_frag.cu"), include_str!("lora_fused.cu"));
const MODULE: &str = "finetune_lora_fused";
/// Rows of X a block takes (one m-tile).
const ROWS: usize = 16;
/// The 16-column groups of the kernels built (`FT_LORA_DOWN` instances).
const GROUPS: [usize; 7] = [1, 2, 3, 4, 6, 8, 12];

fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    let opts = candle_core::cuda::cudarc::nvrtc::CompileOptions {
        arch: Some("compute_80"),
        ..Default::default()
    };
    super::compiled_ptx(&PTX, SOURCE, opts, "FineTune's fused LoRA products")
}

/// Whether the fused kernels run when `FINETUNE_CUDA_LORA_FUSED` does not say (`1` on, `0` off).
const BY_DEFAULT: bool = false;

/// Whether the fused kernels run on `dev`: bf16 `mma.sync`, and asked for ([`BY_DEFAULT`]).
fn on(dev: &CudaDevice) -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    let asked = *ON.get_or_init(
        || match std::env::var("FINETUNE_CUDA_LORA_FUSED").as_deref() {
            Ok("1") => true,
            Ok("0") => false,
            _ => BY_DEFAULT,
        },
    );
    asked && super::flash::gpu_has_bf16_mma(dev)
}

/// How the right operand of [`down_split`] is stored.
#[derive(Debug, Clone, Copy)]
pub(super) enum Right {
    /// B3 (3r, K) row-major with rows `ld` apart: the product takes its transpose (`x·Aᵀ`).
    Transposed { ld: usize },
    /// B (K, ≥ 3r) row-major with rows `ld` apart: its first 3r columns (`g·B`).
    Plain { ld: usize },
}

/// `scale · ((P₂ + P₁) + P₀)` split into bf16 parts, (rows, 6r), copy j holding part
/// `pattern[j]`, where P (rows, 3r) = X · right and P_q its columns q·r..(q + 1)·r: the same
/// values `lora_split::row_parts` splits from cuBLAS's P, but for the order of the f32 sums in
/// the product. X (rows, k) bf16 with rows `k` apart. `None` where the kernels do not apply
/// (the caller takes cuBLAS and the split launch).
pub(super) fn down_split(
    dev: &CudaDevice,
    x: &CudaView<'_, bf16>,
    (rows, k, r): (usize, usize, usize),
    (b, right): (&CudaView<'_, bf16>, Right),
    scale: f32,
    pattern: &[u8; 6],
) -> Result<Option<CudaSlice<bf16>>> {
    let op = "ft-lora-down-split";
    let Some(&np) = GROUPS.iter().find(|&&g| 16 * g >= 3 * r) else {
        return Ok(None);
    };
    let (ld, nn) = match right {
        Right::Transposed { ld } => (ld, false),
        Right::Plain { ld } => (ld, true),
    };
    // Pairs of bf16 are read as 32-bit words: even widths and starts.
    let units = k % 2 == 0 && ld % 2 == 0;
    if !on(dev) || !units || rows == 0 || k == 0 || r == 0 {
        return Ok(None);
    }
    let fits = match right {
        Right::Transposed { ld } => ld >= k && b.len() >= (3 * r - 1) * ld + k,
        Right::Plain { ld } => ld >= 3 * r && b.len() >= (k - 1) * ld + 3 * r,
    };
    if x.len() < rows * k || !fits {
        candle_core::bail!(
            "{op}: ({rows}, {k}) · ({k}, {}) over buffers of {} and {}",
            3 * r,
            x.len(),
            b.len()
        );
    }
    let stream = dev.cuda_stream();
    {
        use candle_core::cuda::cudarc::driver::DevicePtr;
        let (xp, _gx) = x.device_ptr(&stream);
        let (bp, _gb) = b.device_ptr(&stream);
        if xp % 4 != 0 || bp % 4 != 0 {
            return Ok(None);
        }
    }
    // SAFETY: the kernel writes all 6r columns of every one of the rows.
    let out = unsafe { dev.alloc::<bf16>(rows * 6 * r) }?;
    let name = format!("ft_lora_down_{}_{np}", if nn { "nn" } else { "nt" });
    let f = dev.get_or_load_custom_func(&name, MODULE, ptx()?)?;
    let int = |v: usize| super::to_i32(v, op);
    let (ldx, ldb) = (k as i64, ld as i64);
    let (rows_i, k_i, r_i) = (int(rows)?, int(k)?, int(r)?);
    let pat: i32 = pattern
        .iter()
        .enumerate()
        .map(|(j, &p)| i32::from(p) << (2 * j))
        .sum();
    let mut bl = f.builder();
    bl.arg(x)
        .arg(&ldx)
        .arg(b)
        .arg(&ldb)
        .arg(&out)
        .arg(&rows_i)
        .arg(&k_i)
        .arg(&r_i)
        .arg(&scale)
        .arg(&pat);
    let cfg = LaunchConfig {
        grid_dim: (int(rows.div_ceil(ROWS))? as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match `ft_lora_down_{nt,nn}_NP`; X holds rows × k and the right
    // operand 3r × k (checked above) and the kernel reads inside them (zeros past them); the
    // 32-bit reads are aligned (even starts and strides); each block writes its rows of out.
    unsafe { bl.launch(cfg) }.w()?;
    Ok(Some(out))
}
