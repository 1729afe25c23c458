//! The MLP's gated activation and its down projection as one op: `silu(gate) ⊙ up` is computed
//! in the forward for the product and freed, and computed again in the backward, so the graph
//! keeps gate and up (which the activation's backward needs anyway) and not their product. That
//! product, (N, I) per layer, was a third of the MLP's activations and a seventh of a
//! Qwen2.5-0.5B step's graph on CUDA (`memory::estimate`). The recomputation is one element-wise
//! kernel per layer in the backward.

use std::sync::Arc;

use candle_core::quantized::QTensor;

use super::layer::{SwiGlu, SwiGluBwd};
use super::linear::{lora_forward, lora_grads, Weight};
use super::lora_split::Kept;
use super::*;
use crate::model::kernels::cpu::Saved;

/// `silu(gate) ⊙ up` through a frozen `weight` (out, I) with the LoRA term `(A, B, scale)` where
/// given: `h·Wᵀ + s·(h·Aᵀ)·Bᵀ` for `h = silu(gate) ⊙ up`, the LoRA product in f32 as in
/// [`super::lora_linear`]. `gate` and `up` are 2-D (N, I) of the weight's dtype; A (r, I) and B
/// (out, r) f32. Gradients go to gate, up, A and B; no dropout.
pub fn swiglu_linear(
    gate: &Tensor,
    up: &Tensor,
    weight: &Tensor,
    lora: Option<(&Tensor, &Tensor, f64)>,
) -> Result<Tensor> {
    gated(gate, up, Weight::Dense(weight.contiguous()?), lora)
}

/// [`swiglu_linear`] with the frozen weight kept quantized (QLoRA), dequantized per product.
pub fn swiglu_qlinear(
    gate: &Tensor,
    up: &Tensor,
    weight: &Arc<QTensor>,
    lora: Option<(&Tensor, &Tensor, f64)>,
) -> Result<Tensor> {
    gated(gate, up, Weight::Quant(weight.clone()), lora)
}

fn gated(
    gate: &Tensor,
    up: &Tensor,
    w: Weight,
    lora: Option<(&Tensor, &Tensor, f64)>,
) -> Result<Tensor> {
    let (n, i) = gate.dims2()?;
    if up.dims() != [n, i] || up.dtype() != gate.dtype() {
        candle_core::bail!(
            "swiglu-linear: gate {:?} {:?} and up {:?} {:?} differ",
            gate.dims(),
            gate.dtype(),
            up.dims(),
            up.dtype()
        );
    }
    // A and B travel as one flat f32 tensor, the op's third input (Candle's custom ops take at
    // most three); its gradient splits back into theirs through the concatenation.
    let (factors, lora) = match lora {
        Some((a, b, scale)) => {
            let (r, ai) = a.dims2()?;
            let (o, br) = b.dims2()?;
            if ai != i || br != r {
                candle_core::bail!(
                    "swiglu-linear: A {:?} and B {:?} do not fit an input of {i}",
                    a.dims(),
                    b.dims()
                );
            }
            let ab = Tensor::cat(&[a.flatten_all()?, b.flatten_all()?], 0)?;
            (ab, Some((r, o, scale as f32)))
        }
        None => (Tensor::zeros(1, DType::F32, gate.device())?, None),
    };
    let op = SwiGluLinear {
        w,
        lora,
        kept: Saved::new(),
    };
    gate.contiguous()?
        .apply_op3(&up.contiguous()?, &factors, op)
}

struct SwiGluLinear {
    w: Weight,
    /// The LoRA term's rank, output width and scale; `None`: the frozen product alone.
    lora: Option<(usize, usize, f32)>,
    /// The forward's LoRA splits for the backward (bf16, `lora_split`), taken by it.
    kept: Saved<Kept>,
}

impl SwiGluLinear {
    /// A's and B's layouts inside the flat factors `(r·I + out·r)`.
    fn factor_layouts(&self, i: usize, lf: &Layout) -> Result<Option<(Layout, Layout, f32)>> {
        let Some((r, o, scale)) = self.lora else {
            return Ok(None);
        };
        if !lf.is_contiguous() || lf.shape().elem_count() != r * i + o * r {
            candle_core::bail!(
                "{}: the factors {:?} are not A ({r}, {i}) and B ({o}, {r})",
                self.name(),
                lf.dims()
            );
        }
        let start = lf.start_offset();
        Ok(Some((
            Layout::contiguous_with_offset((r, i), start),
            Layout::contiguous_with_offset((o, r), start + r * i),
            scale,
        )))
    }
}

impl CustomOp3 for SwiGluLinear {
    fn name(&self) -> &'static str {
        "ft-cuda-swiglu-linear"
    }

    cuda_only!(3);

    fn cuda_fwd(
        &self,
        gate: &CudaStorage,
        lg: &Layout,
        up: &CudaStorage,
        lu: &Layout,
        f: &CudaStorage,
        lf: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let (n, i) = lg.shape().dims2()?;
        let (h, lh) = SwiGlu.cuda_fwd(gate, lg, up, lu)?;
        let lh = Layout::contiguous(lh);
        match self.factor_layouts(i, lf)? {
            Some((la, lb, scale)) => {
                let ab = ((f, &la), (f, &lb));
                lora_forward(op, &self.w, scale, (&h, &lh), ab, &self.kept)
            }
            None => {
                let w_t = self.w.in_dtype(gate.dtype())?;
                let (w_ref, lw) = w_t.storage_and_layout();
                let candle_core::Storage::Cuda(w) = &*w_ref else {
                    candle_core::bail!("{op}: the weight is not on the GPU");
                };
                let o = lw.dims()[0];
                if lw.dims() != [o, i] || w.dtype() != gate.dtype() {
                    candle_core::bail!(
                        "{op}: W {:?} {:?} does not take {:?} {:?}",
                        lw.dims(),
                        w.dtype(),
                        lg.dims(),
                        gate.dtype()
                    );
                }
                let y = h.matmul(w, (1, n, o, i), &lh, &lw.transpose(0, 1)?)?;
                Ok((y, Shape::from_dims(&[n, o])))
            }
        }
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        f: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Detached, as in the LoRA op: the results must not carry the step's graph.
        let (gate, up, g) = (gate.detach(), up.detach(), g.detach().contiguous()?);
        let i = gate.dim(1)?;
        let w = self.w.in_dtype(g.dtype())?;
        let (dh, df) = {
            // h again, alive only for the projection's gradients.
            let h = gate.apply_op2_no_bwd(&up, &SwiGlu)?;
            match self.lora {
                Some((r, o, scale)) => {
                    let f = f.detach();
                    let a = f.narrow(0, 0, r * i)?.reshape((r, i))?;
                    let b = f.narrow(0, r * i, o * r)?.reshape((o, r))?;
                    let kept = self.kept.take();
                    let (dh, da, db) = lora_grads(&h, &g, &w, (&a, &b), scale, None, kept)?;
                    let df = Tensor::cat(&[da.flatten_all()?, db.flatten_all()?], 0)?;
                    (dh, Some(df))
                }
                None => (g.matmul(&w)?, None),
            }
        };
        let both = gate.apply_op3_no_bwd(&up, &dh, &SwiGluBwd)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?), df))
    }
}
