//! Chat templates: the model's Jinja template rendered with minijinja the way transformers'
//! `apply_chat_template` does (trim_blocks + lstrip_blocks, Python string/dict methods through
//! minijinja-contrib's pycompat, `raise_exception`, `strftime_now`, a `tojson` that writes what
//! Python's `json.dumps` writes, and the variables `messages`, `tools`, `documents`,
//! `add_generation_prompt`, `bos_token`, `eos_token`).
//!
//! A model without a template gets [`FALLBACK_TEMPLATE`], ChatML:
//! `<|im_start|>{role}\n{content}<|im_end|>\n` per message (tool calls as JSON after the content,
//! the tool list as a leading `tools` turn) and `<|im_start|>assistant\n` as generation prompt.
//! ChatML is what most open chat models use, so an adapter trained on it is easy to prompt.

use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, Value};

/// ChatML, used when the model ships no chat template.
pub const FALLBACK_TEMPLATE: &str =
    "{%- if tools %}{{ '<|im_start|>tools\\n' + (tools | tojson) + '<|im_end|>\\n' }}{% endif %}\
{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}\
{%- if message['content'] %}{{ message['content'] }}{% endif %}\
{%- if message['tool_calls'] %}{{ message['tool_calls'] | tojson }}{% endif %}\
{{- '<|im_end|>\\n' }}{% endfor %}\
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Errors of a chat template.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TemplateError {
    /// The template does not compile (minijinja's message, with the line).
    #[error("{0}")]
    Syntax(String),
    /// Rendering failed: the template called `raise_exception` or hit an undefined value or a type
    /// error; holds the message.
    #[error("{0}")]
    Render(String),
}

/// A compiled chat template plus the special-token strings it may use.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    is_fallback: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("is_fallback", &self.is_fallback)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

const NAME: &str = "chat";

/// Instructions one rendering may run: real chat templates take thousands for a long
/// conversation; a template that loops (or recurses) without end is stopped here, in about a
/// second, with an error instead of hanging the app.
const FUEL: u64 = 20_000_000;

impl ChatTemplate {
    /// Compiles `source`. `{% generation %}` markers (transformers' assistant-mask extension) are
    /// removed first: FineTune finds assistant turns by rendering prefixes instead.
    pub fn new(
        source: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(FUEL));
        super::template_limits::install(&mut env);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, strip_generation_tags(source))
            .map_err(|e| TemplateError::Syntax(describe(&e)))?;
        Ok(Self {
            env,
            bos_token: bos_token.unwrap_or_default().to_owned(),
            eos_token: eos_token.unwrap_or_default().to_owned(),
            is_fallback: false,
        })
    }

    /// The ChatML fallback for models without a template.
    pub fn fallback(
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self, TemplateError> {
        let mut t = Self::new(FALLBACK_TEMPLATE, bos_token, eos_token)?;
        t.is_fallback = true;
        Ok(t)
    }

    /// Whether this is the ChatML fallback rather than the model's own template.
    pub fn is_fallback(&self) -> bool {
        self.is_fallback
    }

    /// Renders `messages` (JSON objects with at least `role`; passed through untouched so templates
    /// see `tool_calls`, `name`, ...). `tools` is `None` → the template sees `none`, as in
    /// transformers.
    pub fn render(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        self.render_with(
            messages,
            tools,
            add_generation_prompt,
            &serde_json::Map::new(),
        )
    }

    /// As [`ChatTemplate::render`], with more variables for the template (`apply_chat_template`'s
    /// extra keyword arguments, e.g. Qwen3's `enable_thinking`).
    pub fn render_with(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| TemplateError::Syntax(describe(&e)))?;
        let ctx = minijinja::context! {
            messages => Value::from_serialize(messages),
            tools => tools.map(Value::from_serialize).unwrap_or(Value::from(())),
            documents => Value::from(()),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
            ..Value::from_serialize(extra)
        };
        super::template_limits::start_render();
        template
            .render(ctx)
            .map_err(|e| TemplateError::Render(describe(&e)))
    }
}

/// minijinja's message with the template line when it has one.
fn describe(e: &Error) -> String {
    let what = match (e.kind(), e.detail()) {
        (ErrorKind::OutOfFuel, _) => format!(
            "the chat template ran more than {FUEL} steps without finishing (does it loop forever?); fix the template or pick another model's"
        ),
        (ErrorKind::InvalidOperation, Some(detail)) if detail.contains("recursion") => format!(
            "the chat template recursed too deeply ({detail}); fix the template or pick another model's"
        ),
        (ErrorKind::InvalidOperation, Some(detail)) => detail.to_owned(),
        _ => e.to_string(),
    };
    match e.line() {
        Some(line) => format!("{what}, template line {line}"),
        None => what,
    }
}

/// `tojson` as transformers defines it: Python's `json.dumps(ensure_ascii=False)`, i.e. `", "` and
/// `": "` separators, `indent` (spaces or a string) with `","` line ends, no HTML escaping, and
/// the keyword arguments `sort_keys` and `ensure_ascii` (`\uXXXX`, surrogate pairs above U+FFFF).
/// minijinja's own filter writes compact, HTML-escaped JSON, so tool schemas and tool-call
/// arguments would train in a form the model never meets at inference. Keys keep their insertion
/// order (serde_json's and minijinja's `preserve_order`), as Python's dicts do, unless `sort_keys`.
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    super::template_limits::check_items(value)?;
    let indent = match indent.or(kwargs.get::<Option<Value>>("indent")?) {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match (v.as_usize(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(super::template_limits::width(n)?)),
            (None, Some(s)) => Some(s.to_owned()),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson indent must be a number or a string",
                ))
            }
        },
    };
    let default_item = if indent.is_some() { "," } else { ", " };
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let (item, key) = match separators.as_deref() {
        None => (default_item.to_owned(), ": ".to_owned()),
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson separators must be two strings",
            ))
        }
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let style = JsonStyle {
        indent: indent.as_deref(),
        item: &item,
        key: &key,
        sort_keys,
        ensure_ascii,
    };
    let mut out = String::new();
    write_py_json(&json, &style, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

/// Layout of Python's `json.dumps`.
struct JsonStyle<'a> {
    indent: Option<&'a str>,
    item: &'a str,
    key: &'a str,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn write_py_json(v: &serde_json::Value, style: &JsonStyle<'_>, level: usize, out: &mut String) {
    let newline = |out: &mut String, level: usize| {
        if let Some(unit) = style.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(unit);
            }
        }
    };
    let separator = style.item;
    match v {
        serde_json::Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(separator);
                }
                newline(out, level + 1);
                write_py_json(item, style, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        serde_json::Value::Object(map) if !map.is_empty() => {
            out.push('{');
            let mut entries: Vec<(&String, &serde_json::Value)> = map.iter().collect();
            if style.sort_keys {
                // Python compares str keys by code point, as Rust's str ordering does.
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(separator);
                }
                newline(out, level + 1);
                write_py_string(key, style.ensure_ascii, out);
                out.push_str(style.key);
                write_py_json(item, style, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
        serde_json::Value::String(s) => write_py_string(s, style.ensure_ascii, out),
        other => out.push_str(&other.to_string()),
    }
}

fn write_py_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            // Python's ensure_ascii escapes everything outside ' '..='~', DEL included.
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the current UTC date/time, as templates such as Llama 3.1's use for
/// "Today Date". Supports %Y %y %m %d %e %H %I %M %S %p %j %B %b %h %A %a %%; other directives are
/// kept as written.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    strftime(&format, secs)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];

/// Formats `unix_secs` (UTC) with a subset of C's strftime.
pub(crate) fn strftime(format: &str, unix_secs: u64) -> String {
    let days = unix_secs / 86_400;
    let rem = unix_secs % 86_400;
    let (hour, minute, second) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let (year, month, day) = civil_from_days(days);
    let weekday = ((days + 4) % 7) as usize; // 1970-01-01 was a Thursday
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let month_name = MONTHS[(month - 1) as usize];
    let weekday_name = WEEKDAYS[weekday];
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('H') => out.push_str(&format!("{hour:02}")),
            Some('I') => out.push_str(&format!("{hour12:02}")),
            Some('M') => out.push_str(&format!("{minute:02}")),
            Some('S') => out.push_str(&format!("{second:02}")),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('j') => out.push_str(&format!("{day_of_year:03}")),
            Some('B') => out.push_str(month_name),
            Some('b') | Some('h') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(weekday_name),
            Some('a') => out.push_str(&weekday_name[..3]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 → (year, month 1-12, day 1-31), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// (year ≥ 1970, month, day) → days since 1970-01-01.
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe).saturating_sub(719_468)
}

/// Removes `{% generation %}` / `{% endgeneration %}` tags (any whitespace-control form).
fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        // The closing `%}` after the opening `{%` (in `{%}` they overlap; found by fuzzing).
        let Some(len) = rest[start + 2..].find("%}").map(|end| end + 4) else {
            break;
        };
        let tag = &rest[start..start + len];
        let inner =
            tag[2..len - 2].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..start]);
        if inner != "generation" && inner != "endgeneration" {
            out.push_str(tag);
        }
        rest = &rest[start + len..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pycompat_methods_and_specials() {
        let src = "{{ bos_token }}{% for m in messages %}{{ m['content'].strip().upper() }}\
                   {% if m.content.startswith(' hi') %}!{% endif %}{% endfor %}{{ eos_token }}";
        let t = ChatTemplate::new(src, Some("<s>"), Some("</s>")).unwrap();
        let out = t
            .render(
                &[json!({"role": "user", "content": " hi there "})],
                None,
                false,
            )
            .unwrap();
        assert_eq!(out, "<s>HI THERE!</s>");
    }

    #[test]
    fn raise_exception_becomes_a_render_error() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        let err = t
            .render(&[json!({"role": "assistant", "content": "x"})], None, false)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("Conversation must start with user"),
            "{err}"
        );
    }

    #[test]
    fn tools_are_none_unless_given() {
        let src =
            "{% if tools is not none %}{{ tools | length }} tools{% else %}no tools{% endif %}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        assert_eq!(t.render(&[], None, false).unwrap(), "no tools");
        let tools = json!([{"type": "function"}]);
        assert_eq!(t.render(&[], Some(&tools), false).unwrap(), "1 tools");
    }

    #[test]
    fn fallback_is_chatml() {
        let t = ChatTemplate::fallback(None, Some("</s>")).unwrap();
        let msgs = [
            json!({"role": "user", "content": "Hi"}),
            json!({"role": "assistant", "content": "Yo"}),
        ];
        assert_eq!(
            t.render(&msgs, None, false).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
        );
        assert_eq!(
            t.render(&msgs[..1], None, true).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(t.is_fallback());
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = ChatTemplate::new(
            "{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=2) }}|{{ messages[1] | tojson }}|{{ messages[2] | tojson(separators=(',', ':')) }}",
            None,
            None,
        )
        .unwrap();
        let v =
            json!({"a": [1, 2.5, "x<y\n\"é\u{1}"], "b": {}, "c": [], "d": {"e": null, "f": true}});
        let out = t
            .render(&[v, json!("plain"), json!({"k": [1, 2]})], None, false)
            .unwrap();
        // Both expected strings are Python's json.dumps(v, ensure_ascii=False[, indent=2]).
        let compact =
            r#"{"a": [1, 2.5, "x<y\n\"é\u0001"], "b": {}, "c": [], "d": {"e": null, "f": true}}"#;
        let indented = "{\n  \"a\": [\n    1,\n    2.5,\n    \"x<y\\n\\\"é\\u0001\"\n  ],\n  \"b\": {},\n  \"c\": [],\n  \"d\": {\n    \"e\": null,\n    \"f\": true\n  }\n}";
        assert_eq!(
            out,
            format!("{compact}|{indented}|\"plain\"|{{\"k\":[1,2]}}")
        );
    }

    #[test]
    fn tojson_sort_keys_and_ensure_ascii_match_python() {
        let t = ChatTemplate::new(
            "{{ messages[0] | tojson(sort_keys=True, ensure_ascii=True) }}|{{ messages[0] | tojson }}",
            None,
            None,
        )
        .unwrap();
        let v = json!({"b": 1, "a": {"z": "é🌦\u{7f}~", "y": [true, null]}});
        let out = t.render(&[v], None, false).unwrap();
        // Python's json.dumps(v, sort_keys=True, ensure_ascii=True) and json.dumps(v, ensure_ascii=False).
        let sorted_ascii =
            r#"{"a": {"y": [true, null], "z": "\u00e9\ud83c\udf26\u007f~"}, "b": 1}"#;
        let plain = "{\"b\": 1, \"a\": {\"z\": \"é🌦\u{7f}~\", \"y\": [true, null]}}";
        assert_eq!(out, format!("{sorted_ascii}|{plain}"));
    }

    #[test]
    fn templates_that_never_finish_are_stopped_with_an_error() {
        // Issue 20: a loop of 10^10 steps and unbounded recursion end in an error, not a hang.
        let looping =
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
        let recursing = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}";
        for (src, says) in [(looping, "loop forever"), (recursing, "recursed")] {
            let t = ChatTemplate::new(src, None, None).unwrap();
            let started = std::time::Instant::now();
            let err = t.render(&[json!({"role": "user", "content": "hi"})], None, false);
            let Err(TemplateError::Render(msg)) = err else {
                panic!("{src}: {err:?}")
            };
            assert!(msg.contains(says), "{msg}");
            assert!(
                started.elapsed().as_secs() < 30,
                "{src} ran {:?}",
                started.elapsed()
            );
        }
    }

    #[test]
    fn syntax_errors_are_reported() {
        let err = ChatTemplate::new("{% for m in messages %}", None, None).unwrap_err();
        assert!(matches!(err, TemplateError::Syntax(_)));
    }

    #[test]
    fn generation_tags_are_ignored() {
        let src = "{% for m in messages %}{%- generation -%}{{ m.content }}{% endgeneration %}{% endfor %}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        let out = t
            .render(
                &[json!({"role": "assistant", "content": "ok"})],
                None,
                false,
            )
            .unwrap();
        assert_eq!(out, "ok");
    }

    #[test]
    fn strftime_known_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(strftime("%d %b %Y", t), "29 Feb 2024");
        assert_eq!(
            strftime("%A %B %e, %H:%M:%S %p %j %y %%", t),
            "Thursday February 29, 13:05:09 PM 060 24 %"
        );
        assert_eq!(strftime("%Y-%m-%d %a", 0), "1970-01-01 Thu");
        let now = strftime_now("%Y".into());
        assert!(now.parse::<u32>().unwrap() >= 2024);
    }
}
