//! The KV cache of incremental decoding: each layer's keys and values `(B, KV, S, Dh)` after RoPE,
//! S the tokens seen so far. A cached pass ([`super::Model::forward_cached`]) runs only the new
//! tokens, at positions `S..S+T`, and appends their keys and values.

use candle_core::{Result, Tensor};

/// One layer's cached keys and values, `(B, KV, S, Dh)` each.
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    kv: Option<(Tensor, Tensor)>,
}

impl LayerKv {
    /// Appends the new keys and values `(B, KV, T, Dh)` and returns all of them `(B, KV, S+T, Dh)`.
    pub fn append(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
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
}

impl KvCache {
    /// An empty cache for a model of `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![LayerKv::default(); num_layers],
            len: 0,
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
        self.layers.iter_mut().for_each(|l| l.kv = None);
        self.len = 0;
    }

    /// Records that a pass appended `t` positions to every layer.
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
}
