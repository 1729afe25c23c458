//! The mixed-precision product against an f64 reference: every kernel, random shapes and
//! strides, block boundaries, real shapes, errors.
#![cfg(test)]

use super::{matmul_f32_bf16, matmul_f32_bf16_on, matmul_f32_bf16_rows, Error, RowWork};
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
    random_cases(matmul_f32_bf16_on::<false>, 0x2345_6789_abcd_ef12, 300);
}

#[test]
fn random_shapes_portable() {
    random_cases(matmul_f32_bf16_on::<true>, 0x0fed_cba9_8765_4321, 300);
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
        // several k-blocks (KC = 2048; AMX: chunks of 1024 above 2048), odd k, ragged last block
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

/// The product with row work (`matmul_f32_bf16_rows`, inside the AMX kernel where it runs, k
/// chunked above 2048 included) equals the plain product followed by the same work on every row:
/// `packed` checks that its rows are A's from the index it is given and gives each row of the side
/// buffer the sums of its row of A, `done` adds them onto C's row, so a row given twice, skipped,
/// misplaced or paired with another row's side would show.
#[test]
fn row_work_equals_the_work_around_the_product() {
    let mut rng = Rng(11);
    let width = 3;
    for &(m, n, k) in &[
        (1, 5, 7),
        (31, 40, 64),
        (70, 33, 100),
        (96, 48, 2100),
        (40, 17, 4099),
    ] {
        for fwd in [true, false] {
            let (b_rs, b_cs) = if fwd { (1, k) } else { (n, 1) };
            let a: Vec<f32> = (0..m * k).map(|_| rng.f()).collect();
            let b: Vec<bf16> = (0..k * n).map(|_| bf16::from_f32(rng.f())).collect();
            let packed = |i0: usize, rows: &[f32], side: &mut [f32]| -> Result<(), String> {
                if rows != &a[i0 * k..i0 * k + rows.len()] || rows.len() != side.len() / width * k {
                    return Err(format!("rows from {i0} are not A's"));
                }
                for (row, s) in rows.chunks_exact(k).zip(side.chunks_exact_mut(width)) {
                    for (t, v) in s.iter_mut().enumerate() {
                        *v = row.iter().sum::<f32>() * (t + 1) as f32;
                    }
                }
                Ok(())
            };
            let done = |_: usize, side: &[f32], c: &mut [f32]| -> Result<(), String> {
                for (s, row) in side.chunks_exact(width).zip(c.chunks_exact_mut(n)) {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v += s[j % width] + 1.0;
                    }
                }
                Ok(())
            };
            let mut side = vec![f32::NAN; m * width];
            let mut got = vec![f32::NAN; m * n];
            let mut work = RowWork {
                side: &mut side,
                width,
                packed: &packed,
                done: &done,
            };
            matmul_f32_bf16_rows((m, n, k), &a, (&b, b_rs, b_cs), &mut got, false, &mut work)
                .unwrap();
            let mut want = vec![0f32; m * n];
            matmul_f32_bf16(m, n, k, &a, k, 1, &b, b_rs, b_cs, &mut want, n, false).unwrap();
            let mut want_side = vec![0f32; m * width];
            packed(0, &a, &mut want_side).unwrap();
            done(0, &want_side, &mut want).unwrap();
            assert_eq!(side, want_side, "side ({m},{n},{k}) fwd {fwd}");
            assert_eq!(got, want, "C ({m},{n},{k}) fwd {fwd}");
        }
    }
    let (mut short, nothing) = (vec![0f32; 2], |_: usize, _: &[f32], _: &mut [f32]| Ok(()));
    let mut work = RowWork {
        side: &mut short,
        width,
        packed: &nothing,
        done: &nothing,
    };
    let err = matmul_f32_bf16_rows(
        (2, 2, 2),
        &[0.0; 4],
        (&[bf16::ZERO; 4], 2, 1),
        &mut [0.0; 4],
        false,
        &mut work,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("2 side values for 2 rows of 3"),
        "{err}"
    );
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

/// The small all-f32 product (the fused attention's, in the bf16 mode) against f64 sums of the
/// bf16-rounded operands: each layout the attention hands over (A and B row-major, transposed,
/// or neither), written and accumulated, at sizes on and off the tiles' 32.
#[test]
fn small_products_match_rounded_f64() {
    let mut rng = Rng(0x5eed_a77e);
    let round = |x: f32| f64::from(bf16::from_f32(x).to_f32());
    let shapes = [
        (64, 256, 64),
        (64, 64, 200),
        (1, 1, 1),
        (33, 17, 70),
        (7, 64, 31),
        (32, 32, 32),
        (100, 45, 96),
    ];
    let mut checked = 0;
    for (m, n, k) in shapes {
        let a_layouts = [(k, 1), (1, m), (2 * k, 2)];
        let b_layouts = [(n, 1), (1, k), (2 * n, 2)];
        for ((a_rs, a_cs), (b_rs, b_cs)) in a_layouts
            .into_iter()
            .flat_map(|a| b_layouts.into_iter().map(move |b| (a, b)))
        {
            let a: Vec<f32> = (0..(m - 1) * a_rs + (k - 1) * a_cs + 1)
                .map(|_| rng.f())
                .collect();
            let b: Vec<f32> = (0..(k - 1) * b_rs + (n - 1) * b_cs + 1)
                .map(|_| rng.f() * 3.0)
                .collect();
            let ldc = n + 3;
            for accumulate in [false, true] {
                let c0: Vec<f32> = (0..m * ldc).map(|_| rng.f()).collect();
                let mut c = c0.clone();
                super::matmul_f32_small(
                    (m, n, k),
                    (&a, a_rs, a_cs),
                    (&b, b_rs, b_cs),
                    &mut c,
                    ldc,
                    accumulate,
                )
                .unwrap();
                for i in 0..m {
                    for j in 0..n {
                        let (mut want, mut size) = (0f64, 0f64);
                        for p in 0..k {
                            let x = round(a[i * a_rs + p * a_cs]) * round(b[p * b_rs + j * b_cs]);
                            want += x;
                            size += x.abs();
                        }
                        if accumulate {
                            want += f64::from(c0[i * ldc + j]);
                        }
                        let err = (f64::from(c[i * ldc + j]) - want).abs();
                        assert!(
                            err <= 1e-6 * (1.0 + size),
                            "{m}×{n}×{k} a ({a_rs},{a_cs}) b ({b_rs},{b_cs}) acc {accumulate}: \
                             C[{i}][{j}] = {} vs {want}",
                            c[i * ldc + j]
                        );
                    }
                    // Columns past n are left alone.
                    assert_eq!(
                        c[i * ldc + n..(i + 1) * ldc],
                        c0[i * ldc + n..(i + 1) * ldc]
                    );
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, shapes.len() * 18);
}
