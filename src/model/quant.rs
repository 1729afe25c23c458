//! QLoRA's frozen weights: a linear projection's weight kept quantized in memory (Candle's
//! `QTensor`: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, ...) while the LoRA tensors stay f32.
//!
//! Candle's `QMatMul` records no backward, so the projection is our own op:
//! - training and prefill (more than a few rows): `W` is dequantized for this product alone, the
//!   float matmul runs, and `W` is dropped at once. The op's node in the graph holds only the
//!   quantized tensor; the backward dequantizes it again and gives the input its gradient
//!   `grad · W`. So no float copy of any weight outlives one projection, forward or backward.
//! - decoding (a few rows, no graph): Candle's quantized matmul, which rounds the activations to
//!   the quant's dot type (Q8_0 / Q8_K) as llama.cpp does.
//!
//! The quantized forward is thus exactly the float forward of the dequantized weights in training,
//! and within the activation rounding while decoding (tests/qlora.rs measures both).

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Device, Layout, MetalStorage, Result,
    Shape, Storage, Tensor,
};

use super::kernels;

/// A linear projection's frozen weight (out, in): a float tensor, or kept quantized (QLoRA,
/// [`super::quant`]).
#[derive(Debug, Clone)]
pub enum Frozen {
    /// In the compute dtype (or the CPU's bf16 matrix dtype).
    Dense(Tensor),
    /// Quantized; dequantized per product and dropped at once.
    Quant(Arc<QWeight>),
}

impl Frozen {
    /// (out, in).
    pub fn dims2(&self) -> (usize, usize) {
        match self {
            Frozen::Dense(t) => {
                let d = t.dims();
                (d[0], d.get(1).copied().unwrap_or(1))
            }
            Frozen::Quant(q) => q.dims(),
        }
    }

    /// The device the weight lives on.
    pub fn device(&self) -> candle_core::Device {
        match self {
            Frozen::Dense(t) => t.device().clone(),
            Frozen::Quant(q) => q.device(),
        }
    }

    /// The float weight; a quantized one dequantized to f32 (a fresh tensor).
    pub fn dense(&self) -> Result<std::borrow::Cow<'_, Tensor>> {
        match self {
            Frozen::Dense(t) => Ok(std::borrow::Cow::Borrowed(t)),
            Frozen::Quant(q) => Ok(std::borrow::Cow::Owned(q.dequantize(DType::F32)?)),
        }
    }

    /// The float tensor when the weight is not quantized.
    pub fn as_dense(&self) -> Option<&Tensor> {
        match self {
            Frozen::Dense(t) => Some(t),
            Frozen::Quant(_) => None,
        }
    }

    /// Bytes held.
    pub fn size_in_bytes(&self) -> usize {
        match self {
            Frozen::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Frozen::Quant(q) => q.size_in_bytes(),
        }
    }

    /// `x · Wᵀ (+ update)` for 2-D `x` (N, in): gradients to `x` and `update` only.
    pub fn linear_plus(&self, x: &Tensor, update: Option<&Tensor>) -> Result<Tensor> {
        match self {
            Frozen::Dense(w) => kernels::frozen_linear_plus(x, w, update),
            Frozen::Quant(q) => q.forward_plus(x, update),
        }
    }
}

/// Rows up to which a product without a graph runs through the quantized matmul itself.
pub const QUANT_MATMUL_ROWS: usize = 8;

/// A frozen weight (out, in) kept quantized.
pub struct QWeight {
    q: Arc<QTensor>,
    out_features: usize,
    in_features: usize,
}

impl std::fmt::Debug for QWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QWeight({:?}, {}x{})",
            self.q.dtype(),
            self.out_features,
            self.in_features
        )
    }
}

impl QWeight {
    /// Wraps a quantized (out, in) tensor.
    pub fn new(q: QTensor) -> Result<Self> {
        let (out_features, in_features) = q.shape().dims2()?;
        Ok(Self {
            q: Arc::new(q),
            out_features,
            in_features,
        })
    }

    /// Quantizes the float weight `w` (out, in) to `ty` on `device`. `ty` must suit the row
    /// length ([`fits`]).
    pub fn quantize(w: &Tensor, ty: GgmlDType, device: &Device) -> Result<Self> {
        let w = w.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        // The K-quants by FineTune's quantizer, which writes llama.cpp's bytes (Candle's own gives
        // Q5_K 1.8x llama.cpp's error, BENCHMARKS.md); the others by Candle's.
        let q = crate::export::kquant::quantize(&w, ty)?;
        if device.is_cpu() {
            return Self::new(q);
        }
        let storage = QStorage::from_data(q.data()?, device, ty)?;
        Self::new(QTensor::new(storage, q.shape().clone())?)
    }

    /// (out, in).
    pub fn dims(&self) -> (usize, usize) {
        (self.out_features, self.in_features)
    }

    /// The quantized tensor itself.
    pub fn qtensor(&self) -> &Arc<QTensor> {
        &self.q
    }

    /// The quantization type.
    pub fn ggml_dtype(&self) -> GgmlDType {
        self.q.dtype()
    }

    /// Bytes held.
    pub fn size_in_bytes(&self) -> usize {
        self.q.storage_size_in_bytes()
    }

    /// The device the weight lives on.
    pub fn device(&self) -> Device {
        self.q.device()
    }

    /// The weight as a float tensor (out, in) of `dtype`, on its device.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        kernels::dequantize(&self.q, dtype)
    }

    /// `x · Wᵀ` for `x` (N, in), in `x`'s dtype; the gradient flows to `x`, never to `W`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_plus(x, None)
    }

    /// `x · Wᵀ + update` for `x` (N, in) and an optional (N, out) `update` (the LoRA term), as
    /// one node: the graph keeps one (N, out) output per projection, as the float path's
    /// `frozen_linear_plus` does. Gradients flow to `x` and `update`.
    pub fn forward_plus(&self, x: &Tensor, update: Option<&Tensor>) -> Result<Tensor> {
        let tracked = x.track_op() || update.is_some_and(Tensor::track_op);
        if !tracked && x.dim(0)? <= QUANT_MATMUL_ROWS {
            let y = x
                .to_dtype(DType::F32)?
                .apply_op1_no_bwd(self.q.as_ref())?
                .to_dtype(x.dtype())?;
            return match update {
                Some(u) => y + u,
                None => Ok(y),
            };
        }
        let y = {
            let w = self.dequantize(x.dtype())?;
            let u = update.map(Tensor::detach);
            kernels::frozen_linear_plus(&x.detach(), &w, u.as_ref())?
        };
        if !tracked {
            return Ok(y);
        }
        let op = QLinear {
            q: self.q.clone(),
            y: Mutex::new(Some(y)),
        };
        match update {
            Some(u) => x.apply_op2(u, op),
            None => x.apply_op1(op),
        }
    }
}

/// Whether rows of `in_features` values can be quantized to `ty` (whole blocks).
pub fn fits(ty: GgmlDType, in_features: usize) -> bool {
    in_features.is_multiple_of(ty.block_size())
}

/// The type a weight with rows of `in_features` values gets when `wanted` does not fit them: the
/// fallback llama.cpp's quantizer uses for such rows (K-quants need rows of 256).
pub fn fallback(wanted: GgmlDType, in_features: usize) -> GgmlDType {
    if fits(wanted, in_features) {
        return wanted;
    }
    let next = match wanted {
        GgmlDType::Q2K | GgmlDType::Q3K | GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        _ => GgmlDType::F16,
    };
    if fits(next, in_features) {
        next
    } else {
        GgmlDType::F16
    }
}

/// The projection's node in the graph: its forward hands over the output computed before (from
/// the weight dequantized for that product alone), its backward is `grad · dequant(W)`.
struct QLinear {
    q: Arc<QTensor>,
    y: Mutex<Option<Tensor>>,
}

impl QLinear {
    fn take(&self) -> Result<Tensor> {
        let mut slot = match self.y.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        let y = slot
            .take()
            .ok_or_else(|| candle_core::Error::Msg("the QLoRA projection ran twice".into()))?;
        let fresh = y.is_contiguous() && y.layout().start_offset() == 0;
        if fresh {
            Ok(y)
        } else {
            y.copy()
        }
    }
}

impl QLinear {
    fn cpu_out(&self) -> Result<(CpuStorage, Shape)> {
        let y = self.take()?;
        let n = y.elem_count();
        let (s, _) = y.storage_and_layout();
        let out = match &*s {
            Storage::Cpu(CpuStorage::F32(v)) => CpuStorage::F32(v[..n].to_vec()),
            Storage::Cpu(CpuStorage::BF16(v)) => CpuStorage::BF16(v[..n].to_vec()),
            Storage::Cpu(CpuStorage::F16(v)) => CpuStorage::F16(v[..n].to_vec()),
            _ => candle_core::bail!("qlora-linear: unexpected output storage on the CPU"),
        };
        Ok((out, y.shape().clone()))
    }

    fn cuda_out(&self) -> Result<(CudaStorage, Shape)> {
        let y = self.take()?;
        let (s, l) = y.storage_and_layout();
        match &*s {
            Storage::Cuda(c) => Ok((c.try_clone(l)?, y.shape().clone())),
            _ => candle_core::bail!("qlora-linear: unexpected output storage on CUDA"),
        }
    }

    fn metal_out(&self) -> Result<(MetalStorage, Shape)> {
        let y = self.take()?;
        let (s, l) = y.storage_and_layout();
        match &*s {
            Storage::Metal(m) => Ok((m.try_clone(l)?, y.shape().clone())),
            _ => candle_core::bail!("qlora-linear: unexpected output storage on Metal"),
        }
    }

    /// `grad · dequant(W)`: the input's gradient.
    fn input_grad(&self, grad: &Tensor) -> Result<Tensor> {
        let w = kernels::dequantize(&self.q, grad.dtype())?;
        grad.matmul(&w)
    }
}

impl CustomOp1 for QLinear {
    fn name(&self) -> &'static str {
        "qlora-linear"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu_out()
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.cuda_out()
    }

    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        self.metal_out()
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.input_grad(grad)?))
    }
}

impl CustomOp2 for QLinear {
    fn name(&self) -> &'static str {
        "qlora-linear-plus"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_out()
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.cuda_out()
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.metal_out()
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _update: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(self.input_grad(grad)?), Some(grad.clone())))
    }
}
