//! One decoding step (one new token, batch 1) of a llama-family model on the CPU, as one fused
//! pass over plain slices instead of ~30 Candle ops a layer.
//!
//! Decoding reads every weight once per token, so its speed is the memory bandwidth minus the
//! overhead around the products. Through Candle ops a step of SmolLM2-135M (30 layers) ran about
//! 900 ops, each allocating its output and many waking the thread pool; here a layer is: RMSNorm,
//! q/k/v as one parallel pass over the three matrices (bias and LoRA term added per row), q/k
//! norms and RoPE, attention over the cache, o, RMSNorm, gate/up as one parallel pass, the gated
//! activation, down. Weights are read where they lie (f32 or bf16) by the same dot-product kernel
//! as [`crate::model::kernels::cpu::gemv`]; activations are f32, as in the CPU's bf16 mode.
//!
//! The keys and values live in [`FastKv`] (position-major, appended in place, grown by doubling)
//! rather than in Candle tensors concatenated each step; [`super::super::cache::LayerKv`] moves
//! them between the two forms when a multi-token pass (a prefill) and single steps alternate.
//!
//! Numbers: the same products in the same order as the Candle path's gemv (so, identical), and
//! RMSNorm, RoPE, softmax and the activation in f32 (`tests/generate.rs` holds every decode step
//! to a full forward within 1e-4 and greedy ids to transformers').

use std::ops::Deref;

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::{Layer, Llama};
use crate::model::cache::KvCache;
use crate::model::config::Activation;
use crate::model::config::Variant;
use crate::model::kernels::cpu::gemv::{Simd, Weight};
use crate::model::lora::LoraLinear;

/// Fewest weights one parallel task reads (waking a thread costs microseconds).
const WEIGHTS_PER_TASK: usize = 1 << 15;

/// A layer's keys and values, position-major: `k[s·KV·Dh + g·Dh + d]`.
#[derive(Debug, Clone, Default)]
pub struct FastKv {
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
}

/// A weight or vector as it lies in memory.
#[derive(Clone, Copy)]
enum Mat<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

impl Mat<'_> {
    fn at(&self, i: usize) -> f32 {
        match self {
            Mat::F32(s) => s[i],
            Mat::Bf16(s) => s[i].f32(),
        }
    }

    fn len(&self) -> usize {
        match self {
            Mat::F32(s) => s.len(),
            Mat::Bf16(s) => s.len(),
        }
    }

    /// `out[r] = x · W[j0 + r]`, W having rows of `i`.
    fn dot_rows(&self, x: &[f32], i: usize, j0: usize, out: &mut [f32]) {
        match self {
            Mat::F32(w) => <f32 as Simd>::dot_rows(x, w, i, j0, out),
            Mat::Bf16(w) => <bf16 as Simd>::dot_rows(x, w, i, j0, out),
        }
    }
}

/// A tensor's storage held for reading (Candle's read guard).
struct Held<'a>(Box<dyn Deref<Target = Storage> + 'a>, &'a Layout);

fn hold(t: &Tensor) -> Held<'_> {
    let (g, l) = t.storage_and_layout();
    Held(Box::new(g), l)
}

impl Held<'_> {
    fn mat(&self) -> Result<Mat<'_>> {
        let Some((a, b)) = self.1.contiguous_offsets() else {
            candle_core::bail!("decode step: a weight is not contiguous");
        };
        match &**self.0 {
            Storage::Cpu(CpuStorage::F32(d)) => Ok(Mat::F32(&d[a..b])),
            Storage::Cpu(CpuStorage::BF16(d)) => Ok(Mat::Bf16(&d[a..b])),
            _ => candle_core::bail!("decode step: weights must be f32 or bf16 on the CPU"),
        }
    }
}

/// The storages one projection reads: weight, bias, LoRA A and B.
struct ProjHeld<'a> {
    /// `None` for a quantized weight, which [`super::Llama::decode_cpu`] is never asked to run.
    w: Option<Held<'a>>,
    bias: Option<Held<'a>>,
    lora: Option<(Held<'a>, Held<'a>, f32)>,
    i: usize,
    o: usize,
}

fn hold_proj(l: &LoraLinear) -> ProjHeld<'_> {
    ProjHeld {
        w: l.weight.as_dense().map(hold),
        bias: l.bias.as_ref().map(hold),
        lora: l
            .active()
            .map(|a| (hold(a.a.as_tensor()), hold(a.b.as_tensor()), a.scale as f32)),
        i: l.in_features(),
        o: l.out_features(),
    }
}

/// A projection ready to run on one input: its weight, bias, and the LoRA term's `B` with
/// `s · A x` already computed.
struct Proj<'a> {
    w: Mat<'a>,
    bias: Option<Mat<'a>>,
    /// B (out, r) in f32 and `s · A x` (r).
    lora: Option<(&'a [f32], Vec<f32>)>,
    i: usize,
}

impl<'a> ProjHeld<'a> {
    fn ready(&'a self, x: &[f32]) -> Result<Proj<'a>> {
        let lora = match &self.lora {
            Some((a, b, s)) => {
                let (a, b) = (a.mat()?, b.mat()?);
                let Mat::F32(b) = b else {
                    candle_core::bail!("decode step: LoRA B must be f32");
                };
                let r = a.len() / self.i;
                let mut t = vec![0f32; r];
                a.dot_rows(x, self.i, 0, &mut t);
                t.iter_mut().for_each(|v| *v *= s);
                Some((b, t))
            }
            None => None,
        };
        if self
            .w
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("decode step: a quantized weight".into()))?
            .mat()?
            .len()
            != self.o * self.i
        {
            candle_core::bail!("decode step: a weight is not {}×{}", self.o, self.i);
        }
        Ok(Proj {
            w: self
                .w
                .as_ref()
                .ok_or_else(|| candle_core::Error::Msg("decode step: a quantized weight".into()))?
                .mat()?,
            bias: self.bias.as_ref().map(Held::mat).transpose()?,
            lora,
            i: self.i,
        })
    }
}

/// `outs[p] = W_p x (+ bias_p) (+ B_p (s A_p x))` for every projection, as one parallel pass
/// over all their rows.
fn project(x: &[f32], projs: &[Proj<'_>], outs: &mut [&mut [f32]]) {
    let weights: usize = projs.iter().map(|p| p.w.len()).sum();
    let tasks = (rayon::current_num_threads() * 4)
        .min(weights / WEIGHTS_PER_TASK)
        .max(1);
    let mut work: Vec<(&Proj<'_>, usize, &mut [f32])> = Vec::new();
    for (p, out) in projs.iter().zip(outs.iter_mut()) {
        let share = (p.w.len() * tasks).div_ceil(weights.max(1)).max(1);
        let rows = out.len().div_ceil(share).max(8);
        for (c, chunk) in out.chunks_mut(rows).enumerate() {
            work.push((p, c * rows, chunk));
        }
    }
    let run = |(p, j0, chunk): (&Proj<'_>, usize, &mut [f32])| {
        p.w.dot_rows(x, p.i, j0, chunk);
        for (r, o) in chunk.iter_mut().enumerate() {
            let j = j0 + r;
            if let Some(b) = &p.bias {
                *o += b.at(j);
            }
            if let Some((bm, t)) = &p.lora {
                let rank = t.len();
                let row = &bm[j * rank..(j + 1) * rank];
                *o += row.iter().zip(t).map(|(b, t)| b * t).sum::<f32>();
            }
        }
    };
    if work.len() == 1 {
        work.into_iter().for_each(run);
    } else {
        work.into_par_iter().for_each(run);
    }
}

/// RMSNorm of `x` with weight `w`: `x / √(mean(x²) + eps) · w`.
fn rms_norm(x: &[f32], w: Mat<'_>, eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for (i, (o, v)) in out.iter_mut().zip(x).enumerate() {
        *o = v * inv * w.at(i);
    }
}

/// RoPE (rotate-half form) of each `dh`-wide head of `x` at one position.
fn rope(x: &mut [f32], dh: usize, cos: &[f32], sin: &[f32]) {
    let half = dh / 2;
    for head in x.chunks_mut(dh) {
        for d in 0..half {
            let (a, b) = (head[d], head[d + half]);
            head[d] = a * cos[d] - b * sin[d];
            head[d + half] = b * cos[d + half] + a * sin[d + half];
        }
    }
}

fn activate(x: f32, act: Activation) -> f32 {
    match act {
        Activation::Silu => x / (1.0 + (-x).exp()),
        Activation::GeluTanh => {
            let c = (2.0f32 / std::f32::consts::PI).sqrt();
            0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
        }
        // Not taken: `Llama::can_decode_cpu` leaves erf-gelu models to the Candle path.
        Activation::Gelu => x,
        Activation::Relu => x.max(0.0),
    }
}

/// Attention of one query position over the cache: `q` (H·Dh) against `kv` positions.
fn attend(q: &[f32], kv: &FastKv, h: usize, kvh: usize, dh: usize, out: &mut [f32]) {
    let s_len = kv.k.len() / (kvh * dh);
    let scale = 1.0 / (dh as f32).sqrt();
    let group = h / kvh;
    let one = |(head, o): (usize, &mut [f32])| {
        let g = head / group;
        let qh = &q[head * dh..(head + 1) * dh];
        let mut scores: Vec<f32> = (0..s_len)
            .map(|s| {
                let k = &kv.k[(s * kvh + g) * dh..(s * kvh + g + 1) * dh];
                qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale
            })
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for v in scores.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        o.iter_mut().for_each(|v| *v = 0.0);
        for (s, p) in scores.iter().enumerate() {
            let w = p / sum;
            let v = &kv.v[(s * kvh + g) * dh..(s * kvh + g + 1) * dh];
            for (ov, vv) in o.iter_mut().zip(v) {
                *ov += w * vv;
            }
        }
    };
    if s_len * h * dh >= WEIGHTS_PER_TASK {
        out.par_chunks_mut(dh).enumerate().for_each(one);
    } else {
        out.chunks_mut(dh).enumerate().for_each(one);
    }
}

impl Layer {
    /// One token through the layer: `x` (D) in place, its key and value appended to `kv`.
    fn decode_cpu(
        &self,
        x: &mut [f32],
        kv: &mut FastKv,
        cfg: &crate::model::config::ModelConfig,
        cos: &[f32],
        sin: &[f32],
    ) -> Result<()> {
        let (h, kvh, dh) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let eps = cfg.norm_eps as f32;
        let d = x.len();
        let (Some([q_proj, k_proj, v_proj]), Some([gate_proj, up_proj])) =
            (self.split_qkv(), self.split_gate_up())
        else {
            candle_core::bail!(
                "the fused CPU decoder takes separate q/k/v and gate/up projections"
            );
        };
        let mut n = vec![0f32; d];
        rms_norm(x, hold(&self.input_norm).mat()?, eps, &mut n);
        let (mut q, mut k, mut v) = (
            vec![0f32; h * dh],
            vec![0f32; kvh * dh],
            vec![0f32; kvh * dh],
        );
        {
            let held = [q_proj, k_proj, v_proj].map(hold_proj);
            let projs = [held[0].ready(&n)?, held[1].ready(&n)?, held[2].ready(&n)?];
            project(&n, &projs, &mut [&mut q, &mut k, &mut v]);
        }
        for (t, norm) in [(&mut q, &self.q_norm), (&mut k, &self.k_norm)] {
            if let Some(w) = norm {
                let held = hold(w);
                let w = held.mat()?;
                for head in t.chunks_mut(dh) {
                    let src = head.to_vec();
                    rms_norm(&src, w, eps, head);
                }
            }
        }
        rope(&mut q, dh, cos, sin);
        rope(&mut k, dh, cos, sin);
        kv.k.extend_from_slice(&k);
        kv.v.extend_from_slice(&v);
        let mut att = vec![0f32; h * dh];
        attend(&q, kv, h, kvh, dh, &mut att);
        let mut o = vec![0f32; d];
        {
            let held = hold_proj(&self.o_proj);
            project(&att, &[held.ready(&att)?], &mut [&mut o]);
        }
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        rms_norm(x, hold(&self.post_norm).mat()?, eps, &mut n);
        let inter = gate_proj.out_features();
        let (mut gate, mut up) = (vec![0f32; inter], vec![0f32; inter]);
        {
            let held = [gate_proj, up_proj].map(hold_proj);
            let projs = [held[0].ready(&n)?, held[1].ready(&n)?];
            project(&n, &projs, &mut [&mut gate, &mut up]);
        }
        let act = cfg.activation;
        gate.iter_mut()
            .zip(&up)
            .for_each(|(g, u)| *g = activate(*g, act) * u);
        {
            let held = hold_proj(&self.down_proj);
            project(&gate, &[held.ready(&gate)?], &mut [&mut o]);
        }
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        Ok(())
    }
}

impl Llama {
    /// Whether [`Llama::decode_cpu`] can run this model's next step after `past` cached
    /// positions: its activation has a form here and it is plain Llama (no [`Variant`] feature;
    /// a sliding window only while every key is still inside it).
    pub(crate) fn can_decode_cpu(&self, past: usize) -> bool {
        let v = &self.cfg.variant;
        let within_window = v.sliding_window.is_none_or(|w| past < w);
        let plain = Variant {
            sliding_window: v.sliding_window,
            sliding_layers: v.sliding_layers.clone(),
            ..Variant::default()
        };
        self.cfg.activation != Activation::Gelu && within_window && *v == plain
    }

    /// The logits (V) of one new token `id` after the cached positions, appending its keys and
    /// values: the fused CPU step. The caller checks the device, dtype and context.
    pub(crate) fn decode_cpu(&self, id: u32, cache: &mut KvCache) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        let (d, dh) = (cfg.hidden_size, cfg.head_dim);
        let pos = cache.len();
        let mut x: Vec<f32> = {
            let held = hold(&self.embed);
            let e = held.mat()?;
            let row = id as usize * d;
            if row + d > e.len() {
                candle_core::bail!("token id {id} is outside the vocabulary");
            }
            (row..row + d).map(|i| e.at(i)).collect()
        };
        let (cos, sin) = self.rope().row(pos);
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let fast = kv.fast(cfg.num_kv_heads, dh)?;
            layer.decode_cpu(&mut x, fast, cfg, &cos, &sin)?;
        }
        cache.advance(1);
        let mut n = vec![0f32; d];
        rms_norm(&x, hold(&self.norm).mat()?, cfg.norm_eps as f32, &mut n);
        let held = hold(&self.lm_head);
        let w = held.mat()?;
        let vocab = w.len() / d;
        let mut logits = vec![0f32; vocab];
        let head = Proj {
            w,
            bias: None,
            lora: None,
            i: d,
        };
        project(&n, &[head], &mut [&mut logits]);
        Ok(logits)
    }
}
