//! Mixed-precision matrix multiply for the CPU: f32 activations × bf16 frozen weights, f32
//! accumulation (the frozen linear layers' forward and input-gradient products).
//!
//! On x86_64 CPUs with AMX-BF16 (Intel Sapphire Rapids and later) the product runs on the matrix
//! unit's tiles ([`amx`]); with AVX512-BF16 (AMD Zen 4/5, Intel Cooper Lake) on a packed
//! `vdpbf16ps` microkernel; everywhere else a portable (bf16-rounded) f32 path is used. The
//! choice is made at run time ([`kernel_name`]); `FINETUNE_NO_AMX=1` skips the tiles.

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod amx_small;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod portable;

use half::bf16;
use std::fmt;

/// The AMX kernel runs products with k over 2048 as products over k chunks of this size, packing
/// one chunk of each operand at a time (the memory estimate counts one).
pub const AMX_K_CHUNK: usize = 1024;

/// Errors reported for inconsistent slice sizes / strides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Slice `a` is too short for the given shape and strides.
    ATooShort {
        /// Elements the shape and strides need.
        needed: usize,
        /// Elements the slice has.
        len: usize,
    },
    /// Slice `b` is too short for the given shape and strides.
    BTooShort {
        /// Elements the shape and strides need.
        needed: usize,
        /// Elements the slice has.
        len: usize,
    },
    /// Slice `c` is too short for the given shape and `ldc`.
    CTooShort {
        /// Elements the shape and `ldc` need.
        needed: usize,
        /// Elements the slice has.
        len: usize,
    },
    /// `ldc < n` while `m > 1`: rows of C would overlap.
    LdcTooSmall {
        /// Row stride of C, in elements.
        ldc: usize,
        /// Columns of C.
        n: usize,
    },
    /// Index arithmetic overflowed `usize`.
    Overflow,
    /// The row work of [`matmul_f32_bf16_rows`] failed, or its side buffer is too short.
    Work(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::ATooShort { needed, len } => {
                write!(f, "slice a too short: needs {needed} elements, has {len}")
            }
            Error::BTooShort { needed, len } => {
                write!(f, "slice b too short: needs {needed} elements, has {len}")
            }
            Error::CTooShort { needed, len } => {
                write!(f, "slice c too short: needs {needed} elements, has {len}")
            }
            Error::LdcTooSmall { ldc, n } => write!(f, "ldc ({ldc}) smaller than n ({n})"),
            Error::Overflow => write!(f, "index arithmetic overflow"),
            Error::Work(ref e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Error {}

/// Minimum slice length holding a `rows × cols` matrix with the given strides.
fn needed_len(rows: usize, cols: usize, rs: usize, cs: usize) -> Result<usize, Error> {
    if rows == 0 || cols == 0 {
        return Ok(0);
    }
    let r = (rows - 1).checked_mul(rs).ok_or(Error::Overflow)?;
    let c = (cols - 1).checked_mul(cs).ok_or(Error::Overflow)?;
    r.checked_add(c)
        .and_then(|x| x.checked_add(1))
        .ok_or(Error::Overflow)
}

/// Shape/stride validation shared by all paths.
#[allow(clippy::too_many_arguments)]
fn validate(
    m: usize,
    n: usize,
    k: usize,
    a_len: usize,
    a_rs: usize,
    a_cs: usize,
    b_len: usize,
    b_rs: usize,
    b_cs: usize,
    c_len: usize,
    ldc: usize,
) -> Result<(), Error> {
    if m > 1 && ldc < n {
        return Err(Error::LdcTooSmall { ldc, n });
    }
    let need_c = needed_len(m, n, ldc, 1)?;
    if c_len < need_c {
        return Err(Error::CTooShort {
            needed: need_c,
            len: c_len,
        });
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let need_a = needed_len(m, k, a_rs, a_cs)?;
    if a_len < need_a {
        return Err(Error::ATooShort {
            needed: need_a,
            len: a_len,
        });
    }
    let need_b = needed_len(k, n, b_rs, b_cs)?;
    if b_len < need_b {
        return Err(Error::BTooShort {
            needed: need_b,
            len: b_len,
        });
    }
    Ok(())
}

/// Handles a product with no rows, columns or inner dimension (C (m×n, rows `ldc` apart) is
/// zeroed for k = 0 unless `accumulate`); false when there is work for a kernel.
pub fn degenerate(
    (m, n, k): (usize, usize, usize),
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) -> bool {
    if m > 0 && n > 0 && k > 0 {
        return false;
    }
    if m > 0 && n > 0 && !accumulate {
        for i in 0..m {
            c[i * ldc..i * ldc + n].fill(0.0);
        }
    }
    true
}

/// True when the AVX512-BF16 kernel can run on this CPU.
pub fn has_bf16_hw() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the AMX-BF16 tiles run the product here ([`amx::usable`]).
pub fn has_amx() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        amx::usable()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The kernel [`matmul_f32_bf16`] runs on this CPU: "amx-bf16", "avx512bf16" or "portable".
pub fn kernel_name() -> &'static str {
    if has_amx() {
        "amx-bf16"
    } else if has_bf16_hw() {
        "avx512bf16"
    } else {
        "portable"
    }
}

/// Which kernel a product runs on: the best the CPU has, or (for tests) a given one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Best,
    #[cfg(test)]
    Avx512,
    #[cfg(test)]
    Portable,
}

/// C (m×n, row-major, row stride ldc) = A · B  (+ C if accumulate)
///
/// * A: f32, m×k, element (i,p) at `a[i*a_rs + p*a_cs]` (rounded to bf16, RNE, while packing)
/// * B: bf16, k×n, element (p,j) at `b[p*b_rs + j*b_cs]`
///
/// Accumulation is in f32. Runs in parallel on rayon's current pool.
#[allow(clippy::too_many_arguments)]
pub fn matmul_f32_bf16(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[bf16],
    b_rs: usize,
    b_cs: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) -> Result<(), Error> {
    matmul_impl(
        m,
        n,
        k,
        a,
        a_rs,
        a_cs,
        b,
        b_rs,
        b_cs,
        c,
        ldc,
        accumulate,
        Path::Best,
    )
}

/// [`matmul_f32_bf16`] on a given kernel, for testing the others on machines whose best path is
/// another: `PORTABLE` true takes the portable path, false the AVX512-BF16 kernel (portable where
/// the CPU lacks it).
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub fn matmul_f32_bf16_on<const PORTABLE: bool>(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[bf16],
    b_rs: usize,
    b_cs: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) -> Result<(), Error> {
    let path = if PORTABLE {
        Path::Portable
    } else {
        Path::Avx512
    };
    matmul_impl(
        m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, c, ldc, accumulate, path,
    )
}

#[allow(clippy::too_many_arguments)]
fn matmul_impl(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[bf16],
    b_rs: usize,
    b_cs: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    path: Path,
) -> Result<(), Error> {
    validate(
        m,
        n,
        k,
        a.len(),
        a_rs,
        a_cs,
        b.len(),
        b_rs,
        b_cs,
        c.len(),
        ldc,
    )?;
    if degenerate((m, n, k), c, ldc, accumulate) {
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    {
        if path == Path::Best && amx::usable() {
            // SAFETY: AMX-BF16 is usable on this CPU and process (checked just above) and all
            // shapes/strides were validated against the slice lengths by `validate`.
            return unsafe {
                amx::matmul(
                    m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, c, ldc, accumulate, None,
                )
            }
            .map_err(Error::Work);
        }
        #[cfg(test)]
        let avx512_allowed = path != Path::Portable;
        #[cfg(not(test))]
        let avx512_allowed = true;
        if avx512_allowed && has_bf16_hw() {
            // SAFETY: the CPU supports avx512f/bw/vl/bf16 (checked just above) and all
            // shapes/strides were validated against the slice lengths by `validate`.
            unsafe {
                avx512::matmul(m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, c, ldc, accumulate);
            }
            return Ok(());
        }
    }
    let _ = path;
    portable::matmul(m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, c, ldc, accumulate);
    Ok(())
}

/// Work on a product's rows while they are in cache (the LoRA op's rank-r terms): `packed` gets
/// the index of a block's first row, its rows of A (k each) and the same rows of `side` (`width`
/// each) right after those rows are packed; `done` gets the index, rows of `side` and the same
/// rows of C (n each) as soon as they are complete. Blocks of rows come in any order, from any
/// thread; each row exactly once to each.
pub struct RowWork<'a> {
    /// m rows of `width` values (written by `packed`, read by `done`).
    pub side: &'a mut [f32],
    /// Values a row of `side` holds (≥ 1).
    pub width: usize,
    /// (rows of A, the same rows of `side`).
    pub packed: &'a RowFn<'a>,
    /// (rows of `side`, the same rows of C).
    pub done: &'a RowFn<'a>,
}

/// Work on rows of two matrices: (first row's index, rows read, rows written).
pub type RowFn<'f> = dyn Fn(usize, &[f32], &mut [f32]) -> Result<(), String> + Sync + 'f;

/// C (m×n, rows n apart) = [C +] A · B as [`matmul_f32_bf16`] with A row-major (m×k), running
/// `work` on the rows: inside the AMX kernel where it runs (A's rows as they are packed, C's as
/// each block of 32 is done), else `packed` on all of A before the product and `done` on all of
/// C after it — the same calls on the same rows either way.
#[allow(clippy::too_many_arguments)]
pub fn matmul_f32_bf16_rows(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    (b, b_rs, b_cs): (&[bf16], usize, usize),
    c: &mut [f32],
    accumulate: bool,
    work: &mut RowWork<'_>,
) -> Result<(), Error> {
    validate(m, n, k, a.len(), k, 1, b.len(), b_rs, b_cs, c.len(), n)?;
    if work.width == 0 || work.side.len() < m * work.width {
        return Err(Error::Work(format!(
            "row work: {} side values for {m} rows of {}",
            work.side.len(),
            work.width
        )));
    }
    let (a, c, side) = (
        &a[..m * k],
        &mut c[..m * n],
        &mut work.side[..m * work.width],
    );
    let work = RowWork {
        side,
        width: work.width,
        packed: work.packed,
        done: work.done,
    };
    #[cfg(target_arch = "x86_64")]
    if m > 0 && n > 0 && k > 0 && amx::usable() {
        let mut work = work;
        // SAFETY: AMX-BF16 is usable here (checked), the shapes were validated against the
        // slices, m, n, k > 0, A is row-major, ldc = n and the side holds m·width ≥ m values.
        return unsafe {
            amx::matmul(
                m,
                n,
                k,
                a,
                k,
                1,
                b,
                b_rs,
                b_cs,
                c,
                n,
                accumulate,
                Some(&mut work),
            )
        }
        .map_err(Error::Work);
    }
    (work.packed)(0, a, work.side).map_err(Error::Work)?;
    matmul_f32_bf16(m, n, k, a, k, 1, b, b_rs, b_cs, c, n, accumulate)?;
    (work.done)(0, work.side, c).map_err(Error::Work)
}

/// Whether [`matmul_f32_small`] runs on the AMX tiles here (its packers need AVX512-BF16 too,
/// which every AMX CPU has; a VM could hide it); elsewhere it is a plain loop, kept for tests
/// (callers use it only where this says yes).
pub fn small_products_on_tiles() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        amx::usable() && has_bf16_hw()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A matrix operand: its slice, row stride and column stride.
pub type Operand<'a> = (&'a [f32], usize, usize);

/// C (m×n, row stride `ldc`) = [C +] A·B with A (m×k) and B (k×n) both f32, their values rounded
/// to bf16 (RNE) and the sums in f32, on the calling thread only: for small products inside a
/// parallel region (the fused attention's blocks in the bf16 mode). On the AMX tiles where
/// [`small_products_on_tiles`], else a plain loop with the same rounding.
pub fn matmul_f32_small(
    (m, n, k): (usize, usize, usize),
    a: Operand<'_>,
    b: Operand<'_>,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) -> Result<(), Error> {
    validate(
        m,
        n,
        k,
        a.0.len(),
        a.1,
        a.2,
        b.0.len(),
        b.1,
        b.2,
        c.len(),
        ldc,
    )?;
    if degenerate((m, n, k), c, ldc, accumulate) {
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if small_products_on_tiles() {
        // SAFETY: AMX and AVX512-BF16 are usable here, checked just above; the shapes and
        // strides were validated against the slices; m, n, k > 0.
        unsafe { amx_small::matmul((m, n, k), a, b, c, ldc, accumulate) };
        return Ok(());
    }
    let round = |x: f32| bf16::from_f32(x).to_f32();
    for i in 0..m {
        for j in 0..n {
            let dot: f32 = (0..k)
                .map(|p| round(a.0[i * a.1 + p * a.2]) * round(b.0[p * b.1 + j * b.2]))
                .sum();
            let out = &mut c[i * ldc + j];
            *out = if accumulate { *out + dot } else { dot };
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
