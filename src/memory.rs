//! Memory: an estimate before a run starts (base weights, LoRA + AdamW state, activations with and
//! without gradient checkpointing, logits) to warn when it exceeds the device, and figures while it
//! runs (process RSS now and at peak) for the charts and `finetune bench`.

use crate::model::{Family, ModelConfig};

/// Keeps freed tensor buffers inside the process for reuse (glibc). Training frees and reallocates
/// the same large activation buffers every step; by default glibc serves blocks over its mmap
/// threshold (at most 32 MiB) with fresh mmaps, so each step pays page faults and kernel zeroing
/// for every big tensor (a fifth of CPU time in `perf`). A 1 GiB threshold and no trimming keep
/// them on the heap instead. Called once at startup; harmless elsewhere.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any training threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// Resident set size of this process in bytes, when the OS tells.
pub fn process_rss_bytes() -> Option<u64> {
    let pid = sysinfo::get_current_pid().ok()?;
    let mut sys = sysinfo::System::new().ok()?;
    sys.refresh_processes_specifics(
        sysinfo::ProcessesToUpdate::Some(&[pid]),
        false,
        sysinfo::ProcessRefreshKind::nothing().with_memory(),
    );
    sys.process(pid).map(|p| p.memory())
}

/// Peak resident set size of this process so far (getrusage), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    // SAFETY: getrusage only writes into the zeroed struct we own.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut u) != 0 {
            return None;
        }
        u
    };
    let max = u64::try_from(usage.ru_maxrss).ok()?;
    // Linux reports kilobytes, macOS bytes.
    Some(if cfg!(target_os = "macos") {
        max
    } else {
        max * 1024
    })
}

/// Total physical memory of the machine in bytes.
pub fn total_memory_bytes() -> Option<u64> {
    let mut sys = sysinfo::System::new().ok()?;
    sys.refresh_memory();
    Some(sys.total_memory())
}

/// What a training run will need, by part, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Estimate {
    pub base_weights: u64,
    /// LoRA A/B (f32) + their gradients + AdamW's two moments.
    pub lora_and_optimizer: u64,
    /// Activations kept for backward.
    pub activations: u64,
    /// Logits and their softmax intermediates for the positions that carry loss.
    pub logits: u64,
    pub total: u64,
}

/// Inputs of [`estimate`].
#[derive(Debug, Clone, Copy)]
pub struct EstimateInput {
    pub batch: usize,
    pub seq_len: usize,
    pub rank: usize,
    /// Bytes per element of the compute dtype (4 = f32, 2 = bf16/f16).
    pub dtype_bytes: usize,
    /// Recompute each layer's activations in backward (keeps only layer inputs).
    pub checkpointing: bool,
    /// Modules per layer carrying LoRA (default all).
    pub lora_modules_per_layer: Option<usize>,
}

/// Estimates peak training memory for `cfg`. Counts follow this engine's forward pass: per layer it
/// keeps the normed inputs, q/k/v (after RoPE and GQA expansion), attention scores and
/// probabilities (B·H·T² each), the attention output, the MLP's gate/up/activation products, and
/// the residual stream; the loss keeps ~4 copies of the (N, V) logits in f32.
pub fn estimate(cfg: &ModelConfig, input: &EstimateInput) -> Estimate {
    let (b, t) = (input.batch as u64, input.seq_len as u64);
    let (h, i, v) = (
        cfg.hidden_size as u64,
        cfg.intermediate_size as u64,
        cfg.vocab_size as u64,
    );
    let heads = cfg.num_heads as u64;
    let d = cfg.head_dim as u64;
    let layers = cfg.num_layers as u64;
    let e = input.dtype_bytes as u64;
    let base_weights = cfg.parameter_count() as u64 * e;
    let (q, kv) = (heads * d, cfg.num_kv_heads as u64 * d);
    let r = input.rank as u64;
    let per_layer_lora: u64 = match cfg.family {
        Family::Llama => r * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h)),
        Family::Gpt2 => r * ((h + 3 * h) + 2 * h + (h + i) + (i + h)),
    };
    let modules = match cfg.family {
        Family::Llama => 7,
        Family::Gpt2 => 4,
    };
    let share = input
        .lora_modules_per_layer
        .map_or(1.0, |m| m.min(modules) as f64 / modules as f64);
    let lora_params = (per_layer_lora as f64 * share) as u64 * layers;
    // parameter + gradient + exp_avg + exp_avg_sq, all f32
    let lora_and_optimizer = lora_params * 4 * 4;
    let tokens = b * t;
    let per_layer_acts = tokens * (4 * h + 3 * q + 4 * kv + 4 * i) * e + 3 * b * heads * t * t * e;
    let activations = if input.checkpointing {
        // layer inputs for every layer + one layer's full set during its recompute
        layers * tokens * h * e + per_layer_acts
    } else {
        layers * per_layer_acts
    };
    let logits = tokens * v * 4 * 4;
    let total = base_weights + lora_and_optimizer + activations + logits;
    Estimate {
        base_weights,
        lora_and_optimizer,
        activations,
        logits,
        total,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_is_known_and_plausible() {
        let rss = process_rss_bytes().unwrap();
        assert!(rss > 1 << 20 && rss < 1 << 40, "{rss}");
        assert!(peak_rss_bytes().unwrap() >= rss / 2);
    }

    #[test]
    fn checkpointing_cuts_activation_memory() {
        let cfg = ModelConfig::from_json(
            r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576,
            "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
            "num_key_value_heads": 3, "tie_word_embeddings": true}"#,
        )
        .unwrap();
        let mut input = EstimateInput {
            batch: 4,
            seq_len: 256,
            rank: 8,
            dtype_bytes: 4,
            checkpointing: false,
            lora_modules_per_layer: None,
        };
        let full = estimate(&cfg, &input);
        input.checkpointing = true;
        let ckpt = estimate(&cfg, &input);
        assert_eq!(full.base_weights, 134_515_008 * 4);
        assert!(ckpt.activations * 5 < full.activations);
        assert_eq!(
            full.total,
            full.base_weights + full.lora_and_optimizer + full.activations + full.logits
        );
    }
}
