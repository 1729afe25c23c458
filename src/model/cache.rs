//! The KV cache of incremental decoding: each layer's keys and values `(B, KV, S, Dh)` after RoPE,
//! S the tokens seen so far. A cached pass ([`super::Model::forward_cached`]) runs only the new
//! tokens, at positions `S..S+T`, and appends their keys and values.

use candle_core::{Result, Tensor};

use super::llama::FastKv;

/// One layer's cached keys and values, `(B, KV, S, Dh)` each: as tensors for multi-token passes,
/// or position-major f32 for the CPU's fused decoding step ([`FastKv`]); one form at a time, moved
/// to the other when the kind of pass changes (once per prompt, not per token).
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    kv: Option<(Tensor, Tensor)>,
    fast: Option<FastKv>,
}

impl LayerKv {
    /// The fused step's form (`kv_heads`, `head_dim` per position), moved from the tensors if
    /// they hold the cache.
    pub(crate) fn fast(&mut self, kv_heads: usize, head_dim: usize) -> Result<&mut FastKv> {
        if let Some((k, v)) = self.kv.take() {
            // (1, KV, S, Dh) → (S, KV, Dh), f32.
            let flat = |t: &Tensor| -> Result<Vec<f32>> {
                t.to_dtype(candle_core::DType::F32)?
                    .squeeze(0)?
                    .transpose(0, 1)?
                    .contiguous()?
                    .flatten_all()?
                    .to_vec1()
            };
            if k.dim(1)? != kv_heads || k.dim(3)? != head_dim {
                candle_core::bail!("the KV cache has another shape than the model's heads");
            }
            self.fast = Some(FastKv {
                k: flat(&k)?,
                v: flat(&v)?,
            });
        }
        Ok(self.fast.get_or_insert_with(FastKv::default))
    }

    /// Appends the new keys and values `(B, KV, T, Dh)` and returns all of them `(B, KV, S+T, Dh)`.
    pub fn append(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        if let Some(fast) = self.fast.take() {
            let (_, kvh, _, dh) = k.dims4()?;
            let s = fast.k.len() / (kvh * dh);
            let back = |data: Vec<f32>| -> Result<Tensor> {
                Tensor::from_vec(data, (s, kvh, dh), k.device())?
                    .transpose(0, 1)?
                    .unsqueeze(0)?
                    .to_dtype(k.dtype())?
                    .contiguous()
            };
            self.kv = Some((back(fast.k)?, back(fast.v)?));
        }
        let (k, v) = match self.kv.take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        self.kv = Some((k.clone(), v.clone()));
        Ok((k, v))
    }
}

/// Every layer's cached keys and values, and how many positions they hold.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub(crate) layers: Vec<LayerKv>,
    len: usize,
    /// The tokens cached, in order (a LongRoPE model recomputes them when a pass crosses its
    /// original context, as transformers' Phi-3 does).
    tokens: Vec<u32>,
}

impl KvCache {
    /// An empty cache for a model of `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![LayerKv::default(); num_layers],
            len: 0,
            tokens: Vec::new(),
        }
    }

    /// Positions cached so far: the position of the next token.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets everything (a new conversation).
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| {
            l.kv = None;
            l.fast = None;
        });
        self.len = 0;
        self.tokens.clear();
    }

    /// The tokens cached so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Records the tokens of a pass (before [`KvCache::advance`]).
    pub(crate) fn record(&mut self, ids: &[u32]) {
        self.tokens.extend_from_slice(ids);
    }

    /// Records that a pass appended `t` positions to every layer.
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
}
