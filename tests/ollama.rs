//! The Ollama export's Modelfile TEMPLATE renders conversations as the model's chat template does.
//! The reference is transformers' `apply_chat_template` (tests/fixtures/templates/expected.json,
//! made by tools/make_template_fixtures.py) for every template folder there: ChatML (the fixture
//! models), Qwen2.5, Llama 3.1, Qwen3, Mistral, Gemma, Phi-3 and SmolLM2 styles. The cases are
//! those Ollama can express: conversations of system/user/assistant messages that end with the
//! user, rendered with the generation prompt.
//!
//! `go_templates_render_like_transformers` runs the TEMPLATE with Go's own text/template as
//! Ollama executes it (tools/ollama_template/main.go: missingkey=zero, Ollama's message
//! collation); it needs `go` on PATH (.ci/run installs golang-go) and is `#[ignore]`d in plain
//! `cargo test`. The other tests check FineTune's Rust twin of the template and the stop tokens.
// Tests panic on purpose: unwrap/expect are how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use common::fixture;
use finetune::data::{ChatTemplate, ModelTokenizer};
use finetune::export::ollama::{disagreements, stop_tokens, TurnFormat};
use serde_json::{json, Value};

/// Folders whose template must have an exact Ollama form.
const FAMILIES: [&str; 12] = [
    "tiny-llama",
    "tiny-qwen2",
    "tiny-gpt2",
    "tiny-qwen3",
    "templates/qwen2.5-style",
    "templates/llama3.1-style",
    "templates/qwen3-style",
    "templates/mistral-style",
    "templates/gemma-style",
    "templates/phi3-style",
    "templates/smollm2-style",
    "templates/tojson-options",
];

fn template(dir: &Path) -> ChatTemplate {
    let tok = ModelTokenizer::from_dir(dir).unwrap();
    ChatTemplate::new(
        tok.chat_template.as_deref().unwrap(),
        tok.bos_token.as_deref(),
        tok.eos_token.as_deref(),
    )
    .unwrap()
}

struct Case {
    folder: String,
    messages: Vec<(String, String)>,
    want: String,
}

/// The expected renderings Ollama can express, by folder.
fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixture("templates/expected.json")).unwrap();
    let expected: Value = serde_json::from_str(&text).unwrap();
    let conversations = &expected["conversations"];
    let mut out = Vec::new();
    for r in expected["renderings"].as_array().unwrap() {
        let conv = &conversations[r["conversation"].as_str().unwrap()];
        let msgs = conv["messages"].as_array().unwrap();
        let plain = conv.get("tools").is_none_or(Value::is_null)
            && msgs.iter().all(|m| {
                m.get("tool_calls").is_none()
                    && ["system", "user", "assistant"].contains(&m["role"].as_str().unwrap())
            });
        let ends_with_user = msgs.last().unwrap()["role"] == "user";
        let Some(want) = r["text"].as_str() else {
            continue;
        };
        if plain && ends_with_user && r["add_generation_prompt"] == true {
            out.push(Case {
                folder: r["template"].as_str().unwrap().to_owned(),
                messages: msgs
                    .iter()
                    .map(|m| {
                        (
                            m["role"].as_str().unwrap().to_owned(),
                            m["content"].as_str().unwrap().to_owned(),
                        )
                    })
                    .collect(),
                want: want.to_owned(),
            });
        }
    }
    out
}

fn format_of(folder: &str) -> TurnFormat {
    let t = template(&fixture(folder));
    let f = TurnFormat::probe(&t, None).unwrap();
    assert!(
        disagreements(&f, &t, None).is_empty(),
        "{folder}: {:?}",
        disagreements(&f, &t, None)
    );
    f
}

#[test]
fn every_family_has_an_exact_turn_format() {
    let all = cases();
    for folder in FAMILIES {
        let f = format_of(folder);
        let mine: Vec<&Case> = all.iter().filter(|c| c.folder == folder).collect();
        assert!(mine.len() >= 3, "{folder}: only {} cases", mine.len());
        for c in mine {
            assert_eq!(f.render(&c.messages), c.want, "{folder}: {:?}", c.messages);
        }
    }
}

#[test]
fn stop_tokens_end_each_familys_turn() {
    let control: Vec<String> = [
        "<|im_start|>",
        "<|im_end|>",
        "<|begin_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<s>",
        "</s>",
        "<bos>",
        "<start_of_turn>",
        "<end_of_turn>",
        "<|user|>",
        "<|assistant|>",
        "<|end|>",
    ]
    .map(String::from)
    .to_vec();
    for (folder, eos, first_stop) in [
        ("templates/qwen2.5-style", "<|im_end|>", "<|im_end|>"),
        ("templates/llama3.1-style", "<|eot_id|>", "<|eot_id|>"),
        ("templates/mistral-style", "</s>", "</s>"),
        ("templates/gemma-style", "<eos>", "<end_of_turn>"),
        ("templates/phi3-style", "<|endoftext|>", "<|end|>"),
        ("templates/smollm2-style", "<|im_end|>", "<|im_end|>"),
    ] {
        let stops = stop_tokens(&format_of(folder), &control, Some(eos));
        assert_eq!(
            stops.first().map(String::as_str),
            Some(first_stop),
            "{folder}: {stops:?}"
        );
        assert!(stops.iter().any(|s| s == eos), "{folder}: {stops:?}");
        assert!(
            !stops.iter().any(|s| s == "<s>" || s == "<bos>"),
            "{folder}: {stops:?}"
        );
    }
}

#[test]
fn bos_added_by_llama_cpp_is_left_out() {
    let t = template(&fixture("templates/llama3.1-style"));
    let f = TurnFormat::probe(&t, Some("<|begin_of_text|>")).unwrap();
    assert!(
        f.start_user.starts_with("<|start_header_id|>system"),
        "{:?}",
        f.start_user
    );
    assert!(disagreements(&f, &t, Some("<|begin_of_text|>")).is_empty());
}

#[test]
#[ignore = "needs Go (go on PATH); .ci/run runs it"]
fn go_templates_render_like_transformers() {
    let all = cases();
    let mut input = Vec::new();
    for c in &all {
        let f = format_of(&c.folder);
        input.push(json!({
            "template": f.go_template(),
            "messages": c.messages.iter().map(|(r, t)| json!({"role": r, "content": t})).collect::<Vec<_>>(),
        }));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut child = Command::new("go")
        .args(["run", "tools/ollama_template/main.go"])
        .current_dir(root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("go on PATH");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&input).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let got: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got.len(), all.len());
    let mut families = std::collections::BTreeSet::new();
    for (c, g) in all.iter().zip(&got) {
        assert_eq!(
            g["text"].as_str(),
            Some(c.want.as_str()),
            "{}: {:?} → {g}",
            c.folder,
            c.messages
        );
        families.insert(c.folder.clone());
    }
    assert_eq!(families.len(), FAMILIES.len());
    eprintln!(
        "{} renderings of {} templates equal transformers'",
        all.len(),
        families.len()
    );
}
