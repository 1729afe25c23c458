//! Attention in query chunks with a backward that recomputes them, for the backends whose
//! attention otherwise keeps whole `(B, H, T, T)` scores (CUDA's softmax kernel keeps two per
//! layer, Metal's composed graph four): once those would pass [`CHUNK_ABOVE`] elements, the
//! queries go through in chunks of rows whose score tile stays under [`TILE_ELEMS`], nothing of
//! a tile is kept, and backward recomputes each tile's probabilities from q and k (as flash
//! attention does; the CPU has its own fused kernel, `model::attention`). The graph keeps q, k, v
//! and the output, so memory grows linearly in T. Each product is the backend's own matmul
//! (cuBLAS on CUDA).

use candle_core::{DType, Result, Tensor, D};

use crate::model::grad::with_grad3;
use crate::model::kernels::composed;

/// Whole scores `B·H·T·T` up to this many elements are computed at once (the shapes measured so
/// far, e.g. Llama 3.1 8B at B4×512, stay on that path).
pub const CHUNK_ABOVE: usize = 1 << 26;

/// The most elements of one chunk's score tile `(B, H, C, T)`.
pub const TILE_ELEMS: usize = 1 << 25;

/// Query rows per chunk for `b` rows of `h` heads over `t` tokens, `None` when the whole scores
/// are small enough to compute at once: a multiple of 64 (or all of `t`) whose tile fits
/// [`TILE_ELEMS`], at least 64.
pub fn chunk_rows(b: usize, h: usize, t: usize) -> Option<usize> {
    if b * h * t * t <= CHUNK_ABOVE {
        return None;
    }
    let rows = (TILE_ELEMS / (b * h * t).max(1)) / 64 * 64;
    Some(rows.max(64).min(t))
}

/// How a tile's scores become probabilities, and back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Softmax {
    /// FineTune's CUDA softmax kernels (scale and bias folded in; probabilities in the dtype).
    #[cfg(feature = "cuda")]
    Cuda,
    /// The composed graph's: scaled and biased in the dtype, the softmax in f32.
    Composed,
}

impl Softmax {
    /// The probabilities of `s·scale + bias` in the scores' dtype, and (composed) the f32 ones
    /// the backward needs.
    fn probs(self, s: &Tensor, bias: &Tensor, scale: f64) -> Result<(Tensor, Option<Tensor>)> {
        match self {
            #[cfg(feature = "cuda")]
            Softmax::Cuda => Ok((
                crate::model::kernels::cuda::attention_softmax(s, bias, scale)?,
                None,
            )),
            Softmax::Composed => {
                let scores = (s * scale)?.broadcast_add(bias)?;
                let (scores, dtype) = composed::upcast(&scores)?;
                let p = crate::model::kernels::softmax_last_dim(&scores)?;
                Ok((p.to_dtype(dtype)?, Some(p)))
            }
        }
    }

    /// The scores' gradient from the probabilities `(p, p_f32)` and the gradient `dp` of `p`.
    fn grad(self, p: &Tensor, p_f32: Option<&Tensor>, dp: &Tensor, scale: f64) -> Result<Tensor> {
        match (self, p_f32) {
            #[cfg(feature = "cuda")]
            (Softmax::Cuda, _) => crate::model::kernels::cuda::attention_softmax_bwd(p, dp, scale),
            (_, Some(p32)) => {
                let dp = dp.to_dtype(p32.dtype())?;
                let dot = (p32 * &dp)?.sum_keepdim(D::Minus1)?;
                let ds = (p32 * dp.broadcast_sub(&dot)?)?;
                ds.to_dtype(p.dtype())? * scale
            }
            (_, None) => {
                let dot = (p * dp)?.sum_keepdim(D::Minus1)?;
                (p * dp.broadcast_sub(&dot)?)? * scale
            }
        }
    }
}

/// How [`attention`] goes through the queries.
#[derive(Debug, Clone, Copy)]
pub struct Chunking {
    /// Query rows per chunk.
    pub rows: usize,
    /// The bias masks every key after its query (a causal LM's), so a chunk skips those keys.
    pub causal: bool,
    /// The softmax kernels of the backend.
    pub softmax: Softmax,
}

/// `softmax(q·kᵀ·scale + bias)·v` in chunks of query rows. q, k, v `(B, H, T, Dh)` (k and v
/// already at H heads), `bias` `(1 or B, 1, T, T)`. The value is computed off the graph; q, k
/// and v get their gradients from [`backward`].
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
    how: Chunking,
) -> Result<Tensor> {
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let bias = bias.detach();
    let value = forward(&qd, &kd, &vd, &bias, scale, how)?;
    let bwd = move |q: &Tensor, k: &Tensor, v: &Tensor, dy: &Tensor| {
        backward((q, k, v), &bias, &dy.detach(), scale, how)
    };
    with_grad3(value, (q, k, v), Box::new(bwd))
}

/// One chunk of query rows and the keys it reads.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    first: usize,
    rows: usize,
    /// Keys `0..keys`: all of them, or (causal) those up to the chunk's last row.
    keys: usize,
}

impl Chunk {
    /// The chunk's keys (or values) of `x` `(B, H, T, Dh)`.
    fn keys(&self, x: &Tensor) -> Result<Tensor> {
        if self.keys == x.dim(2)? {
            return Ok(x.clone());
        }
        x.narrow(2, 0, self.keys)?.contiguous()
    }

    /// The chunk's rows and keys of the bias `(R, 1, T, T)`.
    fn bias(&self, bias: &Tensor) -> Result<Tensor> {
        bias.narrow(2, self.first, self.rows)?
            .narrow(3, 0, self.keys)?
            .contiguous()
    }
}

/// The chunks of `t` query rows, `rows` at a time; with `causal` each reads only the keys up to
/// its last row.
fn chunks(t: usize, rows: usize, causal: bool) -> impl Iterator<Item = Chunk> {
    let rows = rows.max(1);
    (0..t).step_by(rows).map(move |first| {
        let rows = rows.min(t - first);
        let keys = if causal { first + rows } else { t };
        Chunk { first, rows, keys }
    })
}

fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
    Chunking {
        rows,
        causal,
        softmax,
    }: Chunking,
) -> Result<Tensor> {
    let mut outs = Vec::new();
    for c in chunks(q.dim(2)?, rows, causal) {
        let (k, v) = (c.keys(k)?, c.keys(v)?);
        let s = q.narrow(2, c.first, c.rows)?.matmul(&k.t()?)?;
        let (p, _) = softmax.probs(&s, &c.bias(bias)?, scale)?;
        outs.push(p.matmul(&v)?);
    }
    Tensor::cat(&outs, 2)
}

/// dq, dk, dv of the chunked attention for the output gradient `dy`, each tile recomputed; dk
/// and dv add up over the chunks in f32.
fn backward(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    bias: &Tensor,
    dy: &Tensor,
    scale: f64,
    Chunking {
        rows,
        causal,
        softmax,
    }: Chunking,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (q, k, v) = (q.detach(), k.detach(), v.detach());
    let dtype = q.dtype();
    let acc = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let t = q.dim(2)?;
    let mut dq = Vec::new();
    let mut dk = k.zeros_like()?.to_dtype(acc)?;
    let mut dv = v.zeros_like()?.to_dtype(acc)?;
    // A chunk's keys are a prefix of all keys: its k and v gradients padded to T.
    let add = |sum: Tensor, part: Tensor, keys: usize| -> Result<Tensor> {
        sum + part.to_dtype(acc)?.pad_with_zeros(2, 0, t - keys)?
    };
    for c in chunks(t, rows, causal) {
        let (kc, vc) = (c.keys(&k)?, c.keys(&v)?);
        let qc = q.narrow(2, c.first, c.rows)?;
        let dyc = dy.narrow(2, c.first, c.rows)?;
        let s = qc.matmul(&kc.t()?)?;
        let (p, p32) = softmax.probs(&s, &c.bias(bias)?, scale)?;
        dv = add(dv, p.t()?.matmul(&dyc)?, c.keys)?;
        let dp = dyc.matmul(&vc.t()?)?;
        let ds = softmax.grad(&p, p32.as_ref(), &dp, scale)?;
        dq.push(ds.matmul(&kc)?);
        dk = add(dk, ds.t()?.matmul(&qc)?, c.keys)?;
    }
    Ok((
        Tensor::cat(&dq, 2)?,
        dk.to_dtype(dtype)?,
        dv.to_dtype(dtype)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Values and gradients of the chunked attention equal the composed graph's (f32 and f64,
    /// chunks that do not divide T, a causal bias per batch row).
    #[test]
    fn chunks_equal_the_whole_scores() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            let (b, h, t, d) = (2, 3, 11, 8);
            let var = |seed: f64| {
                let x = Tensor::randn(0f32, 1., (b, h, t, d), &dev)?.to_dtype(dtype)?;
                Var::from_tensor(&(x * seed)?)
            };
            let (q, k, v) = (var(1.0).unwrap(), var(0.7).unwrap(), var(1.3).unwrap());
            let mask: Vec<f32> = (0..b * t * t)
                .map(|i| {
                    let (row, r, c) = (i / (t * t), (i / t) % t, i % t);
                    if c > r || (row == 1 && c + 4 < r) {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect();
            let bias = Tensor::from_vec(mask, (b, 1, t, t), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let dy = Tensor::randn(0f32, 1., (b, h, t, d), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let grads = |y: Tensor| {
                let g = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
                [&q, &k, &v].map(|x| g.get(x.as_tensor()).unwrap().clone())
            };
            let want_y = composed::attention_with(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                &bias,
                0.35,
                &crate::model::kernels::softmax_last_dim,
            )
            .unwrap();
            let want = grads(want_y.clone());
            for (rows, causal) in [(1, false), (4, false), (11, false), (1, true), (4, true)] {
                let how = Chunking {
                    rows,
                    causal,
                    softmax: Softmax::Composed,
                };
                let y = attention(
                    q.as_tensor(),
                    k.as_tensor(),
                    v.as_tensor(),
                    &bias,
                    0.35,
                    how,
                )
                .unwrap();
                let max_diff = |a: &Tensor, b: &Tensor| {
                    let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
                    d.max(0)
                        .unwrap()
                        .to_dtype(DType::F64)
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap()
                };
                let tol = if dtype == DType::F64 { 1e-12 } else { 2e-6 };
                assert!(max_diff(&y, &want_y) < tol, "{dtype:?} {how:?}: value");
                for (name, (g, w)) in ["q", "k", "v"].iter().zip(grads(y).iter().zip(&want)) {
                    let d = max_diff(g, w);
                    assert!(d < tol, "{dtype:?} {how:?}: d{name} differs by {d}");
                }
            }
        }
    }

    #[test]
    fn chunk_rows_bound_the_tile() {
        assert_eq!(chunk_rows(4, 14, 512), None);
        assert_eq!(chunk_rows(4, 32, 512), None);
        let rows = chunk_rows(1, 14, 4096).unwrap();
        assert_eq!(rows % 64, 0);
        assert!(14 * rows * 4096 <= TILE_ELEMS && 14 * (rows + 64) * 4096 > TILE_ELEMS);
        assert_eq!(chunk_rows(8, 64, 32768), Some(64));
        // Many short rows past the threshold: all of them in one chunk, no panic.
        assert_eq!(chunk_rows(20_000, 1, 60), Some(60));
    }
}
