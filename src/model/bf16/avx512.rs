//! AVX512-BF16 (`vdpbf16ps`) packed GEMM.
//!
//! Layout of the packed operands (all as u32 = two bf16, low half = even k):
//! * A block: `mc` rows, each row `kps` u32 (k-pairs), row-major, zero padded.
//! * B micro-panel: for each k-pair, `NR` consecutive u32 (one per column).
//!
//! The microkernel computes an `MR × NR` tile with `MR*NV` zmm accumulators,
//! broadcasting one k-pair of A per row and loading `NV` vectors of B.

use core::arch::x86_64::*;
use half::bf16;
use rayon::prelude::*;

/// Number of zmm vectors across a tile (NR = 16 * NV).
const NV: usize = 3;
/// Columns per micro-panel.
const NR: usize = 16 * NV;
/// Rows per microkernel tile.
const MR: usize = 8;
/// Largest k-block (elements); k is split into balanced even blocks of at most KC.
/// Large on purpose: every extra k-block re-reads and re-writes all of C, which
/// costs more than streaming the B panel from L2 instead of L1.
const KC: usize = 2048;
/// Rows of A packed per block (multiple of MR).
const MC: usize = 1024;

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the pointer is only used to write disjoint tiles of C from different
// threads; the owning `&mut [f32]` outlives the parallel region.
unsafe impl Send for SendPtr {}
// SAFETY: see above.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Pointer `off` elements past the base (caller guarantees in-bounds).
    fn at(&self, off: usize) -> *mut f32 {
        self.0.wrapping_add(off)
    }
}

/// Budget (bytes) for keeping all k-blocks of a packed A row block resident.
const A_FULL_BYTES: usize = 16 << 20;
/// Budget (bytes) for the C block (mc × nc f32) revisited across k-blocks.
const C_BLOCK_BYTES: usize = 4 << 20;

/// # Safety
/// CPU must support avx512f/bw/vl/bf16; shapes validated; m, n, k > 0.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
pub(crate) unsafe fn matmul(
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
) {
    let threads = rayon::current_num_threads().max(1);
    // Balanced k-blocks (even sizes, at most KC) so no block is tiny.
    // Balanced k-blocks of at most KC (k <= KC: a single block, C written once).
    let kcb = k.div_ceil(k.div_ceil(KC)).next_multiple_of(2).min(KC);
    // B panel depth in k-pairs.
    let kpb = kcb / 2;
    // Packed A row stride in u32; +16 (one cache line) so the MR rows read
    // together do not alias to the same L1 set when kpb is a power of two.
    let kps = kpb + 16;
    let nkb = k.div_ceil(kcb);
    let mc_max = MC.min(m.div_ceil(MR) * MR);
    let a_full = mc_max * nkb * kps * 4 <= A_FULL_BYTES;
    let a_blocks = if a_full { nkb } else { 1 };
    // Reuse the calling thread's packing buffer across calls (avoids page faults
    // and zeroing of a fresh multi-MiB allocation on every call).
    let need = a_blocks * mc_max * kps;
    let mut apack = APACK.with(|c| c.take());
    if apack.len() < need {
        apack = vec![0u32; need];
    }
    let cptr = SendPtr(c.as_mut_ptr());
    // Column block: keep the C block in (shared) L3 across k-blocks, and give
    // every thread several panels.
    let nc = {
        let by_cache = (C_BLOCK_BYTES / (4 * mc_max)).max(NR) / NR * NR;
        let min_nc = 8 * threads * NR;
        by_cache.max(min_nc)
    };

    for ic in (0..m).step_by(MC) {
        let mc = MC.min(m - ic);
        let pack_a = |apack: &mut [u32], pc: usize| {
            let kc = kcb.min(k - pc);
            apack[..mc * kps]
                .par_chunks_mut(ROWS_PER_PACK_CHUNK * kps)
                .enumerate()
                .for_each(|(ci, chunk)| {
                    for (r, dst) in chunk.chunks_mut(kps).enumerate() {
                        let i = ic + ci * ROWS_PER_PACK_CHUNK + r;
                        // SAFETY: same CPU features as the caller (checked by it).
                        unsafe { pack_a_row(a, i * a_rs + pc * a_cs, a_cs, kc, dst) };
                    }
                });
        };
        if a_full {
            for (q, blk) in apack[..need].chunks_mut(mc_max * kps).enumerate() {
                pack_a(blk, q * kcb);
            }
        }
        for jc in (0..n).step_by(nc) {
            let ncb = nc.min(n - jc);
            let n_panels = ncb.div_ceil(NR);
            for (q, pc) in (0..k).step_by(kcb).enumerate() {
                let kc = kcb.min(k - pc);
                let kpn = kc.div_ceil(2);
                let load_c = accumulate || pc > 0;
                let ablk: &[u32] = if a_full {
                    &apack[q * mc_max * kps..(q + 1) * mc_max * kps]
                } else {
                    pack_a(&mut apack, pc);
                    &apack
                };
                let m_panels = mc.div_ceil(MR);
                let want = 4 * threads;
                let row_splits = if n_panels >= want {
                    1
                } else {
                    want.div_ceil(n_panels).min(m_panels)
                };
                let panels_per_split = m_panels.div_ceil(row_splits);
                (0..n_panels * row_splits).into_par_iter().for_each(|u| {
                    let jp = u / row_splits;
                    let rsplit = u % row_splits;
                    let ip0 = rsplit * panels_per_split;
                    let ip1 = (ip0 + panels_per_split).min(m_panels);
                    if ip0 >= ip1 {
                        return;
                    }
                    let j0 = jc + jp * NR;
                    let nr = NR.min(n - j0);
                    // Per-thread reusable B panel buffer (no per-unit allocation).
                    let mut bbuf = BPACK.with(|c| c.take());
                    if bbuf.len() < kpb * NR {
                        bbuf = vec![0u32; kpb * NR];
                    }
                    let bpack = &mut bbuf[..kpb * NR];
                    pack_b_panel(b, (b_rs, b_cs), (pc, kc), (j0, nr), bpack, NR);
                    for ip in ip0..ip1 {
                        let i0 = ip * MR;
                        let mr = MR.min(mc - i0);
                        let ap = ablk[i0 * kps..].as_ptr();
                        // SAFETY: tile rows ic+i0..ic+i0+mr, cols j0..j0+nr lie inside C
                        // (validated); tiles of different work units are disjoint; the
                        // packed A rows i0..i0+mr and the B panel hold kpn pairs each.
                        unsafe {
                            let cp = cptr.at((ic + i0) * ldc + j0);
                            dispatch_kernel(mr, kpn, ap, kps, bpack.as_ptr(), cp, ldc, nr, load_c);
                        }
                    }
                });
            }
        }
    }
    if apack.len() <= APACK_KEEP {
        APACK.with(|c| c.set(apack));
    }
}

const ROWS_PER_PACK_CHUNK: usize = 32;

/// Largest packing buffer (in u32) kept alive per calling thread between calls.
const APACK_KEEP: usize = A_FULL_BYTES / 4;

thread_local! {
    static APACK: core::cell::Cell<Vec<u32>> = const { core::cell::Cell::new(Vec::new()) };
    static BPACK: core::cell::Cell<Vec<u32>> = const { core::cell::Cell::new(Vec::new()) };
}

/// Convert `kc` elements of one A row (starting at `a[start]`, stride `cs`) to
/// bf16 pairs into `dst` (len >= kc/2 rounded up), zero padding the rest.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
pub(super) unsafe fn pack_a_row(a: &[f32], start: usize, cs: usize, kc: usize, dst: &mut [u32]) {
    let kpn = kc.div_ceil(2);
    if cs == 1 {
        let src = &a[start..start + kc];
        let mut p = 0;
        let mut kp = 0;
        while p + 32 <= kc {
            // SAFETY: p+32 <= kc = src.len(); kp+16 <= kpn <= dst.len().
            unsafe {
                let lo = _mm512_loadu_ps(src.as_ptr().add(p));
                let hi = _mm512_loadu_ps(src.as_ptr().add(p + 16));
                let v = _mm512_cvtne2ps_pbh(hi, lo);
                _mm512_storeu_si512(
                    dst.as_mut_ptr().add(kp).cast(),
                    core::mem::transmute::<__m512bh, __m512i>(v),
                );
            }
            p += 32;
            kp += 16;
        }
        if p < kc {
            let rem = kc - p;
            let m_lo: __mmask16 = if rem >= 16 { 0xffff } else { (1u16 << rem) - 1 };
            let m_hi: __mmask16 = if rem > 16 {
                ((1u32 << (rem - 16)) - 1) as u16
            } else {
                0
            };
            let pairs = rem.div_ceil(2);
            let m_out: __mmask16 = ((1u32 << pairs) - 1) as u16;
            // SAFETY: masked loads touch only src[p..kc]; masked store only dst[kp..kp+pairs].
            unsafe {
                let lo = _mm512_maskz_loadu_ps(m_lo, src.as_ptr().add(p));
                let hi = _mm512_maskz_loadu_ps(m_hi, src.as_ptr().add(p + 16));
                let v = _mm512_cvtne2ps_pbh(hi, lo);
                _mm512_mask_storeu_epi32(
                    dst.as_mut_ptr().add(kp).cast(),
                    m_out,
                    core::mem::transmute::<__m512bh, __m512i>(v),
                );
            }
        }
    } else {
        for (kp, d) in dst.iter_mut().enumerate().take(kpn) {
            let p = 2 * kp;
            let lo = bf16::from_f32(a[start + p * cs]).to_bits() as u32;
            let hi = if p + 1 < kc {
                bf16::from_f32(a[start + (p + 1) * cs]).to_bits() as u32
            } else {
                0
            };
            *d = lo | (hi << 16);
        }
    }
    dst[kpn..].fill(0);
}

/// Forward-layout B panel pack (b_rs == 1): column j is `b[j*b_cs + p]`.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
unsafe fn pack_b_fwd(
    b: &[bf16],
    b_cs: usize,
    (pc, kc): (usize, usize),
    (j0, nr): (usize, usize),
    dst: &mut [u32],
    ld: usize,
) {
    let kpn = kc.div_ceil(2);
    for jb in (0..nr).step_by(16) {
        let rows = (nr - jb).min(16);
        let cols: [&[bf16]; 16] = core::array::from_fn(|r| {
            if r < rows {
                let s = (j0 + jb + r) * b_cs + pc;
                &b[s..s + kc]
            } else {
                &b[..0]
            }
        });
        for kp0 in (0..kpn).step_by(16) {
            let e0 = 2 * kp0;
            let cnt = (kc - e0).min(32);
            let mask: __mmask32 = if cnt == 32 {
                u32::MAX
            } else {
                (1u32 << cnt) - 1
            };
            let mut v = [_mm512_setzero_si512(); 16];
            for r in 0..rows {
                // SAFETY: the mask limits the load to cols[r][e0..e0+cnt], in bounds.
                v[r] = unsafe { _mm512_maskz_loadu_epi16(mask, cols[r].as_ptr().add(e0).cast()) };
            }
            let t = transpose16(v);
            let np = (kpn - kp0).min(16);
            for (q, tv) in t.iter().enumerate().take(np) {
                let off = (kp0 + q) * ld + jb;
                let d = &mut dst[off..off + 16];
                // SAFETY: `d` has exactly 16 u32.
                unsafe { _mm512_storeu_si512(d.as_mut_ptr().cast(), *tv) };
            }
        }
    }
}

/// Transpose a 16×16 matrix of u32 held in 16 zmm rows.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
fn transpose16(r: [__m512i; 16]) -> [__m512i; 16] {
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // t[2i]   lane l: r2i[4l], r2i+1[4l], r2i[4l+1], r2i+1[4l+1]
    // t[2i+1] lane l: r2i[4l+2], r2i+1[4l+2], r2i[4l+3], r2i+1[4l+3]
    let mut u = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        let (a0, a1, b0, b1) = (t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]);
        u[4 * i] = _mm512_unpacklo_epi64(a0, b0); // col 4l+0, rows 4i..4i+4
        u[4 * i + 1] = _mm512_unpackhi_epi64(a0, b0); // col 4l+1
        u[4 * i + 2] = _mm512_unpacklo_epi64(a1, b1); // col 4l+2
        u[4 * i + 3] = _mm512_unpackhi_epi64(a1, b1); // col 4l+3
    }
    // u[4i+c] lane l = rows 4i..4i+4 of column 4l+c.
    let mut w = [_mm512_setzero_si512(); 16];
    for c in 0..4 {
        // Combine row groups (0,1) and (2,3): lanes [g0.l0, g0.l2, g1.l0, g1.l2] etc.
        let x01_02 = _mm512_shuffle_i32x4::<0x88>(u[c], u[4 + c]); // cols 0,8 (c): g0 l0,l2 | g1 l0,l2
        let x01_13 = _mm512_shuffle_i32x4::<0xdd>(u[c], u[4 + c]); // cols 4,12
        let x23_02 = _mm512_shuffle_i32x4::<0x88>(u[8 + c], u[12 + c]);
        let x23_13 = _mm512_shuffle_i32x4::<0xdd>(u[8 + c], u[12 + c]);
        // column c      : g0.l0 g1.l0 g2.l0 g3.l0
        w[c] = _mm512_shuffle_i32x4::<0x88>(x01_02, x23_02);
        // column 8 + c  : g0.l2 g1.l2 g2.l2 g3.l2
        w[8 + c] = _mm512_shuffle_i32x4::<0xdd>(x01_02, x23_02);
        // column 4 + c
        w[4 + c] = _mm512_shuffle_i32x4::<0x88>(x01_13, x23_13);
        // column 12 + c
        w[12 + c] = _mm512_shuffle_i32x4::<0xdd>(x01_13, x23_13);
    }
    w
}

/// Pack B(pc..pc+kc, j0..j0+nr) into a k-pair interleaved panel `ld` u32 wide (`NR` here, 16
/// for the AMX tiles): row `q` holds, for each column, B[2q][j] | B[2q+1][j] << 16; columns
/// nr..ld are zeros. Writes rows 0..kc/2 rounded up.
#[inline]
pub(super) fn pack_b_panel(
    b: &[bf16],
    (b_rs, b_cs): (usize, usize),
    (pc, kc): (usize, usize),
    (j0, nr): (usize, usize),
    dst: &mut [u32],
    ld: usize,
) {
    let kpn = kc.div_ceil(2);
    let kfull = kc / 2;
    if b_rs == 1 && super::has_bf16_hw() {
        // Columns of B contiguous in k (forward: B = Wᵀ): 16×16 u32 transposes.
        // SAFETY: the CPU has AVX512-BF16/BW (checked); `pack_b_fwd` bounds-checks via slices.
        unsafe { pack_b_fwd(b, b_cs, (pc, kc), (j0, nr), dst, ld) };
    } else if b_cs == 1 {
        // Rows of B contiguous in n (backward: B = W).
        for kp in 0..kfull {
            let r0 = &b[(pc + 2 * kp) * b_rs + j0..(pc + 2 * kp) * b_rs + j0 + nr];
            let r1 = &b[(pc + 2 * kp + 1) * b_rs + j0..(pc + 2 * kp + 1) * b_rs + j0 + nr];
            let d = &mut dst[kp * ld..kp * ld + nr];
            for ((d, x), y) in d.iter_mut().zip(r0).zip(r1) {
                *d = (x.to_bits() as u32) | ((y.to_bits() as u32) << 16);
            }
        }
        if kfull < kpn {
            let r0 = &b[(pc + 2 * kfull) * b_rs + j0..(pc + 2 * kfull) * b_rs + j0 + nr];
            let d = &mut dst[kfull * ld..kfull * ld + nr];
            for (d, x) in d.iter_mut().zip(r0) {
                *d = x.to_bits() as u32;
            }
        }
    } else {
        for kp in 0..kpn {
            let p = pc + 2 * kp;
            for jj in 0..nr {
                let lo = b[p * b_rs + (j0 + jj) * b_cs].to_bits() as u32;
                let hi = if 2 * kp + 1 < kc {
                    b[(p + 1) * b_rs + (j0 + jj) * b_cs].to_bits() as u32
                } else {
                    0
                };
                dst[kp * ld + jj] = lo | (hi << 16);
            }
        }
    }
    if nr < ld {
        for kp in 0..kpn {
            dst[kp * ld + nr..kp * ld + ld].fill(0);
        }
    }
}

/// # Safety
/// See [`kernel`].
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
unsafe fn dispatch_kernel(
    mr: usize,
    kpn: usize,
    a: *const u32,
    lda: usize,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    nr: usize,
    load_c: bool,
) {
    // SAFETY: forwarded contract.
    unsafe {
        match mr {
            8 => kernel::<8>(kpn, a, lda, b, c, ldc, nr, load_c),
            7 => kernel::<7>(kpn, a, lda, b, c, ldc, nr, load_c),
            6 => kernel::<6>(kpn, a, lda, b, c, ldc, nr, load_c),
            5 => kernel::<5>(kpn, a, lda, b, c, ldc, nr, load_c),
            4 => kernel::<4>(kpn, a, lda, b, c, ldc, nr, load_c),
            3 => kernel::<3>(kpn, a, lda, b, c, ldc, nr, load_c),
            2 => kernel::<2>(kpn, a, lda, b, c, ldc, nr, load_c),
            _ => kernel::<1>(kpn, a, lda, b, c, ldc, nr, load_c),
        }
    }
}

/// `R × NR` tile: C[r, 0..nr] (+)= Σ_kp A[r, kp] · B[kp, :].
///
/// # Safety
/// * `a`: R rows of `kpn` u32 with row stride `lda`.
/// * `b`: `kpn * NR` u32.
/// * `c`: R rows (stride `ldc`) of at least `nr` writable f32, `1 <= nr <= NR`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
unsafe fn kernel<const R: usize>(
    kpn: usize,
    a: *const u32,
    lda: usize,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    nr: usize,
    load_c: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); NV]; R];
    let mut ap = a;
    let mut bp = b;
    for _ in 0..kpn {
        // SAFETY: bp points at NR u32 of the packed panel; ap at row 0 of the
        // current k-pair, rows r at ap + r*lda (all within the packed A block).
        unsafe {
            let mut bv = [_mm512_setzero_si512(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = _mm512_loadu_si512(bp.add(16 * v).cast());
            }
            for (r, accr) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_epi32(*ap.add(r * lda) as i32);
                let av: __m512bh = core::mem::transmute::<__m512i, __m512bh>(av);
                for (v, accv) in accr.iter_mut().enumerate() {
                    let bb: __m512bh = core::mem::transmute::<__m512i, __m512bh>(bv[v]);
                    *accv = _mm512_dpbf16_ps(*accv, av, bb);
                }
            }
            ap = ap.add(1);
            bp = bp.add(NR);
        }
    }
    for (r, accr) in acc.iter().enumerate() {
        for (v, accv) in accr.iter().enumerate() {
            let col = 16 * v;
            if col >= nr {
                break;
            }
            let cnt = (nr - col).min(16);
            let mask: __mmask16 = if cnt == 16 { 0xffff } else { (1u16 << cnt) - 1 };
            // SAFETY: row r < R and columns col..col+cnt < nr are inside the C tile.
            unsafe {
                let p = c.add(r * ldc + col);
                let mut x = *accv;
                if load_c {
                    x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(mask, p));
                }
                _mm512_mask_storeu_ps(p, mask, x);
            }
        }
    }
}
