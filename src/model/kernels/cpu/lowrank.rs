//! The LoRA op's skinny f32 products on the CPU, where one side is the rank r (4–64):
//! `dots` (n, r) = x (n, k) · wᵀ for w (r, k), `update` (n, m) (+)= h (n, r) · v (r, m) with v's
//! rows contiguous, and `reduce` (r, m) = hᵀ · x for h (n, r), x (n, m).
//!
//! The `gemm` crate packs both operands and runs its 32×6 register tile over an r-wide side: at
//! r = 8 on SmolLM2's shapes a LoRA op cost 1.4–2× its r = 1 time. With AVX-512 (Intel since
//! Skylake-SP, AMD since Zen 4) these run as kernels of their own instead, which read the large
//! operand once, in row order, with the r-wide side in registers: `dots` four rows of w against
//! four x rows per pass, `update` 64 columns of four output rows per pass over v (w and v, up to
//! 64 × 4 KB, come from L2: each vector serves four rows), `reduce` eight output rows × 32 columns
//! per pass over x. Elsewhere, and with `FINETUNE_NO_AVX512=1` (`exp::path`), the same
//! products go to `gemm`. Sums in f32, each in a fixed order (so a result does not depend on the
//! thread count); `tests` checks both paths against f64.

use candle_core::Result;
use rayon::prelude::*;

use super::exp::{path, Path};
use super::strided::gemm;

/// f32 lanes of one AVX-512 register.
const LANES: usize = 16;

/// Fewest elements of the large operand one task reads (waking a thread costs microseconds).
const ELEMS_PER_TASK: usize = 1 << 15;

/// Errs (naming `op`) when a slice is shorter than its matrix.
fn check(op: &str, what: [(&str, usize, usize); 3]) -> Result<()> {
    for (name, have, need) in what {
        if have < need {
            candle_core::bail!("{op}: {name} holds {have} elements, the product needs {need}");
        }
    }
    Ok(())
}

/// Rows per task for rows of `width` elements.
fn rows_per_task(width: usize) -> usize {
    (ELEMS_PER_TASK / width.max(1)).max(1)
}

/// Whether the AVX-512 kernels run on path `p` (and the CPU has AVX-512F).
fn avx512(p: Path) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        p == Path::Avx512 && is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = p;
        false
    }
}

/// `out (n×r) = alpha · x (n×k) · wᵀ` with w (r×k) row-major.
pub(crate) fn dots(
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    nkr: (usize, usize, usize),
    alpha: f32,
) -> Result<()> {
    dots_on(path(), x, w, out, nkr, alpha)
}

fn dots_on(
    p: Path,
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    (n, k, r): (usize, usize, usize),
    alpha: f32,
) -> Result<()> {
    let op = "lora dots";
    check(
        op,
        [
            ("x", x.len(), n * k),
            ("w", w.len(), r * k),
            ("out", out.len(), n * r),
        ],
    )?;
    if n * r == 0 {
        return Ok(());
    }
    let (x, w, out) = (&x[..n * k], &w[..r * k], &mut out[..n * r]);
    if k == 0 || !avx512(p) {
        return gemm(
            op,
            (n, r, k),
            (out, r),
            false,
            (x, k, 1),
            (w, 1, k),
            alpha,
            true,
        );
    }
    let rows = rows_per_task(k);
    out.par_chunks_mut(rows * r)
        .zip(x.par_chunks(rows * k))
        .for_each(|(o, x)| {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `avx512(p)` found AVX-512F on this CPU.
            unsafe {
                x86::dots(x, w, o, k, r, alpha)
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (o, x);
        });
    Ok(())
}

/// `out (n×m) = [out +] alpha · h (n×r) · v (r×m)`, v row-major.
pub(crate) fn update(
    h: &[f32],
    v: &[f32],
    out: &mut [f32],
    nrm: (usize, usize, usize),
    alpha: f32,
    accumulate: bool,
) -> Result<()> {
    update_on(path(), h, v, out, nrm, (alpha, accumulate))
}

fn update_on(
    p: Path,
    h: &[f32],
    v: &[f32],
    out: &mut [f32],
    (n, r, m): (usize, usize, usize),
    (alpha, accumulate): (f32, bool),
) -> Result<()> {
    let op = "lora update";
    check(
        op,
        [
            ("h", h.len(), n * r),
            ("v", v.len(), r * m),
            ("out", out.len(), n * m),
        ],
    )?;
    if n * m == 0 {
        return Ok(());
    }
    let (h, v, out) = (&h[..n * r], &v[..r * m], &mut out[..n * m]);
    if r == 0 || !avx512(p) {
        return gemm(
            op,
            (n, m, r),
            (out, m),
            accumulate,
            (h, r, 1),
            (v, m, 1),
            alpha,
            true,
        );
    }
    let rows = rows_per_task(m);
    out.par_chunks_mut(rows * m)
        .zip(h.par_chunks(rows * r))
        .for_each(|(o, h)| {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `avx512(p)` found AVX-512F on this CPU.
            unsafe {
                x86::update(h, v, o, (r, m), (alpha, accumulate))
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (o, h);
        });
    Ok(())
}

/// `out (r×m) = alpha · hᵀ · x` for h (n×r) and x (n×m), both row-major.
pub(crate) fn reduce(
    h: &[f32],
    x: &[f32],
    out: &mut [f32],
    nrm: (usize, usize, usize),
    alpha: f32,
) -> Result<()> {
    reduce_on(path(), h, x, out, nrm, alpha)
}

fn reduce_on(
    p: Path,
    h: &[f32],
    x: &[f32],
    out: &mut [f32],
    (n, r, m): (usize, usize, usize),
    alpha: f32,
) -> Result<()> {
    let op = "lora reduce";
    check(
        op,
        [
            ("h", h.len(), n * r),
            ("x", x.len(), n * m),
            ("out", out.len(), r * m),
        ],
    )?;
    if r * m == 0 {
        return Ok(());
    }
    let (h, x, out) = (&h[..n * r], &x[..n * m], &mut out[..r * m]);
    if n == 0 || !avx512(p) {
        return gemm(
            op,
            (r, m, n),
            (out, m),
            false,
            (h, 1, r),
            (x, m, 1),
            alpha,
            true,
        );
    }
    // Tasks by blocks of BLOCK columns; each returns its columns of every output row.
    const BLOCK: usize = 2 * LANES;
    let blocks = m.div_ceil(BLOCK);
    let cols: Vec<Vec<f32>> = (0..blocks)
        .into_par_iter()
        .with_min_len((ELEMS_PER_TASK / (n * BLOCK)).max(1))
        .map(|b| {
            let (c0, c1) = (b * BLOCK, ((b + 1) * BLOCK).min(m));
            let mut acc = vec![0f32; r * BLOCK];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `avx512(p)` found AVX-512F on this CPU.
            unsafe {
                x86::reduce(h, x, &mut acc, (n, r, m), (c0, c1 - c0))
            };
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (&mut acc, c0, c1);
            acc
        })
        .collect();
    for (b, acc) in cols.iter().enumerate() {
        let (c0, c1) = (b * BLOCK, ((b + 1) * BLOCK).min(m));
        for (j, a) in acc.chunks_exact(BLOCK).enumerate() {
            for (o, a) in out[j * m + c0..j * m + c1].iter_mut().zip(a) {
                *o = alpha * a;
            }
        }
    }
    Ok(())
}

/// `Bᵀ` (r, o) of B (o, r) row-major.
pub(crate) fn transposed(b: &[f32], o: usize, r: usize) -> Vec<f32> {
    let mut t = vec![0f32; r * o];
    for (q, row) in b.chunks_exact(r.max(1)).enumerate().take(o) {
        for (j, &v) in row.iter().enumerate() {
            t[j * o + q] = v;
        }
    }
    t
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The AVX-512 bodies. Every pointer offset stays inside the slice it comes from: the callers
    //! pass whole rows (`x`: rows of k, `out`: rows of r, ...), each loop's bounds are those rows'
    //! lengths, and a row's last partial vector is read and written masked (masked-off lanes are
    //! neither read nor written, so they cannot fault).

    use std::arch::x86_64::*;

    use super::LANES;

    /// The mask of the first `len` lanes (all 16 from 16 on).
    #[inline(always)]
    fn mask(len: usize) -> __mmask16 {
        if len >= LANES {
            0xffff
        } else {
            ((1u32 << len) - 1) as __mmask16
        }
    }

    /// Dot products of `R` rows of x (at `xp`, `k` apart) with `G` rows of w (at `wp`, `k`
    /// apart), all `k` long: each vector of w is loaded once for the R rows (w is read from L2
    /// once per R rows of x, not once per row). Each product's sum is the same as one row alone.
    #[target_feature(enable = "avx512f")]
    fn dot_block<const R: usize, const G: usize>(
        xp: *const f32,
        wp: *const f32,
        k: usize,
    ) -> [[f32; G]; R] {
        let full = k / LANES * LANES;
        let mut acc = [[_mm512_setzero_ps(); G]; R];
        let mut c = 0;
        while c < k {
            let mk = if c < full { 0xffff } else { mask(k - full) };
            // SAFETY: lanes c..c + 16, masked to k: inside each of the R rows of x and G of w.
            unsafe {
                let xv: [__m512; R] =
                    std::array::from_fn(|r| _mm512_maskz_loadu_ps(mk, xp.add(r * k + c)));
                let wv: [__m512; G] =
                    std::array::from_fn(|q| _mm512_maskz_loadu_ps(mk, wp.add(q * k + c)));
                for (accs, x) in acc.iter_mut().zip(xv) {
                    for (a, w) in accs.iter_mut().zip(wv) {
                        *a = _mm512_fmadd_ps(x, w, *a);
                    }
                }
            }
            c += LANES;
        }
        acc.map(|row| row.map(|a| _mm512_reduce_add_ps(a)))
    }

    /// Rows `rows` of x (k each) against w's r rows into out's rows (r each), R rows at a time.
    #[target_feature(enable = "avx512f")]
    fn dots_rows<const R: usize>(
        x: &[f32],
        w: &[f32],
        out: &mut [f32],
        (k, r, alpha): (usize, usize, f32),
    ) {
        for (xr, or) in x.chunks_exact(R * k).zip(out.chunks_exact_mut(R * r)) {
            let put = |or: &mut [f32], j: usize, d: &[f32], row: usize| {
                let o = &mut or[row * r + j..row * r + j + d.len()];
                o.iter_mut().zip(d).for_each(|(o, v)| *o = alpha * v);
            };
            let mut j = 0;
            while j + 4 <= r {
                for (row, d) in dot_block::<R, 4>(xr.as_ptr(), w[j * k..].as_ptr(), k)
                    .iter()
                    .enumerate()
                {
                    put(or, j, d, row);
                }
                j += 4;
            }
            for j in j..r {
                for (row, d) in dot_block::<R, 1>(xr.as_ptr(), w[j * k..].as_ptr(), k)
                    .iter()
                    .enumerate()
                {
                    put(or, j, d, row);
                }
            }
        }
    }

    /// Rows of `out (rows×r) = alpha · x (rows×k) · wᵀ`.
    #[target_feature(enable = "avx512f")]
    pub(super) fn dots(x: &[f32], w: &[f32], out: &mut [f32], k: usize, r: usize, alpha: f32) {
        let w = &w[..r * k];
        let rows = (x.len() / k.max(1)).min(out.len() / r.max(1));
        let four = rows / 4 * 4;
        dots_rows::<4>(&x[..four * k], w, &mut out[..four * r], (k, r, alpha));
        dots_rows::<1>(
            &x[four * k..rows * k],
            w,
            &mut out[four * r..rows * r],
            (k, r, alpha),
        );
    }

    /// `G` vectors of columns from `c` of `R` output rows (at `op`, `m` apart): `(+)= alpha ·
    /// Σ_j h[row][j] · v[j]` with h's rows (`r` long) in `hr` and v's rows (`m` long) at `vp`.
    /// Each vector of v is loaded once for the R rows; each output's sum is as for one row.
    #[target_feature(enable = "avx512f")]
    fn update_block<const R: usize, const G: usize>(
        hr: &[f32],
        (vp, op): (*const f32, *mut f32),
        (r, m, c): (usize, usize, usize),
        (alpha, accumulate): (f32, bool),
    ) {
        let masks: [__mmask16; G] = std::array::from_fn(|q| mask(m.saturating_sub(c + q * LANES)));
        let mut acc = [[_mm512_setzero_ps(); G]; R];
        for j in 0..r {
            let hv: [__m512; R] = std::array::from_fn(|row| _mm512_set1_ps(hr[row * r + j]));
            // SAFETY: the masks keep the lanes inside v's row j (column < m).
            let vv: [__m512; G] = std::array::from_fn(|q| unsafe {
                _mm512_maskz_loadu_ps(masks[q], vp.add(j * m + c + q * LANES))
            });
            for (accs, h) in acc.iter_mut().zip(hv) {
                for (a, v) in accs.iter_mut().zip(vv) {
                    *a = _mm512_fmadd_ps(h, v, *a);
                }
            }
        }
        let al = _mm512_set1_ps(alpha);
        for (row, accs) in acc.iter().enumerate() {
            for (q, a) in accs.iter().enumerate() {
                // SAFETY: as above, inside out's row `row`.
                unsafe {
                    let p = op.add(row * m + c + q * LANES);
                    let y = if accumulate {
                        _mm512_fmadd_ps(al, *a, _mm512_maskz_loadu_ps(masks[q], p))
                    } else {
                        _mm512_mul_ps(al, *a)
                    };
                    _mm512_mask_storeu_ps(p, masks[q], y);
                }
            }
        }
    }

    /// Rows of out (m each) from h's rows (r each), R at a time.
    #[target_feature(enable = "avx512f")]
    fn update_rows<const R: usize>(
        h: &[f32],
        v: &[f32],
        out: &mut [f32],
        (r, m): (usize, usize),
        how: (f32, bool),
    ) {
        for (hr, or) in h.chunks_exact(R * r).zip(out.chunks_exact_mut(R * m)) {
            let op = or.as_mut_ptr();
            let mut c = 0;
            while c + 4 * LANES <= m {
                update_block::<R, 4>(hr, (v.as_ptr(), op), (r, m, c), how);
                c += 4 * LANES;
            }
            while c < m {
                update_block::<R, 1>(hr, (v.as_ptr(), op), (r, m, c), how);
                c += LANES;
            }
        }
    }

    /// Rows of `out (rows×m) (+)= alpha · h (rows×r) · v (r×m)`.
    #[target_feature(enable = "avx512f")]
    pub(super) fn update(
        h: &[f32],
        v: &[f32],
        out: &mut [f32],
        (r, m): (usize, usize),
        how: (f32, bool),
    ) {
        let v = &v[..r * m];
        let rows = (h.len() / r.max(1)).min(out.len() / m.max(1));
        let four = rows / 4 * 4;
        update_rows::<4>(&h[..four * r], v, &mut out[..four * m], (r, m), how);
        update_rows::<1>(
            &h[four * r..rows * r],
            v,
            &mut out[four * m..rows * m],
            (r, m),
            how,
        );
    }

    /// Rows ahead that `reduce_group` prefetches.
    const AHEAD: usize = 8;

    /// Output rows `j..j + G`, columns `c0..c0 + w` (w ≤ 32) of `hᵀ · x`.
    #[target_feature(enable = "avx512f")]
    fn reduce_group<const G: usize>(
        h: &[f32],
        x: &[f32],
        (r, m): (usize, usize),
        (j, c0, w): (usize, usize, usize),
    ) -> [[__m512; 2]; G] {
        let (m0, m1) = (mask(w), mask(w.saturating_sub(LANES)));
        let mut a = [[_mm512_setzero_ps(); 2]; G];
        for (hr, xr) in h.chunks_exact(r).zip(x.chunks_exact(m)) {
            let xp = xr[c0..c0 + w].as_ptr();
            // The same columns AHEAD rows on: rows are m apart, too far for the prefetchers to
            // follow. A prefetch never faults; the address is formed without `add`'s bounds.
            let ahead = xp.wrapping_add(AHEAD * m).cast::<i8>();
            _mm_prefetch::<_MM_HINT_T0>(ahead);
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
            // SAFETY: the masks keep the lanes inside the w columns of this row.
            let (x0, x1) = unsafe {
                (
                    _mm512_maskz_loadu_ps(m0, xp),
                    _mm512_maskz_loadu_ps(m1, xp.add(LANES)),
                )
            };
            let hs = &hr[j..j + G];
            for (aa, &hv) in a.iter_mut().zip(hs) {
                let hb = _mm512_set1_ps(hv);
                aa[0] = _mm512_fmadd_ps(hb, x0, aa[0]);
                aa[1] = _mm512_fmadd_ps(hb, x1, aa[1]);
            }
        }
        a
    }

    /// Columns `c0..c0 + w` (w ≤ 32) of `hᵀ · x` into `acc` (r rows of 32).
    #[target_feature(enable = "avx512f")]
    pub(super) fn reduce(
        h: &[f32],
        x: &[f32],
        acc: &mut [f32],
        (n, r, m): (usize, usize, usize),
        (c0, w): (usize, usize),
    ) {
        let (h, x) = (&h[..n * r], &x[..n * m]);
        let mut put = |j: usize, rows: &[[__m512; 2]]| {
            for (q, aa) in rows.iter().enumerate() {
                let row = &mut acc[(j + q) * 2 * LANES..(j + q + 1) * 2 * LANES];
                // SAFETY: the row holds 32 floats.
                unsafe {
                    _mm512_storeu_ps(row.as_mut_ptr(), aa[0]);
                    _mm512_storeu_ps(row.as_mut_ptr().add(LANES), aa[1]);
                }
            }
        };
        let mut j = 0;
        while j < r {
            if r - j >= 8 {
                put(j, &reduce_group::<8>(h, x, (r, m), (j, c0, w)));
                j += 8;
            } else if r - j >= 4 {
                put(j, &reduce_group::<4>(h, x, (r, m), (j, c0, w)));
                j += 4;
            } else {
                put(j, &reduce_group::<1>(h, x, (r, m), (j, c0, w)));
                j += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests;
