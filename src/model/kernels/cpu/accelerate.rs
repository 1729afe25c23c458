//! Apple's Accelerate framework for the CPU's f32 frozen products on macOS: `cblas_sgemm` runs on
//! the Apple silicon matrix units (AMX) that the `gemm` crate's NEON kernel cannot reach. Used by
//! [`super::linear`]'s product when the build targets macOS; `FINETUNE_NO_ACCELERATE=1` keeps the
//! `gemm` crate's kernel (to compare the two). Linked as a system framework: nothing to download.
//! This machine type-checks it (`shared/tools/mac-check.sh`); it runs only on a Mac.

use std::os::raw::c_int;

#[link(name = "Accelerate", kind = "framework")]
extern "C" {
    fn cblas_sgemm(
        order: c_int,
        trans_a: c_int,
        trans_b: c_int,
        m: c_int,
        n: c_int,
        k: c_int,
        alpha: f32,
        a: *const f32,
        lda: c_int,
        b: *const f32,
        ldb: c_int,
        beta: f32,
        c: *mut f32,
        ldc: c_int,
    );
}

/// CBLAS's constants (cblas.h).
const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

/// Whether the products go through Accelerate (not turned off by `FINETUNE_NO_ACCELERATE=1`).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !std::env::var("FINETUNE_NO_ACCELERATE").is_ok_and(|v| v == "1"))
}

/// out (n, o) = x (n, i) · wᵀ (added to `out` when `accumulate`) for row-major x and w (o, i).
/// False, with `out` untouched, when a size does not fit CBLAS's `int` or a slice is short.
pub fn sgemm_xwt(
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    (n, i, o): (usize, usize, usize),
    accumulate: bool,
) -> bool {
    let (Ok(m), Ok(cols), Ok(k)) = (c_int::try_from(n), c_int::try_from(o), c_int::try_from(i))
    else {
        return false;
    };
    if i == 0 || x.len() < n * i || w.len() < o * i || out.len() < n * o {
        return false;
    }
    let beta = if accumulate { 1.0 } else { 0.0 };
    // SAFETY: x holds n·i values (row stride i = lda), w holds o·i (read transposed, row stride
    // i = ldb), out holds n·o (row stride o = ldc), all checked above; with beta 0 CBLAS writes C
    // without reading it, and `out` does not alias the inputs (it is borrowed mutably).
    unsafe {
        cblas_sgemm(
            ROW_MAJOR,
            NO_TRANS,
            TRANS,
            m,
            cols,
            k,
            1.0,
            x.as_ptr(),
            k,
            w.as_ptr(),
            k,
            beta,
            out.as_mut_ptr(),
            cols,
        );
    }
    true
}

#[cfg(test)]
mod tests {
    /// Against an f64 product, plain and accumulating (runs on a Mac).
    #[test]
    fn sgemm_matches_f64() {
        let (n, i, o) = (37, 300, 45);
        let x: Vec<f32> = (0..n * i)
            .map(|v| ((v * 7919) % 113) as f32 / 56.0 - 1.0)
            .collect();
        let w: Vec<f32> = (0..o * i)
            .map(|v| ((v * 104_729) % 97) as f32 / 48.0 - 1.0)
            .collect();
        let mut out = vec![0.5f32; n * o];
        assert!(super::sgemm_xwt(&x, &w, &mut out, (n, i, o), true));
        for r in 0..n {
            for c in 0..o {
                let want: f64 = 0.5
                    + (0..i)
                        .map(|k| x[r * i + k] as f64 * w[c * i + k] as f64)
                        .sum::<f64>();
                let got = out[r * o + c] as f64;
                assert!(
                    (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "{r},{c}: {got} vs {want}"
                );
            }
        }
    }
}
