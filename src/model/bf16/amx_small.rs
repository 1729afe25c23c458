//! Small products on the AMX tiles, on the calling thread alone, with both operands f32 rounded
//! to bf16 (RNE) while packing and the sums in f32: the fused CPU attention's per-block products
//! in the bf16 mode (`model::attention`), which runs one head per rayon task already.
//!
//! At these sizes (a 64 × 256 × 64 product is a million multiply-adds, about two µs on the
//! tiles) packing is most of the cost, so the layouts the attention hands over are packed with
//! AVX512-BF16 conversions: rows of A or columns of B that are contiguous in k go through the
//! row packer (32 values an instruction), and operands contiguous the other way (A transposed,
//! B row-major) are rounded two k-rows at a time and interleaved into the tiles' pairs. Other
//! strides take a scalar loop. The tile kernel itself is [`super::amx`]'s.

use core::arch::asm;
use core::arch::x86_64::*;
use std::cell::Cell;

use half::bf16;

use super::amx::{as_bf16, block, keep, scratch, write_edge, BLOCK, CONFIG, KT};

thread_local! {
    static A_PACK: Cell<Vec<u32>> = const { Cell::new(Vec::new()) };
    static B_PACK: Cell<Vec<u32>> = const { Cell::new(Vec::new()) };
    static COLUMN: Cell<Vec<u32>> = const { Cell::new(Vec::new()) };
}

/// C (m×n, row stride `ldc`) = [C +] A·B with A (m×k) and B (k×n) f32 at the given strides.
///
/// # Safety
/// [`super::amx::usable`] and [`super::has_bf16_hw`] returned true; shapes were validated
/// against the slices; m, n, k > 0.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    (a, a_rs, a_cs): (&[f32], usize, usize),
    (b, b_rs, b_cs): (&[f32], usize, usize),
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    let kp = k.div_ceil(KT) * KT;
    let (kp2, mp) = (kp / 2, m.div_ceil(BLOCK) * BLOCK);
    let panels = n.div_ceil(BLOCK) * 2;
    let panel = kp2 * 16;
    let mut ap_v = scratch(&A_PACK, mp * kp2, 0u32);
    let mut bp_v = scratch(&B_PACK, panels * panel, 0u32);
    let mut column_v = scratch(&COLUMN, kp2.max(panels * 16).max(m), 0u32);
    let (ap, bp) = (&mut ap_v[..mp * kp2], &mut bp_v[..panels * panel]);
    let column = &mut column_v[..kp2.max(panels * 16).max(m)];
    pack_a(m, k, kp2, (a, a_rs, a_cs), ap, column);
    pack_b(n, k, kp2, (b, b_rs, b_cs), bp, column);
    let (ap16, bp16) = (as_bf16(ap), as_bf16(bp));
    let mut tile = [0f32; BLOCK * BLOCK];
    // SAFETY: AMX is usable (the caller's contract); the configuration is valid for palette 1
    // and is loaded on this thread before any tile instruction and released after.
    unsafe { asm!("ldtilecfg [{0}]", in(reg) &CONFIG, options(nostack, readonly)) };
    for rb in 0..mp / BLOCK {
        let rows = &ap16[rb * BLOCK * kp..(rb + 1) * BLOCK * kp];
        for pp in 0..panels / 2 {
            let pair = &bp16[2 * pp * 2 * panel..(2 * pp + 2) * 2 * panel];
            let (i0, j0) = (rb * BLOCK, pp * BLOCK);
            // SAFETY: `rows` holds 32 × kp bf16 and `pair` two panels of kp/2 × 32, so every
            // tile load stays inside them. A whole block lies inside C (validated: c.len() ≥
            // (m − 1)·ldc + n), an edge block goes through `tile`, 32×32 f32.
            unsafe {
                if i0 + BLOCK <= m && j0 + BLOCK <= n {
                    let out = c.as_mut_ptr().add(i0 * ldc + j0);
                    block(rows, kp, pair, 2 * panel, out, ldc, accumulate);
                } else {
                    block(rows, kp, pair, 2 * panel, tile.as_mut_ptr(), BLOCK, false);
                    write_edge(&tile, c.as_mut_ptr(), ldc, (i0, j0), (m, n), accumulate);
                }
            }
        }
    }
    // SAFETY: releases this thread's tile state (configured above).
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
    keep(&COLUMN, column_v);
    keep(&B_PACK, bp_v);
    keep(&A_PACK, ap_v);
}

/// A as `mp` rows of `kp2` bf16 pairs (k padded with zeros), rows past m zero.
fn pack_a(
    m: usize,
    k: usize,
    kp2: usize,
    (a, rs, cs): (&[f32], usize, usize),
    ap: &mut [u32],
    tmp: &mut [u32],
) {
    ap[m * kp2..].fill(0);
    if cs == 1 {
        for (i, row) in ap.chunks_exact_mut(kp2).take(m).enumerate() {
            // SAFETY: the CPU has AVX512-BF16 (the caller's contract); row i's k values lie in
            // `a` (validated) and `row` holds kp2 ≥ k/2 pairs.
            unsafe { super::avx512::pack_a_row(a, i * rs, 1, k, row) };
        }
    } else if rs == 1 {
        // Aᵀ is row-major: k-rows 2q and 2q + 1 round and interleave into pair q of every row.
        for q in 0..kp2 {
            let (lo, hi) = (k_row(a, cs, m, 2 * q, k), k_row(a, cs, m, 2 * q + 1, k));
            // SAFETY: as above for the CPU; `lo`/`hi` and tmp[..m] have m values.
            unsafe { interleave(lo, hi, &mut tmp[..m]) };
            for (i, &pair) in tmp[..m].iter().enumerate() {
                ap[i * kp2 + q] = pair;
            }
        }
    } else {
        for (i, row) in ap.chunks_exact_mut(kp2).take(m).enumerate() {
            for (q, pair) in row.iter_mut().enumerate() {
                let at = |p: usize| if p < k { a[i * rs + p * cs] } else { 0.0 };
                *pair = pair_of(at(2 * q), at(2 * q + 1));
            }
        }
    }
}

/// B as panels of 16 columns, each `kp2` rows of 16 bf16 pairs (B[2q][j], B[2q + 1][j]): the
/// B tile's layout. Columns past n and k past k are zeros.
fn pack_b(
    n: usize,
    k: usize,
    kp2: usize,
    (b, rs, cs): (&[f32], usize, usize),
    bp: &mut [u32],
    tmp: &mut [u32],
) {
    let panel = kp2 * 16;
    let np = bp.len() / panel * 16;
    if cs == 1 {
        // Row-major: k-rows 2q and 2q + 1 make row q of every panel.
        for q in 0..kp2 {
            let (lo, hi) = (k_row(b, rs, n, 2 * q, k), k_row(b, rs, n, 2 * q + 1, k));
            // SAFETY: the CPU has AVX512-BF16; `lo`/`hi` and tmp[..n] have n values.
            unsafe { interleave(lo, hi, &mut tmp[..n]) };
            tmp[n..np].fill(0);
            for (p, cols) in tmp[..np].chunks_exact(16).enumerate() {
                bp[p * panel + q * 16..p * panel + q * 16 + 16].copy_from_slice(cols);
            }
        }
    } else if rs == 1 {
        // Column j is contiguous in k: packed as an A row, then spread down its panel.
        if n < np {
            bp.fill(0);
        }
        for j in 0..n {
            // SAFETY: the CPU has AVX512-BF16; column j's k values lie in `b` (validated) and
            // tmp[..kp2] holds kp2 ≥ k/2 pairs.
            unsafe { super::avx512::pack_a_row(b, j * cs, 1, k, &mut tmp[..kp2]) };
            let base = (j / 16) * panel + j % 16;
            for (q, &pair) in tmp[..kp2].iter().enumerate() {
                bp[base + q * 16] = pair;
            }
        }
    } else {
        for (p, dst) in bp.chunks_exact_mut(panel).enumerate() {
            for (q, row) in dst.chunks_exact_mut(16).enumerate() {
                for (col, pair) in row.iter_mut().enumerate() {
                    let j = p * 16 + col;
                    let at = |r: usize| {
                        if r < k && j < n {
                            b[r * rs + j * cs]
                        } else {
                            0.0
                        }
                    };
                    *pair = pair_of(at(2 * q), at(2 * q + 1));
                }
            }
        }
    }
}

/// The `len` values of k-row `r` of an operand whose k-rows are contiguous (`stride` apart), or
/// `None` past the last row (the padding, zeros).
fn k_row(x: &[f32], stride: usize, len: usize, r: usize, k: usize) -> Option<&[f32]> {
    (r < k).then(|| &x[r * stride..r * stride + len])
}

/// Two f32 rounded to bf16 as one tile pair, the first in the low half.
fn pair_of(lo: f32, hi: f32) -> u32 {
    u32::from(bf16::from_f32(lo).to_bits()) | (u32::from(bf16::from_f32(hi).to_bits()) << 16)
}

/// `dst[c]` = (bf16(lo[c]), bf16(hi[c])) as a tile pair; a missing row is zeros.
///
/// # Safety
/// The CPU has AVX512F/BW/VL and AVX512-BF16; `lo` and `hi` hold at least `dst.len()` values.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
unsafe fn interleave(lo: Option<&[f32]>, hi: Option<&[f32]>, dst: &mut [u32]) {
    let n = dst.len();
    let mut c = 0;
    while c < n {
        let cnt = (n - c).min(16);
        let mask: __mmask16 = if cnt == 16 { 0xffff } else { (1u16 << cnt) - 1 };
        // SAFETY: the mask limits the loads to lo/hi[c..c + cnt] and the store to
        // dst[c..c + cnt], all in bounds.
        unsafe {
            let l = match lo {
                Some(x) => _mm512_maskz_loadu_ps(mask, x.as_ptr().add(c)),
                None => _mm512_setzero_ps(),
            };
            let h = match hi {
                Some(x) => _mm512_maskz_loadu_ps(mask, x.as_ptr().add(c)),
                None => _mm512_setzero_ps(),
            };
            let l = core::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(l));
            let h = core::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(h));
            let pairs = _mm512_or_si512(
                _mm512_cvtepu16_epi32(l),
                _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)),
            );
            _mm512_mask_storeu_epi32(dst.as_mut_ptr().add(c).cast(), mask, pairs);
        }
        c += 16;
    }
}
