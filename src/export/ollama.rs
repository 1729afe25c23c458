//! The Ollama export: a folder with the GGUF (merged, or the base plus the adapter as a GGUF LoRA
//! for `ADAPTER`) and a `Modelfile` whose `TEMPLATE` renders conversations as the model's own chat
//! template does, with a `stop` for every end-of-turn token and the system prompt the training
//! data used.
//!
//! The template is derived from the chat template itself rather than from a table of families:
//! rendering probe conversations with the Hugging Face template gives the text before the first
//! system or user message, the joints between system → user, user → assistant and assistant →
//! user, and the generation prompt after the last user message ([`TurnFormat`]). That covers
//! ChatML (Qwen, SmolLM, with or without a default system prompt), Llama 3, Mistral's `[INST]`,
//! Gemma, Phi-3 and any template of the same shape. The result is then checked: more
//! conversations are rendered with both and must agree; when they do not (a template that
//! rewrites messages), the Modelfile still gets the closest plain form and the export a warning.
//!
//! The Go template prints every literal as a quoted string inside an action (`{{ "…" }}`) so Go's
//! whitespace trimming never touches it, and walks `.Messages` as Ollama passes them (consecutive
//! messages of one role merged with a blank line, Ollama's `collate`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{json, Value};

use super::gguf::{export_gguf, GgufQuant};
use crate::data::{ChatTemplate, ModelTokenizer};

/// The pieces of a chat template's rendering around the messages' contents.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TurnFormat {
    /// Before a leading system message's content; `None` when the template has no system role.
    pub start_system: Option<String>,
    /// Before the first user message's content when there is no system message.
    pub start_user: String,
    /// Between the system content and the first user content.
    pub system_user: String,
    /// Between a user content and the assistant content that answers it.
    pub user_assistant: String,
    /// Between an assistant content and the next user content.
    pub assistant_user: String,
    /// After the last user content: the end of the turn and the generation prompt.
    pub generation: String,
}

const S: &str = "FTPROBESYS";
const U1: &str = "FTPROBEUSERA";
const A1: &str = "FTPROBEASSISTANT";
const U2: &str = "FTPROBEUSERB";

fn msg(role: &str, content: &str) -> Value {
    json!({"role": role, "content": content})
}

/// The text between the markers of `text`, which must appear once each, in order: `[before
/// first, between 1st and 2nd, …, after last]`.
fn split_on(text: &str, markers: &[&str]) -> Option<Vec<String>> {
    let mut parts = Vec::new();
    let mut rest = text;
    for m in markers {
        let at = rest.find(m)?;
        parts.push(rest[..at].to_owned());
        rest = &rest[at + m.len()..];
        if rest.contains(m) {
            return None;
        }
    }
    parts.push(rest.to_owned());
    Some(parts)
}

impl TurnFormat {
    /// Probes `template`; `bos` is removed from the start when llama.cpp adds it by itself.
    pub fn probe(template: &ChatTemplate, bos: Option<&str>) -> anyhow::Result<Self> {
        let render = |m: &[Value]| template.render(m, None, true);
        let plain = render(&[msg("user", U1), msg("assistant", A1), msg("user", U2)])
            .map_err(|e| anyhow::anyhow!("the chat template fails on a plain conversation: {e}"))?;
        let p = split_on(&plain, &[U1, A1, U2])
            .context("the chat template does not write each message's text once and in order")?;
        let strip = |s: String| match bos {
            Some(b) if !b.is_empty() => s.strip_prefix(b).map(str::to_owned).unwrap_or(s),
            _ => s,
        };
        let mut f = TurnFormat {
            start_system: None,
            start_user: strip(p[0].clone()),
            system_user: String::new(),
            user_assistant: p[1].clone(),
            assistant_user: p[2].clone(),
            generation: p[3].clone(),
        };
        // A template without a system role raises or leaves the system text out.
        if let Ok(text) = render(&[msg("system", S), msg("user", U1)]) {
            if let Some(q) = split_on(&text, &[S, U1]) {
                f.start_system = Some(strip(q[0].clone()));
                f.system_user = q[1].clone();
            }
        }
        Ok(f)
    }

    /// The conversation as the Modelfile template renders it (Ollama's message list in, the
    /// prompt out). The Rust twin of [`TurnFormat::go_template`].
    pub fn render(&self, messages: &[(String, String)]) -> String {
        let mut out = String::new();
        let mut prev = "";
        for (role, content) in collate(messages) {
            let joint = match (prev, role.as_str()) {
                ("", "system") => self.start_system.as_deref(),
                ("", "user") => Some(self.start_user.as_str()),
                ("system", "user") => Some(self.system_user.as_str()),
                (_, "user") => Some(self.assistant_user.as_str()),
                (_, "assistant") => Some(self.user_assistant.as_str()),
                _ => None,
            };
            if let Some(j) = joint {
                out.push_str(j);
                out.push_str(&content);
                prev = match role.as_str() {
                    "system" => "system",
                    "user" => "user",
                    _ => "assistant",
                };
            }
        }
        if prev == "user" {
            out.push_str(&self.generation);
        }
        out
    }

    /// The template in Go's text/template syntax over Ollama's `.Messages`.
    pub fn go_template(&self) -> String {
        let q = |s: &str| go_string(s);
        let mut t = String::new();
        t.push_str("{{- $prev := \"\" }}\n{{- range .Messages }}\n");
        if let Some(start) = &self.start_system {
            t.push_str(&format!(
                "{{{{- if and (eq .Role \"system\") (eq $prev \"\") }}}}{{{{ {} }}}}{{{{ .Content }}}}{{{{ $prev = \"system\" }}}}\n",
                q(start)
            ));
            t.push_str("{{- else if eq .Role \"user\" }}");
        } else {
            t.push_str("{{- if eq .Role \"user\" }}");
        }
        t.push_str(&format!(
            "{{{{ if eq $prev \"\" }}}}{{{{ {} }}}}{{{{ else if eq $prev \"system\" }}}}{{{{ {} }}}}{{{{ else }}}}{{{{ {} }}}}{{{{ end }}}}{{{{ .Content }}}}{{{{ $prev = \"user\" }}}}\n",
            q(&self.start_user),
            q(&self.system_user),
            q(&self.assistant_user)
        ));
        t.push_str(&format!(
            "{{{{- else if eq .Role \"assistant\" }}}}{{{{ {} }}}}{{{{ .Content }}}}{{{{ $prev = \"assistant\" }}}}\n",
            q(&self.user_assistant)
        ));
        t.push_str("{{- end }}\n{{- end }}\n");
        t.push_str(&format!(
            "{{{{- if eq $prev \"user\" }}}}{{{{ {} }}}}{{{{ end }}}}",
            q(&self.generation)
        ));
        t
    }
}

/// Ollama's `collate`: consecutive messages of one role become one, joined by a blank line.
fn collate(messages: &[(String, String)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (role, content) in messages {
        match out.last_mut() {
            Some((r, c)) if r == role => {
                c.push_str("\n\n");
                c.push_str(content);
            }
            _ => out.push((role.clone(), content.clone())),
        }
    }
    out
}

/// `s` as a Go interpreted string literal.
pub fn go_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Conversations the derived template must render as the chat template does.
fn check_conversations() -> Vec<Vec<(String, String)>> {
    let c = |m: &[(&str, &str)]| -> Vec<(String, String)> {
        m.iter()
            .map(|(r, t)| ((*r).to_owned(), (*t).to_owned()))
            .collect()
    };
    vec![
        c(&[("user", "What is the capital of France?")]),
        c(&[
            ("system", "Answer in one word."),
            ("user", "Capital of Italy?"),
        ]),
        c(&[
            ("user", "Name a prime."),
            ("assistant", "7"),
            ("user", "A bigger one?"),
        ]),
        c(&[
            ("system", "You are terse."),
            ("user", "Hi!"),
            ("assistant", "Hello."),
            ("user", "Count to three."),
            ("assistant", "1, 2, 3."),
            ("user", "Thanks, «merci» 🤖"),
        ]),
    ]
}

/// Where the derived format and the chat template disagree, one line each.
pub fn disagreements(f: &TurnFormat, template: &ChatTemplate, bos: Option<&str>) -> Vec<String> {
    let mut out = Vec::new();
    for conv in check_conversations() {
        let msgs: Vec<Value> = conv.iter().map(|(r, t)| msg(r, t)).collect();
        let Ok(hf) = template.render(&msgs, None, true) else {
            continue;
        };
        let hf = match bos {
            Some(b) if !b.is_empty() => hf.strip_prefix(b).map(str::to_owned).unwrap_or(hf),
            _ => hf,
        };
        let ours = f.render(&conv);
        if ours != hf {
            out.push(format!(
                "for a conversation of {} messages the chat template writes {hf:?} but the Modelfile's template {ours:?}",
                conv.len()
            ));
        }
    }
    out
}

/// The control tokens that end an assistant turn (those written right after its text), with the
/// tokenizer's EOS.
pub fn stop_tokens(f: &TurnFormat, control: &[String], eos: Option<&str>) -> Vec<String> {
    let mut stops: Vec<(usize, String)> = control
        .iter()
        .filter_map(|t| f.assistant_user.find(t.as_str()).map(|at| (at, t.clone())))
        .collect();
    stops.sort();
    let mut out: Vec<String> = stops.into_iter().map(|(_, t)| t).collect();
    if let Some(e) = eos {
        if !out.iter().any(|t| t == e) && !e.is_empty() {
            out.push(e.to_owned());
        }
    }
    out
}

/// The system prompt most records of the JSONL file `data` start with, when more than half do.
pub fn data_system_prompt(data: &Path) -> Option<String> {
    let text = std::fs::read_to_string(data).ok()?;
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut records = 0usize;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        records += 1;
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let first = v["messages"]
            .get(0)
            .filter(|m| m["role"] == "system")
            .and_then(|m| m["content"].as_str())
            .or_else(|| {
                v["conversations"]
                    .get(0)
                    .filter(|m| m["from"] == "system")
                    .and_then(|m| m["value"].as_str())
            });
        if let Some(s) = first {
            *counts.entry(s.to_owned()).or_default() += 1;
        }
    }
    let (best, n) = counts.into_iter().max_by_key(|(_, n)| *n)?;
    (n * 2 > records).then_some(best)
}

/// What to export for Ollama.
pub struct OllamaRequest<'a> {
    /// The adapter folder (PEFT layout).
    pub adapter: &'a Path,
    /// The base model (anything `train` takes).
    pub base: &'a Path,
    /// The destination folder.
    pub dir: &'a Path,
    /// The GGUF's type.
    pub quant: GgufQuant,
    /// The base GGUF plus a GGUF LoRA (`ADAPTER`) instead of one merged GGUF.
    pub separate_adapter: bool,
    /// The training data, for its system prompt.
    pub data: Option<&'a Path>,
}

/// What an Ollama export wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct OllamaExport {
    /// The folder.
    pub dir: PathBuf,
    /// Files written (GGUF, maybe the GGUF LoRA, Modelfile).
    pub files: Vec<PathBuf>,
    /// The model name for `ollama create`.
    pub name: String,
    /// The command that adds and runs it.
    pub command: String,
    /// What the person should know (a template that could not be matched exactly, …).
    pub warnings: Vec<String>,
}

/// The Modelfile's text.
fn modelfile(
    from: &str,
    adapter: Option<&str>,
    f: &TurnFormat,
    stops: &[String],
    system: Option<&str>,
) -> anyhow::Result<String> {
    let template = f.go_template();
    if template.contains("\"\"\"") || system.is_some_and(|s| s.contains("\"\"\"")) {
        anyhow::bail!(
            "the template or system prompt contains \"\"\", which a Modelfile cannot quote"
        );
    }
    let mut m = format!("# Written by FineTune. Add it to Ollama with: ollama create <name> -f Modelfile\nFROM ./{from}\n");
    if let Some(a) = adapter {
        m.push_str(&format!("ADAPTER ./{a}\n"));
    }
    m.push_str(&format!("TEMPLATE \"\"\"{template}\"\"\"\n"));
    for s in stops {
        m.push_str(&format!("PARAMETER stop {}\n", go_string(s)));
    }
    if let Some(s) = system {
        m.push_str(&format!("SYSTEM \"\"\"{s}\"\"\"\n"));
    }
    Ok(m)
}

/// The GGUF files of the folder: (files written, the model's file name, the adapter's).
fn write_ggufs(
    req: &OllamaRequest<'_>,
    stem: &str,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> anyhow::Result<(Vec<PathBuf>, String, Option<String>)> {
    let q = req.quant;
    if req.separate_adapter {
        let base_file = format!("{stem}-{}.gguf", q.name());
        let lora_file = format!("{stem}-lora.gguf");
        let g = export_gguf(None, req.base, &req.dir.join(&base_file), q, progress)?;
        let l =
            super::gguf_lora::export_gguf_lora(req.adapter, req.base, &req.dir.join(&lora_file))?;
        Ok((vec![g.path, l.path], base_file, Some(lora_file)))
    } else {
        let file = format!("{stem}-tuned-{}.gguf", q.name());
        let g = export_gguf(
            Some(req.adapter),
            req.base,
            &req.dir.join(&file),
            q,
            progress,
        )?;
        Ok((vec![g.path], file, None))
    }
}

/// The model's turn format, stop tokens and what to warn about.
fn template_parts(base: &Path) -> anyhow::Result<(TurnFormat, Vec<String>, Vec<String>)> {
    let prepared = crate::model::source::prepare(base)?;
    let tok = ModelTokenizer::from_dir(&prepared.dir)?;
    let bos = tok.bos_token.as_deref();
    let template = match &tok.chat_template {
        Some(t) => ChatTemplate::new(t, bos, tok.eos_token.as_deref()),
        None => ChatTemplate::fallback(bos, tok.eos_token.as_deref()),
    }
    .map_err(|e| anyhow::anyhow!("the model's chat template: {e}"))?;
    let vocab = super::gguf_vocab::read(&prepared.dir, prepared.config.vocab_size)?;
    let added_bos = vocab.added_bos.as_deref();
    let mut warnings = Vec::new();
    let format = TurnFormat::probe(&template, added_bos)?;
    if format.start_system.is_none() {
        warnings.push(
            "the chat template has no system role: Ollama's system prompts are left out".into(),
        );
    }
    for d in disagreements(&format, &template, added_bos) {
        warnings.push(format!(
            "the Modelfile TEMPLATE is the closest plain form of the chat template: {d}"
        ));
    }
    let stops = stop_tokens(&format, &vocab.control, tok.eos_token.as_deref());
    Ok((format, stops, warnings))
}

/// Writes the Ollama folder for `req`.
pub fn export_ollama(
    req: &OllamaRequest<'_>,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> anyhow::Result<OllamaExport> {
    std::fs::create_dir_all(req.dir).with_context(|| format!("creating {}", req.dir.display()))?;
    let stem = super::file_stem_of(req.base);
    let (format, stops, warnings) = template_parts(req.base)?;
    let (mut files, model_file, adapter_file) = write_ggufs(req, &stem, progress)?;
    let system = req.data.and_then(data_system_prompt);
    let text = modelfile(
        &model_file,
        adapter_file.as_deref(),
        &format,
        &stops,
        system.as_deref(),
    )?;
    let path = req.dir.join("Modelfile");
    crate::model::adapter::write_atomic(&path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    files.push(path);
    // Ollama's names: lowercase letters, digits, `-`, `_`, `.`.
    let name = super::file_safe(&stem.to_lowercase()).replace(|c: char| !c.is_ascii(), "-");
    let name = format!("{name}-tuned");
    let command = format!(
        "cd {} && ollama create {name} -f Modelfile && ollama run {name}",
        shell_quote(&req.dir.display().to_string())
    );
    Ok(OllamaExport {
        dir: req.dir.to_path_buf(),
        files,
        name,
        command,
        warnings,
    })
}

fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-~".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chatml() -> ChatTemplate {
        ChatTemplate::fallback(None, Some("<|im_end|>")).unwrap()
    }

    #[test]
    fn chatml_turns() {
        let f = TurnFormat::probe(&chatml(), None).unwrap();
        assert_eq!(f.start_user, "<|im_start|>user\n");
        assert_eq!(f.start_system.as_deref(), Some("<|im_start|>system\n"));
        assert_eq!(f.system_user, "<|im_end|>\n<|im_start|>user\n");
        assert_eq!(f.user_assistant, "<|im_end|>\n<|im_start|>assistant\n");
        assert_eq!(f.generation, "<|im_end|>\n<|im_start|>assistant\n");
        assert!(disagreements(&f, &chatml(), None).is_empty());
        let stops = stop_tokens(
            &f,
            &["<|im_start|>".into(), "<|im_end|>".into()],
            Some("<|im_end|>"),
        );
        assert_eq!(stops, ["<|im_end|>", "<|im_start|>"]);
    }

    #[test]
    fn a_template_that_rewrites_messages_is_reported() {
        // Mistral v0.3's habit: the system prompt goes into the last user message.
        let t = ChatTemplate::new(
            "{% for m in messages %}{% if m.role == 'user' %}[INST] {% if loop.last and messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}{{ m.content }} [/INST]{% elif m.role == 'assistant' %}{{ m.content }}</s>{% endif %}{% endfor %}",
            None,
            None,
        )
        .unwrap();
        let f = TurnFormat::probe(&t, None).unwrap();
        assert_eq!(f.start_user, "[INST] ");
        assert_eq!(f.assistant_user, "</s>[INST] ");
        let d = disagreements(&f, &t, None);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].contains("6 messages"), "{d:?}");
    }

    #[test]
    fn go_strings_escape() {
        assert_eq!(go_string("a\"b\\c\nd\u{1}"), "\"a\\\"b\\\\c\\nd\\x01\"");
        assert_eq!(go_string("▁é"), "\"▁é\"");
    }

    #[test]
    fn collate_merges_like_ollama() {
        let m = |r: &str, c: &str| (r.to_owned(), c.to_owned());
        assert_eq!(
            collate(&[m("system", "a"), m("system", "b"), m("user", "c")]),
            [m("system", "a\n\nb"), m("user", "c")]
        );
    }
}
