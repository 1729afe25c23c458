//! The LM head and the loss in chunks of rows: logits `(N, V)` never exist whole.
//!
//! The vocabulary makes the logits the largest tensor of a step (Qwen2.5's 151,936 entries: 1.2 GB
//! of bf16 logits and as much again for their gradient at 4096 tokens; the composed graph a GPU
//! without FineTune's kernels runs keeps four f32 copies). Training takes the loss a chunk of rows
//! at a time: each chunk's logits, its loss and the gradient of that loss to the chunk's hidden
//! states are computed together in the forward, with the same head and cross-entropy ops as the
//! whole loss (so every backend and kernel choice is the same), and the chunk's logits are freed
//! before the next. The graph keeps only the (N, D) input gradient, scaled by the upstream
//! gradient in backward. Same values as the whole loss: each row's loss and gradient are computed
//! by the same ops; only the order the row losses are summed in differs.

use candle_core::{DType, Result, Tensor, Var};

use super::grad::with_grad;

/// Logit elements one chunk holds (rows × vocabulary): 16M, 64 MB in f32, plus their gradient
/// while the chunk runs (the CPU's and other GPUs' chunk).
pub const CHUNK_ELEMENTS: usize = 16 << 20;

/// A chunk on CUDA: 64M bf16 logits (128 MB, and as much for their gradient). Each chunk costs a
/// dozen launches whatever its size: on an H100 at 4096 tokens of Qwen2.5's 151,936-entry
/// vocabulary, 16M-logit chunks (38 of them) made the step 8% slower than the whole loss, 64M
/// ones (10) 4% faster than 16M, at the same peak (the step's peak is in the backward then).
pub const CUDA_CHUNK_ELEMENTS: usize = 64 << 20;

/// Rows per chunk for a vocabulary of `vocab` entries on CUDA (`cuda`) or elsewhere:
/// [`CUDA_CHUNK_ELEMENTS`] or [`CHUNK_ELEMENTS`] logits, or `FINETUNE_LOSS_CHUNK` million (2²⁰)
/// of them where set (to measure other sizes).
pub fn chunk_rows(vocab: usize, cuda: bool) -> usize {
    (chunk_elements(cuda) / vocab.max(1)).max(1)
}

/// `FINETUNE_LOSS_CHUNK`: unset (or not a number) the default; `0` the whole loss; `M` M·2²⁰ logits.
fn setting() -> Option<usize> {
    static SET: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *SET.get_or_init(|| {
        let v = std::env::var("FINETUNE_LOSS_CHUNK").ok()?;
        v.trim().parse::<usize>().ok()
    })
}

fn chunk_elements(cuda: bool) -> usize {
    match setting() {
        Some(m) if m > 0 => m.saturating_mul(1 << 20),
        _ if cuda => CUDA_CHUNK_ELEMENTS,
        _ => CHUNK_ELEMENTS,
    }
}

/// `FINETUNE_LOSS_CHUNK=0` asks for the whole loss at once (to compare the two; the kernel plan's
/// `loss_chunks`).
pub fn switched_off() -> bool {
    setting() == Some(0)
}

/// The mean loss of the rows of `x` `(N, D)` against `targets` (N), computed `rows` at a time by
/// `chunk_loss`, which maps a chunk's rows and targets to their mean loss (the LM head and the
/// cross-entropy; differentiable in its input, with no other trainable tensor). Where `x` is on a
/// graph the gradient reaches it as if the loss had been computed whole (each chunk's gradient is
/// computed in the forward, as the whole loss's backward would); otherwise only the value is
/// computed.
pub fn chunked_mean_loss(
    x: &Tensor,
    targets: &[u32],
    rows: usize,
    chunk_loss: impl Fn(&Tensor, &[u32]) -> Result<Tensor>,
) -> Result<Tensor> {
    let n = targets.len();
    if x.dim(0)? != n || n == 0 || rows == 0 {
        candle_core::bail!(
            "chunked loss: {} rows of hidden states for {n} targets (chunks of {rows})",
            x.dim(0)?
        );
    }
    let train = x.track_op();
    let x_detached = x.detach();
    let mut total: Option<Tensor> = None;
    let mut grads = Vec::new();
    for start in (0..n).step_by(rows) {
        let len = rows.min(n - start);
        let part = x_detached.narrow(0, start, len)?;
        // Each chunk's mean, weighted by its share of the rows: together the mean over all rows.
        let share = len as f64 / n as f64;
        let loss = if train {
            let part = Var::from_tensor(&part)?;
            let loss = (chunk_loss(part.as_tensor(), &targets[start..start + len])? * share)?;
            let store = loss.backward()?;
            match store.get(part.as_tensor()) {
                Some(g) => grads.push(g.clone()),
                None => grads.push(part.as_tensor().zeros_like()?),
            }
            loss.detach()
        } else {
            (chunk_loss(&part, &targets[start..start + len])? * share)?
        };
        total = Some(match total {
            Some(t) => (t + loss)?,
            None => loss,
        });
    }
    let Some(total) = total else {
        candle_core::bail!("chunked loss: no rows");
    };
    if !train {
        return Ok(total);
    }
    let dx = if grads.len() == 1 {
        grads.remove(0)
    } else {
        Tensor::cat(&grads, 0)?
    };
    with_grad(
        total,
        x,
        Box::new(move |_x, g| {
            // The upstream gradient (a scalar, the loss's dtype) scales the input gradient in
            // f32, rounded once to the input's dtype.
            let g = g.to_dtype(DType::F32)?;
            dx.to_dtype(DType::F32)?
                .broadcast_mul(&g)?
                .to_dtype(dx.dtype())
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::cpu::tests::close;
    use candle_core::Device;

    /// Mean cross-entropy of `x · wᵀ` as plain differentiable ops (the reference).
    fn head_loss(x: &Tensor, w: &Tensor, targets: &[u32]) -> Result<Tensor> {
        let logits = x.matmul(&w.t()?)?;
        let t = Tensor::from_vec(targets.to_vec(), targets.len(), x.device())?;
        crate::model::kernels::composed::cross_entropy(&logits, &t)
    }

    /// The chunked loss equals the whole one in value and input gradient, for chunks that divide
    /// the rows, that do not, one row per chunk and a single chunk; with an upstream gradient
    /// other than one (the loss scaled as gradient accumulation scales it).
    #[test]
    fn chunks_give_the_whole_loss_and_gradient() {
        let dev = Device::Cpu;
        let (n, d, v) = (13, 8, 37);
        let w = Tensor::randn(0f32, 0.5, (v, d), &dev).unwrap();
        let h = Var::from_tensor(&Tensor::randn(0f32, 1., (n, d), &dev).unwrap()).unwrap();
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7 + 3) % v as u32).collect();
        let whole = (head_loss(h.as_tensor(), &w, &targets).unwrap() * 0.25).unwrap();
        let want = whole.to_scalar::<f32>().unwrap();
        let want_grad = whole
            .backward()
            .unwrap()
            .get(h.as_tensor())
            .unwrap()
            .clone();
        for rows in [1, 4, 5, 13, 20] {
            let loss = chunked_mean_loss(h.as_tensor(), &targets, rows, |x, t| head_loss(x, &w, t))
                .unwrap();
            let loss = (loss * 0.25).unwrap();
            let got = loss.to_scalar::<f32>().unwrap();
            assert!((got - want).abs() < 1e-6, "{rows} rows: {got} vs {want}");
            let grad = loss.backward().unwrap().get(h.as_tensor()).unwrap().clone();
            let diff = close(&grad, &want_grad);
            assert!(diff < 1e-7, "{rows} rows: gradient off by {diff}");
        }
    }

    /// Without a graph the value is the same and nothing is differentiated; mismatched targets
    /// are an error.
    #[test]
    fn without_a_graph_only_the_value() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.5, (11, 4), &dev).unwrap();
        let h = Tensor::randn(0f32, 1., (6, 4), &dev).unwrap();
        let targets = [0u32, 3, 10, 2, 2, 7];
        let want = head_loss(&h, &w, &targets)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let got = chunked_mean_loss(&h, &targets, 4, |x, t| head_loss(x, &w, t)).unwrap();
        assert!(!got.track_op());
        assert!((got.to_scalar::<f32>().unwrap() - want).abs() < 1e-6);
        let short = chunked_mean_loss(&h, &targets[..5], 4, |x, t| head_loss(x, &w, t));
        assert!(short.is_err());
    }
}
