//! The LoRA op's skinny f32 products on the CPU, where one side is the rank r (4–64):
//! `dots` (n, r) = x (n, k) · wᵀ for w (r, k), `update` (n, m) (+)= h (n, r) · v (r, m) with v's
//! rows contiguous, and `reduce` (r, m) = hᵀ · x for h (n, r), x (n, m).
//!
//! The `gemm` crate packs both operands and runs its 32×6 register tile over an r-wide side: at
//! r = 8 on SmolLM2's shapes a LoRA op cost 1.4–2× its r = 1 time. With AVX-512 (Intel since
//! Skylake-SP, AMD since Zen 4) these run as kernels of their own instead, which read the large
//! operand once, in row order, with the r-wide side in registers: `dots` four rows of w per pass
//! over an x row, `update` 64 columns of an output row per pass over v, `reduce` eight output rows
//! × 32 columns per pass over x. Elsewhere, and with `FINETUNE_NO_AVX512=1` (`exp::path`), the same
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

    /// `G` dot products of the row at `xp` with the rows at `wp` (`k` apart), all `k` long.
    #[target_feature(enable = "avx512f")]
    fn dot_group<const G: usize>(xp: *const f32, wp: *const f32, k: usize) -> [f32; G] {
        let full = k / LANES * LANES;
        let mut acc = [_mm512_setzero_ps(); G];
        let mut c = 0;
        while c < k {
            let mk = if c < full { 0xffff } else { mask(k - full) };
            // SAFETY: lanes c..c + 16, masked to k: inside x's row and each of the G rows of w.
            unsafe {
                let xv = _mm512_maskz_loadu_ps(mk, xp.add(c));
                for (q, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(mk, wp.add(q * k + c)), *a);
                }
            }
            c += LANES;
        }
        acc.map(|a| _mm512_reduce_add_ps(a))
    }

    /// Rows of `out (rows×r) = alpha · x (rows×k) · wᵀ`.
    #[target_feature(enable = "avx512f")]
    pub(super) fn dots(x: &[f32], w: &[f32], out: &mut [f32], k: usize, r: usize, alpha: f32) {
        let w = &w[..r * k];
        for (xr, or) in x.chunks_exact(k).zip(out.chunks_exact_mut(r)) {
            let mut j = 0;
            while j < r {
                let wp = w[j * k..].as_ptr();
                if r - j >= 4 {
                    let d = dot_group::<4>(xr.as_ptr(), wp, k);
                    for (o, v) in or[j..j + 4].iter_mut().zip(d) {
                        *o = alpha * v;
                    }
                    j += 4;
                } else {
                    or[j] = alpha * dot_group::<1>(xr.as_ptr(), wp, k)[0];
                    j += 1;
                }
            }
        }
    }

    /// `G` vectors of columns from `c` of one output row at `op`: `(+)= alpha · Σ_j h[j] · v[j]`
    /// with v's rows (`m` long) at `vp`.
    #[target_feature(enable = "avx512f")]
    fn update_block<const G: usize>(
        hr: &[f32],
        (vp, op): (*const f32, *mut f32),
        (m, c): (usize, usize),
        (alpha, accumulate): (f32, bool),
    ) {
        let masks: [__mmask16; G] = std::array::from_fn(|q| mask(m.saturating_sub(c + q * LANES)));
        let mut acc = [_mm512_setzero_ps(); G];
        for (j, &hj) in hr.iter().enumerate() {
            let hv = _mm512_set1_ps(hj);
            for (q, a) in acc.iter_mut().enumerate() {
                // SAFETY: the mask keeps the lanes inside v's row j (column < m).
                let vv = unsafe { _mm512_maskz_loadu_ps(masks[q], vp.add(j * m + c + q * LANES)) };
                *a = _mm512_fmadd_ps(hv, vv, *a);
            }
        }
        let al = _mm512_set1_ps(alpha);
        for (q, a) in acc.iter().enumerate() {
            // SAFETY: as above, inside out's row.
            unsafe {
                let p = op.add(c + q * LANES);
                let y = if accumulate {
                    _mm512_fmadd_ps(al, *a, _mm512_maskz_loadu_ps(masks[q], p))
                } else {
                    _mm512_mul_ps(al, *a)
                };
                _mm512_mask_storeu_ps(p, masks[q], y);
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
        for (hr, or) in h.chunks_exact(r).zip(out.chunks_exact_mut(m)) {
            let op = or.as_mut_ptr();
            let mut c = 0;
            while c + 4 * LANES <= m {
                update_block::<4>(hr, (v.as_ptr(), op), (m, c), how);
                c += 4 * LANES;
            }
            while c < m {
                update_block::<1>(hr, (v.as_ptr(), op), (m, c), how);
                c += LANES;
            }
        }
    }

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
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    fn paths() -> Vec<Path> {
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut p = vec![Path::Portable];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            p.push(Path::Avx512);
        }
        p
    }

    /// Both paths (gemm; the AVX-512 kernels where the CPU has them) against f64 sums, at sizes
    /// with and without whole vectors and 64-column blocks, ranks 1–13 (groups of 8/4/1 and their
    /// remainders), row counts that split over several tasks.
    #[test]
    fn products_match_f64_on_every_path() {
        for &(n, k, r) in &[
            (1, 1, 1),
            (5, 31, 3),
            (37, 64, 8),
            (70, 100, 13),
            (600, 130, 4),
        ] {
            let (x, w, h, base) = (
                data(n * k, 1),
                data(r * k, 2),
                data(n * r, 3),
                data(n * k, 5),
            );
            for p in paths() {
                let close = |got: f32, want: f64, what: &str| {
                    let ok = (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs());
                    assert!(ok, "{p:?} {what} ({n},{k},{r}): {got} vs {want}");
                };
                let mut out = vec![f32::NAN; n * r];
                dots_on(p, &x, &w, &mut out, (n, k, r), 0.5).unwrap();
                for i in 0..n {
                    for j in 0..r {
                        let s: f64 = (0..k)
                            .map(|c| x[i * k + c] as f64 * w[j * k + c] as f64)
                            .sum();
                        close(out[i * r + j], 0.5 * s, "dots");
                    }
                }
                for acc in [false, true] {
                    let mut out = if acc {
                        base.clone()
                    } else {
                        vec![f32::NAN; n * k]
                    };
                    update_on(p, &h, &w, &mut out, (n, r, k), (2.0, acc)).unwrap();
                    for i in 0..n {
                        for c in 0..k {
                            let s: f64 = (0..r)
                                .map(|j| h[i * r + j] as f64 * w[j * k + c] as f64)
                                .sum();
                            let want = 2.0 * s + if acc { base[i * k + c] as f64 } else { 0.0 };
                            close(out[i * k + c], want, "update");
                        }
                    }
                }
                let mut out = vec![f32::NAN; r * k];
                reduce_on(p, &h, &x, &mut out, (n, r, k), 0.25).unwrap();
                for j in 0..r {
                    for c in 0..k {
                        let s: f64 = (0..n)
                            .map(|i| h[i * r + j] as f64 * x[i * k + c] as f64)
                            .sum();
                        close(out[j * k + c], 0.25 * s, "reduce");
                    }
                }
            }
            let t = transposed(&w, r, k);
            assert!((0..r).all(|j| (0..k).all(|c| t[c * r + j] == w[j * k + c])));
        }
    }

    /// A slice shorter than its matrix is an error naming it, on every path.
    #[test]
    fn short_slices_are_errors() {
        for p in paths() {
            let err = dots_on(p, &[0.0; 3], &[0.0; 4], &mut [0.0; 4], (2, 2, 2), 1.0).unwrap_err();
            assert!(err.to_string().contains("x holds 3 elements"), "{err}");
            let err =
                reduce_on(p, &[0.0; 4], &[0.0; 4], &mut [0.0; 3], (2, 2, 2), 1.0).unwrap_err();
            assert!(err.to_string().contains("out holds 3 elements"), "{err}");
        }
    }
}
