//! GGUF (llama.cpp) → Hugging Face folder: every tensor dequantized with candle's GGML kernels,
//! renamed to transformers' keys, and for llama/mistral the Q/K rows un-permuted
//! (`convert_hf_to_gguf.py` interleaves each head's rotary halves; transformers'
//! `_reverse_permute_weights` is the inverse used here); config.json, generation_config.json,
//! tokenizer.json, tokenizer_config.json and chat_template.jinja from the metadata.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use super::gguf_meta::{hf_architecture, hf_config, Meta, TensorFacts};
use super::gguf_tokenizer::{self, TokenizerFiles};
use super::pytorch::natural_key;
use super::write::{dtype_name, write_json, write_model, PlannedTensor};
use super::{io_err, ConvertError, ConvertOptions, ConvertReport, SourceKind};

/// GGUF tensor name → transformers name for a file of GGUF architecture `arch`; `None` for
/// tensors with no HF counterpart. Gemma's `ffn_norm` is the MLP's input norm
/// (`pre_feedforward_layernorm`) beside its post-norms; Phi-3 keeps q/k/v and gate/up fused.
pub(crate) fn hf_name(arch: &str, gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let gemma = arch.starts_with("gemma");
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" if gemma => "pre_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "post_attention_norm" if gemma => "post_attention_layernorm",
        "post_ffw_norm" if gemma => "post_feedforward_layernorm",
        "attn_qkv" if arch == "phi3" => "self_attn.qkv_proj",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" if arch == "phi3" => "mlp.gate_up_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// An error unless every tensor the GGUF `content` lists fits in the file of `file_len` bytes:
/// its element count (checked, under 2^40) splits into whole blocks and its bytes lie inside the
/// file. Candle sizes buffers from these numbers, so a damaged or hostile file is stopped here
/// (found by the `gguf` fuzz target: a shape whose byte count overflowed past the file check).
pub(crate) fn check_tensor_extents(content: &Content, file_len: u64) -> Result<(), String> {
    for (name, info) in &content.tensor_infos {
        let elems = info
            .shape
            .dims()
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
            .filter(|&n| n <= 1 << 40);
        let block = info.ggml_dtype.block_size() as u64;
        let bytes = elems
            .filter(|n| n % block == 0)
            .and_then(|n| (n / block).checked_mul(info.ggml_dtype.type_size() as u64));
        let end = bytes.and_then(|b| {
            content
                .tensor_data_offset
                .checked_add(info.offset)?
                .checked_add(b)
        });
        if end.is_none_or(|e| e > file_len) {
            return Err(format!(
                "tensor {name} ({:?}, shape {:?}) does not fit in the file; it is damaged or not a model",
                info.ggml_dtype,
                info.shape.dims()
            ));
        }
    }
    Ok(())
}

/// Whether llama.cpp's converter permuted this architecture's Q and K rows (its LlamaModel and
/// the models built on it).
pub(crate) fn permutes_qk(arch: &str) -> bool {
    matches!(arch, "llama" | "mistral" | "smollm3")
}

/// Tensors that go into config.json rather than the weights.
const CONFIG_TENSORS: [&str; 3] = [
    "rope_freqs.weight",
    "rope_factors_long.weight",
    "rope_factors_short.weight",
];

/// Undoes llama.cpp's `permute(w, n_head)`: rows grouped `(head, dim/2, 2)` back to
/// `(head, 2, dim/2)`. Works for weights `(rows, cols)` and biases `(rows,)`.
pub(crate) fn unpermute(t: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
        candle_core::bail!("{rows} rows do not split into {n_head} heads");
    }
    let half = rows / n_head / 2;
    let rest: usize = dims[1..].iter().product();
    t.reshape((n_head, half, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

pub(crate) fn convert(
    path: &Path,
    out: &Path,
    options: &ConvertOptions,
    source: SourceKind,
) -> Result<ConvertReport, ConvertError> {
    let file = File::open(path).map_err(io_err(path))?;
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader).map_err(|e| ConvertError::Gguf {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let file_len = std::fs::metadata(path).map_err(io_err(path))?.len();
    check_tensor_extents(&content, file_len).map_err(|reason| ConvertError::Gguf {
        path: path.to_path_buf(),
        reason,
    })?;
    let meta = Meta::new(&content.metadata, path);
    if hf_architecture(&meta.arch).is_none() {
        return Err(ConvertError::GgufArchitecture {
            arch: meta.arch.clone(),
            path: path.to_path_buf(),
        });
    }
    let layout = Layout::of(&meta);
    let mut notes = Vec::new();
    let dtype = options.dtype.unwrap_or_else(|| default_dtype(&content));
    let plan = tensor_plan(&content, &meta.arch, &mut notes);
    let facts = tensor_facts(&content, &mut reader, path)?;

    let context = meta.arch_u64("context_length").unwrap_or(4096);
    let tok = gguf_tokenizer::build(&meta, context, &mut notes)?;
    let config = hf_config(&meta, &facts, &tok.special, dtype_name(dtype), &mut notes)?;

    let planned: Vec<PlannedTensor> = plan
        .iter()
        .map(|(hf, g)| PlannedTensor {
            name: hf.clone(),
            bytes: content
                .tensor_infos
                .get(g)
                .map(|t| (t.shape.elem_count() * dtype.size_in_bytes()) as u64)
                .unwrap_or(0),
        })
        .collect();
    let mut load = |hf: &str| -> Result<Tensor, ConvertError> {
        let gguf = plan
            .iter()
            .find(|(h, _)| h == hf)
            .map(|(_, g)| g.clone())
            .unwrap_or_default();
        let t = dequantize(&content, &mut reader, path, &gguf)?;
        let bad_t = |e: candle_core::Error| ConvertError::Tensor {
            name: gguf.clone(),
            reason: e.to_string(),
            path: path.to_path_buf(),
        };
        to_transformers(t, hf, &layout)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(bad_t)
    };
    let (shards, weight_bytes) = write_model(out, &planned, options.max_shard_bytes, &mut load)?;

    write_json(&out.join("config.json"), &config)?;
    write_tokenizer_files(out, &tok)?;
    Ok(ConvertReport {
        source,
        out: out.to_path_buf(),
        tensors: planned.len(),
        shards,
        weight_bytes,
        notes,
    })
}

/// How llama.cpp's converter changed this architecture's tensors.
struct Layout {
    /// Q and K rows permuted, with (heads, kv heads).
    permuted: Option<(usize, usize)>,
    /// Gemma's norms stored as the `1 + w` they scale by.
    norm_plus_one: bool,
}

impl Layout {
    fn of(meta: &Meta<'_>) -> Self {
        let heads = meta.arch_u64("attention.head_count").unwrap_or(0) as usize;
        let kv_heads = meta
            .arch_u64("attention.head_count_kv")
            .map_or(heads, |v| v as usize);
        Self {
            permuted: permutes_qk(&meta.arch).then_some((heads, kv_heads)),
            norm_plus_one: meta.arch.starts_with("gemma"),
        }
    }
}

/// The GGUF tensor `t` as transformers keeps tensor `hf`: Q/K rows un-permuted, Gemma's norms
/// shifted back.
fn to_transformers(t: Tensor, hf: &str, layout: &Layout) -> candle_core::Result<Tensor> {
    match layout.permuted {
        Some((heads, _)) if hf.contains(".self_attn.q_proj.") => return unpermute(&t, heads),
        Some((_, kv)) if hf.contains(".self_attn.k_proj.") => return unpermute(&t, kv),
        _ => {}
    }
    if layout.norm_plus_one && hf.ends_with("norm.weight") {
        return t.affine(1.0, -1.0);
    }
    Ok(t)
}

/// The dtype to store when the caller names none: bf16 if any tensor is, f32 if all are, else f16.
fn default_dtype(content: &Content) -> DType {
    let types: Vec<GgmlDType> = content
        .tensor_infos
        .values()
        .map(|t| t.ggml_dtype)
        .collect();
    if types.contains(&GgmlDType::BF16) {
        DType::BF16
    } else if types.iter().all(|t| *t == GgmlDType::F32) {
        DType::F32
    } else {
        DType::F16
    }
}

/// (hf name, gguf name) of every tensor with a transformers counterpart, in natural order; the
/// others are named in a note (`rope_freqs` silently: it goes into config.json).
fn tensor_plan(content: &Content, arch: &str, notes: &mut Vec<String>) -> Vec<(String, String)> {
    let mut plan: Vec<(String, String)> = Vec::new();
    let mut skipped = Vec::new();
    for name in content.tensor_infos.keys() {
        match hf_name(arch, name) {
            Some(hf) => plan.push((hf, name.clone())),
            None if CONFIG_TENSORS.contains(&name.as_str()) => {}
            None => skipped.push(name.clone()),
        }
    }
    if !skipped.is_empty() {
        skipped.sort();
        notes.push(format!(
            "skipped tensors with no transformers counterpart: {}",
            skipped.join(", ")
        ));
    }
    plan.sort_by_key(|p| natural_key(&p.0));
    plan
}

/// Reads and dequantizes the GGUF tensor `name` (f32 on the CPU).
fn dequantize(
    content: &Content,
    reader: &mut BufReader<File>,
    path: &Path,
    name: &str,
) -> Result<Tensor, ConvertError> {
    content
        .tensor(reader, name, &Device::Cpu)
        .and_then(|q| q.dequantize(&Device::Cpu))
        .map_err(|e| ConvertError::Tensor {
            name: name.to_owned(),
            reason: e.to_string(),
            path: path.to_path_buf(),
        })
}

/// What config.json needs from the tensors rather than the metadata.
fn tensor_facts(
    content: &Content,
    reader: &mut BufReader<File>,
    path: &Path,
) -> Result<TensorFacts, ConvertError> {
    let mut vector = |name: &str| -> Result<Option<Vec<f32>>, ConvertError> {
        if !content.tensor_infos.contains_key(name) {
            return Ok(None);
        }
        dequantize(content, reader, path, name)?
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map(Some)
            .map_err(|e| ConvertError::Gguf {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
    };
    let rope_freqs = vector("rope_freqs.weight")?;
    let rope_long = vector("rope_factors_long.weight")?;
    let rope_short = vector("rope_factors_short.weight")?;
    Ok(TensorFacts {
        has_output: content.tensor_infos.contains_key("output.weight"),
        has_q_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        embed_rows: content
            .tensor_infos
            .get("token_embd.weight")
            .and_then(|t| t.shape.dims().first().copied()),
        rope_freqs,
        rope_long,
        rope_short,
    })
}

/// generation_config.json (BOS, the stop ids as EOS, pad), tokenizer.json,
/// tokenizer_config.json and chat_template.jinja.
fn write_tokenizer_files(out: &Path, tok: &TokenizerFiles) -> Result<(), ConvertError> {
    let mut generation = json!({"_from_model_config": true});
    if let Some(obj) = generation.as_object_mut() {
        if let Some(b) = tok.special.bos {
            obj.insert("bos_token_id".into(), json!(b));
        }
        match tok.special.stop.as_slice() {
            [] => {}
            [one] => {
                obj.insert("eos_token_id".into(), json!(one));
            }
            many => {
                obj.insert("eos_token_id".into(), json!(many));
            }
        }
        if let Some(p) = tok.special.pad {
            obj.insert("pad_token_id".into(), json!(p));
        }
    }
    write_json(&out.join("generation_config.json"), &generation)?;
    write_json(&out.join("tokenizer.json"), &tok.tokenizer_json)?;
    write_json(&out.join("tokenizer_config.json"), &tok.tokenizer_config)?;
    if let Some(t) = &tok.chat_template {
        let p = out.join("chat_template.jinja");
        std::fs::write(&p, t).map_err(io_err(&p))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_transformers_keys() {
        assert_eq!(
            hf_name("llama", "blk.3.attn_output.weight").as_deref(),
            Some("model.layers.3.self_attn.o_proj.weight")
        );
        assert_eq!(
            hf_name("llama", "blk.0.attn_q.bias").as_deref(),
            Some("model.layers.0.self_attn.q_proj.bias")
        );
        assert_eq!(
            hf_name("llama", "token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(hf_name("llama", "blk.0.ssm_in.weight"), None);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // permute: reshape(n_head, 2, d/2, cols).swapaxes(1, 2) — rows 0..8, 2 heads of 4.
        let rows: Vec<f32> = (0..8).map(|r| r as f32).collect();
        let original = Tensor::from_vec(rows, (8, 1), &Device::Cpu).unwrap();
        let permuted = original
            .reshape((2, 2, 2, 1))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((8, 1))
            .unwrap();
        let p: Vec<f32> = permuted.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(p, [0., 2., 1., 3., 4., 6., 5., 7.]);
        let back = unpermute(&permuted, 2).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            (0..8).map(|r| r as f32).collect::<Vec<_>>()
        );
    }
}
