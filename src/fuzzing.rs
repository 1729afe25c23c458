//! Entry points of the coverage-guided fuzz targets in `fuzz/` (issue 20): each takes arbitrary
//! bytes as a file of one kind FineTune reads from strangers, and must end in `Ok` or an error,
//! never a panic, a hang or an unbounded allocation. Files are written to a temporary folder
//! and read through the same public functions the app uses.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A temporary folder holding `name` = `data` (and `extra` files).
fn folder(name: &str, data: &[u8], extra: &[(&str, &[u8])]) -> Option<tempfile::TempDir> {
    let dir = tempfile::tempdir().ok()?;
    std::fs::write(dir.path().join(name), data).ok()?;
    for (n, d) in extra {
        std::fs::write(dir.path().join(n), d).ok()?;
    }
    Some(dir)
}

/// The tiny-llama fixture folder (its tokenizer and config), in this source tree.
fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama")
}

/// `config.json`: parsed into a model config.
pub fn config_json(data: &[u8]) {
    let _ = crate::model::ModelConfig::from_json(&String::from_utf8_lossy(data));
}

/// A safetensors file (header and data) as a model's weights, beside the fixture's config:
/// summarized from its header, then the model loaded from it (and the bytes as a shard index).
pub fn safetensors(data: &[u8]) {
    let Ok(config) = std::fs::read(fixture().join("config.json")) else {
        return;
    };
    let Some(dir) = folder("model.safetensors", data, &[("config.json", &config)]) else {
        return;
    };
    let _ = crate::inspect::summarize(dir.path());
    let _ = crate::model::Model::load(
        dir.path(),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    );
    let _ = crate::model::weights::shard_index_names(&String::from_utf8_lossy(data));
}

/// A GGUF file: imported into a model folder (metadata, tokenizer, tensors).
pub fn gguf(data: &[u8]) {
    let Some(dir) = folder("model.gguf", data, &[]) else {
        return;
    };
    let out = dir.path().join("out");
    let _ = crate::convert::convert(&dir.path().join("model.gguf"), &out, &Default::default());
}

/// A PyTorch `pytorch_model.bin` (a zip holding a pickle): converted without running it.
pub fn pytorch_bin(data: &[u8]) {
    let Ok(config) = std::fs::read(fixture().join("config.json")) else {
        return;
    };
    let Some(dir) = folder("pytorch_model.bin", data, &[("config.json", &config)]) else {
        return;
    };
    let out = dir.path().join("out");
    let _ = crate::convert::convert(dir.path(), &out, &Default::default());
}

/// `adapter_config.json` beside the fixture's PEFT weights: loaded onto the fixture model.
pub fn adapter_config(data: &[u8]) {
    static MODEL: OnceLock<Option<crate::model::Model>> = OnceLock::new();
    let model = MODEL.get_or_init(|| {
        crate::model::Model::load(
            &fixture(),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .ok()
    });
    let (Some(model), Ok(weights)) = (
        model,
        std::fs::read(fixture().join("peft-adapter/adapter_model.safetensors")),
    ) else {
        return;
    };
    let Some(dir) = folder(
        "adapter_config.json",
        data,
        &[("adapter_model.safetensors", &weights)],
    ) else {
        return;
    };
    let mut model = model.clone();
    let _ = crate::model::adapter::load(dir.path(), &mut model);
}

/// A JSONL dataset: format detection, parsing and tokenization with the fixture's tokenizer and
/// chat template.
pub fn jsonl(data: &[u8]) {
    static TOKENIZER: OnceLock<Option<crate::data::tokenizer::ModelTokenizer>> = OnceLock::new();
    let tok =
        TOKENIZER.get_or_init(|| crate::data::tokenizer::ModelTokenizer::from_dir(&fixture()).ok());
    let (Some(tok), Some(dir)) = (tok, folder("train.jsonl", data, &[])) else {
        return;
    };
    let options = crate::data::DataOptions {
        max_seq_len: 256,
        skip_bad_lines: data.first().is_some_and(|b| b & 1 == 1),
        ..Default::default()
    };
    let _ = crate::data::load(&dir.path().join("train.jsonl"), None, tok, &options);
}

/// A chat template: compiled and rendered for a short conversation (with a system turn and a
/// tool call), with and without the generation prompt.
pub fn chat_template(data: &[u8]) {
    let src = String::from_utf8_lossy(data);
    let Ok(t) = crate::data::template::ChatTemplate::new(&src, Some("<s>"), Some("</s>")) else {
        return;
    };
    let messages = [
        serde_json::json!({"role": "system", "content": "Be brief."}),
        serde_json::json!({"role": "user", "content": "Hi"}),
        serde_json::json!({"role": "assistant", "content": "Hello", "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]}),
        serde_json::json!({"role": "user", "content": "Bye"}),
    ];
    let _ = t.render(&messages, None, true);
    let _ = t.render(&messages[1..3], None, false);
}
