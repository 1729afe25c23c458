//! Backward of the fused attention: recompute each (batch, head)'s probabilities from the saved
//! log-sum-exp, then dV = Pᵀ·dO, dS = P ⊙ (dO·Vᵀ − rowsum(dO ⊙ O)), dQ = scale·dS·K and
//! dK = scale·dSᵀ·Q, summing dK/dV over the query heads that share a kv head.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{block_range, cpu_f32, dims_of, key_ranges, mm, probs, with_f32, Dims, BLOCK};

/// The backward op over (q, k, v): returns dq, dk and dv concatenated into one flat buffer.
pub(super) struct FlashAttnBwd {
    pub(super) bias: Tensor,
    pub(super) bias_rows: usize,
    pub(super) bf16: bool,
    pub(super) scale: f32,
    pub(super) lse: Option<Arc<Vec<f32>>>,
    /// The forward output and its gradient, contiguous (B, H, T, D).
    pub(super) o: Tensor,
    pub(super) g: Tensor,
}

impl CustomOp3 for FlashAttnBwd {
    fn name(&self) -> &'static str {
        "ft-attention-bwd"
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
        let (nq, nk) = (q.len(), k.len());
        let mut all = vec![0f32; nq + 2 * nk];
        if let Some(l) = &self.lse {
            if l.len() != dm.b * dm.h * t {
                candle_core::bail!("attention backward: saved log-sum-exp does not fit");
            }
        }
        if hd > 0 {
            with_f32(&self.bias, |bias| {
                with_f32(&self.o, |o| {
                    with_f32(&self.g, |g| {
                        if o.len() != nq || g.len() != nq {
                            candle_core::bail!("attention backward: output/gradient do not fit");
                        }
                        let ranges = key_ranges(bias, dm.bias_rows, t)?;
                        let job = GroupBwd {
                            dm,
                            scale: self.scale,
                            q,
                            k,
                            v,
                            o,
                            g,
                            lse: self.lse.as_ref().map(|l| l.as_slice()),
                            bias,
                            ranges: &ranges,
                        };
                        let (dq, rest) = all.split_at_mut(nq);
                        let (dk, dv) = rest.split_at_mut(nk);
                        dq.par_chunks_mut(dm.rep() * hd)
                            .zip(dk.par_chunks_mut(hd).zip(dv.par_chunks_mut(hd)))
                            .enumerate()
                            .try_for_each(|(group, (dq, (dk, dv)))| job.run(group, dq, dk, dv))
                    })
                })
            })?;
        }
        let n = all.len();
        Ok((CpuStorage::F32(all), Shape::from_dims(&[n])))
    }
}

/// Backward of one (batch, kv head) group: `dq` holds the group's H/KV query heads (each T×D),
/// `dk`/`dv` the kv head's gradients, summed over the group's query heads.
struct GroupBwd<'a> {
    dm: Dims,
    scale: f32,
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    o: &'a [f32],
    g: &'a [f32],
    lse: Option<&'a [f32]>,
    bias: &'a [f32],
    ranges: &'a [(usize, usize)],
}

/// The key/value side of one (batch, kv head) group: its K and V (T×D each) and the bias rows
/// and key ranges of its batch.
struct KvGroup<'a> {
    k: &'a [f32],
    v: &'a [f32],
    bias: &'a [f32],
    ranges: &'a [(usize, usize)],
}

/// One query head's Q, output O and output gradient dO (T×D each), and its saved log-sum-exp.
struct QueryHead<'a> {
    q: &'a [f32],
    o: &'a [f32],
    g: &'a [f32],
    lse: Option<&'a [f32]>,
}

/// Per-block buffers reused across blocks: the probabilities P and dP (then dS), nb × nk each.
#[derive(Default)]
struct Scratch {
    s: Vec<f32>,
    dp: Vec<f32>,
}

impl<'a> GroupBwd<'a> {
    fn run(&self, group: usize, dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) -> Result<()> {
        let dm = &self.dm;
        let (t, d, rep) = (dm.t, dm.d, dm.rep());
        let (b, kvh) = (group / dm.kv, group % dm.kv);
        let hd = t * d;
        let br = if dm.bias_rows == 1 { 0 } else { b };
        let kv = KvGroup {
            k: &self.k[group * hd..(group + 1) * hd],
            v: &self.v[group * hd..(group + 1) * hd],
            bias: &self.bias[br * t * t..(br + 1) * t * t],
            ranges: &self.ranges[br * t..(br + 1) * t],
        };
        let mut scratch = Scratch::default();
        for (j, dq) in dq.chunks_mut(hd).enumerate() {
            let head = b * dm.h + kvh * rep + j;
            let at = |x: &'a [f32]| &x[head * hd..(head + 1) * hd];
            let qh = QueryHead {
                q: at(self.q),
                o: at(self.o),
                g: at(self.g),
                lse: self.lse.map(|l| &l[head * t..(head + 1) * t]),
            };
            for i0 in (0..t).step_by(BLOCK) {
                self.query_block(&kv, &qh, i0, &mut scratch, dq, (&mut *dk, &mut *dv))?;
            }
        }
        Ok(())
    }

    /// The query rows `i0..i0 + BLOCK` of one head against the keys they see: writes those rows
    /// of `dq`, adds into the key range of `dk`/`dv`.
    fn query_block(
        &self,
        kv: &KvGroup<'_>,
        qh: &QueryHead<'_>,
        i0: usize,
        scratch: &mut Scratch,
        dq: &mut [f32],
        (dk, dv): (&mut [f32], &mut [f32]),
    ) -> Result<()> {
        let (t, d) = (self.dm.t, self.dm.d);
        let (q, o, g, k, v) = (qh.q, qh.o, qh.g, kv.k, kv.v);
        let i1 = (i0 + BLOCK).min(t);
        let nb = i1 - i0;
        let (klo, khi) = block_range(&kv.ranges[i0..i1]);
        if klo >= khi {
            dq[i0 * d..i1 * d].fill(0.0);
            return Ok(());
        }
        let nk = khi - klo;
        let Scratch { s, dp } = scratch;
        s.resize(nb * nk, 0.0);
        dp.resize(nb * nk, 0.0);
        self.probs_block(kv, qh, (i0, i1), (klo, nk), s)?;
        // dV_range += Pᵀ · dO_blk
        mm(
            self.dm.bf16,
            (nk, d, nb),
            &mut dv[klo * d..],
            d,
            true,
            (s, 1, nk),
            (&g[i0 * d..], d, 1),
            1.0,
        )?;
        // dP = dO_blk · V_rangeᵀ
        mm(
            self.dm.bf16,
            (nb, nk, d),
            dp,
            nk,
            false,
            (&g[i0 * d..], d, 1),
            (&v[klo * d..], 1, d),
            1.0,
        )?;
        // scale · dS = scale · P ∘ (dP − Σ_d dO·O), into dp (the scale of both products below).
        for (r, (dpr, pr)) in dp.chunks_mut(nk).zip(s.chunks(nk)).enumerate() {
            let i = i0 + r;
            let row = i * d..(i + 1) * d;
            let di: f32 = g[row.clone()].iter().zip(&o[row]).map(|(a, b)| a * b).sum();
            for (x, &p) in dpr.iter_mut().zip(pr.iter()) {
                *x = self.scale * (p * (*x - di));
            }
        }
        // dQ_blk = scale · dS · K_range
        mm(
            self.dm.bf16,
            (nb, d, nk),
            &mut dq[i0 * d..i1 * d],
            d,
            false,
            (dp, nk, 1),
            (&k[klo * d..], d, 1),
            1.0,
        )?;
        // dK_range += scale · dSᵀ · Q_blk
        mm(
            self.dm.bf16,
            (nk, d, nb),
            &mut dk[klo * d..],
            d,
            true,
            (dp, 1, nk),
            (&q[i0 * d..], d, 1),
            1.0,
        )
    }

    /// P of query rows `i0..i1` over keys `klo..klo + nk` into `s` (nb × nk), recomputed from
    /// S = scale · Q_blk · K_rangeᵀ and the saved log-sum-exp.
    fn probs_block(
        &self,
        kv: &KvGroup<'_>,
        qh: &QueryHead<'_>,
        (i0, i1): (usize, usize),
        (klo, nk): (usize, usize),
        s: &mut [f32],
    ) -> Result<()> {
        let (t, d) = (self.dm.t, self.dm.d);
        mm(
            self.dm.bf16,
            (i1 - i0, nk, d),
            s,
            nk,
            false,
            (&qh.q[i0 * d..], d, 1),
            (&kv.k[klo * d..], 1, d),
            self.scale,
        )?;
        for (r, row) in s.chunks_mut(nk).enumerate() {
            let i = i0 + r;
            let l = qh.lse.map(|l| l[i]);
            probs(row, &kv.bias[i * t..(i + 1) * t], klo, kv.ranges[i], l);
        }
        Ok(())
    }
}
