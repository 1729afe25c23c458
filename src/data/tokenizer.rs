//! The model's tokenizer as found in a Hugging Face folder: `tokenizer.json` (read with the stable
//! `tokenizers` 0.2x line, which understands Hub files), the special tokens named in
//! `tokenizer_config.json`, and the chat template source from `chat_template.jinja` (transformers ≥ 5)
//! or `tokenizer_config.json`'s `chat_template` (older convention). Rendering lives in `data::template`.

use std::path::{Path, PathBuf};

/// Errors while reading a model's tokenizer files.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The model folder has no `tokenizer.json`; holds the path looked for.
    #[error("no tokenizer.json in the model folder; FineTune needs the fast-tokenizer file that Hub models ship (convert with transformers' AutoTokenizer.save_pretrained if you only have a slow tokenizer): {0}")]
    Missing(PathBuf),
    /// `tokenizer.json` or `tokenizer_config.json` could not be read or parsed.
    #[error(
        "could not read tokenizer ({reason}); re-download the model's tokenizer files: {path}"
    )]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What went wrong, from the reader or parser.
        reason: String,
    },
    /// The tokenizer failed to encode or decode text; holds its message.
    #[error("could not tokenize text: {0}")]
    Encode(String),
}

/// Longest text a `Replace` or `Prepend` normalizer may insert per match. Real tokenizers insert a
/// character or two ("▁"); one that inserts a page per character makes every record a
/// memory bomb (issue 20), so it is refused when the tokenizer is read.
pub const MAX_INSERTED_BYTES: usize = 256;

/// Errs when a normalizer of `tokenizer` (anywhere in its JSON) inserts more than
/// [`MAX_INSERTED_BYTES`] per match. Pre-tokenizer regexes need no check: tokenizers' regex
/// engines run in linear time or stop at a backtracking limit.
fn check_growth(tokenizer: &serde_json::Value) -> Result<(), String> {
    fn walk(v: &serde_json::Value) -> Result<(), String> {
        match v {
            serde_json::Value::Object(o) => {
                let kind = o.get("type").and_then(|t| t.as_str());
                let inserted = match kind {
                    Some("Replace") => o.get("content"),
                    Some("Prepend") => o.get("prepend"),
                    _ => None,
                };
                if let Some(n) = inserted.and_then(|c| c.as_str()).map(str::len) {
                    if n > MAX_INSERTED_BYTES {
                        return Err(format!(
                            "its {} normalizer inserts {n} bytes per match (at most {MAX_INSERTED_BYTES}), which would multiply every record's size",
                            kind.unwrap_or_default()
                        ));
                    }
                }
                o.values().try_for_each(walk)
            }
            serde_json::Value::Array(a) => a.iter().try_for_each(walk),
            _ => Ok(()),
        }
    }
    // Only the normalizer inserts text; the vocabulary is not walked.
    tokenizer.get("normalizer").map_or(Ok(()), walk)
}

/// Errs when a merge of a BPE `tokenizer` names a piece outside its vocabulary or joins into one.
/// `tokenizers` refuses most such files itself, but panics (slicing a buffer the size of the
/// longest token) when a merge joins into something longer than every token; a file found by
/// fuzzing did so (issue 20's fuzz smoke), so the merges are checked before it reads them.
pub(crate) fn check_merges(tokenizer: &serde_json::Value) -> Result<(), String> {
    let Some(model) = tokenizer.get("model") else {
        return Ok(());
    };
    let (Some(vocab), Some(merges)) = (
        model.get("vocab").and_then(|v| v.as_object()),
        model.get("merges").and_then(|m| m.as_array()),
    ) else {
        return Ok(());
    };
    let prefix = model
        .get("continuing_subword_prefix")
        .and_then(|p| p.as_str())
        .unwrap_or_default();
    for (i, merge) in merges.iter().enumerate() {
        let pair = match merge {
            serde_json::Value::String(s) => s.split_once(' '),
            serde_json::Value::Array(a) => match (a.first(), a.get(1)) {
                (Some(x), Some(y)) => x.as_str().zip(y.as_str()),
                _ => None,
            },
            _ => None,
        };
        // Malformed entries are left to tokenizers, which rejects them with an error.
        let Some((a, b)) = pair else { continue };
        let joined = b.get(prefix.len()..).map(|rest| format!("{a}{rest}"));
        let missing = [Some(a.to_owned()), Some(b.to_owned()), joined]
            .into_iter()
            .find(|piece| piece.as_ref().is_none_or(|p| !vocab.contains_key(p)));
        if let Some(piece) = missing {
            return Err(format!(
                "merge {} ({a:?} + {b:?}) {} not in the vocabulary",
                i + 1,
                match piece {
                    Some(p) => format!("needs {p:?}, which is"),
                    None => "joins into a piece that is".into(),
                }
            ));
        }
    }
    Ok(())
}

/// A tokenizer plus what `tokenizer_config.json` says about specials and the chat template.
#[derive(Clone)]
pub struct ModelTokenizer {
    inner: tokenizers::Tokenizer,
    /// Jinja source of the chat template, if the model ships one.
    pub chat_template: Option<String>,
    /// Text of the BOS token (`bos_token` in `tokenizer_config.json`), if declared.
    pub bos_token: Option<String>,
    /// Text of the EOS token, if declared; appended to records so the model learns to stop.
    pub eos_token: Option<String>,
    /// Text of the padding token, if declared.
    pub pad_token: Option<String>,
}

impl std::fmt::Debug for ModelTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("has_chat_template", &self.chat_template.is_some())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

/// A special token in tokenizer_config.json is either a string or `{"content": "...", ...}`.
fn special_token(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

impl ModelTokenizer {
    /// Reads `tokenizer.json`, `tokenizer_config.json` (optional) and `chat_template.jinja` (optional).
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(TokenizerError::Missing(path));
        }
        let invalid = |reason: String| TokenizerError::Invalid {
            path: path.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| invalid(e.to_string()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        check_growth(&json).map_err(invalid)?;
        check_merges(&json).map_err(invalid)?;
        let inner: tokenizers::Tokenizer =
            serde_json::from_value(json).map_err(|e| invalid(e.to_string()))?;
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = if config_path.is_file() {
            let text =
                std::fs::read_to_string(&config_path).map_err(|e| TokenizerError::Invalid {
                    path: config_path.clone(),
                    reason: e.to_string(),
                })?;
            serde_json::from_str(&text).map_err(|e| TokenizerError::Invalid {
                path: config_path.clone(),
                reason: e.to_string(),
            })?
        } else {
            serde_json::Value::Null
        };
        let template_path = dir.join("chat_template.jinja");
        let chat_template = if template_path.is_file() {
            Some(
                std::fs::read_to_string(&template_path).map_err(|e| TokenizerError::Invalid {
                    path: template_path.clone(),
                    reason: e.to_string(),
                })?,
            )
        } else {
            match config.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                // Older multi-template form: [{"name": "default", "template": "..."}, ...].
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .or_else(|| list.first())
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(str::to_owned),
                _ => None,
            }
        };
        Ok(Self {
            inner,
            chat_template,
            bos_token: special_token(config.get("bos_token")),
            eos_token: special_token(config.get("eos_token")),
            pad_token: special_token(config.get("pad_token")),
        })
    }

    /// Token ids of `text`. `add_special_tokens` applies the tokenizer's post-processor (e.g. a BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids` (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// Text of `ids` without the special tokens (what a person reads).
    pub fn decode_text(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// Id of the token whose text is `token` (specials included), if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of the EOS token, if declared and in the vocabulary.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// Id of the BOS token, if declared and in the vocabulary.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// Padding id: the declared pad token, else EOS, else 0. Padded positions never reach the loss.
    pub fn pad_id(&self) -> u32 {
        self.pad_token
            .as_deref()
            .and_then(|t| self.token_to_id(t))
            .or_else(|| self.eos_id())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    #[test]
    fn reads_template_from_both_conventions() {
        let a = ModelTokenizer::from_dir(&fixture("tiny-llama")).unwrap();
        let b = ModelTokenizer::from_dir(&fixture("tiny-qwen2")).unwrap();
        assert_eq!(a.chat_template, b.chat_template);
        assert!(a.chat_template.unwrap().contains("<|im_start|>"));
        assert_eq!(b.eos_token.as_deref(), Some("<|im_end|>"));
        assert_eq!(b.eos_id(), Some(2));
        assert_eq!(b.bos_id(), Some(1));
    }

    #[test]
    fn encodes_and_decodes() {
        let t = ModelTokenizer::from_dir(&fixture("tiny-llama")).unwrap();
        let ids = t.encode("hello world", false).unwrap();
        assert!(!ids.is_empty());
        assert_eq!(t.decode(&ids).unwrap(), "hello world");
    }

    #[test]
    fn a_merge_outside_the_vocabulary_is_a_clear_error() {
        let tokenizer = |merges: serde_json::Value, prefix: Option<&str>| {
            serde_json::json!({"version": "1.0", "added_tokens": [], "normalizer": null,
                "pre_tokenizer": null, "post_processor": null, "decoder": null,
                "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2, "##b": 3, "<s>": 4},
                    "continuing_subword_prefix": prefix, "merges": merges}})
        };
        // Both spellings of merges, with and without a continuing-subword prefix.
        for (merges, prefix) in [
            (serde_json::json!(["a b"]), None),
            (serde_json::json!([["a", "b"]]), None),
            (serde_json::json!([["a", "##b"]]), Some("##")),
        ] {
            let json = tokenizer(merges, prefix);
            assert_eq!(check_merges(&json), Ok(()));
            assert!(json.to_string().parse::<tokenizers::Tokenizer>().is_ok());
        }
        // Joining into a piece longer than every token made tokenizers panic.
        let err = check_merges(&tokenizer(serde_json::json!(["a b", "ab <s>"]), None)).unwrap_err();
        assert!(
            err.contains("merge 2") && err.contains("\"ab<s>\""),
            "{err}"
        );
        let err = check_merges(&tokenizer(serde_json::json!([["a", "c"]]), None)).unwrap_err();
        assert!(err.contains("\"c\""), "{err}");
        // A second piece shorter than the prefix joins into nothing.
        let err =
            check_merges(&tokenizer(serde_json::json!([["a", "b"]]), Some("###"))).unwrap_err();
        assert!(err.contains("joins into"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let json = tokenizer(serde_json::json!(["a b", "ab <s>"]), None);
        std::fs::write(&path, json.to_string()).unwrap();
        let err = ModelTokenizer::from_dir(dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("merge 2") && err.contains("tokenizer.json"),
            "{err}"
        );
    }

    #[test]
    fn missing_tokenizer_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = ModelTokenizer::from_dir(dir.path()).unwrap_err();
        assert!(err.to_string().contains("tokenizer.json"));
    }
}
