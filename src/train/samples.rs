//! Samples while training: at each evaluation the model answers a few fixed prompts of the
//! validation set greedily, so a person sees the answers change, not only the loss.
//!
//! A validation record gives a prompt when it has both parts the loss mask tells apart: the
//! tokens before its first trained token (the prompt, as the chat template or prompt/completion
//! style rendered it, generation prompt included) and the trained tokens after them (the expected
//! answer, up to the end of that first answer). Plain-text records (every token trained) give
//! none. The first `n` such records in file order whose prompt fits the context and differs from
//! those already taken are used, the same ones for the whole run.

use crate::data::{Dataset, ModelTokenizer};
use crate::generate::{self, GenerateOptions, SamplingParams};
use crate::model::Model;

/// A prompt the model answers at each evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplePrompt {
    /// 1-based line of the record in the validation file.
    pub line: usize,
    /// The prompt's token ids, as training saw them.
    pub ids: Vec<u32>,
    /// The prompt as text (special tokens left out).
    pub prompt: String,
    /// The record's answer as text.
    pub expected: String,
    /// Most tokens to generate: the expected answer's length and some room, within the cap.
    pub max_new_tokens: usize,
}

/// One answer of an evaluation.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SampleAnswer {
    /// 1-based line of the record in the validation file.
    pub line: usize,
    /// The prompt as text (special tokens left out).
    pub prompt: String,
    /// The record's answer.
    pub expected: String,
    /// What the model answered (greedy).
    pub answer: String,
}

/// The first `n` records of `valid` with a prompt and an answer, the prompt no longer than
/// `max_prompt` tokens; each generates at most `max_new_tokens` (and never far past the
/// expected answer's length).
pub fn pick(
    valid: &Dataset,
    tokenizer: &ModelTokenizer,
    n: usize,
    max_prompt: usize,
    max_new_tokens: usize,
) -> Vec<SamplePrompt> {
    let mut out = Vec::new();
    for sample in &valid.samples {
        if out.len() >= n {
            break;
        }
        let Some(start) = sample.loss_mask.iter().position(|&m| m) else {
            continue;
        };
        let end = sample.loss_mask[start..]
            .iter()
            .position(|&m| !m)
            .map_or(sample.loss_mask.len(), |e| start + e);
        if start == 0 || start > max_prompt {
            continue;
        }
        let ids = sample.tokens[..start].to_vec();
        if out.iter().any(|p: &SamplePrompt| p.ids == ids) {
            continue;
        }
        let (Ok(prompt), Ok(expected)) = (
            tokenizer.decode_text(&ids),
            tokenizer.decode_text(&sample.tokens[start..end]),
        ) else {
            continue;
        };
        out.push(SamplePrompt {
            line: sample.line,
            ids,
            prompt: prompt.trim().to_owned(),
            expected: expected.trim().to_owned(),
            max_new_tokens: (end - start + 16).min(max_new_tokens).max(1),
        });
    }
    out
}

/// Greedy answers to `prompts` with the model as it is (adapter on).
pub fn answer(
    model: &Model,
    tokenizer: &ModelTokenizer,
    prompts: &[SamplePrompt],
    stop_ids: &[u32],
) -> anyhow::Result<Vec<SampleAnswer>> {
    let mut answers = Vec::with_capacity(prompts.len());
    for p in prompts {
        let options = GenerateOptions {
            max_new_tokens: p.max_new_tokens,
            sampling: SamplingParams::default(),
            seed: 0,
            stop_ids: stop_ids.to_vec(),
        };
        let done = generate::generate(model, &p.ids, &options, &mut |_| {
            std::ops::ControlFlow::Continue(())
        })?;
        answers.push(SampleAnswer {
            line: p.line,
            prompt: p.prompt.clone(),
            expected: p.expected.clone(),
            answer: tokenizer.decode_text(&done.tokens)?.trim().to_owned(),
        });
    }
    Ok(answers)
}
