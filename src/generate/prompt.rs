//! The prompt's tokens, as transformers makes them: raw text through the tokenizer with its
//! special tokens (`add_special_tokens=True`, e.g. a BOS), or a chat turn rendered with the
//! model's chat template (ChatML when it has none) and `add_generation_prompt`, tokenized without
//! adding special tokens (`apply_chat_template(tokenize=True)`).

use crate::data::{ChatTemplate, ModelTokenizer, TemplateError, TokenizerError};

/// What to prompt with.
#[derive(Debug, Clone, Default)]
pub struct Prompt {
    /// The text: the whole prompt, or the user's message with `chat`.
    pub text: String,
    /// Render `text` as a user turn with the chat template.
    pub chat: bool,
    /// A system message before it (`chat` only).
    pub system: Option<String>,
    /// Earlier turns of the conversation, oldest first (`chat` only).
    pub history: Vec<Turn>,
    /// The template variable `enable_thinking` (Qwen3), passed only when set.
    pub enable_thinking: Option<bool>,
}

/// One earlier exchange of a conversation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Turn {
    /// What the user wrote.
    pub user: String,
    /// What the model answered.
    pub assistant: String,
}

/// Errors making a prompt.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// The chat template failed to compile or render.
    #[error("chat template: {0}")]
    Template(#[from] TemplateError),
    /// The tokenizer failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The prompt has no tokens.
    #[error("the prompt is empty")]
    Empty,
}

/// The chat-rendered text of `prompt` (with `chat`), else its text as given.
pub fn render(tokenizer: &ModelTokenizer, prompt: &Prompt) -> Result<String, PromptError> {
    if !prompt.chat {
        return Ok(prompt.text.clone());
    }
    let (bos, eos) = (
        tokenizer.bos_token.as_deref(),
        tokenizer.eos_token.as_deref(),
    );
    let template = match &tokenizer.chat_template {
        Some(source) => ChatTemplate::new(source, bos, eos)?,
        None => ChatTemplate::fallback(bos, eos)?,
    };
    let mut messages = Vec::new();
    if let Some(system) = &prompt.system {
        messages.push(serde_json::json!({"role": "system", "content": system}));
    }
    for turn in &prompt.history {
        messages.push(serde_json::json!({"role": "user", "content": turn.user}));
        messages.push(serde_json::json!({"role": "assistant", "content": turn.assistant}));
    }
    messages.push(serde_json::json!({"role": "user", "content": prompt.text}));
    let mut extra = serde_json::Map::new();
    if let Some(on) = prompt.enable_thinking {
        extra.insert("enable_thinking".into(), on.into());
    }
    Ok(template.render_with(&messages, None, true, &extra)?)
}

/// The token ids of `prompt` (not empty).
pub fn ids(tokenizer: &ModelTokenizer, prompt: &Prompt) -> Result<Vec<u32>, PromptError> {
    let text = render(tokenizer, prompt)?;
    let ids = tokenizer.encode(&text, !prompt.chat)?;
    if ids.is_empty() {
        return Err(PromptError::Empty);
    }
    Ok(ids)
}
