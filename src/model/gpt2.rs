//! GPT-2 (transformers `modeling_gpt2.py`): learned positions, pre-LayerNorm blocks, fused
//! `c_attn` q/k/v projection, gelu_new MLP, tied head. Checkpoints store Conv1D weights (in, out);
//! they are transposed to (out, in) on load so every projection is an ordinary [`LoraLinear`]
//! (PEFT's `fan_in_fan_out=True` describes the same thing from the adapter's side). Keys with or
//! without the `transformer.` prefix are accepted (older Hub uploads omit it); module paths are
//! always transformers' (`transformer.h.N.attn.c_attn`), which is what PEFT names adapters by.

use candle_core::{Result, Tensor};

use super::cache::{KvCache, LayerKv};
use super::config::ModelConfig;
use super::kernels;
use super::lora::LoraLinear;
use super::ops;
use super::weights::Weights;
use super::{ModelError, ModelInput};

#[derive(Debug, Clone)]
struct Block {
    ln_1: (Tensor, Tensor),
    c_attn: LoraLinear,
    attn_c_proj: LoraLinear,
    ln_2: (Tensor, Tensor),
    c_fc: LoraLinear,
    mlp_c_proj: LoraLinear,
}

/// A GPT-2 causal LM.
#[derive(Debug, Clone)]
pub struct Gpt2 {
    cfg: ModelConfig,
    /// (V, D)
    wte: Tensor,
    /// (P, D), P = max positions
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: (Tensor, Tensor),
    lm_head: Tensor,
}

/// Loads a Conv1D stored (in, out) as a linear (out, in).
fn conv1d(
    w: &Weights,
    prefix: &str,
    path: &str,
    layer: usize,
    in_f: usize,
    out_f: usize,
) -> std::result::Result<LoraLinear, ModelError> {
    let key = format!("{prefix}{}", path.trim_start_matches("transformer."));
    Ok(LoraLinear {
        path: path.to_owned(),
        layer,
        weight: w.get_linear(&format!("{key}.weight"), out_f, in_f, true)?,
        bias: Some(w.get(&format!("{key}.bias"), &[out_f])?),
        lora: None,
    })
}

/// How one pass runs the blocks.
struct Pass<'a> {
    cfg: &'a ModelConfig,
    /// Additive attention bias, `(B or 1, 1, T, S)`.
    bias: Tensor,
    /// Dropout on the LoRA input.
    train: bool,
    /// LoRA as constants (inference: no graph).
    detach_lora: bool,
}

impl Block {
    /// Block `l` on `x` `(B, T, D)`; with `cache`, the new keys and values are appended to it and
    /// the queries attend to every cached key.
    fn forward(
        &self,
        l: usize,
        x: &Tensor,
        pass: &Pass<'_>,
        cache: Option<&mut LayerKv>,
    ) -> Result<Tensor> {
        let cfg = pass.cfg;
        let (b, t, _) = x.dims3()?;
        let (h, dh, d) = (cfg.num_heads, cfg.head_dim, cfg.hidden_size);
        let eps = cfg.norm_eps;
        let lin = |m: &LoraLinear, x: &Tensor| m.forward_opts(x, pass.train, pass.detach_lora);
        let a = kernels::layer_norm(x, &self.ln_1.0, &self.ln_1.1, eps)?;
        let qkv = lin(&self.c_attn, &a)?; // (B, T, 3D)
        let split = |i: usize| -> Result<Tensor> {
            qkv.narrow(2, i * d, d)?
                .reshape((b, t, h, dh))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let (k, v) = match cache {
            Some(cache) => cache.append(k, v)?,
            None => (k, v),
        };
        let mut scale = 1.0 / (dh as f64).sqrt();
        if cfg.scale_attn_by_inverse_layer_idx {
            scale /= (l + 1) as f64;
        }
        let products = kernels::Products::of(self.attn_c_proj.weight.as_dense(), &q);
        let att = kernels::attention_with(&q, &k, &v, &pass.bias, scale, products)?
            .transpose(1, 2)?
            .reshape((b, t, d))?;
        let x = (x + lin(&self.attn_c_proj, &att)?)?;
        let m = kernels::layer_norm(&x, &self.ln_2.0, &self.ln_2.1, eps)?;
        let m = lin(&self.c_fc, &m)?;
        let m = kernels::activation(&m, cfg.activation)?;
        x + lin(&self.mlp_c_proj, &m)?
    }
}

fn norm(w: &Weights, key: &str, d: usize) -> std::result::Result<(Tensor, Tensor), ModelError> {
    Ok((
        w.get(&format!("{key}.weight"), &[d])?,
        w.get(&format!("{key}.bias"), &[d])?,
    ))
}

impl Gpt2 {
    /// Builds the model from checkpoint `w` as `cfg` describes it (no LoRA attached); keys with or
    /// without the `transformer.` prefix, Conv1D weights transposed to (out, in).
    pub fn load(w: &Weights, cfg: &ModelConfig) -> std::result::Result<Self, ModelError> {
        let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
        let prefix = if w.contains("transformer.wte.weight") || !w.contains("wte.weight") {
            "transformer."
        } else {
            ""
        };
        let wte = w.get_matrix(&format!("{prefix}wte.weight"), &[cfg.vocab_size, d])?;
        let wpe = w.get(
            &format!("{prefix}wpe.weight"),
            &[cfg.max_position_embeddings, d],
        )?;
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("transformer.h.{l}");
            let key = format!("{prefix}h.{l}");
            blocks.push(Block {
                ln_1: norm(w, &format!("{key}.ln_1"), d)?,
                c_attn: conv1d(w, prefix, &format!("{p}.attn.c_attn"), l, d, 3 * d)?,
                attn_c_proj: conv1d(w, prefix, &format!("{p}.attn.c_proj"), l, d, d)?,
                ln_2: norm(w, &format!("{key}.ln_2"), d)?,
                c_fc: conv1d(w, prefix, &format!("{p}.mlp.c_fc"), l, d, i)?,
                mlp_c_proj: conv1d(w, prefix, &format!("{p}.mlp.c_proj"), l, i, d)?,
            });
        }
        let ln_f = norm(w, &format!("{prefix}ln_f"), d)?;
        let lm_head = if w.contains("lm_head.weight") && !cfg.tie_word_embeddings {
            w.get_matrix("lm_head.weight", &[cfg.vocab_size, d])?
        } else {
            wte.clone()
        };
        Ok(Self {
            cfg: cfg.clone(),
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
        })
    }

    /// Every linear projection, block by block (c_attn, attn.c_proj, c_fc, mlp.c_proj).
    pub fn linears(&self) -> Vec<&LoraLinear> {
        self.blocks
            .iter()
            .flat_map(|b| [&b.c_attn, &b.attn_c_proj, &b.c_fc, &b.mlp_c_proj])
            .collect()
    }

    /// As [`Gpt2::linears`], mutable.
    pub fn linears_mut(&mut self) -> Vec<&mut LoraLinear> {
        self.blocks
            .iter_mut()
            .flat_map(|b| {
                [
                    &mut b.c_attn,
                    &mut b.attn_c_proj,
                    &mut b.c_fc,
                    &mut b.mlp_c_proj,
                ]
            })
            .collect()
    }

    /// The LM head weight `(V, D)` (`wte` when tied or absent).
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    /// Token plus position embeddings of `ids` `(B, T)` at positions `past..past+T`, or at
    /// `position_ids` when given.
    fn embed(&self, ids: &Tensor, past: usize, position_ids: Option<&Tensor>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let d = self.cfg.hidden_size;
        let positions = self.wpe.dim(0)?;
        if past + t > positions {
            candle_core::bail!(
                "a row of {} tokens is longer than this model's context ({positions} positions)",
                past + t
            );
        }
        let tok = self
            .wte
            .index_select(&ids.flatten_all()?, 0)?
            .to_dtype(self.wpe.dtype())?
            .reshape((b, t, d))?;
        let pos = match position_ids {
            Some(p) => self
                .wpe
                .index_select(&p.flatten_all()?, 0)?
                .reshape((b, t, d))?,
            None => self.wpe.narrow(0, past, t)?.unsqueeze(0)?,
        };
        tok.broadcast_add(&pos)
    }

    /// Final hidden states `(B, T, D)` after `ln_f`.
    pub fn hidden(&self, input: &ModelInput, train: bool) -> Result<Tensor> {
        let mut x = self.embed(&input.input_ids, 0, input.position_ids.as_ref())?;
        let pass = Pass {
            cfg: &self.cfg,
            bias: input.bias(x.dtype())?,
            train,
            detach_lora: false,
        };
        for (l, blk) in self.blocks.iter().enumerate() {
            x = blk.forward(l, &x, &pass, None)?;
        }
        kernels::layer_norm(&x, &self.ln_f.0, &self.ln_f.1, self.cfg.norm_eps)
    }

    /// Final hidden states `(B, T, D)` of the new tokens `ids` `(B, T)`, continuing `cache` (at
    /// positions `S..S+T`) and appending to it. Inference only: no dropout, LoRA as constants.
    pub fn hidden_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let past = cache.len();
        if cache.layers.len() != self.blocks.len() {
            candle_core::bail!(
                "the KV cache is for another model ({} layers)",
                cache.layers.len()
            );
        }
        let mut x = self.embed(ids, past, None)?;
        let pass = Pass {
            cfg: &self.cfg,
            bias: ops::causal_bias_after(past, t, x.dtype(), x.device())?,
            train: false,
            detach_lora: true,
        };
        for ((l, blk), kv) in self.blocks.iter().enumerate().zip(cache.layers.iter_mut()) {
            x = blk.forward(l, &x, &pass, Some(kv))?;
        }
        cache.advance(t);
        kernels::layer_norm(&x, &self.ln_f.0, &self.ln_f.1, self.cfg.norm_eps)
    }
}
