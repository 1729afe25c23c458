//! Rebuilding a Hugging Face `tokenizer.json` from a GGUF vocabulary, as transformers' own GGUF
//! loader does (`integrations/ggml.py`, `convert_slow_tokenizer.py`):
//! - `gpt2` (byte-level BPE: Llama 3, Qwen, SmolLM, GPT-2): vocabulary + merges, with the
//!   pre-tokenizer that `tokenizer.ggml.pre` names (llama.cpp's table in `llama-vocab.cpp`);
//! - `llama` (SentencePiece: Llama 2, Mistral v0.1, TinyLlama): a byte-fallback BPE whose merges
//!   are derived from the piece scores like transformers' `SentencePieceExtractor`, with the
//!   `▁` normalizer and decoder of `LlamaConverter`.
//!
//! Control and user-defined tokens become added tokens; BOS is prepended when the file asks.
//! A ChatML template's `<|im_end|>` joins EOS in generation_config's stop ids.
//! The result is checked by loading it with the `tokenizers` crate.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::gguf_meta::{Meta, SpecialIds};
use super::ConvertError;

/// llama.cpp token types (`llama_token_type`).
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The HF tokenizer files rebuilt from the GGUF.
pub(crate) struct TokenizerFiles {
    pub tokenizer_json: Value,
    pub tokenizer_config: Value,
    pub special: SpecialIds,
    pub chat_template: Option<String>,
}

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split(regex: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false})
}

/// The `tokenizer.ggml.pre` names of distinct byte-level pre-tokenizers, as the GGUF export writes
/// them (the first of each group of aliases in [`byte_level_pre`]).
pub(crate) const BYTE_LEVEL_PRE_NAMES: [&str; 4] = ["gpt-2", "llama-bpe", "qwen2", "smollm"];

/// (normalizer, pre_tokenizer, ignore_merges) for a `tokenizer.ggml.pre` name; `None` if unknown.
pub(crate) fn byte_level_pre(pre: &str) -> Option<(Value, Value, bool)> {
    Some(match pre {
        "default" | "gpt2" | "gpt-2" => (Value::Null, byte_level(true), false),
        "llama-bpe" | "llama3" | "llama-v3" | "dbrx" | "smaug-bpe" => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_REGEX), byte_level(false)]}),
            true,
        ),
        "qwen2" | "deepseek-r1-qwen" => (
            json!({"type": "NFC"}),
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_REGEX), byte_level(false)]}),
            false,
        ),
        "smollm" | "starcoder" | "refact" | "codeshell" => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            false,
        ),
        _ => return None,
    })
}

/// Merges from SentencePiece scores, as transformers' `SentencePieceExtractor.extract` derives
/// them: every split of a piece into two vocabulary pieces, ranked by the merged piece's score.
fn merges_from_scores(tokens: &[String], scores: &[f64]) -> Vec<(String, String)> {
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .rev()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(usize, usize, f64)> = Vec::new();
    for (i, piece) in tokens.iter().enumerate() {
        if ids.get(piece.as_str()) != Some(&i) {
            continue;
        }
        let score = scores.get(i).copied().unwrap_or(0.0);
        let mut local: Vec<(usize, usize, f64)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let l = *ids.get(&piece[..at])?;
                let r = *ids.get(&piece[at..])?;
                Some((l, r, score))
            })
            .collect();
        local.sort_by_key(|&(l, r, _)| (l, r));
        merges.extend(local);
    }
    // Stable, like Python's sorted(): ties keep the order above.
    merges.sort_by(|a, b| b.2.total_cmp(&a.2));
    merges
        .into_iter()
        .map(|(l, r, _)| (tokens[l].clone(), tokens[r].clone()))
        .collect()
}

fn bos_template(bos: &str, bos_id: u32) -> Value {
    json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    })
}

/// A tokenizer error about the GGUF file `meta` reads.
fn bad(meta: &Meta<'_>, reason: String) -> ConvertError {
    ConvertError::Tokenizer {
        path: meta.path.clone(),
        reason,
    }
}

/// The piece of token `id`, if any.
fn piece(tokens: &[String], id: Option<u32>) -> Option<String> {
    id.map(|i| tokens[i as usize].clone())
}

/// Builds tokenizer.json, tokenizer_config.json and the special ids from the GGUF metadata.
pub(crate) fn build(
    meta: &Meta<'_>,
    context_length: u64,
    notes: &mut Vec<String>,
) -> Result<TokenizerFiles, ConvertError> {
    let model = meta
        .str("tokenizer.ggml.model")
        .ok_or_else(|| bad(meta, "no tokenizer.ggml.model".into()))?
        .to_owned();
    let tokens = meta
        .strings("tokenizer.ggml.tokens")
        .ok_or_else(|| bad(meta, "no tokenizer.ggml.tokens".into()))?;
    let chat_template = meta.str("tokenizer.chat_template").map(str::to_owned);
    let special = special_ids(meta, &tokens, chat_template.as_deref());
    let added = added_tokens(meta, &tokens);
    let mut vocab = serde_json::Map::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.entry(t.clone()).or_insert(json!(i));
    }

    // SentencePiece models prepend BOS unless told otherwise; byte-level ones only when told.
    let add_bos = meta
        .bool("tokenizer.ggml.add_bos_token")
        .unwrap_or(model == "llama");
    let bos_post = match (add_bos, special.bos) {
        (true, Some(b)) => Some(bos_template(&tokens[b as usize], b)),
        _ => None,
    };

    let tokenizer_json = match model.as_str() {
        "gpt2" => byte_level_json(meta, added, vocab, bos_post, notes)?,
        "llama" => {
            let unk = piece(&tokens, special.unk).unwrap_or_else(|| "<unk>".into());
            sentencepiece_json(meta, &tokens, added, vocab, bos_post, unk)?
        }
        other => {
            return Err(bad(
                meta,
                format!("tokenizer model {other:?} is not supported (supported: gpt2, llama)"),
            ))
        }
    };
    crate::data::tokenizer::check_merges(&tokenizer_json).map_err(|e| {
        bad(
            meta,
            format!("tokenizer.ggml.merges does not fit tokenizer.ggml.tokens: {e}"),
        )
    })?;
    let text = serde_json::to_string(&tokenizer_json).map_err(|e| bad(meta, e.to_string()))?;
    text.parse::<tokenizers::Tokenizer>().map_err(|e| {
        bad(
            meta,
            format!("the rebuilt tokenizer.json does not load ({e})"),
        )
    })?;

    let config = tokenizer_config(
        &tokens,
        &special,
        &model,
        add_bos,
        context_length,
        chat_template.as_deref(),
    );
    Ok(TokenizerFiles {
        tokenizer_json,
        tokenizer_config: config,
        special,
        chat_template,
    })
}

/// tokenizer_config.json: BOS/EOS handling, the context length, the tokenizer class, the special
/// tokens and the chat template.
fn tokenizer_config(
    tokens: &[String],
    special: &SpecialIds,
    model: &str,
    add_bos: bool,
    context_length: u64,
    chat_template: Option<&str>,
) -> Value {
    let mut config = json!({
        "add_bos_token": add_bos,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": context_length,
        "tokenizer_class": if model == "llama" { "LlamaTokenizerFast" } else { "PreTrainedTokenizerFast" },
    });
    if let Some(obj) = config.as_object_mut() {
        for (key, value) in [
            ("bos_token", piece(tokens, special.bos)),
            ("eos_token", piece(tokens, special.eos)),
            ("pad_token", piece(tokens, special.pad)),
            ("unk_token", piece(tokens, special.unk)),
            ("chat_template", chat_template.map(str::to_owned)),
        ] {
            if let Some(v) = value {
                obj.insert(key.into(), json!(v));
            }
        }
    }
    config
}

/// BOS, EOS, pad and unknown ids (those inside the vocabulary), and the ids generation stops at.
fn special_ids(meta: &Meta<'_>, tokens: &[String], chat_template: Option<&str>) -> SpecialIds {
    let id = |key: &str| {
        meta.u64(key)
            .and_then(|v| u32::try_from(v).ok())
            .filter(|&v| (v as usize) < tokens.len())
    };
    let mut special = SpecialIds {
        bos: id("tokenizer.ggml.bos_token_id"),
        eos: id("tokenizer.ggml.eos_token_id"),
        pad: id("tokenizer.ggml.padding_token_id"),
        unk: id("tokenizer.ggml.unknown_token_id"),
        stop: Vec::new(),
    };
    // A ChatML template ends turns with <|im_end|>: generation stops there too.
    let im_end = tokens
        .iter()
        .position(|t| t == "<|im_end|>")
        .map(|i| i as u32)
        .filter(|_| chat_template.is_some_and(|t| t.contains("<|im_end|>")));
    for s in [
        special.eos,
        id("tokenizer.ggml.eot_token_id"),
        id("tokenizer.ggml.eom_token_id"),
        im_end,
    ]
    .into_iter()
    .flatten()
    {
        if !special.stop.contains(&s) {
            special.stop.push(s);
        }
    }
    special
}

/// Control, unknown and user-defined tokens as tokenizer.json's `added_tokens`.
fn added_tokens(meta: &Meta<'_>, tokens: &[String]) -> Vec<Value> {
    let types: Vec<i64> = meta
        .numbers("tokenizer.ggml.token_type")
        .map(|t| t.into_iter().map(|x| x as i64).collect())
        .unwrap_or_else(|| vec![1; tokens.len()]);
    let mut added = Vec::new();
    for (i, (t, ty)) in tokens
        .iter()
        .zip(types.iter().chain(std::iter::repeat(&1)))
        .enumerate()
    {
        let is_special = *ty == TYPE_CONTROL || *ty == TYPE_UNKNOWN;
        if is_special || *ty == TYPE_USER_DEFINED {
            added.push(
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": !is_special, "special": is_special}),
            );
        }
    }
    added
}

/// tokenizer.json of a byte-level BPE (`gpt2`), with the pre-tokenizer `tokenizer.ggml.pre` names.
fn byte_level_json(
    meta: &Meta<'_>,
    added: Vec<Value>,
    vocab: serde_json::Map<String, Value>,
    bos_post: Option<Value>,
    notes: &mut Vec<String>,
) -> Result<Value, ConvertError> {
    let merges: Vec<Value> = meta
        .strings("tokenizer.ggml.merges")
        .ok_or_else(|| bad(meta, "a byte-level BPE vocabulary without merges".into()))?
        .iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => json!([a, b]),
            None => json!([m, ""]),
        })
        .collect();
    let pre = meta.str("tokenizer.ggml.pre").unwrap_or("default");
    let (normalizer, pre_tokenizer, ignore_merges) = byte_level_pre(pre)
        .unwrap_or_else(|| {
            notes.push(format!("pre-tokenizer {pre:?} is not known to FineTune; used GPT-2's, so some texts may split differently than in llama.cpp"));
            (Value::Null, byte_level(true), false)
        });
    Ok(json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": bos_post.unwrap_or_else(|| json!({"type": "ByteLevel",
            "add_prefix_space": true, "trim_offsets": false, "use_regex": true})),
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
            "vocab": vocab, "merges": merges},
    }))
}

/// tokenizer.json of a SentencePiece vocabulary (`llama`): a byte-fallback BPE with the `▁`
/// normalizer and decoder; merges from the file, else derived from the piece scores.
fn sentencepiece_json(
    meta: &Meta<'_>,
    tokens: &[String],
    added: Vec<Value>,
    vocab: serde_json::Map<String, Value>,
    bos_post: Option<Value>,
    unk: String,
) -> Result<Value, ConvertError> {
    let scores = meta
        .numbers("tokenizer.ggml.scores")
        .ok_or_else(|| bad(meta, "a SentencePiece vocabulary without scores".into()))?;
    let merges: Vec<Value> = match meta.strings("tokenizer.ggml.merges") {
        Some(m) if !m.is_empty() => m
            .iter()
            .filter_map(|m| m.split_once(' ').map(|(a, b)| json!([a, b])))
            .collect(),
        _ => merges_from_scores(tokens, &scores)
            .into_iter()
            .map(|(a, b)| json!([a, b]))
            .collect(),
    };
    Ok(json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u{2581}"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]},
        "pre_tokenizer": null,
        "post_processor": bos_post,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentencepiece_merges_follow_scores() {
        let tokens: Vec<String> = ["<unk>", "a", "b", "c", "ab", "abc", "bc"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let scores = [0.0, -1.0, -2.0, -3.0, -0.5, -0.7, -0.6];
        let merges = merges_from_scores(&tokens, &scores);
        let pairs: Vec<(&str, &str)> = merges
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        // "ab" (-0.5) first, then "bc" (-0.6), then both splits of "abc" (-0.7) by ids.
        assert_eq!(pairs, [("a", "b"), ("b", "c"), ("a", "bc"), ("ab", "c")]);
    }

    #[test]
    fn every_known_pre_tokenizer_loads() {
        for pre in ["gpt2", "llama-bpe", "qwen2", "smollm"] {
            let (norm, pre_tok, _) = byte_level_pre(pre).unwrap();
            let json = json!({"version": "1.0", "truncation": null, "padding": null,
                "added_tokens": [], "normalizer": norm, "pre_tokenizer": pre_tok,
                "post_processor": null, "decoder": null,
                "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}});
            let parsed = json.to_string().parse::<tokenizers::Tokenizer>();
            assert!(parsed.is_ok(), "{pre}: {:?}", parsed.err());
        }
        assert!(byte_level_pre("mystery").is_none());
    }
}
