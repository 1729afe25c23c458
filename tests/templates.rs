//! Chat-template renderings equal transformers' `apply_chat_template(..., tokenize=False)`
//! character for character. tests/fixtures/templates/expected.json was made once by
//! transformers (the version is recorded in the file) with `python3 tools/make_template_fixtures.py`;
//! it holds the conversations and, for every tokenizer folder × conversation × add_generation_prompt,
//! the text transformers rendered or the message of the exception the template raised.
//!
//! The folders are the fixture models (ChatML, the template in chat_template.jinja or, for
//! tiny-qwen2, inside tokenizer_config.json) and tests/fixtures/templates/<name>/: templates in
//! the style of Qwen2.5 (tools, `tojson`), Llama 3.1 (`bos_token`, tools in the first user message,
//! `tojson(indent=4)`, `raise_exception`, `is iterable` on strings) and Qwen3 (pycompat
//! `startswith`/`split`/`rstrip`/`lstrip`/`strip`, `namespace()`, `messages[::-1]`,
//! `raise_exception`), Mistral (`[INST]`, the system prompt folded into the first user message),
//! Gemma (`model` role, `trim`), Phi-3 (`<|end|>`) and SmolLM2 (a default system prompt), plus
//! templates/tojson-options, FineTune's own probe of tojson's keyword
//! arguments (`sort_keys`, `ensure_ascii` with surrogate pairs, `indent`, `separators`).
// Tests panic on purpose: unwrap/expect are how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::fixture;
use finetune::data::{ChatTemplate, ModelTokenizer};
use serde_json::Value;

fn expected() -> Value {
    let path = fixture("templates/expected.json");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The template of a tokenizer folder, compiled the way `data::Encoder` compiles it.
fn template(dir: &Path) -> ChatTemplate {
    let tok = ModelTokenizer::from_dir(dir).unwrap();
    let source = tok
        .chat_template
        .as_deref()
        .unwrap_or_else(|| panic!("no chat template in {}", dir.display()));
    ChatTemplate::new(source, tok.bos_token.as_deref(), tok.eos_token.as_deref()).unwrap()
}

/// Index of the first differing character, for a readable failure.
fn first_difference(a: &str, b: &str) -> usize {
    a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count()
}

/// Renders every expected case whose template folder satisfies `select`; returns the number of
/// cases checked and a description of each mismatch.
fn check(select: impl Fn(&str) -> bool) -> (usize, Vec<String>) {
    let expected = expected();
    let conversations = expected["conversations"].as_object().unwrap();
    let mut templates: HashMap<String, ChatTemplate> = HashMap::new();
    let mut checked = 0;
    let mut failures = Vec::new();
    for case in expected["renderings"].as_array().unwrap() {
        let folder = case["template"].as_str().unwrap();
        if !select(folder) {
            continue;
        }
        let name = case["conversation"].as_str().unwrap();
        let generation = case["add_generation_prompt"].as_bool().unwrap();
        let conversation = &conversations[name];
        let messages = conversation["messages"].as_array().unwrap();
        let tools = conversation.get("tools");
        let template = templates
            .entry(folder.to_owned())
            .or_insert_with(|| template(&fixture(folder)));
        let got = template.render(messages, tools, generation);
        let label = format!("{folder} / {name} / add_generation_prompt={generation}");
        checked += 1;
        match (&got, case.get("text"), case.get("error")) {
            (Ok(text), Some(Value::String(want)), _) if text == want => {}
            (Ok(text), Some(Value::String(want)), _) => {
                let at = first_difference(text, want);
                failures.push(format!(
                    "{label}: differs at char {at}\n  FineTune:     {text:?}\n  transformers: {want:?}"
                ));
            }
            (Err(e), _, Some(Value::String(message))) if e.to_string().contains(message) => {}
            (got, _, _) => failures.push(format!(
                "{label}: FineTune gave {got:?}, transformers gave {case}"
            )),
        }
    }
    (checked, failures)
}

fn assert_all_match(select: impl Fn(&str) -> bool, min_cases: usize) {
    let (checked, failures) = check(select);
    assert!(
        checked >= min_cases,
        "only {checked} cases checked; regenerate expected.json with tools/make_template_fixtures.py"
    );
    assert!(
        failures.is_empty(),
        "{} of {checked} renderings differ from transformers:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn fixture_model_templates_render_like_transformers() {
    // tiny-llama, tiny-gpt2, tiny-qwen3: chat_template.jinja; tiny-qwen2: tokenizer_config.json.
    assert_all_match(|folder| folder.starts_with("tiny-"), 4 * 2 * 11);
}

#[test]
fn real_world_style_templates_render_like_transformers() {
    assert_all_match(|folder| folder.starts_with("templates/"), 4 * 2 * 11);
}

#[test]
fn expected_file_covers_tools_generation_prompts_and_raise_exception() {
    let expected = expected();
    assert!(expected["transformers"].is_string() && expected["made_by"].is_string());
    let cases = expected["renderings"].as_array().unwrap();
    let errors: Vec<&str> = cases.iter().filter_map(|c| c["error"].as_str()).collect();
    for message in [
        "This model only supports single tool-calls at once!",
        "Cannot put tools in the first user message when there's no first user message!",
        "No user query found in messages.",
    ] {
        assert!(errors.contains(&message), "no case raises {message:?}");
    }
    let texts: Vec<&str> = cases.iter().filter_map(|c| c["text"].as_str()).collect();
    for needle in [
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\", \"unit\": \"celsius\"}}",
        "<|begin_of_text|><|start_header_id|>system",
        "{\n    \"type\": \"function\",",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<think>\n4*3 = 12\n</think>\n\n12<|im_end|>",
        "{\"function\": {\"description\": \"Current weather \\ud83c\\udf26 for a city, e.g. \\\"Z\\u00fcrich\\\".\"",
    ] {
        assert!(
            texts.iter().any(|t| t.contains(needle)),
            "no rendering contains {needle:?}"
        );
    }
}
