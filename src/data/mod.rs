//! Data: the model's tokenizer and chat template source, JSONL datasets with line-numbered errors,
//! format detection, chat-template rendering, tokenization with prompt masks, and batching.
//!
//! `load` reads the training (and validation) JSONL into tokenized, masked `Dataset`s and reports
//! every problem at once; `batches` cuts a dataset into host-side `Batch`es for one epoch;
//! `preview` shows the first records split into masked and trained text.

pub mod batch;
pub mod dataset;
pub mod encode;
pub mod error;
pub mod format;
pub mod jsonl;
mod load;
pub mod summary;
pub mod template;
mod template_limits;
pub mod tokenizer;

pub use batch::{batches, make_batch, Batch, BatchOptions, EpochBatches, IGNORE_INDEX};
pub use dataset::{
    hold_out, load, load_with_progress, preview, DataOptions, Dataset, LoadedData, OverLong,
    PreviewRecord, PreviewSegment, ValidSource,
};
pub use encode::{Encoder, PromptCompletionStyle, Sample};
pub use error::{DataError, DataErrors, Problem};
pub use format::Format;
pub use jsonl::DEFAULT_MAX_LINE_BYTES;
pub use summary::{DatasetSummary, TemplateUse};
pub use template::{ChatTemplate, TemplateError, FALLBACK_TEMPLATE};
pub use tokenizer::{ModelTokenizer, TokenizerError};
