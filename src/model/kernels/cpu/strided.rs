//! Bounds-checked f32 products over strided operands through the `gemm` crate: the fused
//! attention's per-block products (on its own thread) and the LoRA op's skinny ones (on the
//! pool).

use candle_core::Result;

use crate::model::bf16::Operand;

/// Elements a `rows × cols` matrix at strides (`rs`, `cs`) spans.
fn extent(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// `dst (m×n) = [dst +] alpha · A (m×k) · B (k×n)`, dst's rows `dst_rs` apart (its columns
/// adjacent). Errs (naming `op`) when a slice does not cover its strided extent. `parallel`: on
/// rayon's pool, else on this thread.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    op: &str,
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (&mut [f32], usize),
    accumulate: bool,
    a: Operand<'_>,
    b: Operand<'_>,
    alpha: f32,
    parallel: bool,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    if dst.len() < extent(m, n, dst_rs, 1)
        || a.0.len() < extent(m, k, a.1, a.2)
        || b.0.len() < extent(k, n, b.1, b.2)
    {
        candle_core::bail!("{op}: gemm operands out of bounds");
    }
    if crate::model::bf16::degenerate((m, n, k), dst, dst_rs, accumulate) {
        return Ok(());
    }
    let threads = rayon::current_num_threads();
    let par = if parallel && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the checks above guarantee every strided element of dst (m×n, strides dst_rs/1),
    // a (m×k, strides a.1/a.2) and b (k×n, strides b.1/b.2) lies inside its slice; dst is a
    // unique borrow so it aliases neither input; the parallel tasks end before this returns.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.0.as_ptr(),
            a.2 as isize,
            a.1 as isize,
            b.0.as_ptr(),
            b.2 as isize,
            b.1 as isize,
            if accumulate { 1.0 } else { 0.0 },
            alpha,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}
