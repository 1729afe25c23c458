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
mod avx512;
mod portable;

use half::bf16;
use std::fmt;

/// Errors reported for inconsistent slice sizes / strides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
        Path::Portable,
    )
}

/// Same contract as [`matmul_f32_bf16`] on the AVX512-BF16 kernel (for testing it on machines
/// whose best path is AMX); the portable path where the CPU lacks it.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub fn matmul_f32_bf16_avx512(
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
        Path::Avx512,
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
        if path == Path::Best && amx::usable() {
            // SAFETY: AMX-BF16 is usable on this CPU and process (checked just above) and all
            // shapes/strides were validated against the slice lengths by `validate`.
            unsafe {
                amx::matmul(m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, c, ldc, accumulate);
            }
            return Ok(());
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

#[cfg(test)]
mod tests {
    use super::{matmul_f32_bf16, matmul_f32_bf16_avx512, matmul_f32_bf16_portable, Error};
    use half::bf16;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn f(&mut self) -> f32 {
            ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        fn range(&mut self, lo: usize, hi: usize) -> usize {
            lo + (self.next() % (hi - lo + 1) as u64) as usize
        }
    }

    type MatFn = fn(
        usize,
        usize,
        usize,
        &[f32],
        usize,
        usize,
        &[bf16],
        usize,
        usize,
        &mut [f32],
        usize,
        bool,
    ) -> Result<(), Error>;

    struct Case {
        m: usize,
        n: usize,
        k: usize,
        a_rs: usize,
        a_cs: usize,
        b_rs: usize,
        b_cs: usize,
        ldc: usize,
        accumulate: bool,
    }

    impl Case {
        /// A and C row-major; B as the forward pass reads it (`fwd`: Wᵀ, contiguous in k) or as
        /// the backward does (row-major).
        fn dense(m: usize, n: usize, k: usize, fwd: bool, accumulate: bool) -> Self {
            let (b_rs, b_cs) = if fwd { (1, k) } else { (n, 1) };
            Self {
                m,
                n,
                k,
                a_rs: k,
                a_cs: 1,
                b_rs,
                b_cs,
                ldc: n,
                accumulate,
            }
        }
    }

    /// Returns (rel err vs bf16-rounded-input f64 ref, rel err vs unrounded f64 ref).
    fn run_case(f: MatFn, cs: &Case, rng: &mut Rng) -> (f64, f64) {
        let Case {
            m,
            n,
            k,
            a_rs,
            a_cs,
            b_rs,
            b_cs,
            ldc,
            accumulate,
        } = *cs;
        let a_len = if m == 0 || k == 0 {
            0
        } else {
            (m - 1) * a_rs + (k - 1) * a_cs + 1
        };
        let b_len = if k == 0 || n == 0 {
            0
        } else {
            (k - 1) * b_rs + (n - 1) * b_cs + 1
        };
        let c_len = if m == 0 { 0 } else { (m - 1) * ldc + n };
        let a: Vec<f32> = (0..a_len).map(|_| rng.f()).collect();
        // Unrounded "true" B values; the bf16 B is its rounding.
        let b_true: Vec<f32> = (0..b_len).map(|_| rng.f()).collect();
        let b: Vec<bf16> = b_true.iter().map(|&x| bf16::from_f32(x)).collect();
        let c0: Vec<f32> = (0..c_len).map(|_| rng.f()).collect();
        let mut c = if accumulate {
            c0.clone()
        } else {
            vec![f32::NAN; c_len]
        };
        f(
            m, n, k, &a, a_rs, a_cs, &b, b_rs, b_cs, &mut c, ldc, accumulate,
        )
        .unwrap();
        let (mut num_r, mut num_u, mut den) = (0.0f64, 0.0f64, 0.0f64);
        for i in 0..m {
            for j in 0..n {
                let mut sr = 0.0f64;
                let mut su = 0.0f64;
                for p in 0..k {
                    let av = a[i * a_rs + p * a_cs];
                    let bi = p * b_rs + j * b_cs;
                    sr += bf16::from_f32(av).to_f32() as f64 * b[bi].to_f64();
                    su += av as f64 * b_true[bi] as f64;
                }
                if accumulate {
                    sr += c0[i * ldc + j] as f64;
                    su += c0[i * ldc + j] as f64;
                }
                let got = c[i * ldc + j] as f64;
                assert!(got.is_finite(), "non-finite at ({i},{j}) m={m} n={n} k={k}");
                num_r += (got - sr).powi(2);
                num_u += (got - su).powi(2);
                den += sr * sr;
            }
        }
        // Padding between rows (ldc > n) must be untouched.
        if !accumulate {
            for i in 0..m.saturating_sub(1) {
                for j in n..ldc {
                    assert!(c[i * ldc + j].is_nan(), "wrote outside C tile");
                }
            }
        }
        let den = den.max(1e-30);
        ((num_r / den).sqrt(), (num_u / den).sqrt())
    }

    fn random_cases(f: MatFn, seed: u64, count: usize) {
        let mut rng = Rng(seed);
        let mut worst = 0.0f64;
        let mut worst_u = 0.0f64;
        for t in 0..count {
            let m = rng.range(1, 70);
            let n = rng.range(1, 70);
            let k = match t % 7 {
                0 => 1,
                1 => 2 * rng.range(0, 35) + 1,
                _ => rng.range(1, 70),
            };
            let fwd = t % 2 == 0;
            let (a_rs, a_cs) = match t % 5 {
                0 => (1, m + rng.range(0, 3)), // column-major A
                1 => (k + rng.range(1, 5), 1), // padded rows
                2 => (2 * k + 3, 2),           // strided
                _ => (k, 1),
            };
            let (b_rs, b_cs) = match (fwd, t % 3) {
                (true, 0) => (1, k + rng.range(1, 4)),
                (true, _) => (1, k),
                (false, 0) => (n + rng.range(1, 4), 1),
                (false, 1) => (n, 1),
                (false, _) => (3 * n + 1, 3), // general strides
            };
            let ldc = n + if t % 4 == 0 { rng.range(1, 5) } else { 0 };
            let accumulate = t % 3 == 1;
            let cs = Case {
                m,
                n,
                k,
                a_rs,
                a_cs,
                b_rs,
                b_cs,
                ldc,
                accumulate,
            };
            let (er, eu) = run_case(f, &cs, &mut rng);
            assert!(er < 1e-5, "rel err {er} (m={m} n={n} k={k} t={t})");
            worst = worst.max(er);
            worst_u = worst_u.max(eu);
        }
        println!(
            "random cases: {count}, worst rel err vs rounded ref {worst:.3e}, vs unrounded {worst_u:.3e}"
        );
    }

    #[test]
    fn random_shapes_fast_path() {
        println!("kernel: {}", super::kernel_name());
        random_cases(matmul_f32_bf16, 0x1234_5678_9abc_def1, 600);
    }

    #[test]
    fn random_shapes_avx512() {
        random_cases(matmul_f32_bf16_avx512, 0x2345_6789_abcd_ef12, 300);
    }

    #[test]
    fn random_shapes_portable() {
        random_cases(matmul_f32_bf16_portable, 0x0fed_cba9_8765_4321, 300);
    }

    #[test]
    fn block_boundaries() {
        // Shapes straddling KC (256), MC (1024), NR (48), MR (8) boundaries.
        let mut rng = Rng(42);
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 577, 513),
            (9, 49, 257),
            (1030, 50, 300),
            (17, 97, 511),
            (64, 1000, 3),
            (3, 5, 1025),
            // several k-blocks (KC = 2048), odd k, ragged last block
            (13, 33, 4097),
            (20, 50, 2049),
            // packed A too large to keep all k-blocks resident (per-block A packing),
            // and more rows than one row block (MC = 1024)
            (1100, 9, 8201),
        ] {
            for fwd in [true, false] {
                for accumulate in [false, true] {
                    let cs = Case::dense(m, n, k, fwd, accumulate);
                    let (er, eu) = run_case(matmul_f32_bf16, &cs, &mut rng);
                    println!(
                        "m={m} n={n} k={k} fwd={fwd} acc={accumulate}: rel {er:.2e} unrounded {eu:.2e}"
                    );
                    assert!(er < 1e-5);
                }
            }
        }
    }

    #[test]
    fn real_shapes() {
        // SmolLM2-135M shapes (m = N tokens reduced to keep the f64 reference cheap
        // for the largest ones; k and n are the real sizes).
        let mut rng = Rng(7);
        for &(m, k, n) in &[
            (1024, 576, 576),
            (1024, 576, 192),
            (256, 576, 1536),
            (256, 1536, 576),
            (8, 576, 49152),
            (8, 49152, 576),
        ] {
            for fwd in [true, false] {
                let cs = Case::dense(m, n, k, fwd, !fwd);
                let (er, eu) = run_case(matmul_f32_bf16, &cs, &mut rng);
                println!(
                    "real m={m} k={k} n={n} fwd={fwd}: rel err vs rounded ref {er:.2e}, vs unrounded f32 ref {eu:.2e}"
                );
                assert!(er < 1e-5);
                assert!(eu < 1e-2);
            }
        }
    }

    #[test]
    fn errors_and_degenerate() {
        let a = vec![1.0f32; 6];
        let b = vec![bf16::from_f32(1.0); 6];
        let mut c = vec![0.0f32; 4];
        assert!(matches!(
            matmul_f32_bf16(2, 2, 3, &a[..5], 3, 1, &b, 2, 1, &mut c, 2, false),
            Err(Error::ATooShort { .. })
        ));
        assert!(matches!(
            matmul_f32_bf16(2, 2, 3, &a, 3, 1, &b[..5], 2, 1, &mut c, 2, false),
            Err(Error::BTooShort { .. })
        ));
        assert!(matches!(
            matmul_f32_bf16(2, 2, 3, &a, 3, 1, &b, 2, 1, &mut c[..3], 2, false),
            Err(Error::CTooShort { .. })
        ));
        assert!(matches!(
            matmul_f32_bf16(2, 2, 3, &a, 3, 1, &b, 2, 1, &mut c, 1, false),
            Err(Error::LdcTooSmall { .. })
        ));
        assert!(matches!(
            matmul_f32_bf16(2, 2, 3, &a, usize::MAX, 1, &b, 2, 1, &mut c, 2, false),
            Err(Error::Overflow)
        ));
        matmul_f32_bf16(2, 2, 3, &a, 3, 1, &b, 2, 1, &mut c, 2, false).unwrap();
        assert_eq!(c, vec![3.0; 4]);
        matmul_f32_bf16(2, 2, 3, &a, 3, 1, &b, 2, 1, &mut c, 2, true).unwrap();
        assert_eq!(c, vec![6.0; 4]);
        // k = 0: C = 0 (or unchanged when accumulating).
        matmul_f32_bf16(2, 2, 0, &[], 0, 1, &[], 2, 1, &mut c, 2, true).unwrap();
        assert_eq!(c, vec![6.0; 4]);
        matmul_f32_bf16(2, 2, 0, &[], 0, 1, &[], 2, 1, &mut c, 2, false).unwrap();
        assert_eq!(c, vec![0.0; 4]);
        // m = 0 / n = 0 are no-ops.
        matmul_f32_bf16(0, 2, 3, &[], 3, 1, &b, 2, 1, &mut [], 2, false).unwrap();
        matmul_f32_bf16(2, 0, 3, &a, 3, 1, &[], 2, 1, &mut c, 0, false).unwrap();
    }

    #[test]
    fn single_thread_pool() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        pool.install(|| random_cases(matmul_f32_bf16, 99, 60));
    }
}
