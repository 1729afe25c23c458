//! Portable fallback: A rounded to bf16, B widened to f32, blocked f32 loops.

use half::bf16;
use rayon::prelude::*;

const KB: usize = 256;

/// Preconditions: validated shapes, m, n, k > 0.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
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
    let mut bblk = vec![0.0f32; KB.min(k) * n];
    // Row i of C lives in c[i*ldc .. i*ldc+n]; chunks of ldc give disjoint rows.
    let ldc_eff = ldc.max(n);
    for pc in (0..k).step_by(KB) {
        let kc = KB.min(k - pc);
        bblk[..kc * n]
            .par_chunks_mut(n)
            .enumerate()
            .for_each(|(p, row)| {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = b[(pc + p) * b_rs + j * b_cs].to_f32();
                }
            });
        let bblk = &bblk;
        let first = pc == 0 && !accumulate;
        c.par_chunks_mut(ldc_eff)
            .take(m)
            .enumerate()
            .for_each(|(i, crow)| {
                let crow = &mut crow[..n];
                if first {
                    crow.fill(0.0);
                }
                for p in 0..kc {
                    let av = bf16::from_f32(a[i * a_rs + (pc + p) * a_cs]).to_f32();
                    let brow = &bblk[p * n..p * n + n];
                    for (cv, bv) in crow.iter_mut().zip(brow) {
                        *cv += av * bv;
                    }
                }
            });
    }
}
