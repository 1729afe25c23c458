//! `train::run`: one readable training loop (after mlx-lm's `tuner/trainer.py`). Loads the backend,
//! tokenizer, data and model, attaches LoRA (or resumes a checkpoint), then steps: micro-batches →
//! masked loss → gradients accumulated with token weights → global-norm clipping → AdamW with the
//! scheduled lr. Evaluates at start, every N and at the end; saves every N and at the end; honours
//! the stop flag between steps; stops on a non-finite loss keeping the last good adapter.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};

use crate::backend;
use crate::data::{self, Batch, BatchOptions, Dataset, EpochBatches, ModelTokenizer};
use crate::model::{adapter, lora::mix, ops, LoraState, Model, ModelInput};
use crate::session::Reporter;
use crate::train::checkpoint::{self, TrainerState};
use crate::train::config::{Duration, TrainConfig};
use crate::train::events::{Event, StepStats};
use crate::train::optim::AdamW;

/// Batches of the training set across epochs, resumable at (epoch, batch index).
struct BatchStream<'a> {
    data: &'a Dataset,
    options: BatchOptions,
    seed: u64,
    epoch: u64,
    /// Batches of `epoch` already taken.
    pos: usize,
    iter: EpochBatches<'a>,
}

impl<'a> BatchStream<'a> {
    fn new(data: &'a Dataset, options: BatchOptions, seed: u64, epoch: u64, pos: usize) -> Self {
        let mut iter = data::batches(data, &options, seed, epoch);
        // Planning is indices only; skipping builds the skipped batches' vectors, which is cheap.
        for _ in 0..pos {
            iter.next();
        }
        Self {
            data,
            options,
            seed,
            epoch,
            pos,
            iter,
        }
    }

    fn next(&mut self) -> Option<Batch> {
        if let Some(b) = self.iter.next() {
            self.pos += 1;
            return Some(b);
        }
        self.epoch += 1;
        self.pos = 0;
        self.iter = data::batches(self.data, &self.options, self.seed, self.epoch);
        let b = self.iter.next()?;
        self.pos = 1;
        Some(b)
    }

    /// Fractional epochs completed.
    fn progress(&self) -> f64 {
        let len = data::batches(self.data, &self.options, self.seed, self.epoch).len();
        self.epoch as f64 + self.pos as f64 / len.max(1) as f64
    }
}

/// Tensors for one host batch.
pub fn model_input(
    batch: &Batch,
    packing: bool,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<ModelInput> {
    let shape = (batch.batch_size, batch.seq_len);
    let input_ids = Tensor::from_vec(batch.input_ids.clone(), shape, device)?;
    if !packing {
        // Right padding under a causal mask: real tokens never see padding, and padded positions
        // carry label -100, so plain causal attention is exact.
        return Ok(ModelInput::causal(input_ids));
    }
    Ok(ModelInput {
        input_ids,
        position_ids: Some(Tensor::from_vec(batch.position_ids.clone(), shape, device)?),
        attn_bias: Some(ops::attention_bias(
            batch.batch_size,
            batch.seq_len,
            Some(&batch.segment_ids),
            dtype,
            device,
        )?),
    })
}

/// Token-weighted mean loss over (up to `max_batches`, 0 = all) validation batches.
fn evaluate(
    model: &Model,
    valid: &Dataset,
    config: &TrainConfig,
    options: &BatchOptions,
) -> anyhow::Result<f64> {
    let (mut sum, mut count) = (0f64, 0usize);
    let batches = data::batches(valid, options, config.seed, 0);
    let limit = if config.eval_batches == 0 {
        usize::MAX
    } else {
        config.eval_batches
    };
    for batch in batches.take(limit) {
        let input = model_input(&batch, config.packing, model.dtype, model.device())?;
        let (loss, n) = model.loss(&input, &batch.labels, false)?;
        let loss = loss.detach().to_scalar::<f32>()? as f64;
        sum += loss * n as f64;
        count += n;
    }
    Ok(if count == 0 {
        f64::NAN
    } else {
        sum / count as f64
    })
}

/// Runs one training session to its end, reporting through `reporter`. Never panics on bad input:
/// every failure ends in `Event::Failed` with what to do next.
pub fn run(mut config: TrainConfig, reporter: Reporter) {
    let end = match Trainer::prepare(&mut config, &reporter) {
        Ok(mut t) => t.train().unwrap_or_else(|e| Event::Failed {
            error: format!("{e:#}"),
        }),
        Err(e) => Event::Failed {
            error: format!("{e:#}"),
        },
    };
    reporter.send(end);
}

struct Trainer<'c> {
    config: &'c TrainConfig,
    reporter: &'c Reporter,
    model: Model,
    lora: LoraState,
    opt: AdamW,
    train: std::sync::Arc<Dataset>,
    valid: Option<Dataset>,
    options: BatchOptions,
    state: TrainerState,
    base_name: String,
    /// LoRA gradients of recomputed layers (gradient checkpointing).
    recompute: Option<crate::model::recompute::GradSink>,
}

impl<'c> Trainer<'c> {
    fn prepare(config: &'c mut TrainConfig, reporter: &'c Reporter) -> anyhow::Result<Self> {
        let config_ok = config.clone().validate().map_err(|problems| {
            let lines: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
            anyhow::anyhow!("settings need attention:\n{}", lines.join("\n"))
        })?;
        let config = {
            // validate() consumed a clone; keep using the borrowed original.
            let _ = config_ok;
            config
        };
        let backend = backend::pick_with(config.device, config.dtype)?;
        reporter.send(Event::Log(format!(
            "device: {} — {}",
            backend.name, backend.reason
        )));
        // A folder with only PyTorch .bin files, or a GGUF file, is converted once (cached); from
        // here on everything reads the prepared folder.
        let prepared = crate::model::source::prepare(&config.model_dir)?;
        if let Some(message) = &prepared.message {
            reporter.send(Event::Log(message.clone()));
        }
        // Rows longer than the model's context cannot run: cap the max sequence length to it.
        let context = prepared.config.max_position_embeddings;
        if context > 0 && config.max_seq_len > context {
            reporter.send(Event::Log(format!(
                "max sequence length lowered from {} to {context} tokens, the model's context length",
                config.max_seq_len
            )));
            config.max_seq_len = context;
        }
        let config: &'c TrainConfig = config;
        let model_dir = prepared.dir;
        let tokenizer = ModelTokenizer::from_dir(&model_dir)?;
        reporter.send(Event::Log(format!(
            "reading {}",
            config.train_data.display()
        )));
        let loaded = data::load(
            &config.train_data,
            config.valid_data.as_deref(),
            &tokenizer,
            &config.data_options(),
        )
        .map_err(|errors| anyhow::anyhow!("{errors}"))?;
        for skipped in &loaded.skipped {
            reporter.send(Event::Log(format!("skipped: {skipped}")));
        }
        reporter.send(Event::Log(format!(
            "loading {}",
            config.model_dir.display()
        )));
        let mut model = Model::load(&model_dir, backend.dtype, &backend.device)?;
        let (lora, resumed) = match &config.resume_from {
            Some(dir) => {
                let state = checkpoint::load_state(dir)?;
                let lora = adapter::load(dir, &mut model)?;
                (lora, Some((dir.clone(), state)))
            }
            None => (model.attach_lora(&config.lora, config.seed)?, None),
        };
        let recompute = model.set_gradient_checkpointing_keep(
            config.gradient_checkpointing,
            config.checkpoint_keep_every,
        );
        let mut opt = AdamW::new(lora.named_vars(), config.adamw)?;
        let options = BatchOptions {
            batch_size: config.batch_size,
            packing: config.packing,
            max_seq_len: config.max_seq_len,
            pad_to_multiple: 1,
        };
        let batches_per_epoch = data::batches(&loaded.train, &options, config.seed, 0).len();
        let total_steps = match config.duration {
            Duration::Steps(n) => n,
            Duration::Epochs(e) => (e * batches_per_epoch).div_ceil(config.grad_accum),
        };
        let state = match resumed {
            Some((dir, mut s)) => {
                opt.load_state(&checkpoint::load_optimizer(&dir, &backend.device)?, s.step)?;
                reporter.send(Event::Log(format!(
                    "resuming at step {} from {}",
                    s.step,
                    dir.display()
                )));
                s.total_steps = total_steps;
                s.config = config.clone();
                s
            }
            None => TrainerState {
                step: 0,
                total_steps,
                epoch: 0,
                batch_in_epoch: 0,
                best_val_loss: None,
                evals_since_best: 0,
                last_loss: None,
                config: config.clone(),
                finetune_version: env!("CARGO_PKG_VERSION").to_owned(),
            },
        };
        let base_name = prepared.source.name();
        reporter.send(Event::Started {
            model: base_name.clone(),
            architecture: model.config.architecture.clone(),
            device: backend.name.clone(),
            base_params: model.config.parameter_count(),
            trainable_params: lora.parameter_count(),
            total_steps,
            start_step: state.step,
            train: Box::new(loaded.train.summary.clone()),
            valid: loaded.valid.as_ref().map(|v| Box::new(v.summary.clone())),
        });
        Ok(Self {
            config,
            reporter,
            model,
            lora,
            opt,
            train: std::sync::Arc::new(loaded.train),
            valid: loaded.valid,
            options,
            state,
            base_name,
            recompute,
        })
    }

    fn out(&self, name: &str) -> PathBuf {
        self.config.out_dir.join(name)
    }

    /// Saves the latest adapter (`out/adapter`) and a full checkpoint (`out/checkpoints/step-N`).
    fn save(&self) -> anyhow::Result<PathBuf> {
        let ckpt = self
            .out("checkpoints")
            .join(format!("step-{:06}", self.state.step));
        checkpoint::save(
            &ckpt,
            &self.model,
            &self.lora,
            &self.opt,
            &self.state,
            Some(&self.base_name),
        )?;
        let latest = self.out("adapter");
        adapter::save(&latest, &self.lora, &self.model, Some(&self.base_name))
            .with_context(|| format!("saving the adapter to {}", latest.display()))?;
        self.reporter.send(Event::Saved {
            step: self.state.step,
            path: ckpt,
        });
        Ok(latest)
    }

    /// Evaluates, tracks the best adapter; returns (val_loss, patience exhausted).
    fn eval(&mut self) -> anyhow::Result<Option<(f64, bool)>> {
        let Some(valid) = &self.valid else {
            return Ok(None);
        };
        let val = evaluate(&self.model, valid, self.config, &self.options)?;
        let best = self.state.best_val_loss.is_none_or(|b| val < b);
        if best {
            self.state.best_val_loss = Some(val);
            self.state.evals_since_best = 0;
            if self.state.step > 0 {
                adapter::save(
                    &self.out("best"),
                    &self.lora,
                    &self.model,
                    Some(&self.base_name),
                )?;
            }
        } else {
            self.state.evals_since_best += 1;
        }
        self.reporter.send(Event::Eval {
            step: self.state.step,
            val_loss: val,
            best,
        });
        let p = self.config.early_stop_patience;
        Ok(Some((val, p > 0 && self.state.evals_since_best >= p)))
    }

    /// The best-validation adapter folder, once one was written.
    fn best_adapter(&self) -> Option<PathBuf> {
        let best = self.out("best");
        best.join(adapter::ADAPTER_WEIGHTS)
            .is_file()
            .then_some(best)
    }

    fn stopped(&self, reason: String) -> anyhow::Result<Event> {
        let adapter = self.save()?;
        Ok(Event::Stopped {
            adapter,
            best: self.best_adapter(),
            step: self.state.step,
            reason,
        })
    }

    fn train(&mut self) -> anyhow::Result<Event> {
        let config = self.config;
        std::fs::create_dir_all(&config.out_dir)
            .with_context(|| format!("creating the output folder {}", config.out_dir.display()))?;
        let train = self.train.clone();
        let mut stream = BatchStream::new(
            &train,
            self.options.clone(),
            config.seed,
            self.state.epoch,
            self.state.batch_in_epoch,
        );
        let mut last_val = None;
        if self.state.step == 0 {
            last_val = self.eval()?.map(|(v, _)| v);
        }
        let started = Instant::now();
        let first_step = self.state.step;
        let device = self.model.device().clone();
        while self.state.step < self.state.total_steps {
            if self.reporter.stop_requested() {
                return self.stopped(format!("stopped at step {}", self.state.step));
            }
            let step_start = Instant::now();
            let micro: Vec<Batch> = (0..config.grad_accum)
                .filter_map(|_| stream.next())
                .collect();
            let n_total: usize = micro.iter().map(|b| b.trained_tokens).sum();
            if n_total == 0 {
                anyhow::bail!("the training set has no tokens to learn from (all masked?)");
            }
            let mut grads: Vec<Option<Tensor>> = vec![None; self.opt.params().len()];
            let (mut loss_sum, mut input_tokens) = (0f64, 0usize);
            for (i, batch) in micro.iter().enumerate() {
                self.lora.dropout_seed.set(mix(
                    config.seed,
                    (self.state.step * config.grad_accum + i) as u64,
                ));
                let input = model_input(batch, config.packing, self.model.dtype, &device)?;
                let (loss, n) = self.model.loss(&input, &batch.labels, true)?;
                let value = loss.to_scalar::<f32>()? as f64;
                if !value.is_finite() {
                    return self.stopped(format!(
                        "the loss became {value} at step {}; nothing of that step was applied and the adapter of step {} is kept. Lower the learning rate or check the data",
                        self.state.step + 1,
                        self.state.step
                    ));
                }
                loss_sum += value * n as f64;
                input_tokens += batch.segment_ids.iter().filter(|&&s| s != 0).count();
                // Weight each micro-batch by its share of target tokens, so the step's gradient is
                // that of the mean loss over all its tokens (HF's num_items_in_batch convention).
                let weight = n as f64 / n_total as f64;
                self.opt.accumulate(&mut grads, &loss.backward()?, weight)?;
                if let Some(sink) = &self.recompute {
                    self.opt.accumulate_sink(&mut grads, sink.take(), weight)?;
                }
            }
            let loss = loss_sum / n_total as f64;
            let grad_norm = AdamW::grad_norm(&grads)?;
            if !grad_norm.is_finite() {
                return self.stopped(format!(
                    "the gradient norm became {grad_norm} at step {}; nothing of that step was applied and the adapter of step {} is kept. Lower the learning rate",
                    self.state.step + 1,
                    self.state.step
                ));
            }
            let clip = if config.max_grad_norm > 0.0 && grad_norm > config.max_grad_norm {
                config.max_grad_norm / grad_norm
            } else {
                1.0
            };
            let lr = config.lr_at(self.state.step, self.state.total_steps);
            self.opt.step(&grads, lr, clip)?;
            self.state.step += 1;
            self.state.epoch = stream.epoch;
            self.state.batch_in_epoch = stream.pos;
            self.state.last_loss = Some(loss);

            let step_secs = step_start.elapsed().as_secs_f64();
            let elapsed = started.elapsed().as_secs_f64();
            let done = (self.state.step - first_step) as f64;
            self.reporter.send(Event::Step(StepStats {
                step: self.state.step,
                total_steps: self.state.total_steps,
                epoch: stream.progress(),
                loss,
                lr,
                grad_norm,
                tokens: n_total,
                input_tokens,
                tokens_per_sec: input_tokens as f64 / step_secs.max(1e-9),
                elapsed_secs: elapsed,
                eta_secs: elapsed / done * (self.state.total_steps - self.state.step) as f64,
                rss_bytes: crate::memory::process_rss_bytes(),
                device_bytes: crate::backend::device_memory_used(self.model.device()),
            }));
            let last = self.state.step == self.state.total_steps;
            if !last && config.eval_every > 0 && self.state.step.is_multiple_of(config.eval_every) {
                if let Some((v, exhausted)) = self.eval()? {
                    last_val = Some(v);
                    if exhausted {
                        self.reporter.send(Event::Log(format!(
                            "early stop: validation loss has not improved for {} evaluations",
                            config.early_stop_patience
                        )));
                        break;
                    }
                }
            }
            if !last && config.save_every > 0 && self.state.step.is_multiple_of(config.save_every) {
                self.save()?;
            }
        }
        if self.state.step == self.state.total_steps {
            last_val = self.eval()?.map(|(v, _)| v).or(last_val);
        }
        let adapter = self.save()?;
        Ok(Event::Finished {
            adapter,
            best: self.best_adapter(),
            final_loss: self.state.last_loss,
            final_val_loss: last_val,
        })
    }
}

/// Convenience for tests and the CLI: where `run` puts the latest adapter.
pub fn adapter_dir(out_dir: &Path) -> PathBuf {
    out_dir.join("adapter")
}
