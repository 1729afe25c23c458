//! The tokenizer of a GGUF export, as llama.cpp reads it, from the model folder's
//! `tokenizer.json` (+ `tokenizer_config.json`, the chat template):
//! - byte-level BPE (Llama 3, Qwen, SmolLM, GPT-2): `tokenizer.ggml.model = gpt2`, the vocabulary
//!   by id, the merges, and `tokenizer.ggml.pre`, the name of llama.cpp's pre-tokenizer. The name
//!   is the one whose tokenizer.json form (the table FineTune's GGUF import rebuilds tokenizers
//!   from, [`crate::convert`]) equals this tokenizer's normalizer and pre-tokenizer; a tokenizer
//!   that matches none is an error, since llama.cpp would split its text differently;
//! - SentencePiece-style BPE with byte fallback (Llama 2, Mistral, TinyLlama): `model = llama`,
//!   the pieces, their scores (minus the rank of the merge that makes a piece, so llama.cpp's
//!   highest-score-first merging follows the merge order) and `add_space_prefix`.
//!
//! Token types follow `convert_hf_to_gguf.py`: added special tokens (and ones that look special,
//! `<|…|>`) are control tokens, other added tokens user-defined, ids without a token `[PAD{id}]`
//! (unused). BOS/EOS/pad/unknown ids come from the tokenizer's own settings, and whether BOS or
//! EOS is added is what the HF tokenizer does when it encodes text.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::quantized::gguf_file::Value as GValue;
use serde_json::Value;

use crate::data::ModelTokenizer;

/// llama.cpp's token types (`llama_token_type`).
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// What the export needs to know about the tokenizer besides the metadata it writes.
pub(crate) struct Vocab {
    /// `tokenizer.*` metadata, in the order written.
    pub metadata: Vec<(String, GValue)>,
    /// The BOS token's text when llama.cpp adds it to every prompt (Ollama's template then leaves
    /// it out).
    pub added_bos: Option<String>,
    /// Token texts of the control tokens (for Ollama's stop list).
    pub control: Vec<String>,
}

/// `convert_hf_to_gguf.py`'s `does_token_look_special`.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<\u{ff5c}") && t.ends_with("\u{ff5c}>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// `value` without the keys that change only offsets, for comparing tokenizer.json parts.
fn canonical(value: &Value) -> Value {
    match value {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| k.as_str() != "trim_offsets")
                .map(|(k, v)| (k.clone(), canonical(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

/// llama.cpp's pre-tokenizer name for a byte-level BPE's normalizer and pre-tokenizer.
pub(crate) fn pre_tokenizer_name(
    normalizer: &Value,
    pre_tokenizer: &Value,
) -> Option<&'static str> {
    let (n, p) = (canonical(normalizer), canonical(pre_tokenizer));
    crate::convert::BYTE_LEVEL_PRE_NAMES
        .iter()
        .copied()
        .find(|name| {
            crate::convert::byte_level_pre(name)
                .is_some_and(|(norm, pre, _)| canonical(&norm) == n && canonical(&pre) == p)
        })
}

/// The merges as `"a b"` strings (tokenizer.json has them as strings or as pairs).
fn merges(model: &Value, file: &Path) -> anyhow::Result<Vec<String>> {
    let Some(list) = model.get("merges").and_then(Value::as_array) else {
        return Ok(Vec::new());
    };
    list.iter()
        .map(|m| match m {
            Value::String(s) => Ok(s.clone()),
            Value::Array(pair) if pair.len() == 2 => Ok(format!(
                "{} {}",
                pair[0].as_str().unwrap_or_default(),
                pair[1].as_str().unwrap_or_default()
            )),
            other => anyhow::bail!(
                "{}: a merge is neither \"a b\" nor [a, b]: {other}",
                file.display()
            ),
        })
        .collect()
}

/// Whether a SentencePiece-style tokenizer puts `▁` before the text.
fn adds_space_prefix(tok: &Value) -> bool {
    let text = |v: &Value| serde_json::to_string(v).unwrap_or_default();
    let normalizer = text(&tok["normalizer"]);
    let pre = &tok["pre_tokenizer"];
    normalizer.contains("\"Prepend\"")
        || (text(pre).contains("\"Metaspace\"") && !text(pre).contains("\"never\""))
}

/// Every id's text (`None` where no token has the id) and, for added tokens, whether each is
/// special.
type IdTexts = (Vec<Option<String>>, HashMap<u64, bool>);

fn id_texts(tok: &Value, vocab_size: usize, file: &Path) -> anyhow::Result<IdTexts> {
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut place = |id: u64, t: &str| -> anyhow::Result<()> {
        let slot = tokens.get_mut(id as usize).with_context(|| {
            format!(
                "{}: token {t:?} has id {id}, beyond the model's {vocab_size} embedding rows",
                file.display()
            )
        })?;
        *slot = Some(t.to_owned());
        Ok(())
    };
    if let Some(vocab) = tok["model"]["vocab"].as_object() {
        for (t, id) in vocab {
            place(id.as_u64().unwrap_or(u64::MAX), t)?;
        }
    }
    let mut added: HashMap<u64, bool> = HashMap::new();
    for a in tok["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) else {
            continue;
        };
        place(id, content)?;
        added.insert(id, a["special"].as_bool().unwrap_or(false));
    }
    Ok((tokens, added))
}

/// The texts (holes as `[PAD{id}]`), llama.cpp token types and the control tokens' texts.
fn typed_tokens(
    ids: IdTexts,
    unk: Option<&str>,
    sentencepiece: bool,
) -> (Vec<String>, Vec<i32>, Vec<String>) {
    let (tokens, added) = ids;
    let mut types = Vec::with_capacity(tokens.len());
    let mut texts = Vec::with_capacity(tokens.len());
    let mut control = Vec::new();
    for (id, t) in tokens.into_iter().enumerate() {
        let Some(t) = t else {
            texts.push(format!("[PAD{id}]"));
            types.push(UNUSED);
            continue;
        };
        let ty = match added.get(&(id as u64)) {
            _ if Some(t.as_str()) == unk => UNKNOWN,
            Some(&special) if special || looks_special(&t) => CONTROL,
            Some(_) => USER_DEFINED,
            None if sentencepiece && t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') => {
                BYTE
            }
            None => NORMAL,
        };
        if ty == CONTROL {
            control.push(t.clone());
        }
        types.push(ty);
        texts.push(t);
    }
    (texts, types, control)
}

/// SentencePiece scores: minus the rank of the first merge that makes a piece, 0 otherwise.
fn scores_from_merges(texts: &[String], merge_list: &[String]) -> GValue {
    let mut rank: HashMap<String, usize> = HashMap::new();
    for (i, m) in merge_list.iter().enumerate() {
        rank.entry(m.replacen(' ', "", 1)).or_insert(i);
    }
    GValue::Array(
        texts
            .iter()
            .map(|t| GValue::F32(rank.get(t).map_or(0.0, |&r| -(r as f32))))
            .collect(),
    )
}

/// The unknown token as tokenizer_config.json names it (as llama.cpp's converter reads it).
fn config_unk(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
    let config: Value = serde_json::from_str(&text).ok()?;
    match &config["unk_token"] {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

/// Special ids, whether BOS/EOS are added (what the HF tokenizer does to a test string) and the
/// chat template; returns the BOS text when it is added.
fn special_metadata(
    dir: &Path,
    hf: &ModelTokenizer,
    unk: Option<&str>,
    md: &mut Vec<(String, GValue)>,
) -> anyhow::Result<Option<String>> {
    let id_of = |t: &Option<String>| t.as_deref().and_then(|t| hf.token_to_id(t));
    let bos = id_of(&hf.bos_token);
    let eos = id_of(&hf.eos_token);
    let unk_id = config_unk(dir)
        .as_deref()
        .or(unk)
        .and_then(|u| hf.token_to_id(u));
    for (key, id) in [
        ("bos", bos),
        ("eos", eos),
        ("unknown", unk_id),
        ("padding", id_of(&hf.pad_token)),
    ] {
        if let Some(id) = id {
            md.push((format!("tokenizer.ggml.{key}_token_id"), GValue::U32(id)));
        }
    }
    let probe = hf
        .encode("Hello world", true)
        .with_context(|| format!("encoding a test string with {}", dir.display()))?;
    let add_bos = bos.is_some() && probe.first().copied() == bos;
    let add_eos = eos.is_some() && probe.last().copied() == eos;
    md.push(("tokenizer.ggml.add_bos_token".into(), GValue::Bool(add_bos)));
    md.push(("tokenizer.ggml.add_eos_token".into(), GValue::Bool(add_eos)));
    if let Some(template) = &hf.chat_template {
        md.push((
            "tokenizer.chat_template".into(),
            GValue::String(template.clone()),
        ));
    }
    Ok(hf.bos_token.clone().filter(|_| add_bos))
}

/// Reads the tokenizer of the model folder `dir` for an export with `vocab_size` token rows.
pub(crate) fn read(dir: &Path, vocab_size: usize) -> anyhow::Result<Vocab> {
    let file = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&file).with_context(|| {
        format!(
            "reading {} (a GGUF needs the model's tokenizer)",
            file.display()
        )
    })?;
    let tok: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", file.display()))?;
    let model = &tok["model"];
    if model["type"].as_str() != Some("BPE") {
        anyhow::bail!(
            "{}: a {} tokenizer; the GGUF export writes BPE tokenizers (byte-level or SentencePiece-style): export the merged model instead",
            file.display(),
            model["type"].as_str().unwrap_or("unknown")
        );
    }
    let hf =
        ModelTokenizer::from_dir(dir).with_context(|| format!("loading {}", file.display()))?;
    let sentencepiece = model["byte_fallback"].as_bool().unwrap_or(false);
    let unk = model["unk_token"].as_str();
    let merge_list = merges(model, &file)?;
    let (texts, types, control) =
        typed_tokens(id_texts(&tok, vocab_size, &file)?, unk, sentencepiece);

    let mut md: Vec<(String, GValue)> = Vec::new();
    let mut put = |k: &str, v: GValue| md.push((k.to_owned(), v));
    if sentencepiece {
        put("tokenizer.ggml.model", GValue::String("llama".into()));
        put("tokenizer.ggml.pre", GValue::String("default".into()));
        let scores = scores_from_merges(&texts, &merge_list);
        put("tokenizer.ggml.tokens", strings(texts));
        put("tokenizer.ggml.scores", scores);
        put("tokenizer.ggml.token_type", ints(&types));
        put(
            "tokenizer.ggml.add_space_prefix",
            GValue::Bool(adds_space_prefix(&tok)),
        );
    } else {
        let pre = pre_tokenizer_name(&tok["normalizer"], &tok["pre_tokenizer"]).with_context(|| {
            format!(
                "{}: llama.cpp has no pre-tokenizer that splits text as this tokenizer does (normalizer {}, pre-tokenizer {}); export the merged model and convert it with llama.cpp's convert_hf_to_gguf.py",
                file.display(),
                tok["normalizer"],
                tok["pre_tokenizer"]
            )
        })?;
        put("tokenizer.ggml.model", GValue::String("gpt2".into()));
        put("tokenizer.ggml.pre", GValue::String(pre.into()));
        put("tokenizer.ggml.tokens", strings(texts));
        put("tokenizer.ggml.token_type", ints(&types));
        put("tokenizer.ggml.merges", strings(merge_list));
    }
    let added_bos = special_metadata(dir, &hf, unk, &mut md)?;
    Ok(Vocab {
        metadata: md,
        added_bos,
        control,
    })
}

fn strings(v: Vec<String>) -> GValue {
    GValue::Array(v.into_iter().map(GValue::String).collect())
}

fn ints(v: &[i32]) -> GValue {
    GValue::Array(v.iter().map(|&i| GValue::I32(i)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_pre_tokenizer_name_is_found_from_its_own_form() {
        for name in crate::convert::BYTE_LEVEL_PRE_NAMES {
            let (norm, pre, _) = crate::convert::byte_level_pre(name).unwrap();
            let found = pre_tokenizer_name(&norm, &pre).unwrap();
            // Aliases share one form; the first listed name is the one written.
            assert_eq!(
                crate::convert::byte_level_pre(found).map(|(n, p, _)| (n, p)),
                Some((norm, pre))
            );
        }
    }

    #[test]
    fn an_unknown_pre_tokenizer_is_not_guessed() {
        let pre = json!({"type": "ByteLevel", "add_prefix_space": true, "use_regex": true});
        assert_eq!(pre_tokenizer_name(&Value::Null, &pre), None);
        let gpt2 = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true});
        assert_eq!(pre_tokenizer_name(&Value::Null, &gpt2), Some("gpt-2"));
    }

    #[test]
    fn special_looking_tokens() {
        assert!(looks_special("<|im_end|>"));
        assert!(looks_special("<pad>"));
        assert!(!looks_special("<tool_call>"));
    }
}
