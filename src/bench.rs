//! `finetune bench`: timed LoRA training steps after a warm-up, with the step split into forward /
//! backward / optimizer, tokens per second, peak memory beside the estimate. A model folder with a
//! config.json but no weights is benchmarked with random weights (std 0.02), so speed can be
//! measured before a download.

pub mod cpu;
pub mod generate;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

use crate::backend;
use crate::memory;
use crate::model::kernels::{plan_for_device, KernelPlan};
use crate::model::{LoraConfig, Model, ModelConfig, ModelInput};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::{DeviceChoice, DtypeChoice};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The model folder (config.json, with or without weights; without, random weights are used).
    pub model: PathBuf,
    /// Rows per step (B).
    pub batch: usize,
    /// Tokens per row (T); real records are cut or padded to it.
    pub seq_len: usize,
    /// LoRA rank r on every linear projection (alpha = 2r).
    pub rank: usize,
    /// Timed steps.
    pub steps: usize,
    /// Untimed steps first.
    pub warmup: usize,
    /// Optional JSONL: real batches instead of random tokens.
    pub data: Option<PathBuf>,
    /// Device to run on, as in training's settings.
    pub device: DeviceChoice,
    /// Compute dtype of the frozen weights, as in training's settings.
    pub dtype: DtypeChoice,
    /// Where to keep random weights between runs (so a run's peak memory is not inflated by
    /// writing them); default a temp folder.
    pub random_dir: Option<PathBuf>,
    /// Gradient checkpointing.
    pub checkpointing: bool,
    /// With checkpointing, every k-th layer keeps its activations (0 = all recomputed).
    pub keep_every: usize,
    /// The device's peak dense TFLOP/s in the compute dtype, for model FLOP utilisation.
    pub peak_tflops: Option<f64>,
    /// QLoRA: the linear weights quantized at load to this type (`None`: float).
    pub quantize: Option<crate::model::qload::QuantChoice>,
    /// DoRA instead of plain LoRA.
    pub dora: bool,
}

/// Model FLOPs per trained token of this LoRA job: frozen projections (incl. the LM head) forward
/// and input-gradient (4 per weight), LoRA A/B forward, input gradient and weight gradient (6 per
/// parameter), attention scores and values over `seq_len` forward (4·T per query dim per layer)
/// and backward (twice that). Causal masking is not subtracted, as is usual for MFU.
pub fn training_flops_per_token(
    cfg: &crate::model::ModelConfig,
    seq_len: usize,
    rank: usize,
) -> f64 {
    let (h, i, v, l) = (
        cfg.hidden_size as f64,
        cfg.intermediate_size as f64,
        cfg.vocab_size as f64,
        cfg.num_layers as f64,
    );
    let q = (cfg.num_heads * cfg.head_dim) as f64;
    let kv = (cfg.num_kv_heads * cfg.head_dim) as f64;
    let r = rank as f64;
    // (in, out) of every projection of one layer
    let shapes: Vec<(f64, f64)> = match cfg.family {
        crate::model::Family::Llama => {
            vec![(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
        }
        crate::model::Family::Gpt2 => vec![(h, 3.0 * h), (h, h), (h, i), (i, h)],
    };
    let frozen: f64 = shapes.iter().map(|(a, b)| a * b).sum::<f64>() * l + v * h;
    let lora: f64 = shapes.iter().map(|(a, b)| r * (a + b)).sum::<f64>() * l;
    let attention = 12.0 * seq_len as f64 * q * l;
    4.0 * frozen + 6.0 * lora + attention
}

/// Measured figures (medians over the timed steps).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    /// The model folder as given.
    pub model: String,
    /// The device's name in words, e.g. "CUDA 0: NVIDIA H100 80GB HBM3 (80 GB)".
    pub device: String,
    /// Compute dtype of the frozen weights, e.g. "BF16".
    pub dtype: String,
    /// Which implementation of each op ran (`FINETUNE_KERNELS` and the device decide).
    pub kernels: KernelPlan,
    /// The CPU: model, threads, matrix features, the bf16 matmul path.
    pub cpu: cpu::CpuInfo,
    /// Rows per step (B).
    pub batch: usize,
    /// Tokens per row (T).
    pub seq_len: usize,
    /// LoRA rank r.
    pub rank: usize,
    /// Timed steps (warm-up not counted).
    pub steps: usize,
    /// Tokens a step trains on: B·T with random tokens; with `--data` the records' tokens up to T,
    /// padding excluded.
    pub tokens_per_step: usize,
    /// tokens_per_step / step_secs.
    pub tokens_per_sec: f64,
    /// Whole step (forward + backward + optimizer), device synced, in seconds.
    pub step_secs: f64,
    /// Forward and loss, device synced, in seconds.
    pub forward_secs: f64,
    /// Backward and gradient collection, device synced, in seconds.
    pub backward_secs: f64,
    /// AdamW update, device synced, in seconds.
    pub optimizer_secs: f64,
    /// Host time until the forward / backward call returned, before waiting for the device: near
    /// the synced time when the host's op issue is the bottleneck (on the CPU, the same).
    pub forward_host_secs: f64,
    /// As `forward_host_secs`, for the backward.
    pub backward_host_secs: f64,
    /// Peak resident set size of the process at the end, when the OS reports it.
    pub peak_rss_bytes: Option<u64>,
    /// What [`memory::estimate`] predicted for this job, to compare with the peaks measured.
    pub estimate: memory::Estimate,
    /// LoRA parameters trained (every A and B).
    pub trainable_params: usize,
    /// The folder had no weights, so random ones (std 0.02) were used.
    pub random_weights: bool,
    /// Gradient checkpointing was on.
    pub checkpointing: bool,
    /// With checkpointing, every k-th layer kept its activations (0 = all recomputed).
    pub keep_every: usize,
    /// See [`training_flops_per_token`].
    pub flops_per_token: f64,
    /// flops_per_token × tokens/s.
    pub achieved_tflops: f64,
    /// achieved / the `--peak-tflops` given.
    pub mfu: Option<f64>,
    /// Largest device memory in use seen after a forward or backward (CUDA).
    pub device_bytes: Option<u64>,
    /// Peak bytes held by tensors on the device (CUDA), see [`backend::device_peak_allocated`].
    pub device_peak_allocated: Option<u64>,
    /// QLoRA: what was kept quantized ([`Model::quant_summary`]); `None` for float weights.
    pub quant: Option<String>,
    /// DoRA was trained instead of plain LoRA.
    pub dora: bool,
    /// The loss of every step, warm-up included (runs that differ only in a kernel, e.g.
    /// `FINETUNE_CUDA_FLASH=0`, should follow the same curve).
    pub losses: Vec<f32>,
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

/// Writes a random-weight checkpoint for the config in `src` into `dst` (config + safetensors).
pub fn write_random_checkpoint(src: &Path, dst: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dst)?;
    std::fs::copy(src.join("config.json"), dst.join("config.json"))?;
    let cfg = ModelConfig::from_dir(src)?;
    // Load the shapes by building the model from an all-zero-sized probe is not possible; list
    // them from the architecture instead.
    let mut shapes: Vec<(String, Vec<usize>)> = Vec::new();
    let (h, i, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (q, kv) = (cfg.num_heads * d, cfg.num_kv_heads * d);
    match cfg.family {
        crate::model::Family::Llama => {
            shapes.push(("model.embed_tokens.weight".into(), vec![cfg.vocab_size, h]));
            shapes.push(("model.norm.weight".into(), vec![h]));
            if !cfg.tie_word_embeddings {
                shapes.push(("lm_head.weight".into(), vec![cfg.vocab_size, h]));
            }
            for l in 0..cfg.num_layers {
                let p = format!("model.layers.{l}");
                let v = &cfg.variant;
                let mut names = vec![
                    ("input_layernorm.weight", vec![h]),
                    ("post_attention_layernorm.weight", vec![h]),
                    ("self_attn.o_proj.weight", vec![h, q]),
                    ("mlp.down_proj.weight", vec![h, i]),
                ];
                if v.sandwich_norms {
                    names.push(("pre_feedforward_layernorm.weight", vec![h]));
                    names.push(("post_feedforward_layernorm.weight", vec![h]));
                }
                if v.fused_qkv {
                    names.push(("self_attn.qkv_proj.weight", vec![q + 2 * kv, h]));
                } else {
                    names.push(("self_attn.q_proj.weight", vec![q, h]));
                    names.push(("self_attn.k_proj.weight", vec![kv, h]));
                    names.push(("self_attn.v_proj.weight", vec![kv, h]));
                }
                if v.fused_gate_up {
                    names.push(("mlp.gate_up_proj.weight", vec![2 * i, h]));
                } else {
                    names.push(("mlp.gate_proj.weight", vec![i, h]));
                    names.push(("mlp.up_proj.weight", vec![i, h]));
                }
                for (n, s) in names {
                    shapes.push((format!("{p}.{n}"), s));
                }
                if cfg.qkv_bias {
                    for (n, s) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
                        shapes.push((format!("{p}.self_attn.{n}.bias"), vec![s]));
                    }
                }
                if cfg.qk_norm {
                    shapes.push((format!("{p}.self_attn.q_norm.weight"), vec![d]));
                    shapes.push((format!("{p}.self_attn.k_norm.weight"), vec![d]));
                }
            }
        }
        crate::model::Family::Gpt2 => {
            anyhow::bail!("random-weight benchmarking supports the llama family; give a GPT-2 folder with weights")
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, shape) in shapes {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else {
            (0..n).map(|_| (rng.random::<f32>() - 0.5) * 0.07).collect()
        };
        // Stored in bf16 (as the checkpoints are published): an 8B shape is 16 GB, not 32.
        let t = Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(candle_core::DType::BF16)?;
        tensors.insert(name, t);
    }
    candle_core::safetensors::save(&tensors, dst.join("model.safetensors"))?;
    Ok(())
}

/// The folder to load: the model's own, or random weights from its config.json (kept in
/// `random_dir`, else in the returned temporary folder). True when the weights are the model's.
pub(crate) fn bench_model_dir(
    opts: &BenchOptions,
) -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>, bool)> {
    if crate::model::weights::checkpoint_files(&opts.model).is_ok() {
        return Ok((opts.model.clone(), None, true));
    }
    if let Some(dir) = &opts.random_dir {
        if crate::model::weights::checkpoint_files(dir).is_err() {
            write_random_checkpoint(&opts.model, dir)
                .context("writing random weights for the benchmark")?;
            eprintln!(
                "note: random weights written to {}; run again for a peak-memory figure without that step",
                dir.display()
            );
        }
        return Ok((dir.clone(), None, false));
    }
    let tmp = tempfile::tempdir()?;
    write_random_checkpoint(&opts.model, tmp.path())
        .context("writing random weights for the benchmark")?;
    Ok((tmp.path().to_path_buf(), Some(tmp), false))
}

/// Seconds of each timed step, by phase (device-synchronised, and host issue time), with the
/// largest device memory seen and the tokens of the last timed step.
#[derive(Default)]
struct Timings {
    forward: Vec<f64>,
    backward: Vec<f64>,
    optimizer: Vec<f64>,
    forward_host: Vec<f64>,
    backward_host: Vec<f64>,
    total: Vec<f64>,
    device_bytes: Option<u64>,
    tokens_per_step: usize,
    losses: Vec<f32>,
}

impl Timings {
    fn sample(&mut self, d: &Device) {
        if let Some(now) = backend::device_memory_used(d) {
            self.device_bytes = Some(self.device_bytes.map_or(now, |m| m.max(now)));
        }
    }
}

/// Runs `warmup + steps` training steps (forward, backward, AdamW) and times the last `steps`.
fn time_steps(
    opts: &BenchOptions,
    model: &Model,
    opt: &mut AdamW,
    batches: &[HostBatch],
    device: &Device,
) -> anyhow::Result<Timings> {
    let mut t = Timings::default();
    for step in 0..opts.warmup + opts.steps {
        let (ids, labels, n_tokens) = &batches[step % batches.len()];
        let ids = Tensor::from_vec(ids.clone(), (opts.batch, opts.seq_len), device)?;
        let input = ModelInput::causal(ids);
        let t0 = Instant::now();
        let (loss, _) = model.loss(&input, labels, true)?;
        let t1_host = Instant::now();
        loss.device().synchronize()?;
        let t1 = Instant::now();
        t.sample(loss.device());
        let grads = opt.collect(&model.backward(&loss)?)?;
        let t2_host = Instant::now();
        loss.device().synchronize()?;
        let t2 = Instant::now();
        t.sample(loss.device());
        opt.step(&grads, 1e-4, 1.0)?;
        loss.device().synchronize()?;
        let t3 = Instant::now();
        t.losses
            .push(loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?);
        if step >= opts.warmup {
            t.forward.push((t1 - t0).as_secs_f64());
            t.backward.push((t2 - t1).as_secs_f64());
            t.optimizer.push((t3 - t2).as_secs_f64());
            t.forward_host.push((t1_host - t0).as_secs_f64());
            t.backward_host.push((t2_host - t1).as_secs_f64());
            t.total.push((t3 - t0).as_secs_f64());
            t.tokens_per_step = *n_tokens;
        }
    }
    Ok(t)
}

/// Runs the benchmark on its own thread, as training runs (`session`'s "finetune-train"): on the
/// main thread the same CPU step moved ~10% with the size of the environment (its strings sit
/// above the main stack, so they move it; SmolLM2 B4×256 on an Intel Xeon: 675–762 tokens/s as
/// variables were added, 745–751 on a thread of its own).
pub fn run(opts: &BenchOptions) -> anyhow::Result<BenchReport> {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("finetune-bench".into())
            .spawn_scoped(s, || run_here(opts))
            .map_err(|e| anyhow::anyhow!("could not start the benchmark thread: {e}"))?
            .join()
            .map_err(|_| anyhow::anyhow!("the benchmark thread panicked"))?
    })
}

fn run_here(opts: &BenchOptions) -> anyhow::Result<BenchReport> {
    let backend = backend::pick_with(opts.device, opts.dtype)?;
    let (model_dir, _tmp, has_weights) = bench_model_dir(opts)?;
    let quant = opts.quantize.and_then(|q| q.ggml()).map_or(
        crate::model::qload::LinearQuant::Float,
        crate::model::qload::LinearQuant::To,
    );
    let mut model = Model::load_with(&model_dir, backend.dtype, &backend.device, &quant)?;
    let quant_summary = model.quant_summary();
    let lora = model.attach_lora(
        &LoraConfig {
            rank: opts.rank,
            alpha: 2.0 * opts.rank as f64,
            use_dora: opts.dora,
            ..Default::default()
        },
        0,
    )?;
    model.set_gradient_checkpointing(opts.checkpointing, opts.keep_every);
    let mut opt = AdamW::new(lora.named_vars(), AdamWConfig::default())?;
    let (b, t) = (opts.batch, opts.seq_len);
    let batches = make_batches(opts, &model)?;
    let mut timings = time_steps(opts, &model, &mut opt, &batches, &backend.device)?;
    let step_secs = median(&mut timings.total);
    let tokens_per_sec = timings.tokens_per_step as f64 / step_secs.max(1e-9);
    let flops_per_token = training_flops_per_token(&model.config, t, opts.rank);
    let achieved_tflops = flops_per_token * tokens_per_sec / 1e12;
    let kernels = plan_for_device(&backend.device, backend.dtype);
    let estimate = memory::estimate(
        &model.config,
        &memory::EstimateInput {
            batch: b,
            seq_len: t,
            rank: opts.rank,
            weight_bytes: backend.dtype.size_in_bytes(),
            activation_bytes: kernels.activations.size_in_bytes(),
            checkpointing: opts.checkpointing,
            checkpoint_keep_every: opts.keep_every,
            lora_modules_per_layer: None,
            kernels,
            lora_dropout: false, // bench trains without dropout
            quant_bytes_per_weight: opts.quantize.and_then(|q| q.bytes_per_weight()),
            dora: opts.dora,
            device_memory: backend.device.is_cuda(),
            checkpoint_bytes: safetensors_bytes(&model_dir),
        },
    );
    Ok(BenchReport {
        model: opts.model.display().to_string(),
        device: backend.name,
        dtype: format!("{:?}", backend.dtype),
        kernels,
        cpu: cpu::cpu_info(),
        batch: b,
        seq_len: t,
        rank: opts.rank,
        steps: opts.steps,
        tokens_per_step: timings.tokens_per_step,
        tokens_per_sec,
        step_secs,
        forward_secs: median(&mut timings.forward),
        backward_secs: median(&mut timings.backward),
        optimizer_secs: median(&mut timings.optimizer),
        forward_host_secs: median(&mut timings.forward_host),
        backward_host_secs: median(&mut timings.backward_host),
        peak_rss_bytes: memory::peak_rss_bytes(),
        estimate,
        trainable_params: lora.parameter_count(),
        random_weights: !has_weights,
        checkpointing: opts.checkpointing,
        keep_every: opts.keep_every,
        flops_per_token,
        achieved_tflops,
        mfu: opts.peak_tflops.map(|p| achieved_tflops / p),
        device_bytes: timings.device_bytes,
        device_peak_allocated: backend::device_peak_allocated(&backend.device),
        quant: quant_summary,
        dora: opts.dora,
        losses: timings.losses,
    })
}

/// (ids, labels, tokens) of one benchmark batch.
type HostBatch = (Vec<u32>, Vec<i64>, usize);

/// (ids, labels, tokens) per batch: random tokens, or real records cut/padded to seq_len.
fn make_batches(opts: &BenchOptions, model: &Model) -> anyhow::Result<Vec<HostBatch>> {
    let (b, t) = (opts.batch, opts.seq_len);
    if let Some(path) = &opts.data {
        let tok = crate::data::ModelTokenizer::from_dir(&opts.model)?;
        let options = crate::data::DataOptions {
            max_seq_len: t,
            valid_fraction: 0.0,
            ..Default::default()
        };
        let loaded =
            crate::data::load(path, None, &tok, &options).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut out = Vec::new();
        for chunk in loaded
            .train
            .samples
            .chunks(b)
            .filter(|c| c.len() == b)
            .take(16)
        {
            let mut ids = vec![loaded.train.pad_id; b * t];
            let mut labels = vec![-100i64; b * t];
            let mut n = 0;
            for (r, s) in chunk.iter().enumerate() {
                for (j, (&tk, &m)) in s.tokens.iter().zip(&s.loss_mask).enumerate().take(t) {
                    ids[r * t + j] = tk;
                    if m {
                        labels[r * t + j] = tk as i64;
                    }
                    n += 1;
                }
            }
            out.push((ids, labels, n));
        }
        anyhow::ensure!(
            !out.is_empty(),
            "the benchmark data has fewer than {b} records"
        );
        return Ok(out);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let v = model.config.vocab_size as u32;
    Ok((0..4)
        .map(|_| {
            let ids: Vec<u32> = (0..b * t).map(|_| rng.random_range(0..v)).collect();
            let labels = ids.iter().map(|&x| x as i64).collect();
            (ids, labels, b * t)
        })
        .collect())
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mb = |b: u64| b as f64 / 1e6;
        writeln!(
            f,
            "model {} ({}), {} {}, batch {} × {} tokens, LoRA r={} ({} trainable), {} timed steps{}",
            self.model,
            if self.random_weights {
                "random weights"
            } else {
                "checkpoint"
            },
            self.device,
            self.dtype,
            self.batch,
            self.seq_len,
            self.rank,
            self.trainable_params,
            self.steps,
            match (self.checkpointing, self.keep_every) {
                (false, _) => String::new(),
                (true, 0) => ", gradient checkpointing".to_string(),
                (true, k) => format!(", gradient checkpointing (every {k}th layer kept)"),
            }
        )?;
        writeln!(f, "kernels {}", self.kernels)?;
        writeln!(
            f,
            "cpu     {} ({} threads; {}; bf16 matmul: {}; f32 matmul: {}; bf16-mode attention: {})",
            self.cpu.model,
            self.cpu.threads,
            self.cpu.features.join(" "),
            self.cpu.bf16_matmul,
            self.cpu.f32_matmul,
            self.cpu.bf16_attention
        )?;
        if let Some(q) = &self.quant {
            writeln!(f, "{q}")?;
        }
        if self.dora {
            writeln!(
                f,
                "DoRA: a trained magnitude per output row besides A and B"
            )?;
        }
        writeln!(
            f,
            "tokens/s {:.1} | step {:.3}s = forward {:.3}s + backward {:.3}s + optimizer {:.3}s",
            self.tokens_per_sec,
            self.step_secs,
            self.forward_secs,
            self.backward_secs,
            self.optimizer_secs
        )?;
        if !self.device.starts_with("CPU") {
            writeln!(
                f,
                "host issue time: forward {:.3}s, backward {:.3}s",
                self.forward_host_secs, self.backward_host_secs
            )?;
        }
        write!(
            f,
            "{:.2} GFLOP/token, {:.2} TFLOP/s achieved",
            self.flops_per_token / 1e9,
            self.achieved_tflops
        )?;
        if let Some(m) = self.mfu {
            write!(f, " (MFU {:.1}%)", m * 100.0)?;
        }
        writeln!(f)?;
        if let Some(d) = self.device_bytes {
            write!(f, "device memory in use: up to {:.0} MB", mb(d))?;
            match self.device_peak_allocated {
                Some(p) => writeln!(f, " (tensors at most {:.0} MB at once)", mb(p))?,
                None => writeln!(f)?,
            }
        }
        write!(
            f,
            "peak RSS {} MB | estimate {:.0} MB (weights {:.0}, LoRA+AdamW {:.0}, activations {:.0}, logits {:.0})",
            self.peak_rss_bytes.map_or("?".into(), |b| format!("{:.0}", mb(b))),
            mb(self.estimate.total),
            mb(self.estimate.base_weights),
            mb(self.estimate.lora_and_optimizer),
            mb(self.estimate.activations),
            mb(self.estimate.logits)
        )
    }
}

/// Total bytes of the `.safetensors` files in `dir` (what loading maps), `None` if it has none.
fn safetensors_bytes(dir: &std::path::Path) -> Option<u64> {
    let total: u64 = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    (total > 0).then_some(total)
}
