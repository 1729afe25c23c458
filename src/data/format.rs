//! Dataset formats, one small type each (after mlx-lm's `tuner/datasets.py`): parsed and checked
//! from a JSON object, then turned into tokens and a loss mask by `encode`. The format of a file is
//! detected from the keys of its first record; every later record must have the same format.
//!
//! | format              | keys                                                  | rendered as |
//! |---------------------|-------------------------------------------------------|-------------|
//! | `text`              | `text`                                                | the text + EOS, all trained |
//! | `prompt/completion` | `prompt`, `completion`, optional `tools`              | see `PromptCompletionStyle` |
//! | `messages`          | `messages` [{`role`, `content`, ...}], optional `tools` | chat template |
//! | `alpaca`            | `instruction`, optional `input`, `output`, optional `system` | chat: user = instruction + "\n\n" + input, assistant = output |
//! | `sharegpt`          | `conversations` [{`from`, `value`}], optional `system` | chat: human→user, gpt→assistant, system→system |

use serde_json::{Map, Value};

use super::encode::{Encoder, Sample};
use super::error::{json_kind, Problem};

/// Roles a `messages` record may use.
pub const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];
const ROLES_TEXT: &str = "\"system\", \"developer\", \"user\", \"assistant\", \"tool\"";
const SHAREGPT_FROM_TEXT: &str =
    "\"system\", \"human\", \"user\", \"gpt\", \"assistant\", \"tool\" (ShareGPT \"from\")";

/// A dataset format, detected from the keys of the first record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// `{"text": ...}`: plain text, every token trained.
    Text,
    /// `{"prompt", "completion"}`: trained on the completion when masking.
    PromptCompletion,
    /// `{"messages": [{"role", "content"}, ...]}`: a chat, trained on assistant turns when masking.
    Messages,
    /// Alpaca `{"instruction", "input", "output"}`: a two-turn chat.
    Alpaca,
    /// ShareGPT `{"conversations": [{"from", "value"}, ...]}`: a chat.
    ShareGpt,
}

impl Format {
    /// The format of a record by its keys, or `None` when it matches none.
    pub fn detect(object: &Map<String, Value>) -> Option<Format> {
        let has = |k: &str| object.contains_key(k);
        if has("messages") {
            Some(Format::Messages)
        } else if has("conversations") {
            Some(Format::ShareGpt)
        } else if has("instruction") && has("output") {
            Some(Format::Alpaca)
        } else if has("prompt") && has("completion") {
            Some(Format::PromptCompletion)
        } else if has("text") {
            Some(Format::Text)
        } else {
            None
        }
    }

    /// What a record of this format must have, for error messages.
    pub fn expected_keys(self) -> &'static str {
        match self {
            Format::Text => "a \"text\" string",
            Format::PromptCompletion => "\"prompt\"/\"completion\" keys",
            Format::Messages => "a \"messages\" array",
            Format::Alpaca => "\"instruction\"/\"output\" keys",
            Format::ShareGpt => "a \"conversations\" array",
        }
    }

    /// Whether records are conversations rendered with a chat template.
    pub fn is_chat(self) -> bool {
        matches!(self, Format::Messages | Format::Alpaca | Format::ShareGpt)
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Text => "text",
            Format::PromptCompletion => "prompt/completion",
            Format::Messages => "messages",
            Format::Alpaca => "alpaca",
            Format::ShareGpt => "sharegpt",
        })
    }
}

/// `{"text": "..."}`: trained on every token.
#[derive(Debug, Clone, PartialEq)]
pub struct TextRecord {
    /// The text, not empty.
    pub text: String,
}

/// `{"prompt": "...", "completion": "..."}`: trained on the completion when masking.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRecord {
    /// The prompt, as written (may be empty).
    pub prompt: String,
    /// The completion, not empty.
    pub completion: String,
    /// Tool definitions (`tools`, JSON as written) for the chat template, if any.
    pub tools: Option<Value>,
}

/// `{"messages": [...]}`: trained on assistant turns when masking. Messages are kept as JSON so the
/// template sees every field (`tool_calls`, `name`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRecord {
    /// The messages as written, each an object with a known `role`.
    pub messages: Vec<Value>,
    /// Tool definitions (`tools`, JSON as written) for the chat template, if any.
    pub tools: Option<Value>,
}

/// Alpaca `{"instruction", "input", "output"}`, rendered as a two-turn chat.
#[derive(Debug, Clone, PartialEq)]
pub struct AlpacaRecord {
    /// The optional system prompt (`system`), a leading system turn.
    pub system: Option<String>,
    /// The instruction, not empty.
    pub instruction: String,
    /// The input, appended to the instruction after a blank line; empty when absent or null.
    pub input: String,
    /// The answer, the assistant turn; not empty.
    pub output: String,
}

/// ShareGPT `{"conversations": [{"from", "value"}]}`, rendered as a chat.
#[derive(Debug, Clone, PartialEq)]
pub struct ShareGptRecord {
    /// The optional system prompt (`system`), a leading system turn.
    pub system: Option<String>,
    /// (role after mapping, text)
    pub turns: Vec<(&'static str, String)>,
}

/// A parsed record of any format.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A `text` record.
    Text(TextRecord),
    /// A `prompt`/`completion` record.
    Completion(CompletionRecord),
    /// A `messages` record.
    Chat(ChatRecord),
    /// An Alpaca record.
    Alpaca(AlpacaRecord),
    /// A ShareGPT record.
    ShareGpt(ShareGptRecord),
}

impl Record {
    /// Parses and checks `object` as `format`.
    pub fn parse(format: Format, object: &Map<String, Value>) -> Result<Record, Problem> {
        Ok(match format {
            Format::Text => Record::Text(TextRecord::parse(object)?),
            Format::PromptCompletion => Record::Completion(CompletionRecord::parse(object)?),
            Format::Messages => Record::Chat(ChatRecord::parse(object)?),
            Format::Alpaca => Record::Alpaca(AlpacaRecord::parse(object)?),
            Format::ShareGpt => Record::ShareGpt(ShareGptRecord::parse(object)?),
        })
    }

    /// Tokens and loss mask of this record; `line` is its 1-based line in the file.
    pub fn encode(&self, enc: &Encoder<'_>, line: usize) -> Result<Sample, Problem> {
        match self {
            Record::Text(r) => r.encode(enc, line),
            Record::Completion(r) => r.encode(enc, line),
            Record::Chat(r) => r.encode(enc, line),
            Record::Alpaca(r) => r.encode(enc, line),
            Record::ShareGpt(r) => r.encode(enc, line),
        }
    }
}

impl TextRecord {
    /// Parses and checks `object` as this format; a problem names the key (with its path inside the
    /// record).
    pub fn parse(object: &Map<String, Value>) -> Result<Self, Problem> {
        Ok(Self {
            text: non_empty_string(object, "text")?,
        })
    }

    /// Tokens and loss mask of this record; `line` is its 1-based line in the file.
    pub fn encode(&self, enc: &Encoder<'_>, line: usize) -> Result<Sample, Problem> {
        enc.text(&self.text, line)
    }
}

impl CompletionRecord {
    /// Parses and checks `object` as this format; a problem names the key (with its path inside the
    /// record).
    pub fn parse(object: &Map<String, Value>) -> Result<Self, Problem> {
        Ok(Self {
            prompt: string(object, "prompt")?,
            completion: non_empty_string(object, "completion")?,
            tools: tools(object)?,
        })
    }

    /// Tokens and loss mask of this record; `line` is its 1-based line in the file.
    pub fn encode(&self, enc: &Encoder<'_>, line: usize) -> Result<Sample, Problem> {
        if enc.prompt_completion_as_chat() {
            let messages = [
                serde_json::json!({"role": "user", "content": self.prompt}),
                serde_json::json!({"role": "assistant", "content": self.completion}),
            ];
            enc.chat(&messages, self.tools.as_ref(), line)
        } else {
            enc.plain_pair(&self.prompt, &self.completion, line)
        }
    }
}

impl ChatRecord {
    /// Parses and checks `object` as this format; a problem names the key (with its path inside the
    /// record).
    pub fn parse(object: &Map<String, Value>) -> Result<Self, Problem> {
        let list = array(object, "messages")?;
        let mut messages = Vec::with_capacity(list.len());
        for (i, message) in list.iter().enumerate() {
            let key = format!("messages[{i}]");
            let Value::Object(m) = message else {
                return Err(Problem::WrongType {
                    key,
                    expected: "an object with \"role\" and \"content\"",
                    found: json_kind(message),
                });
            };
            let role = match m.get("role") {
                None => {
                    return Err(Problem::MissingField {
                        key: format!("{key}.role"),
                        hint: "every message needs a \"role\" and a \"content\"",
                    })
                }
                Some(Value::String(r)) => r.as_str(),
                Some(other) => {
                    return Err(Problem::WrongType {
                        key: format!("{key}.role"),
                        expected: "a string",
                        found: json_kind(other),
                    })
                }
            };
            if !ROLES.contains(&role) {
                return Err(Problem::UnknownRole {
                    role: role.to_owned(),
                    key: format!("{key}.role"),
                    allowed: ROLES_TEXT,
                });
            }
            let has_tool_calls = m.get("tool_calls").is_some_and(|v| !v.is_null());
            let content_key = format!("{key}.content");
            match m.get("content") {
                Some(Value::String(s)) => {
                    if s.trim().is_empty()
                        && (role == "user" || role == "assistant" && !has_tool_calls)
                    {
                        return Err(Problem::EmptyText { key: content_key });
                    }
                }
                // An assistant turn that only calls tools may have no content.
                None | Some(Value::Null) if role == "assistant" && has_tool_calls => {}
                None => {
                    return Err(Problem::MissingField {
                        key: content_key,
                        hint: "every message needs a \"role\" and a \"content\"",
                    })
                }
                Some(other) => {
                    return Err(Problem::WrongType {
                        key: content_key,
                        expected: "a string",
                        found: json_kind(other),
                    })
                }
            }
            messages.push(message.clone());
        }
        Ok(Self {
            messages,
            tools: tools(object)?,
        })
    }

    /// Tokens and loss mask of this record; `line` is its 1-based line in the file.
    pub fn encode(&self, enc: &Encoder<'_>, line: usize) -> Result<Sample, Problem> {
        enc.chat(&self.messages, self.tools.as_ref(), line)
    }
}

impl AlpacaRecord {
    /// Parses and checks `object` as this format; a problem names the key (with its path inside the
    /// record).
    pub fn parse(object: &Map<String, Value>) -> Result<Self, Problem> {
        let input = match object.get("input") {
            None | Some(Value::Null) => String::new(),
            Some(_) => string(object, "input")?,
        };
        Ok(Self {
            system: optional_string(object, "system")?,
            instruction: non_empty_string(object, "instruction")?,
            input,
            output: non_empty_string(object, "output")?,
        })
    }

    /// The two-turn chat this record stands for.
    pub fn to_messages(&self) -> Vec<Value> {
        let mut user = self.instruction.clone();
        if !self.input.trim().is_empty() {
            user.push_str("\n\n");
            user.push_str(&self.input);
        }
        let mut messages = Vec::with_capacity(3);
        if let Some(system) = &self.system {
            messages.push(serde_json::json!({"role": "system", "content": system}));
        }
        messages.push(serde_json::json!({"role": "user", "content": user}));
        messages.push(serde_json::json!({"role": "assistant", "content": self.output}));
        messages
    }

    /// Tokens and loss mask of this record; `line` is its 1-based line in the file.
    pub fn encode(&self, enc: &Encoder<'_>, line: usize) -> Result<Sample, Problem> {
        enc.chat(&self.to_messages(), None, line)
    }
}

impl ShareGptRecord {
    /// Parses and checks `object` as this format; a problem names the key (with its path inside the
    /// record).
    pub fn parse(object: &Map<String, Value>) -> Result<Self, Problem> {
        let list = array(object, "conversations")?;
        let mut turns = Vec::with_capacity(list.len());
        for (i, turn) in list.iter().enumerate() {
            let key = format!("conversations[{i}]");
            let Value::Object(t) = turn else {
                return Err(Problem::WrongType {
                    key,
                    expected: "an object with \"from\" and \"value\"",
                    found: json_kind(turn),
                });
            };
            let from = string(t, "from").map_err(|p| prefix_key(p, &key))?;
            let role = match from.as_str() {
                "human" | "user" => "user",
                "gpt" | "assistant" => "assistant",
                "system" => "system",
                "tool" => "tool",
                _ => {
                    return Err(Problem::UnknownRole {
                        role: from,
                        key: format!("{key}.from"),
                        allowed: SHAREGPT_FROM_TEXT,
                    })
                }
            };
            let value = string(t, "value").map_err(|p| prefix_key(p, &key))?;
            if value.trim().is_empty() && matches!(role, "user" | "assistant") {
                return Err(Problem::EmptyText {
                    key: format!("{key}.value"),
                });
            }
            turns.push((role, value));
        }
        Ok(Self {
            system: optional_string(object, "system")?,
            turns,
        })
    }

    /// The chat this record stands for.
    pub fn to_messages(&self) -> Vec<Value> {
        let system = self
            .system
            .iter()
            .map(|s| serde_json::json!({"role": "system", "content": s}));
        let turns = self
            .turns
            .iter()
            .map(|(role, text)| serde_json::json!({"role": role, "content": text}));
        system.chain(turns).collect()
    }

    /// Tokens and loss mask of this record; `line` is its 1-based line in the file.
    pub fn encode(&self, enc: &Encoder<'_>, line: usize) -> Result<Sample, Problem> {
        enc.chat(&self.to_messages(), None, line)
    }
}

fn prefix_key(problem: Problem, prefix: &str) -> Problem {
    match problem {
        Problem::MissingField { key, hint } => Problem::MissingField {
            key: format!("{prefix}.{key}"),
            hint,
        },
        Problem::WrongType {
            key,
            expected,
            found,
        } => Problem::WrongType {
            key: format!("{prefix}.{key}"),
            expected,
            found,
        },
        other => other,
    }
}

fn string(object: &Map<String, Value>, key: &str) -> Result<String, Problem> {
    match object.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        None => Err(Problem::MissingField {
            key: key.to_owned(),
            hint: "see README#datasets for the keys of each format",
        }),
        Some(other) => Err(Problem::WrongType {
            key: key.to_owned(),
            expected: "a string",
            found: json_kind(other),
        }),
    }
}

fn non_empty_string(object: &Map<String, Value>, key: &str) -> Result<String, Problem> {
    let s = string(object, key)?;
    if s.trim().is_empty() {
        return Err(Problem::EmptyText {
            key: key.to_owned(),
        });
    }
    Ok(s)
}

fn optional_string(object: &Map<String, Value>, key: &str) -> Result<Option<String>, Problem> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => string(object, key).map(Some),
    }
}

fn array<'a>(object: &'a Map<String, Value>, key: &str) -> Result<&'a Vec<Value>, Problem> {
    match object.get(key) {
        Some(Value::Array(list)) if list.is_empty() => Err(Problem::EmptyText {
            key: key.to_owned(),
        }),
        Some(Value::Array(list)) => Ok(list),
        None => Err(Problem::MissingField {
            key: key.to_owned(),
            hint: "see README#datasets for the keys of each format",
        }),
        Some(other) => Err(Problem::WrongType {
            key: key.to_owned(),
            expected: "an array",
            found: json_kind(other),
        }),
    }
}

fn tools(object: &Map<String, Value>) -> Result<Option<Value>, Problem> {
    match object.get("tools") {
        None | Some(Value::Null) => Ok(None),
        Some(list @ Value::Array(_)) => Ok(Some(list.clone())),
        Some(other) => Err(Problem::WrongType {
            key: "tools".into(),
            expected: "an array of tool definitions",
            found: json_kind(other),
        }),
    }
}

#[cfg(test)]
mod tests;
