//! Fused, memory-lean CPU attention with its own backward (one of the CPU kernels that
//! `model::kernels` chooses from; it lives here beside its backward).
//!
//! `softmax(q·kᵀ·scale + bias)·v` over q `(B, H, T, Dh)` and k, v `(B, KV, T, Dh)` (GQA: query head
//! `h` reads kv head `h / (H/KV)`), without expanding k/v to H heads. The composed path
//! (`composed::repeat_kv` + `composed::attention`) keeps the repeated k/v copies and four `(B, H, T, T)`
//! score/probability tensors alive until backward ends; this op keeps only its output and one
//! log-sum-exp per query row `(B, H, T)`, and recomputes the probabilities in backward
//! (flash-attention style). Keys whose bias is -inf at the edges of a row (the causal future, other
//! segments of a packed row) are skipped in blocks of query rows.
//!
//! f32 on the CPU only; `model::kernels::plan` says when it runs. In the CPU's bf16 mode the
//! products take bf16-rounded operands on the AMX tiles (`bf16::matmul_f32_small`, f32 sums),
//! as torch runs attention in a bf16 model; the softmax and its statistics stay f32.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::kernels::cpu;

mod backward;
use backward::FlashAttnBwd;
pub mod chunked;

/// Query rows per block: the keys a block needs are the union of its rows' visible ranges.
const BLOCK: usize = 64;

/// Scaled dot-product attention, `softmax(q·kᵀ·scale + bias)·v`, on the CPU in f32. q
/// `(B, H, T, Dh)`, k and v `(B, KV, T, Dh)` with `H` a multiple of `KV` (checked by the caller,
/// `kernels::attention`), `bias` additive `(bias_rows, 1, T, T)` with `bias_rows` 1 or B.
/// Returns `(B, H, T, Dh)`. `bf16`: the products on bf16-rounded operands (see the module doc).
pub fn flash(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    (bias_rows, scale): (usize, f64),
    bf16: bool,
) -> Result<Tensor> {
    let bias = bias.to_dtype(DType::F32)?.contiguous()?;
    let op = FlashAttn {
        bias,
        bias_rows,
        bf16,
        scale: scale as f32,
        lse: cpu::Saved::new(),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// Sizes of one attention call.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    kv: usize,
    t: usize,
    d: usize,
    bias_rows: usize,
    /// The products on bf16-rounded operands.
    bf16: bool,
}

impl Dims {
    fn rep(&self) -> usize {
        self.h / self.kv
    }
}

fn dims_of(
    lq: &Layout,
    lk: &Layout,
    lv: &Layout,
    (bias_rows, bf16): (usize, bool),
) -> Result<Dims> {
    let (b, h, t, d) = lq.shape().dims4()?;
    let (kb, kv, kt, kd) = lk.shape().dims4()?;
    if (kb, kt, kd) != (b, t, d) || lv.shape().dims4()? != (b, kv, t, d) || kv == 0 || h % kv != 0 {
        candle_core::bail!("attention: q/k/v shapes do not fit");
    }
    Ok(Dims {
        b,
        h,
        kv,
        t,
        d,
        bias_rows,
        bf16,
    })
}

/// Reads a contiguous f32 CPU tensor inside a kernel.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    cpu::with_f32(t, "attention", |x, _| f(x))
}

/// For every bias row and query i, the half-open key range `lo..hi` between the first and the last
/// finite bias entry (empty when the whole row is -inf).
fn key_ranges(bias: &[f32], rows: usize, t: usize) -> Result<Vec<(usize, usize)>> {
    if bias.len() != rows * t * t {
        candle_core::bail!(
            "attention: bias holds {} values, not {rows}·{t}²",
            bias.len()
        );
    }
    Ok(bias
        .chunks(t.max(1))
        .take(rows * t)
        .map(|row| {
            let lo = row.iter().position(|&x| x != f32::NEG_INFINITY);
            let hi = row.iter().rposition(|&x| x != f32::NEG_INFINITY);
            match (lo, hi) {
                (Some(lo), Some(hi)) => (lo, hi + 1),
                _ => (0, 0),
            }
        })
        .collect())
}

/// The key range of a block of rows: the union of the rows' non-empty ranges.
fn block_range(ranges: &[(usize, usize)]) -> (usize, usize) {
    ranges
        .iter()
        .filter(|(lo, hi)| lo < hi)
        .fold((usize::MAX, 0), |(a, b), &(lo, hi)| (a.min(lo), b.max(hi)))
}

/// `dst (m×n) = [dst +] beta · A (m×k) · B (k×n)`, each matrix given by its slice, row stride and
/// column stride (dst's column stride is 1), on this thread. Checks that the slices cover the
/// strided extents. `bf16`: the operands rounded to bf16, on the tiles (then `beta` ≠ 1 only
/// without `accumulate`).
#[allow(clippy::too_many_arguments)]
fn mm(
    bf16: bool,
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
    beta: f32,
) -> Result<()> {
    if !bf16 || m == 0 || n == 0 || k == 0 {
        let dst = (dst, dst_rs);
        return cpu::strided::gemm("attention", (m, n, k), dst, accumulate, a, b, beta, false);
    }
    if accumulate && beta != 1.0 {
        candle_core::bail!("attention: a scaled bf16 product cannot accumulate");
    }
    crate::model::bf16::matmul_f32_small((m, n, k), a, b, dst, dst_rs, accumulate)
        .map_err(|e| candle_core::Error::Msg(format!("attention: {e}")))?;
    if beta != 1.0 {
        for r in 0..m {
            dst[r * dst_rs..r * dst_rs + n]
                .iter_mut()
                .for_each(|x| *x *= beta);
        }
    }
    Ok(())
}

/// Turns one row of scaled scores `s` (keys `klo..klo + s.len()`) into probabilities in place:
/// adds the bias row (indexed by key), zeroes keys outside `lo..hi`, and normalises with the given
/// log-sum-exp or, when `None`, a fresh one. Returns the log-sum-exp (-inf for an empty range).
fn probs(
    s: &mut [f32],
    bias: &[f32],
    klo: usize,
    (lo, hi): (usize, usize),
    lse: Option<f32>,
) -> f32 {
    if lo >= hi {
        s.fill(0.0);
        return f32::NEG_INFINITY;
    }
    let (a, b) = (lo - klo, hi - klo);
    s[..a].fill(0.0);
    s[b..].fill(0.0);
    let mid = &mut s[a..b];
    for (x, &bb) in mid.iter_mut().zip(&bias[lo..hi]) {
        *x += bb;
    }
    match lse {
        Some(l) => {
            cpu::exp_in_place(mid, l);
            l
        }
        None => {
            let max = cpu::row_max(mid);
            let sum = cpu::exp_in_place(mid, max);
            let inv = 1.0 / sum;
            mid.iter_mut().for_each(|x| *x *= inv);
            max + sum.ln()
        }
    }
}

/// Forward of one (batch, query head): writes `o` (T×D) and the log-sum-exp per row `l` (T).
#[allow(clippy::too_many_arguments)]
fn forward_head(
    dm: &Dims,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: &[f32],
    ranges: &[(usize, usize)],
    o: &mut [f32],
    l: &mut [f32],
) -> Result<()> {
    let (t, d) = (dm.t, dm.d);
    let mut s = Vec::new();
    for i0 in (0..t).step_by(BLOCK) {
        let i1 = (i0 + BLOCK).min(t);
        let nb = i1 - i0;
        let (klo, khi) = block_range(&ranges[i0..i1]);
        if klo >= khi {
            o[i0 * d..i1 * d].fill(0.0);
            l[i0..i1].fill(f32::NEG_INFINITY);
            continue;
        }
        let nk = khi - klo;
        s.resize(nb * nk, 0.0);
        // S = scale · Q_blk · K_rangeᵀ
        mm(
            dm.bf16,
            (nb, nk, d),
            &mut s,
            nk,
            false,
            (&q[i0 * d..], d, 1),
            (&k[klo * d..], 1, d),
            scale,
        )?;
        for (r, row) in s.chunks_mut(nk).enumerate() {
            let i = i0 + r;
            l[i] = probs(row, &bias[i * t..(i + 1) * t], klo, ranges[i], None);
        }
        // O_blk = P · V_range
        mm(
            dm.bf16,
            (nb, d, nk),
            &mut o[i0 * d..i1 * d],
            d,
            false,
            (&s, nk, 1),
            (&v[klo * d..], d, 1),
            1.0,
        )?;
    }
    Ok(())
}

fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    cpu::slice(s, l, "attention")
}

/// The forward op over (q, k, v); holds the bias and, after the forward, the log-sum-exp rows.
struct FlashAttn {
    /// (bias_rows, 1, T, T), contiguous f32 on CPU.
    bias: Tensor,
    bias_rows: usize,
    /// The products on bf16-rounded operands.
    bf16: bool,
    scale: f32,
    lse: cpu::Saved<Arc<Vec<f32>>>,
}

impl CustomOp3 for FlashAttn {
    fn name(&self) -> &'static str {
        "ft-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dm = dims_of(l1, l2, l3, (self.bias_rows, self.bf16))?;
        let (q, k, v) = (cpu_f32(s1, l1)?, cpu_f32(s2, l2)?, cpu_f32(s3, l3)?);
        let (t, d) = (dm.t, dm.d);
        let hd = t * d;
        let mut out = vec![0f32; dm.b * dm.h * hd];
        let mut lse = vec![0f32; dm.b * dm.h * t];
        if hd > 0 {
            with_f32(&self.bias, |bias| {
                let ranges = key_ranges(bias, dm.bias_rows, t)?;
                out.par_chunks_mut(hd)
                    .zip(lse.par_chunks_mut(t))
                    .enumerate()
                    .try_for_each(|(head, (o, l))| {
                        let (b, h) = (head / dm.h, head % dm.h);
                        let kvh = b * dm.kv + h / dm.rep();
                        let br = if dm.bias_rows == 1 { 0 } else { b };
                        forward_head(
                            &dm,
                            self.scale,
                            &q[head * hd..(head + 1) * hd],
                            &k[kvh * hd..(kvh + 1) * hd],
                            &v[kvh * hd..(kvh + 1) * hd],
                            &bias[br * t * t..(br + 1) * t * t],
                            &ranges[br * t..(br + 1) * t],
                            o,
                            l,
                        )
                    })
            })?;
        }
        self.lse.set(Arc::new(lse));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self.lse.get();
        let op = FlashAttnBwd {
            bias: self.bias.clone(),
            bias_rows: self.bias_rows,
            bf16: self.bf16,
            scale: self.scale,
            lse,
            o: res.contiguous()?,
            g: grad.contiguous()?,
        };
        let all = q
            .contiguous()?
            .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let dq = all.narrow(0, 0, nq)?.reshape(q.shape())?;
        let dk = all.narrow(0, nq, nk)?.reshape(k.shape())?;
        let dv = all.narrow(0, nq + nk, nk)?.reshape(v.shape())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests;
