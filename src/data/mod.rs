//! Data: the model's tokenizer and chat template source, JSONL datasets with line-numbered errors,
//! format detection, chat-template rendering, tokenization with prompt masks, and batching.

pub mod tokenizer;

pub use tokenizer::{ModelTokenizer, TokenizerError};
