//! AMX-BF16 tiles (Intel Xeon from Sapphire Rapids on): the mixed-precision product on the
//! CPU's matrix unit, `tdpbf16ps` on 16×16 f32 accumulator tiles.
//!
//! Operands are packed on each call, into buffers the thread keeps between calls: A (f32)
//! rounded to bf16 (RNE) into rows of `kp` values (k padded to the tile's 32), B (bf16) into
//! 16-column panels in the pair-interleaved layout the B tile wants (row `q` of a panel holds, for each of its 16 columns, B[2q][j] and B[2q+1][j]).
//! Padding is zeros, so every tile is whole. Each rayon task takes 32 rows of C and walks every
//! pair of panels with four accumulator tiles (2 A tiles × 2 B tiles per 32 of k), then adds the
//! 32×32 result to C. The instructions are written with `asm!` (Rust's AMX intrinsics are not
//! stable); the tile state is configured and released by each task on its own thread.
//!
//! Linux hands the tile registers to a process only on request (`arch_prctl`
//! `ARCH_REQ_XCOMP_PERM`); [`usable`] asks once and says no where the CPU, the OS or that request
//! does not allow it, or `FINETUNE_NO_AMX=1` is set.

use core::arch::asm;
use std::cell::Cell;
use std::sync::OnceLock;
use std::thread::LocalKey;

use half::bf16;
use rayon::prelude::*;

use super::RowWork;

/// Rows (and columns) of C one task computes per block: two tiles of 16.
pub(super) const BLOCK: usize = 32;
/// k values per tile step.
pub(super) const KT: usize = 32;
/// Above this k the product runs as a sum of products over k chunks of [`K_CHUNK`], each packing
/// only its own columns of A and rows of B. The LM head's input gradient (k = the vocabulary)
/// otherwise packed its whole (N, V) gradient into a fresh 100 MB buffer (page faults and
/// zeroing), more time than its tile work, and walked 3 MB rows of A per panel.
const K_WHOLE: usize = 2048;
/// k per chunk above [`K_WHOLE`]: A's chunk 2 KB a row, B's 64 KB per 32 columns.
use super::AMX_K_CHUNK as K_CHUNK;

/// Whether the AMX-BF16 path runs here (decided once per process).
pub fn usable() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let off = std::env::var_os("FINETUNE_NO_AMX").is_some_and(|v| v != "0");
        !off && detect()
    })
}

/// cpuid (AMX-TILE, AMX-BF16, OSXSAVE), XCR0 (the OS saves tile config and data), and on Linux
/// the permission to use the tile data.
fn detect() -> bool {
    use core::arch::x86_64::{__cpuid, __cpuid_count};
    if __cpuid(0).eax < 7 {
        return false;
    }
    let edx = __cpuid_count(7, 0).edx;
    let (amx_bf16, amx_tile) = (edx & (1 << 22) != 0, edx & (1 << 24) != 0);
    let osxsave = __cpuid(1).ecx & (1 << 27) != 0;
    if !(amx_bf16 && amx_tile && osxsave) {
        return false;
    }
    let (lo, _hi): (u32, u32);
    // SAFETY: xgetbv with ecx = 0 is valid when OSXSAVE is set (checked above).
    unsafe {
        asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") _hi, options(nomem, nostack));
    }
    let tiles_saved = lo & (1 << 17) != 0 && lo & (1 << 18) != 0;
    tiles_saved && request_tile_data()
}

#[cfg(target_os = "linux")]
fn request_tile_data() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes this process's permitted xsave
    // features; it returns 0 when granted.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_data() -> bool {
    false
}

/// The tile configuration (palette 1): tmm0–3 the 16×16 f32 accumulators, tmm4–5 two A tiles
/// (16 rows × 32 bf16), tmm6–7 two B tiles (16 k-pairs × 16 columns × 2 bf16). 64 bytes as
/// `ldtilecfg` reads them.
#[repr(C, align(64))]
pub(super) struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

pub(super) const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// Raw pointers handed to the tasks (read-only packed operands, disjoint rows of C).
#[derive(Clone, Copy)]
struct Ptrs {
    c: *mut f32,
}
// SAFETY: each task writes only its own rows of C; the owning `&mut [f32]` outlives the
// parallel region.
unsafe impl Send for Ptrs {}
// SAFETY: see above.
unsafe impl Sync for Ptrs {}

/// Same contract as [`super::matmul_f32_bf16`]; with `work`, as [`super::matmul_f32_bf16_rows`]
/// (each block's rows to `packed` as A's are packed, to `done` as C's are complete).
///
/// # Safety
/// [`usable`] returned true; shapes were validated against the slices; m, n, k > 0; with
/// `work`: A row-major (a_rs = k, a_cs = 1), ldc = n, and `work.side` holds m·width values,
/// width ≥ 1.
#[allow(clippy::too_many_arguments)]
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
    mut work: Option<&mut RowWork<'_>>,
) -> Result<(), String> {
    if k > K_WHOLE {
        if let Some(w) = work.as_deref_mut() {
            // Chunked products reach C's rows once per chunk: the work runs around the whole
            // (A and C row-major with `work`, the caller's contract).
            (w.packed)(0, &a[..m * k], w.side)?;
        }
        // SAFETY: this call's contract.
        unsafe {
            matmul_chunked(
                m,
                n,
                k,
                (a, a_rs, a_cs),
                (b, b_rs, b_cs),
                c,
                ldc,
                accumulate,
            )
        }?;
        if let Some(w) = work {
            (w.done)(0, w.side, &mut c[..m * n])?;
        }
        return Ok(());
    }
    let kp = k.div_ceil(KT) * KT;
    let mp = m.div_ceil(BLOCK) * BLOCK;
    let panels = n.div_ceil(BLOCK) * 2;
    let (a_len, panel_len) = (mp * kp / 2, kp * 16);
    let b_len = panels * panel_len / 2;
    let mut ap_buf = scratch(&A_SCRATCH, a_len, 0u32);
    let packed = pack_a(
        m,
        (k, kp),
        (a, a_rs, a_cs),
        &mut ap_buf[..a_len],
        work.as_deref_mut(),
    );
    let mut bp_buf = scratch(&B_SCRATCH, b_len, 0u32);
    pack_b(n, k, kp, b, (b_rs, b_cs), &mut bp_buf[..b_len]);
    let (ap, bp) = (as_bf16(&ap_buf[..a_len]), as_bf16(&bp_buf[..b_len]));
    let out = Ptrs { c: c.as_mut_ptr() };
    let result = packed.and_then(|()| {
        products(
            mp / BLOCK,
            (m, n, kp),
            (ap, bp, panel_len),
            (out, ldc),
            accumulate,
            work.as_deref(),
        )
    });
    keep(&B_SCRATCH, bp_buf);
    keep(&A_SCRATCH, ap_buf);
    result
}

/// Every row block of C from the packed operands, each followed by `work`'s `done` on its rows.
///
/// # Safety
/// As [`matmul`]'s, with the operands packed by [`pack_a`] and [`pack_b`].
#[allow(clippy::too_many_arguments)]
unsafe fn products(
    blocks: usize,
    (m, n, kp): (usize, usize, usize),
    (ap, bp, panel_len): (&[bf16], &[bf16], usize),
    (out, ldc): (Ptrs, usize),
    accumulate: bool,
    work: Option<&RowWork<'_>>,
) -> Result<(), String> {
    (0..blocks).into_par_iter().try_for_each(move |rb| {
        let out = out;
        // SAFETY: AMX is usable (the caller's contract); the configuration is valid for palette
        // 1 and is loaded on this thread before any tile instruction and released after.
        unsafe { asm!("ldtilecfg [{0}]", in(reg) &CONFIG, options(nostack, readonly)) };
        let a_rows = &ap[rb * BLOCK * kp..(rb + 1) * BLOCK * kp];
        // SAFETY: the tiles are configured above; the packed operands are as `row_block` needs
        // them; rows rb·32.. of C belong to this task.
        unsafe {
            row_block(
                rb,
                (a_rows, kp),
                (bp, panel_len),
                (m, n),
                (out.c, ldc),
                accumulate,
            )
        };
        // SAFETY: releases this thread's tile state (configured above).
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
        let Some(w) = work else {
            return Ok(());
        };
        let (i0, i1) = (rb * BLOCK, ((rb + 1) * BLOCK).min(m));
        // SAFETY: rows i0..i1 of C (ldc = n, checked by the caller) belong to this task, and
        // its products above are done.
        let c_rows = unsafe { std::slice::from_raw_parts_mut(out.c.add(i0 * ldc), (i1 - i0) * n) };
        (w.done)(i0, &w.side[i0 * w.width..i1 * w.width], c_rows)
    })
}

/// Row block `rb` of C (rows rb·32..rb·32 + 32) against every pair of B panels: whole 32×32
/// blocks straight in C, edge blocks through a tile-sized buffer.
///
/// # Safety
/// The tiles are configured as [`CONFIG`] on this thread; `a_rows` holds 32·kp packed values and
/// `bp` the packed panels of B (an even count covering n, `panel_len` each); C holds
/// (m − 1)·ldc + n f32 at `c`, and no one else touches this block's rows meanwhile.
unsafe fn row_block(
    rb: usize,
    (a_rows, kp): (&[bf16], usize),
    (bp, panel_len): (&[bf16], usize),
    (m, n): (usize, usize),
    (c, ldc): (*mut f32, usize),
    accumulate: bool,
) {
    let mut tile = [0f32; BLOCK * BLOCK];
    let panels = bp.len() / panel_len;
    for pp in 0..panels / 2 {
        let b_pair = &bp[2 * pp * panel_len..(2 * pp + 2) * panel_len];
        let (i0, j0) = (rb * BLOCK, pp * BLOCK);
        if i0 + BLOCK <= m && j0 + BLOCK <= n {
            // A whole 32×32 block inside C: the tiles load (accumulate) and store C itself.
            // SAFETY: as below for A and B; rows i0..i0 + 32 and columns j0..j0 + 32 lie
            // inside C (validated: c.len() ≥ (m − 1)·ldc + n) and belong to this task.
            unsafe {
                block(
                    a_rows,
                    kp,
                    b_pair,
                    panel_len,
                    c.add(i0 * ldc + j0),
                    ldc,
                    accumulate,
                )
            };
            continue;
        }
        // SAFETY: the A rows hold 32 × kp values and the two panels 2 × kp/2 × 32, so every
        // tile load (16 rows at the given strides, 64 bytes each) stays inside them; `tile`
        // holds the 32×32 f32 the four stores write.
        unsafe {
            block(
                a_rows,
                kp,
                b_pair,
                panel_len,
                tile.as_mut_ptr(),
                BLOCK,
                false,
            )
        };
        // SAFETY: rows i0.. (< m) and columns j0.. (< n) of C belong to this task.
        unsafe { write_edge(&tile, c, ldc, (i0, j0), (m, n), accumulate) };
    }
}

/// [`matmul`] as a sum of products over k chunks of [`K_CHUNK`] (see [`K_WHOLE`]).
///
/// # Safety
/// As [`matmul`].
#[allow(clippy::too_many_arguments)]
unsafe fn matmul_chunked(
    m: usize,
    n: usize,
    k: usize,
    (a, a_rs, a_cs): (&[f32], usize, usize),
    (b, b_rs, b_cs): (&[bf16], usize, usize),
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) -> Result<(), String> {
    for k0 in (0..k).step_by(K_CHUNK) {
        let kc = K_CHUNK.min(k - k0);
        let (a, b) = (&a[k0 * a_cs..], &b[k0 * b_rs..]);
        // SAFETY: as for this call: k0 < k, so columns k0..k0 + kc of A and rows k0..k0 + kc of
        // B lie inside the validated extents of the slices from those offsets on.
        unsafe {
            matmul(
                m,
                n,
                kc,
                a,
                a_rs,
                a_cs,
                b,
                b_rs,
                b_cs,
                c,
                ldc,
                accumulate || k0 > 0,
                None,
            )
        }?;
    }
    Ok(())
}

thread_local! {
    static A_SCRATCH: Cell<Vec<u32>> = const { Cell::new(Vec::new()) };
    static B_SCRATCH: Cell<Vec<u32>> = const { Cell::new(Vec::new()) };
}

/// Packed operands up to this size are kept for the next call on the thread: a training step
/// packs every weight twice, and fresh buffers cost page faults and zeroing on each call.
const KEEP_BYTES: usize = 64 << 20;

/// This thread's kept buffer (or a new one; a nested call finds it taken) of at least `len`
/// values: callers use its first `len`. Its contents are stale: the packers write every value,
/// padding included. It is never shortened, so a call after a larger one zeroes nothing (a
/// step's products alternate between sizes; growing back was a `memset` each time).
pub(super) fn scratch<T: Copy>(
    cell: &'static LocalKey<Cell<Vec<T>>>,
    len: usize,
    zero: T,
) -> Vec<T> {
    let mut v = cell.with(Cell::take);
    if v.len() < len {
        v.resize(len, zero);
    }
    v
}

/// Keeps `v` for the next call on this thread when it is not too large.
pub(super) fn keep<T>(cell: &'static LocalKey<Cell<Vec<T>>>, v: Vec<T>) {
    if v.capacity() * std::mem::size_of::<T>() <= KEEP_BYTES {
        cell.with(|c| c.set(v));
    }
}

/// The part of a 32×32 `tile` that lies inside C (m×n, row stride `ldc`) at block (i0, j0),
/// written or added.
///
/// # Safety
/// C holds (m − 1)·ldc + n f32 at `c`, and no one else touches rows i0..i0 + 32 meanwhile.
pub(super) unsafe fn write_edge(
    tile: &[f32; BLOCK * BLOCK],
    c: *mut f32,
    ldc: usize,
    (i0, j0): (usize, usize),
    (m, n): (usize, usize),
    accumulate: bool,
) {
    let cols = BLOCK.min(n - j0);
    for di in 0..BLOCK.min(m.saturating_sub(i0)) {
        let dst = std::slice::from_raw_parts_mut(c.add((i0 + di) * ldc + j0), cols);
        let src = &tile[di * BLOCK..di * BLOCK + cols];
        if accumulate {
            dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
        } else {
            dst.copy_from_slice(src);
        }
    }
}

/// A (f32, m×k at the given strides) as `mp` rows of `kp` bf16 (rounded to nearest even),
/// row-major, zero padded to whole 32-row blocks; two bf16 per u32, the even k in the low half
/// (the bytes of a bf16 row). Converted 32 at a time by AVX512-BF16 where the CPU has it (every
/// AMX CPU does). With `work` (A row-major), each block's rows go to its `packed` right after,
/// while they are in cache.
fn pack_a(
    m: usize,
    (k, kp): (usize, usize),
    (a, a_rs, a_cs): (&[f32], usize, usize),
    ap: &mut [u32],
    work: Option<&mut RowWork<'_>>,
) -> Result<(), String> {
    let fast = super::has_bf16_hw();
    let pack = |rb: usize, rows: &mut [u32]| {
        for (di, row) in rows.chunks_exact_mut(kp / 2).enumerate() {
            let i = rb * BLOCK + di;
            if i >= m {
                row.fill(0);
                continue;
            }
            if fast {
                // SAFETY: the CPU has AVX512-BF16 (checked); row i's k elements lie in `a`
                // (validated by the caller) and `row` holds kp/2 ≥ k/2 pairs.
                unsafe { super::avx512::pack_a_row(a, i * a_rs, a_cs, k, row) };
                row[k.div_ceil(2)..].fill(0);
                continue;
            }
            for (q, pair) in row.iter_mut().enumerate().take(k.div_ceil(2)) {
                let lo = bf16::from_f32(a[i * a_rs + 2 * q * a_cs]).to_bits() as u32;
                let hi = if 2 * q + 1 < k {
                    bf16::from_f32(a[i * a_rs + (2 * q + 1) * a_cs]).to_bits() as u32
                } else {
                    0
                };
                *pair = lo | (hi << 16);
            }
            row[k.div_ceil(2)..].fill(0);
        }
    };
    let blocks = ap.par_chunks_mut(BLOCK * kp / 2).enumerate();
    let Some(w) = work else {
        blocks.for_each(|(rb, rows)| pack(rb, rows));
        return Ok(());
    };
    let (packed, width) = (w.packed, w.width);
    blocks
        .zip(w.side.par_chunks_mut(BLOCK * width.max(1)))
        .try_for_each(|((rb, rows), side)| {
            pack(rb, rows);
            let (i0, i1) = (rb * BLOCK, ((rb + 1) * BLOCK).min(m));
            packed(i0, &a[i0 * k..i1 * k], &mut side[..(i1 - i0) * width])
        })
}

/// Packed pairs of bf16 as the bf16 values they hold.
pub(super) fn as_bf16(v: &[u32]) -> &[bf16] {
    // SAFETY: a u32 holds two bf16 (its bytes, low half first on x86-64), and bf16's alignment
    // divides u32's: the same memory read as twice as many bf16.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<bf16>(), v.len() * 2) }
}

/// B (bf16, k×n at the given strides) as 16-column panels (`bp` holds a whole number, an even
/// count covering n) of kp/2 rows of 16 u32, each the panel's 16 columns × (k even, k odd): the
/// layout of a B tile (`avx512::pack_b_panel` with rows 16 wide: 16×16 transposes for the
/// forward's Wᵀ, paired rows for the input gradient's W). Zero padded.
fn pack_b(n: usize, k: usize, kp: usize, b: &[bf16], strides: (usize, usize), bp: &mut [u32]) {
    let panel_len = kp * 8;
    let written = k.div_ceil(2) * 16;
    bp.par_chunks_mut(panel_len)
        .enumerate()
        .for_each(|(p, panel)| {
            let (j0, cols) = (p * 16, 16.min(n.saturating_sub(p * 16)));
            if cols == 0 {
                // A padding panel (the second of the last pair).
                panel.fill(0);
                return;
            }
            super::avx512::pack_b_panel(b, strides, (0, k), (j0, cols), panel, 16);
            panel[written..].fill(0);
        });
}

/// One 32×32 block of C: rows `a` (32 × kp bf16), columns from the two panels of `b`
/// (`panel_len` apart), summed over kp into the 32×32 f32 at `out` (row stride `ldo`), added to
/// what is there when `accumulate`.
///
/// # Safety
/// The tiles are configured as [`CONFIG`] on this thread; `a` holds 32·kp and `b` 2·panel_len
/// values with panel_len = 16·kp; kp is a multiple of 32; `out` points at 32 rows of 32 writable
/// f32, `ldo` apart, that no one else touches.
pub(super) unsafe fn block(
    a: &[bf16],
    kp: usize,
    b: &[bf16],
    panel_len: usize,
    out: *mut f32,
    ldo: usize,
    accumulate: bool,
) {
    let a_stride = kp * 2;
    let b_stride = 64usize;
    let a0 = a.as_ptr().cast::<u8>();
    let a1 = a0.add(16 * a_stride);
    let b0 = b.as_ptr().cast::<u8>();
    let b1 = b0.add(panel_len * 2);
    let o = out.cast::<u8>();
    let so = ldo * 4;
    if accumulate {
        asm!(
            "tileloadd tmm0, [{o0} + {so} * 1]",
            "tileloadd tmm1, [{o1} + {so} * 1]",
            "tileloadd tmm2, [{o2} + {so} * 1]",
            "tileloadd tmm3, [{o3} + {so} * 1]",
            o0 = in(reg) o,
            o1 = in(reg) o.add(16 * 4),
            o2 = in(reg) o.add(16 * so),
            o3 = in(reg) o.add(16 * so + 16 * 4),
            so = in(reg) so,
            options(nostack, readonly)
        );
    } else {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
    }
    for t in 0..kp / KT {
        // A tiles: columns t·32.. of rows 0..16 and 16..32; B tiles: k-pair rows t·16.. of each
        // panel (64 bytes a row). Each product comes right after the loads it needs: 10–15%
        // faster than four loads then four products (`examples/bf16_matmul`, Sapphire Rapids,
        // 2 threads).
        asm!(
            "tileloadd tmm4, [{a0} + {sa} * 1]",
            "tileloadd tmm6, [{b0} + {sb} * 1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{b1} + {sb} * 1]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a1} + {sa} * 1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) a0.add(t * KT * 2),
            a1 = in(reg) a1.add(t * KT * 2),
            b0 = in(reg) b0.add(t * 16 * b_stride),
            b1 = in(reg) b1.add(t * 16 * b_stride),
            sa = in(reg) a_stride,
            sb = in(reg) b_stride,
            options(nostack, readonly)
        );
    }
    asm!(
        "tilestored [{o0} + {so} * 1], tmm0",
        "tilestored [{o1} + {so} * 1], tmm1",
        "tilestored [{o2} + {so} * 1], tmm2",
        "tilestored [{o3} + {so} * 1], tmm3",
        o0 = in(reg) o,
        o1 = in(reg) o.add(16 * 4),
        o2 = in(reg) o.add(16 * so),
        o3 = in(reg) o.add(16 * so + 16 * 4),
        so = in(reg) so,
        options(nostack)
    );
}
