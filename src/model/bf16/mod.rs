//! Mixed-precision matrix multiply for the CPU: f32 activations × bf16 frozen weights, f32
//! accumulation (the frozen linear layers' forward and input-gradient products).
//!
//! On x86_64 CPUs with AVX512-BF16 the product runs on a packed `vdpbf16ps`
//! microkernel; everywhere else a portable (bf16-rounded) f32 path is used.

#[cfg(target_arch = "x86_64")]
mod avx512;
mod portable;

use half::bf16;
use std::fmt;

/// Errors reported for inconsistent slice sizes / strides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// Slice `a` is too short for the given shape and strides.
    ATooShort { needed: usize, len: usize },
    /// Slice `b` is too short for the given shape and strides.
    BTooShort { needed: usize, len: usize },
    /// Slice `c` is too short for the given shape and `ldc`.
    CTooShort { needed: usize, len: usize },
    /// `ldc < n` while `m > 1`: rows of C would overlap.
    LdcTooSmall { ldc: usize, n: usize },
    /// Index arithmetic overflowed `usize`.
    Overflow,
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
        m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, c, ldc, accumulate, false,
    )
}

/// Same contract as [`matmul_f32_bf16`] but always uses the portable path (for testing the
/// fallback on machines that have the hardware).
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub fn matmul_f32_bf16_portable(
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
        m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, c, ldc, accumulate, true,
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
    portable_only: bool,
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
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * ldc..i * ldc + n].fill(0.0);
            }
        }
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    {
        if !portable_only && has_bf16_hw() {
            // SAFETY: the CPU supports avx512f/bw/vl/bf16 (checked just above) and all
            // shapes/strides were validated against the slice lengths by `validate`.
            unsafe {
                avx512::matmul(m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, c, ldc, accumulate);
            }
            return Ok(());
        }
    }
    let _ = portable_only;
    portable::matmul(m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, c, ldc, accumulate);
    Ok(())
}

#[cfg(test)]
mod tests;
