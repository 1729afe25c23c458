#![cfg(test)]
// Tests panic on purpose: unwrap/expect are how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Tests of `data::format`.

use super::*;
use serde_json::json;

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => unreachable!("test objects are objects"),
    }
}

#[test]
fn detects_each_format() {
    let cases = [
        (json!({"text": "a"}), Some(Format::Text)),
        (
            json!({"prompt": "a", "completion": "b"}),
            Some(Format::PromptCompletion),
        ),
        (json!({"messages": []}), Some(Format::Messages)),
        (
            json!({"instruction": "a", "input": "", "output": "b"}),
            Some(Format::Alpaca),
        ),
        (json!({"conversations": []}), Some(Format::ShareGpt)),
        (json!({"prompt": "a"}), None),
        (json!({"question": "a"}), None),
    ];
    for (record, want) in cases {
        assert_eq!(Format::detect(&obj(record.clone())), want, "{record}");
    }
}

#[test]
fn message_problems() {
    let parse = |v: Value| ChatRecord::parse(&obj(v)).unwrap_err();
    assert_eq!(
        parse(json!({"messages": [{"role": "bot", "content": "x"}]})),
        Problem::UnknownRole {
            role: "bot".into(),
            key: "messages[0].role".into(),
            allowed: ROLES_TEXT
        }
    );
    assert_eq!(
        parse(json!({"messages": [{"role": "user", "content": 3}]})),
        Problem::WrongType {
            key: "messages[0].content".into(),
            expected: "a string",
            found: "a number"
        }
    );
    assert_eq!(
        parse(
            json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]})
        ),
        Problem::EmptyText {
            key: "messages[1].content".into()
        }
    );
    assert!(matches!(
        parse(json!({"messages": "hi"})),
        Problem::WrongType { .. }
    ));
    assert!(matches!(
        parse(json!({"messages": [{"content": "x"}]})),
        Problem::MissingField { .. }
    ));
    assert!(matches!(
        parse(json!({"messages": [{"role": "user", "content": "x"}], "tools": {}})),
        Problem::WrongType { .. }
    ));
    // Tool-call turns may have null content.
    let ok = ChatRecord::parse(&obj(json!({"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": null, "tool_calls": [{"type": "function"}]}
    ]})));
    assert!(ok.is_ok());
}

#[test]
fn sharegpt_maps_roles() {
    let r = ShareGptRecord::parse(&obj(json!({"conversations": [
        {"from": "system", "value": "S"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}
    ]})))
    .unwrap();
    let messages = r.to_messages();
    let roles: Vec<&str> = messages
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, vec!["system", "user", "assistant"]);
    let err = ShareGptRecord::parse(&obj(
        json!({"conversations": [{"from": "bard", "value": "x"}]}),
    ))
    .unwrap_err();
    assert!(matches!(err, Problem::UnknownRole { ref role, .. } if role == "bard"));
    let err = ShareGptRecord::parse(&obj(json!({"conversations": [{"from": "gpt"}]}))).unwrap_err();
    assert_eq!(
        err,
        Problem::MissingField {
            key: "conversations[0].value".into(),
            hint: "see README#datasets for the keys of each format"
        }
    );
}

#[test]
fn alpaca_joins_instruction_and_input() {
    let r = AlpacaRecord::parse(&obj(
        json!({"instruction": "Translate", "input": "hola", "output": "hello"}),
    ))
    .unwrap();
    let m = r.to_messages();
    assert_eq!(m[0]["content"], "Translate\n\nhola");
    assert_eq!(m[1]["content"], "hello");
    let r = AlpacaRecord::parse(&obj(
        json!({"instruction": "Say hi", "output": "hi", "system": "Be brief"}),
    ))
    .unwrap();
    assert_eq!(r.to_messages().len(), 3);
    assert_eq!(r.to_messages()[1]["content"], "Say hi");
}

#[test]
fn text_and_completion_problems() {
    assert_eq!(
        TextRecord::parse(&obj(json!({"text": "  "}))).unwrap_err(),
        Problem::EmptyText { key: "text".into() }
    );
    assert!(matches!(
        CompletionRecord::parse(&obj(json!({"prompt": 1, "completion": "x"}))).unwrap_err(),
        Problem::WrongType {
            found: "a number",
            ..
        }
    ));
    // An empty prompt is allowed (unconditional generation); an empty completion is not.
    assert!(CompletionRecord::parse(&obj(json!({"prompt": "", "completion": "x"}))).is_ok());
    assert!(CompletionRecord::parse(&obj(json!({"prompt": "p", "completion": ""}))).is_err());
}
