//! Records → tokens and a loss mask.
//!
//! Masks: `loss_mask[i]` says whether token `i` is a training target (predicted from tokens `..i`).
//! Token 0 is never a target (nothing comes before it). With prompt masking on, only completions
//! and assistant turns are targets.
//!
//! Assistant turns are found without knowing the template: for each assistant message `i`, the turn
//! starts where `messages[..i]` rendered with `add_generation_prompt = true` ends and stops where
//! `messages[..=i]` rendered ends. Both renders must be text prefixes of the whole conversation;
//! their tokens are compared with the whole conversation's tokens, and when a token straddles the
//! boundary (BPE merged across it) that token counts as part of the assistant turn. If a template
//! renders earlier turns differently once later turns exist (e.g. it drops reasoning of past turns),
//! the mask falls back to mlx-lm's rule, "everything after the prompt of the last assistant turn",
//! and failing that, to training on the whole record; such records are counted as approximate.
//!
//! EOS: text, plain prompt/completion and chat records get the tokenizer's EOS appended unless the
//! rendered text (trailing whitespace ignored) already ends with it, so the model learns to stop.
//! ChatML templates end turns with `<|im_end|>\n`; where `<|im_end|>` is the EOS nothing is added.

use serde_json::Value;

use super::error::Problem;
use super::template::{ChatTemplate, TemplateError};
use super::tokenizer::ModelTokenizer;

/// How `prompt`/`completion` records are rendered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptCompletionStyle {
    /// The model's chat template as a user turn + assistant turn when the model has one (what mlx-lm
    /// does, and what the adapter will meet in a chat UI), otherwise `Plain`.
    #[default]
    Auto,
    /// `prompt + completion`, concatenated exactly as written (TRL's convention for plain strings),
    /// with the tokenizer's special tokens (e.g. BOS) and EOS. Put any separator in the data.
    Plain,
    /// Always a chat: the model's template, or the ChatML fallback when it has none.
    ChatTemplate,
}

/// One tokenized record.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// 1-based line in the file it came from.
    pub line: usize,
    /// Token ids, BOS/EOS included as the model sees them.
    pub tokens: Vec<u32>,
    /// Same length as `tokens`; true where the token is a training target.
    pub loss_mask: Vec<bool>,
    /// Cut to `max_seq_len`.
    pub truncated: bool,
    /// The assistant turns could not be located exactly (see the module docs).
    pub approximate_mask: bool,
}

impl Sample {
    /// Length in tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the record has no tokens.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Number of target tokens.
    pub fn trained_tokens(&self) -> usize {
        self.loss_mask.iter().filter(|&&m| m).count()
    }

    /// Keeps the first `max_len` tokens.
    pub fn truncate(&mut self, max_len: usize) {
        if self.tokens.len() > max_len {
            self.tokens.truncate(max_len);
            self.loss_mask.truncate(max_len);
            self.truncated = true;
        }
    }

    fn new(line: usize, tokens: Vec<u32>, mut loss_mask: Vec<bool>, approximate: bool) -> Self {
        if let Some(first) = loss_mask.first_mut() {
            *first = false;
        }
        Self {
            line,
            tokens,
            loss_mask,
            truncated: false,
            approximate_mask: approximate,
        }
    }
}

/// Everything needed to encode records: tokenizer, template, masking choice.
#[derive(Debug)]
pub struct Encoder<'a> {
    tokenizer: &'a ModelTokenizer,
    template: ChatTemplate,
    mask_prompt: bool,
    prompt_completion_as_chat: bool,
    eos: Option<(String, u32)>,
}

impl<'a> Encoder<'a> {
    /// Compiles the model's chat template (or the ChatML fallback when it has none).
    pub fn new(
        tokenizer: &'a ModelTokenizer,
        mask_prompt: bool,
        style: PromptCompletionStyle,
    ) -> Result<Self, Problem> {
        let bos = tokenizer.bos_token.as_deref();
        let eos = tokenizer.eos_token.as_deref();
        let template = match &tokenizer.chat_template {
            Some(source) => ChatTemplate::new(source, bos, eos),
            None => ChatTemplate::fallback(bos, eos),
        }
        .map_err(|e| Problem::TemplateSyntax(e.to_string()))?;
        let prompt_completion_as_chat = match style {
            PromptCompletionStyle::Auto => !template.is_fallback(),
            PromptCompletionStyle::Plain => false,
            PromptCompletionStyle::ChatTemplate => true,
        };
        let eos = tokenizer
            .eos_token
            .clone()
            .and_then(|t| tokenizer.token_to_id(&t).map(|id| (t, id)));
        Ok(Self {
            tokenizer,
            template,
            mask_prompt,
            prompt_completion_as_chat,
            eos,
        })
    }

    /// Whether prompt/completion records go through the chat template (a user turn and an assistant
    /// turn) rather than being concatenated as plain text.
    pub fn prompt_completion_as_chat(&self) -> bool {
        self.prompt_completion_as_chat
    }

    /// Whether chats are rendered with the ChatML fallback rather than the model's template.
    pub fn uses_fallback_template(&self) -> bool {
        self.template.is_fallback()
    }

    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, Problem> {
        self.tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| Problem::Tokenize(e.to_string()))
    }

    fn render(
        &self,
        messages: &[Value],
        tools: Option<&Value>,
        gen: bool,
    ) -> Result<String, Problem> {
        self.template
            .render(messages, tools, gen)
            .map_err(|e| match e {
                TemplateError::Syntax(s) => Problem::TemplateSyntax(s),
                TemplateError::Render(s) => Problem::Template(s),
            })
    }

    /// Appends EOS unless `text` already ends with it; the new token is a target if `trained`.
    fn push_eos(&self, text: &str, tokens: &mut Vec<u32>, mask: &mut Vec<bool>, trained: bool) {
        if let Some((eos_text, eos_id)) = &self.eos {
            if !text.trim_end().ends_with(eos_text.as_str()) && tokens.last() != Some(eos_id) {
                tokens.push(*eos_id);
                mask.push(trained);
            }
        }
    }

    /// A `text` record: every token trained, EOS appended.
    pub fn text(&self, text: &str, line: usize) -> Result<Sample, Problem> {
        let mut tokens = self.encode(text, true)?;
        let mut mask = vec![true; tokens.len()];
        self.push_eos(text, &mut tokens, &mut mask, true);
        Ok(Sample::new(line, tokens, mask, false))
    }

    /// `prompt + completion` as plain text; the prompt's tokens are masked when masking is on.
    pub fn plain_pair(
        &self,
        prompt: &str,
        completion: &str,
        line: usize,
    ) -> Result<Sample, Problem> {
        let full = format!("{prompt}{completion}");
        let mut tokens = self.encode(&full, true)?;
        let mut mask = vec![true; tokens.len()];
        if self.mask_prompt {
            let start = common_prefix(&tokens, &self.encode(prompt, true)?);
            mask[..start].fill(false);
        }
        self.push_eos(&full, &mut tokens, &mut mask, true);
        Ok(Sample::new(line, tokens, mask, false))
    }

    /// A conversation rendered with the chat template; assistant turns trained when masking.
    pub fn chat(
        &self,
        messages: &[Value],
        tools: Option<&Value>,
        line: usize,
    ) -> Result<Sample, Problem> {
        let full = self.render(messages, tools, false)?;
        let mut tokens = self.encode(&full, false)?;
        let mut mask = vec![!self.mask_prompt; tokens.len()];
        let mut approximate = false;
        let is_assistant = |m: &Value| m.get("role").and_then(Value::as_str) == Some("assistant");
        if self.mask_prompt {
            let turns: Vec<usize> = (0..messages.len())
                .filter(|&i| is_assistant(&messages[i]))
                .collect();
            let Some(&last) = turns.last() else {
                return Err(Problem::NoAssistantTurn);
            };
            let mut exact = true;
            for &i in &turns {
                let start = self.boundary(&full, &tokens, &messages[..i], tools, true);
                let end = self.boundary(&full, &tokens, &messages[..=i], tools, false);
                match (start, end) {
                    (Some(start), Some(end)) if start.before <= end.after => {
                        mask[start.before..end.after].fill(true)
                    }
                    _ => {
                        exact = false;
                        break;
                    }
                }
            }
            if !exact {
                approximate = true;
                mask.fill(false);
                match self.boundary(&full, &tokens, &messages[..last], tools, true) {
                    Some(start) => mask[start.before..].fill(true),
                    None => mask.fill(true),
                }
            }
        }
        let ends_with_assistant = messages.last().is_some_and(is_assistant);
        self.push_eos(
            &full,
            &mut tokens,
            &mut mask,
            !self.mask_prompt || ends_with_assistant,
        );
        Ok(Sample::new(line, tokens, mask, approximate))
    }

    /// Where the render of `prefix` ends inside `full`'s tokens, or `None` when the render is not a
    /// prefix of `full` (or fails).
    fn boundary(
        &self,
        full: &str,
        tokens: &[u32],
        prefix: &[Value],
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Option<Boundary> {
        let text = self.render(prefix, tools, add_generation_prompt).ok()?;
        if !full.starts_with(&text) {
            return None;
        }
        let prefix_tokens = self.encode(&text, false).ok()?;
        let n = common_prefix(tokens, &prefix_tokens);
        if n == prefix_tokens.len() {
            Some(Boundary {
                before: n,
                after: n,
            })
        } else {
            // tokens[n] straddles the boundary: it holds text from both sides.
            Some(Boundary {
                before: n,
                after: (n + 1).min(tokens.len()),
            })
        }
    }
}

/// A position between tokens; `before < after` when one token straddles it.
#[derive(Debug, Clone, Copy)]
struct Boundary {
    /// Tokens `..before` lie entirely before the boundary.
    before: usize,
    /// Tokens `after..` lie entirely after it.
    after: usize,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::Path;

    fn tokenizer(name: &str) -> ModelTokenizer {
        ModelTokenizer::from_dir(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures")
                .join(name),
        )
        .unwrap()
    }

    /// (masked text, trained text) of a sample.
    fn split(tok: &ModelTokenizer, s: &Sample) -> (String, String) {
        let pick = |want: bool| -> Vec<u32> {
            s.tokens
                .iter()
                .zip(&s.loss_mask)
                .filter(|(_, &m)| m == want)
                .map(|(&t, _)| t)
                .collect()
        };
        (
            tok.decode(&pick(false)).unwrap(),
            tok.decode(&pick(true)).unwrap(),
        )
    }

    #[test]
    fn multi_turn_chat_trains_only_assistant_turns() {
        let tok = tokenizer("tiny-llama");
        let enc = Encoder::new(&tok, true, PromptCompletionStyle::Auto).unwrap();
        let msgs = [
            json!({"role": "system", "content": "Be kind."}),
            json!({"role": "user", "content": "Hi"}),
            json!({"role": "assistant", "content": "Hello!"}),
            json!({"role": "user", "content": "Bye"}),
            json!({"role": "assistant", "content": "Ciao."}),
        ];
        let s = enc.chat(&msgs, None, 1).unwrap();
        assert!(!s.approximate_mask);
        let (masked, trained) = split(&tok, &s);
        assert_eq!(trained, "Hello!<|im_end|>\nCiao.<|im_end|>\n");
        assert_eq!(
            masked,
            "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
        );
        // The template already ends with EOS (<|im_end|>): nothing appended.
        assert_eq!(
            tok.decode(&s.tokens).unwrap(),
            enc.render(&msgs, None, false).unwrap()
        );
    }

    #[test]
    fn unmasked_chat_trains_everything_but_token_zero() {
        let tok = tokenizer("tiny-llama");
        let enc = Encoder::new(&tok, false, PromptCompletionStyle::Auto).unwrap();
        let msgs = [
            json!({"role": "user", "content": "Hi"}),
            json!({"role": "assistant", "content": "Yo"}),
        ];
        let s = enc.chat(&msgs, None, 1).unwrap();
        assert!(!s.loss_mask[0]);
        assert_eq!(s.trained_tokens(), s.len() - 1);
    }

    #[test]
    fn template_that_rewrites_history_falls_back_to_last_turn() {
        let mut tok = tokenizer("tiny-llama");
        // Like templates that drop the reasoning of past assistant turns: earlier assistant
        // contents are elided, so `messages[..=1]` rendered is not a prefix of the conversation.
        tok.chat_template = Some(
            "{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}{{ m.role }}: ...\n{% else %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}".into(),
        );
        let enc = Encoder::new(&tok, true, PromptCompletionStyle::Auto).unwrap();
        let msgs = [
            json!({"role": "user", "content": "Hello"}),
            json!({"role": "assistant", "content": "First"}),
            json!({"role": "user", "content": "Again"}),
            json!({"role": "assistant", "content": "Second"}),
        ];
        let s = enc.chat(&msgs, None, 1).unwrap();
        assert!(s.approximate_mask);
        let (masked, trained) = split(&tok, &s);
        // BPE merges the generation prompt's trailing space into " Second": the straddling token
        // is trained.
        assert_eq!(
            masked,
            "user: Hello\nassistant: ...\nuser: Again\nassistant:"
        );
        // The render does not end with EOS, so one is appended and trained.
        assert_eq!(trained, " Second\n<|im_end|>");
    }

    #[test]
    fn plain_pair_masks_prompt_and_appends_eos() {
        let tok = tokenizer("tiny-llama");
        let enc = Encoder::new(&tok, true, PromptCompletionStyle::Plain).unwrap();
        assert!(!enc.prompt_completion_as_chat());
        let s = enc.plain_pair("Q: 2+2? A:", " 4", 1).unwrap();
        let (masked, trained) = split(&tok, &s);
        assert_eq!(masked, "Q: 2+2? A:");
        assert_eq!(trained, " 4<|im_end|>");
        assert_eq!(s.tokens.last().copied(), tok.eos_id());
    }

    #[test]
    fn text_trains_all_and_ends_with_one_eos() {
        let tok = tokenizer("tiny-llama");
        let enc = Encoder::new(&tok, true, PromptCompletionStyle::Auto).unwrap();
        let s = enc.text("hello world", 1).unwrap();
        assert_eq!(tok.decode(&s.tokens).unwrap(), "hello world<|im_end|>");
        assert_eq!(s.trained_tokens(), s.len() - 1);
        let s = enc.text("done<|im_end|>", 1).unwrap();
        assert_eq!(
            s.tokens
                .iter()
                .filter(|&&t| Some(t) == tok.eos_id())
                .count(),
            1
        );
    }

    #[test]
    fn no_template_uses_chatml_fallback_and_auto_goes_plain() {
        let mut tok = tokenizer("tiny-llama");
        tok.chat_template = None;
        tok.eos_token = Some("<|endoftext|>".into());
        let enc = Encoder::new(&tok, true, PromptCompletionStyle::Auto).unwrap();
        assert!(enc.uses_fallback_template());
        assert!(!enc.prompt_completion_as_chat());
        let msgs = [
            json!({"role": "user", "content": "Hi"}),
            json!({"role": "assistant", "content": "Yo"}),
        ];
        let s = enc.chat(&msgs, None, 1).unwrap();
        let (masked, trained) = split(&tok, &s);
        assert_eq!(
            masked,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        // EOS differs from <|im_end|>, so it is appended and trained.
        assert_eq!(trained, "Yo<|im_end|>\n<|endoftext|>");
    }

    #[test]
    fn masking_needs_an_assistant_turn() {
        let tok = tokenizer("tiny-llama");
        let enc = Encoder::new(&tok, true, PromptCompletionStyle::Auto).unwrap();
        let err = enc
            .chat(&[json!({"role": "user", "content": "Hi"})], None, 1)
            .unwrap_err();
        assert_eq!(err, Problem::NoAssistantTurn);
    }

    #[test]
    fn truncate_keeps_the_start() {
        let mut s = Sample::new(1, vec![1, 2, 3, 4], vec![true; 4], false);
        s.truncate(2);
        assert_eq!(
            (s.tokens.clone(), s.loss_mask.clone(), s.truncated),
            (vec![1, 2], vec![false, true], true)
        );
    }
}
