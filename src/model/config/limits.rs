//! Sanity bounds on the sizes a config.json may give, checked before anything is sized from them
//! (issue 20).

use super::ModelConfig;

/// The largest sizes a config may give (well above every released model: Gemma's 262k vocab,
/// Llama 3.1 405B's 16384 hidden, 126 layers, 53248 MLP, 128 heads, 10M context). A config past
/// them is refused before anything is sized from it.
const LIMITS: [(&str, usize); 8] = [
    ("vocab_size", 1 << 22),
    ("hidden_size", 1 << 17),
    ("intermediate_size", 1 << 20),
    ("num_hidden_layers", 1 << 10),
    ("num_attention_heads", 1 << 12),
    ("num_key_value_heads", 1 << 12),
    ("head_dim", 1 << 13),
    ("max_position_embeddings", 1 << 26),
];

/// An error naming the first size of `cfg` past [`LIMITS`] (or zero).
pub(super) fn check_sizes(cfg: &ModelConfig) -> Result<(), String> {
    let sizes = [
        cfg.vocab_size,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_layers,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.max_position_embeddings,
    ];
    for ((key, limit), value) in LIMITS.iter().zip(sizes) {
        if value == 0 || value > *limit {
            return Err(format!(
                "{key} is {value}, outside 1..={limit}; this config.json is damaged or not a model FineTune can train"
            ));
        }
    }
    Ok(())
}
