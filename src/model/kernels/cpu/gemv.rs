//! `out (n, o) (+)= x (n, i) · Wᵀ` for a few rows `n` (decoding: one token at a time), with `W`
//! (o, i) row-major in f32 or bf16. Each output is a dot product of an `x` row with a contiguous
//! `W` row, so `W` streams through once per call, in row order, split over the threads by output
//! rows. `gemm` instead packs the whole of `W` for every call, which for one row costs more than
//! the product itself: decoding is bound by how fast the weights are read, and this reads each
//! weight once.
//!
//! The dot products accumulate in f32 (bf16 weights widened to f32 exactly) with explicit SIMD:
//! AVX2+FMA on x86-64 when the CPU has it (checked at run time), NEON on aarch64, a portable loop
//! elsewhere.

use rayon::prelude::*;

/// Most rows of `x` this kernel is used for (more go to gemm, whose packing then pays off).
pub const MAX_ROWS: usize = 4;

/// Fewest output rows of `W` one task takes.
const ROWS_PER_TASK: usize = 32;

/// Fewest weights one task reads: waking a thread costs microseconds, so small products use
/// fewer threads (on a 16-core machine, one task per 32 rows spent more time waking threads
/// than multiplying).
const WEIGHTS_PER_TASK: usize = 1 << 15;

const LANES: usize = 16;

/// Weights the kernel reads: f32 as is, bf16 widened exactly.
pub trait Weight: Copy + Send + Sync {
    /// The weight as f32.
    fn f32(self) -> f32;
}

impl Weight for f32 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
}

impl Weight for half::bf16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
}

#[cfg_attr(target_arch = "aarch64", allow(dead_code))]
#[inline(always)]
fn dot<W: Weight>(x: &[f32], w: &[W]) -> f32 {
    let mut acc = [0f32; LANES];
    let xs = x.chunks_exact(LANES);
    let ws = w.chunks_exact(LANES);
    let (xr, wr) = (xs.remainder(), ws.remainder());
    for (xc, wc) in xs.zip(ws) {
        for k in 0..LANES {
            acc[k] += xc[k] * wc[k].f32();
        }
    }
    let mut sum = 0f32;
    for (a, b) in xr.iter().zip(wr) {
        sum += a * b.f32();
    }
    // A fixed pairwise order, the same on every machine.
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for k in 0..width {
            acc[k] += acc[k + width];
        }
    }
    acc[0] + sum
}

/// `out[r] = x · W[j0 + r]` for each `r` (the portable form).
#[cfg_attr(target_arch = "aarch64", allow(dead_code))]
#[inline(always)]
fn dot_rows<W: Weight>(x: &[f32], w: &[W], i: usize, j0: usize, out: &mut [f32]) {
    for (r, o) in out.iter_mut().enumerate() {
        let j = j0 + r;
        *o = dot(x, &w[j * i..(j + 1) * i]);
    }
}

/// Weights the SIMD kernels load eight at a time as f32.
pub trait Simd: Weight {
    /// `out[r] = x · W[j0 + r]` with the best instructions this CPU has.
    fn dot_rows(x: &[f32], w: &[Self], i: usize, j0: usize, out: &mut [f32]);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Eight weights from `p` as f32.
    pub trait Load8: Copy {
        /// # Safety
        /// `p` points at 8 readable values; the CPU has AVX2.
        unsafe fn load8(p: *const Self) -> __m256;
    }

    impl Load8 for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const Self) -> __m256 {
            _mm256_loadu_ps(p)
        }
    }

    impl Load8 for half::bf16 {
        #[inline(always)]
        unsafe fn load8(p: *const Self) -> __m256 {
            let h = _mm_loadu_si128(p.cast());
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        }
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; `x` and `w` have the same length.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot<W: Load8 + super::Weight>(x: &[f32], w: &[W]) -> f32 {
        let n = x.len().min(w.len());
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut k = 0;
        while k + 32 <= n {
            for (a, acc) in acc.iter_mut().enumerate() {
                let off = k + 8 * a;
                *acc = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(off)), W::load8(wp.add(off)), *acc);
            }
            k += 32;
        }
        while k + 8 <= n {
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(k)), W::load8(wp.add(k)), acc[0]);
            k += 8;
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
        let quad = _mm_add_ps(half, _mm_movehl_ps(half, half));
        let one = _mm_add_ss(quad, _mm_shuffle_ps(quad, quad, 1));
        let mut total = _mm_cvtss_f32(one);
        for j in k..n {
            total += x[j] * w[j].f32();
        }
        total
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; `w` holds rows `j0..j0 + out.len()` of length `i`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_rows<W: Load8 + super::Weight>(
        x: &[f32],
        w: &[W],
        i: usize,
        j0: usize,
        out: &mut [f32],
    ) {
        let mut r = 0;
        // Four rows at a time: each x load serves four weight streams, and four independent
        // streams keep more loads in flight.
        while r + 4 <= out.len() && i >= 8 {
            let j = j0 + r;
            let rows = [
                &w[j * i..(j + 1) * i],
                &w[(j + 1) * i..(j + 2) * i],
                &w[(j + 2) * i..(j + 3) * i],
                &w[(j + 3) * i..(j + 4) * i],
            ];
            out[r..r + 4].copy_from_slice(&dot4(x, rows));
            r += 4;
        }
        for (k, o) in out.iter_mut().enumerate().skip(r) {
            let j = j0 + k;
            *o = dot(x, &w[j * i..(j + 1) * i]);
        }
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; every row has `x`'s length.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot4<W: Load8 + super::Weight>(x: &[f32], rows: [&[W]; 4]) -> [f32; 4] {
        let n = x.len();
        let xp = x.as_ptr();
        let wp = rows.map(|r| r.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); 2]; 4];
        let mut k = 0;
        while k + 16 <= n {
            let x0 = _mm256_loadu_ps(xp.add(k));
            let x1 = _mm256_loadu_ps(xp.add(k + 8));
            for (a, p) in acc.iter_mut().zip(wp) {
                a[0] = _mm256_fmadd_ps(x0, W::load8(p.add(k)), a[0]);
                a[1] = _mm256_fmadd_ps(x1, W::load8(p.add(k + 8)), a[1]);
            }
            k += 16;
        }
        while k + 8 <= n {
            let x0 = _mm256_loadu_ps(xp.add(k));
            for (a, p) in acc.iter_mut().zip(wp) {
                a[0] = _mm256_fmadd_ps(x0, W::load8(p.add(k)), a[0]);
            }
            k += 8;
        }
        let mut out = [0f32; 4];
        for ((o, a), row) in out.iter_mut().zip(acc).zip(rows) {
            let sum = _mm256_add_ps(a[0], a[1]);
            let half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
            let quad = _mm_add_ps(half, _mm_movehl_ps(half, half));
            *o = _mm_cvtss_f32(_mm_add_ss(quad, _mm_shuffle_ps(quad, quad, 1)));
            for j in k..n {
                *o += x[j] * row[j].f32();
            }
        }
        out
    }

    /// Sixteen weights from `p` as f32 (AVX-512).
    pub trait Load16: Copy {
        /// # Safety
        /// `p` points at 16 readable values; the CPU has AVX-512F.
        unsafe fn load16(p: *const Self) -> __m512;
    }

    impl Load16 for f32 {
        #[inline(always)]
        unsafe fn load16(p: *const Self) -> __m512 {
            _mm512_loadu_ps(p)
        }
    }

    impl Load16 for half::bf16 {
        #[inline(always)]
        unsafe fn load16(p: *const Self) -> __m512 {
            let h = _mm256_loadu_si256(p.cast());
            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
        }
    }

    /// [`dot_rows`] with 512-bit vectors: half the instructions per weight.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `w` holds rows `j0..j0 + out.len()` of length `i`.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn dot_rows_512<W: Load16 + Load8 + super::Weight>(
        x: &[f32],
        w: &[W],
        i: usize,
        j0: usize,
        out: &mut [f32],
    ) {
        let mut r = 0;
        while r + 4 <= out.len() && i >= 32 {
            let j = j0 + r;
            let xp = x.as_ptr();
            let wp = [0, 1, 2, 3].map(|d| w.as_ptr().add((j + d) * i));
            let mut acc = [[_mm512_setzero_ps(); 2]; 4];
            let mut k = 0;
            while k + 32 <= i {
                let x0 = _mm512_loadu_ps(xp.add(k));
                let x1 = _mm512_loadu_ps(xp.add(k + 16));
                for (a, p) in acc.iter_mut().zip(wp) {
                    a[0] = _mm512_fmadd_ps(x0, W::load16(p.add(k)), a[0]);
                    a[1] = _mm512_fmadd_ps(x1, W::load16(p.add(k + 16)), a[1]);
                }
                k += 32;
            }
            for (d, a) in acc.iter().enumerate() {
                let mut o = _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1]));
                let row = &w[(j + d) * i..(j + d + 1) * i];
                for t in k..i {
                    o += x[t] * row[t].f32();
                }
                out[r + d] = o;
            }
            r += 4;
        }
        if r < out.len() {
            dot_rows(x, w, i, j0 + r, &mut out[r..]);
        }
    }

    /// Whether the AVX-512 kernel may run.
    pub fn usable_512() -> bool {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| {
            is_x86_feature_detected!("avx512f") && std::env::var("FINETUNE_NO_AVX512").is_err()
        })
    }

    /// Whether the AVX2 kernels may run.
    pub fn usable() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use std::arch::aarch64::*;

    /// Four weights from `p` as f32.
    pub trait Load4: Copy {
        /// # Safety
        /// `p` points at 4 readable values.
        unsafe fn load4(p: *const Self) -> float32x4_t;
    }

    impl Load4 for f32 {
        #[inline(always)]
        unsafe fn load4(p: *const Self) -> float32x4_t {
            vld1q_f32(p)
        }
    }

    impl Load4 for half::bf16 {
        #[inline(always)]
        unsafe fn load4(p: *const Self) -> float32x4_t {
            vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(p.cast())))
        }
    }

    /// # Safety
    /// `x` and `w` have the same length (NEON is always there on aarch64).
    pub unsafe fn dot<W: Load4 + super::Weight>(x: &[f32], w: &[W]) -> f32 {
        let n = x.len().min(w.len());
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut acc = [vdupq_n_f32(0.0); 4];
        let mut k = 0;
        while k + 16 <= n {
            for (a, acc) in acc.iter_mut().enumerate() {
                let off = k + 4 * a;
                *acc = vfmaq_f32(*acc, vld1q_f32(xp.add(off)), W::load4(wp.add(off)));
            }
            k += 16;
        }
        let sum = vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3]));
        let mut total = vaddvq_f32(sum);
        for j in k..n {
            total += x[j] * w[j].f32();
        }
        total
    }
}

impl Simd for f32 {
    fn dot_rows(x: &[f32], w: &[Self], i: usize, j0: usize, out: &mut [f32]) {
        simd_dot_rows(x, w, i, j0, out)
    }
}

impl Simd for half::bf16 {
    fn dot_rows(x: &[f32], w: &[Self], i: usize, j0: usize, out: &mut [f32]) {
        simd_dot_rows(x, w, i, j0, out)
    }
}

#[cfg(target_arch = "x86_64")]
fn simd_dot_rows<W: x86::Load8 + x86::Load16 + Weight>(
    x: &[f32],
    w: &[W],
    i: usize,
    j0: usize,
    out: &mut [f32],
) {
    if x86::usable_512() && x86::usable() {
        // SAFETY: the CPU has AVX-512F, AVX2 and FMA (checked just above); whole rows.
        unsafe { x86::dot_rows_512(x, w, i, j0, out) };
    } else if x86::usable() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above); the caller passes whole rows.
        unsafe { x86::dot_rows(x, w, i, j0, out) };
    } else {
        dot_rows(x, w, i, j0, out);
    }
}

#[cfg(target_arch = "aarch64")]
fn simd_dot_rows<W: arm::Load4 + Weight>(x: &[f32], w: &[W], i: usize, j0: usize, out: &mut [f32]) {
    for (r, o) in out.iter_mut().enumerate() {
        let j = j0 + r;
        // SAFETY: both slices have length i; NEON is part of aarch64.
        *o = unsafe { arm::dot(x, &w[j * i..(j + 1) * i]) };
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn simd_dot_rows<W: Weight>(x: &[f32], w: &[W], i: usize, j0: usize, out: &mut [f32]) {
    dot_rows(x, w, i, j0, out);
}

/// `out (n, o) = x (n, i) · Wᵀ`, plus `out`'s contents when `accumulate`. `x`, `w` and `out`
/// hold exactly n·i, o·i and n·o values (the caller checks).
pub fn gemv<W: Simd>(
    x: &[f32],
    w: &[W],
    out: &mut [f32],
    n: usize,
    i: usize,
    o: usize,
    accumulate: bool,
) {
    let mut fresh = vec![0f32; n * o];
    // About four tasks per thread for balance, fewer when the product is small.
    let tasks = (rayon::current_num_threads() * 4)
        .min(o * i / WEIGHTS_PER_TASK)
        .max(1);
    let rows = o.div_ceil(tasks).max(ROWS_PER_TASK);
    for r in 0..n {
        let xr = &x[r * i..(r + 1) * i];
        fresh[r * o..(r + 1) * o]
            .par_chunks_mut(rows)
            .enumerate()
            .for_each(|(c, chunk)| W::dot_rows(xr, w, i, c * rows, chunk));
    }
    if accumulate {
        out.iter_mut().zip(&fresh).for_each(|(o, f)| *o += f);
    } else {
        out.copy_from_slice(&fresh);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], w: &[f32], n: usize, i: usize, o: usize) -> Vec<f64> {
        let mut out = vec![0f64; n * o];
        for r in 0..n {
            for j in 0..o {
                out[r * o + j] = (0..i)
                    .map(|k| f64::from(x[r * i + k]) * f64::from(w[j * i + k]))
                    .sum();
            }
        }
        out
    }

    #[test]
    fn gemv_equals_the_product_in_f32_and_bf16() {
        let (n, i, o) = (3, 77, 70);
        let x: Vec<f32> = (0..n * i)
            .map(|k| ((k * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let w: Vec<f32> = (0..o * i)
            .map(|k| ((k * 53 % 97) as f32 - 48.0) / 48.0)
            .collect();
        let want = reference(&x, &w, n, i, o);
        let mut out = vec![0f32; n * o];
        gemv(&x, &w, &mut out, n, i, o, false);
        // The portable loop (CPUs without AVX2) gives the same within rounding.
        let mut portable = vec![0f32; o];
        dot_rows(&x[..i], &w, i, 0, &mut portable);
        for (a, b) in portable.iter().zip(&want) {
            assert!(
                (f64::from(*a) - b).abs() < 1e-4 * (1.0 + b.abs()),
                "{a} vs {b}"
            );
        }
        for (a, b) in out.iter().zip(&want) {
            assert!(
                (f64::from(*a) - b).abs() < 1e-4 * (1.0 + b.abs()),
                "{a} vs {b}"
            );
        }
        // bf16 weights: the product with the rounded weights, accumulated onto `out`.
        let wb: Vec<half::bf16> = w.iter().map(|v| half::bf16::from_f32(*v)).collect();
        let rounded: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
        let want_b = reference(&x, &rounded, n, i, o);
        let before = out.clone();
        gemv(&x, &wb, &mut out, n, i, o, true);
        for ((a, b), p) in out.iter().zip(&want_b).zip(&before) {
            let got = f64::from(*a - *p);
            assert!((got - b).abs() < 1e-4 * (1.0 + b.abs()), "{got} vs {b}");
        }
    }
}
