//! `train::run`: one readable training loop (after mlx-lm's `tuner/trainer.py`). [`Trainer::prepare`]
//! picks the backend, resolves the model folder once, reads the data, loads the model and attaches
//! LoRA (or resumes a checkpoint); [`Trainer::train`] is a short loop over named parts:
//! [`Trainer::step`] (micro-batches → masked loss → `Model::backward` accumulated with token
//! weights → global-norm clipping → AdamW with the scheduled lr), [`Trainer::report`],
//! [`Trainer::evaluate`] (at start, every N and at the end) and [`Trainer::save`] (every N and at
//! the end). It honours the stop flag between steps and ends in a [`StopReason`]: finished, stopped
//! by the person, early-stopped, or a non-finite loss / gradient norm (the last good adapter kept).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};

use crate::backend;
use crate::data::{self, Batch, BatchOptions, Dataset, LoadedData, ModelTokenizer};
use crate::model::{
    adapter, lora::mix, ops, LoraState, Model, ModelConfig, ModelInput, PreparedModel,
};
use crate::train::checkpoint::{self, TrainerState};
use crate::train::config::{capped_seq_len, Duration, TrainConfig, ValidConfig};
use crate::train::events::{Event, Reporter, StepStats, StopReason};
use crate::train::optim::AdamW;
use crate::train::samples;
use crate::train::stream::BatchStream;

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
fn validation_loss(
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
        let (loss, n) = model.eval_loss(&input, &batch.labels)?;
        let loss = loss.to_scalar::<f32>()? as f64;
        sum += loss * n as f64;
        count += n;
    }
    Ok(if count == 0 {
        f64::NAN
    } else {
        sum / count as f64
    })
}

/// Runs one training session to its end, reporting through `reporter`; the last event is
/// `Finished`, `Stopped` or `Failed`. Never panics on bad input: every failure ends in
/// `Event::Failed` with what to do next.
pub fn run(config: ValidConfig, reporter: &dyn Reporter) {
    let end = Trainer::prepare(config.into_inner(), reporter)
        .and_then(|mut trainer| {
            let reason = trainer.train()?;
            trainer.finish(reason)
        })
        .unwrap_or_else(|e| Event::Failed {
            error: format!("{e:#}"),
        });
    reporter.send(end);
}

/// The model everything downstream loads from (tokenizer, config, context length, weights): the
/// user's folder itself, or the safetensors copy of a GGUF file or a PyTorch `.bin` folder
/// (converted once, then reused from the cache); see [`crate::model::source`].
fn prepare_model(config: &TrainConfig, reporter: &dyn Reporter) -> anyhow::Result<PreparedModel> {
    let prepared = crate::model::source::prepare(&config.model_dir)?;
    if let Some(message) = &prepared.message {
        reporter.send(Event::Log(message.clone()));
    }
    Ok(prepared)
}

/// Rows longer than the model's context cannot run: lowers `max_seq_len` to the prepared
/// model's context length, saying so.
fn cap_to_context(config: &mut TrainConfig, model: &ModelConfig, reporter: &dyn Reporter) {
    let capped = capped_seq_len(config.max_seq_len, model.max_position_embeddings);
    if capped < config.max_seq_len {
        reporter.send(Event::Log(format!(
            "max sequence length lowered from {} to {capped} tokens, the model's context length",
            config.max_seq_len
        )));
        config.max_seq_len = capped;
    }
}

/// Tokenizes the training and validation data with the model's tokenizer.
fn load_data(
    config: &TrainConfig,
    model_dir: &Path,
    reporter: &dyn Reporter,
) -> anyhow::Result<(LoadedData, ModelTokenizer)> {
    let tokenizer = ModelTokenizer::from_dir(model_dir)?;
    reporter.send(Event::Log(format!(
        "reading {}",
        config.train_data.display()
    )));
    let loaded = data::load_with_progress(
        &config.train_data,
        config.valid_data.as_deref(),
        &tokenizer,
        &config.data_options(),
        &|done, total| reporter.send(Event::Reading { done, total }),
    )
    .map_err(|errors| anyhow::anyhow!("{errors}"))?;
    for skipped in &loaded.skipped {
        reporter.send(Event::Log(format!("skipped: {skipped}")));
    }
    Ok((loaded, tokenizer))
}

/// Fresh LoRA weights, or the adapter and trainer state of the checkpoint to resume from.
fn attach_or_resume(
    config: &TrainConfig,
    model: &mut Model,
) -> anyhow::Result<(LoraState, Option<TrainerState>)> {
    Ok(match &config.resume_from {
        Some(dir) => {
            let state = checkpoint::load_state(dir)?;
            (adapter::load(dir, model)?, Some(state))
        }
        None => (model.attach_lora(&config.lora, config.seed)?, None),
    })
}

/// Optimizer steps of the whole run.
fn total_steps(config: &TrainConfig, train: &Dataset, options: &BatchOptions) -> usize {
    match config.duration {
        Duration::Steps(n) => n,
        Duration::Epochs(e) => {
            let batches_per_epoch = data::batches(train, options, config.seed, 0).len();
            (e * batches_per_epoch).div_ceil(config.grad_accum)
        }
    }
}

/// What one optimizer step did, for its `Step` event.
struct StepDone {
    /// Token-weighted mean loss over the step's micro-batches.
    loss: f64,
    lr: f64,
    grad_norm: f64,
    /// Trained (unmasked) tokens and all non-padding tokens.
    tokens: usize,
    input_tokens: usize,
    secs: f64,
}

/// Wall-clock time since this session's first step, for the elapsed time and the ETA.
struct Pace {
    started: Instant,
    first_step: usize,
}

struct Trainer<'r> {
    /// The settings, `max_seq_len` capped to the model's context.
    config: TrainConfig,
    reporter: &'r dyn Reporter,
    model: Model,
    lora: LoraState,
    opt: AdamW,
    train: Arc<Dataset>,
    valid: Option<Dataset>,
    options: BatchOptions,
    state: TrainerState,
    /// The user's name of the model (its folder or file), recorded in the adapter.
    base_name: String,
    /// Validation loss of the latest evaluation.
    last_val: Option<f64>,
    /// The validation prompts answered at each evaluation.
    sample_prompts: Vec<samples::SamplePrompt>,
    /// The model's tokenizer (for the sample answers).
    tokenizer: ModelTokenizer,
    /// Where sample answers end.
    stop_ids: Vec<u32>,
}

impl<'r> Trainer<'r> {
    fn prepare(mut config: TrainConfig, reporter: &'r dyn Reporter) -> anyhow::Result<Self> {
        let backend = backend::pick_with(config.device, config.dtype)?;
        reporter.send(Event::Log(format!(
            "device: {} — {}",
            backend.name, backend.reason
        )));
        let prepared = prepare_model(&config, reporter)?;
        cap_to_context(&mut config, &prepared.config, reporter);
        let model_dir = prepared.dir.clone();
        let (loaded, tokenizer) = load_data(&config, &model_dir, reporter)?;
        reporter.send(Event::Log(format!(
            "loading {}",
            config.model_dir.display()
        )));
        let quant = config.linear_quant(&prepared.source);
        let mut model = Model::load_with(&model_dir, backend.dtype, &backend.device, &quant)?;
        if let Some(line) = model.quant_summary() {
            reporter.send(Event::Log(line));
        }
        let (lora, resumed) = attach_or_resume(&config, &mut model)?;
        model.set_gradient_checkpointing(
            config.gradient_checkpointing,
            config.checkpoint_keep_every,
        );
        let opt = AdamW::new(lora.named_vars(), config.adamw)?;
        let options = BatchOptions {
            batch_size: config.batch_size,
            packing: config.packing,
            max_seq_len: config.max_seq_len,
            pad_to_multiple: 1,
        };
        let total_steps = total_steps(&config, &loaded.train, &options);
        let state = TrainerState::start(&config, total_steps);
        let base_name = prepared.source.name();
        let sample_prompts = loaded.valid.as_ref().map_or_else(Vec::new, |valid| {
            let room = prepared.config.max_position_embeddings;
            let max_prompt = room
                .saturating_sub(config.sample_tokens)
                .min(config.max_seq_len);
            samples::pick(
                valid,
                &tokenizer,
                config.samples,
                max_prompt,
                config.sample_tokens,
            )
        });
        let defaults = crate::generate::GenerationDefaults::from_dir(&model_dir);
        let stop_ids = crate::generate::stop_ids(&defaults.eos_ids, &tokenizer);
        let mut trainer = Self {
            config,
            reporter,
            model,
            lora,
            opt,
            train: Arc::new(loaded.train),
            valid: loaded.valid,
            options,
            state,
            base_name,
            last_val: None,
            sample_prompts,
            tokenizer,
            stop_ids,
        };
        if let Some(state) = resumed {
            trainer.resume(state)?;
        }
        trainer.report_started(&backend.name);
        if !backend.device.is_cpu() && trainer.model.dtype == candle_core::DType::F16 {
            // No loss scaling: small gradients flush to zero, large activations overflow
            // (docs/metal.md, gap 8).
            trainer.reporter.send(Event::Log(
                "warning: f16 on a GPU trains without loss scaling (gradients may underflow); bf16 or f32 are safer".into(),
            ));
        }
        Ok(trainer)
    }

    /// Continues from the checkpoint `config.resume_from`, whose trainer state is `saved`: its
    /// optimizer moments and position, this run's settings and length.
    fn resume(&mut self, mut saved: TrainerState) -> anyhow::Result<()> {
        let Some(dir) = &self.config.resume_from else {
            return Ok(());
        };
        let moments = checkpoint::load_optimizer(dir, self.model.device())?;
        self.opt.load_state(&moments, saved.step)?;
        self.reporter.send(Event::Log(format!(
            "resuming at step {} from {}",
            saved.step,
            dir.display()
        )));
        saved.total_steps = self.state.total_steps;
        saved.config = self.config.clone();
        self.state = saved;
        Ok(())
    }

    fn report_started(&self, device: &str) {
        self.reporter.send(Event::Started {
            model: self.base_name.clone(),
            architecture: self.model.config.architecture.clone(),
            device: device.to_owned(),
            base_params: self.model.config.parameter_count(),
            trainable_params: self.lora.parameter_count(),
            total_steps: self.state.total_steps,
            start_step: self.state.step,
            train: Box::new(self.train.summary.clone()),
            valid: self.valid.as_ref().map(|v| Box::new(v.summary.clone())),
        });
    }

    /// The loop: steps until the end, a stop request, an early stop or a non-finite value.
    fn train(&mut self) -> anyhow::Result<StopReason> {
        let out = &self.config.out_dir;
        std::fs::create_dir_all(out)
            .with_context(|| format!("creating the output folder {}", out.display()))?;
        let train = self.train.clone();
        let mut stream = BatchStream::new(
            &train,
            self.options.clone(),
            self.config.seed,
            self.state.epoch,
            self.state.batch_in_epoch,
        );
        if self.state.step == 0 {
            self.evaluate()?;
        }
        let pace = Pace {
            started: Instant::now(),
            first_step: self.state.step,
        };
        while self.state.step < self.state.total_steps {
            if self.reporter.stop_requested() {
                return Ok(StopReason::StoppedByUser {
                    step: self.state.step,
                });
            }
            let done = match self.step(&mut stream)? {
                ControlFlow::Continue(done) => done,
                ControlFlow::Break(stop) => return Ok(stop),
            };
            self.report(&done, stream.progress(), &pace);
            if self.state.step == self.state.total_steps {
                break;
            }
            if self.due(self.config.eval_every) && self.evaluate()?.is_some() {
                if let Some(stop) = self.early_stop() {
                    return Ok(stop);
                }
            }
            if self.due(self.config.save_every) {
                self.save()?;
            }
        }
        if self.state.step == self.state.total_steps {
            self.evaluate()?;
        }
        Ok(StopReason::Finished)
    }

    /// True when the step just finished is a multiple of `every` (0 = never).
    fn due(&self, every: usize) -> bool {
        every > 0 && self.state.step.is_multiple_of(every)
    }

    /// One optimizer step over `grad_accum` micro-batches. Breaks with the reason when the loss
    /// or the gradient norm is not finite; nothing of that step is applied then.
    fn step(
        &mut self,
        stream: &mut BatchStream,
    ) -> anyhow::Result<ControlFlow<StopReason, StepDone>> {
        let started = Instant::now();
        let micro: Vec<Batch> = (0..self.config.grad_accum)
            .filter_map(|_| stream.next())
            .collect();
        let tokens: usize = micro.iter().map(|b| b.trained_tokens).sum();
        if tokens == 0 {
            anyhow::bail!("the training set has no tokens to learn from (all masked?)");
        }
        let mut grads: Vec<Option<Tensor>> = vec![None; self.opt.params().len()];
        let (mut loss_sum, mut input_tokens) = (0f64, 0usize);
        for (i, batch) in micro.iter().enumerate() {
            let (loss, n) = self.forward(i, batch)?;
            let value = loss.to_scalar::<f32>()? as f64;
            if let Some(stop) = self.non_finite(value, |step, value| StopReason::NonFiniteLoss {
                step,
                value,
            }) {
                return Ok(ControlFlow::Break(stop));
            }
            loss_sum += value * n as f64;
            input_tokens += batch.segment_ids.iter().filter(|&&s| s != 0).count();
            // Weight each micro-batch by its share of target tokens, so the step's gradient is
            // that of the mean loss over all its tokens (HF's num_items_in_batch convention).
            let weight = n as f64 / tokens as f64;
            self.opt
                .accumulate(&mut grads, &self.model.backward(&loss)?, weight)?;
        }
        let grad_norm = AdamW::grad_norm(&grads)?;
        if let Some(stop) = self.non_finite(grad_norm, |step, value| {
            StopReason::NonFiniteGradNorm { step, value }
        }) {
            return Ok(ControlFlow::Break(stop));
        }
        let lr = self.update(&grads, grad_norm)?;
        self.state.step += 1;
        self.state.epoch = stream.epoch;
        self.state.batch_in_epoch = stream.pos;
        let loss = loss_sum / tokens as f64;
        self.state.last_loss = Some(loss);
        Ok(ControlFlow::Continue(StepDone {
            loss,
            lr,
            grad_norm,
            tokens,
            input_tokens,
            secs: started.elapsed().as_secs_f64(),
        }))
    }

    /// The loss of micro-batch `i` of the coming step (dropout seeded by its position in the run,
    /// so a resumed run draws the same masks).
    fn forward(&self, i: usize, batch: &Batch) -> anyhow::Result<(Tensor, usize)> {
        let config = &self.config;
        let position = (self.state.step * config.grad_accum + i) as u64;
        self.lora.dropout_seed.set(mix(config.seed, position));
        let input = model_input(batch, config.packing, self.model.dtype, self.model.device())?;
        Ok(self.model.loss(&input, &batch.labels, true)?)
    }

    /// The stop for a `value` of the coming step that is NaN or infinite, if it is.
    fn non_finite(&self, value: f64, reason: fn(usize, f64) -> StopReason) -> Option<StopReason> {
        (!value.is_finite()).then(|| reason(self.state.step + 1, value))
    }

    /// Clips the gradients to `max_grad_norm` and takes the AdamW step; returns the lr used.
    fn update(&mut self, grads: &[Option<Tensor>], grad_norm: f64) -> anyhow::Result<f64> {
        let max = self.config.max_grad_norm;
        let clip = if max > 0.0 && grad_norm > max {
            max / grad_norm
        } else {
            1.0
        };
        let lr = self.config.lr_at(self.state.step, self.state.total_steps);
        self.opt.step(grads, lr, clip)?;
        Ok(lr)
    }

    /// Sends the `Step` event of the step just taken; `epoch` is the fractional epoch.
    fn report(&self, done: &StepDone, epoch: f64, pace: &Pace) {
        let elapsed = pace.started.elapsed().as_secs_f64();
        let steps_done = (self.state.step - pace.first_step) as f64;
        let steps_left = (self.state.total_steps - self.state.step) as f64;
        self.reporter.send(Event::Step(StepStats {
            step: self.state.step,
            total_steps: self.state.total_steps,
            epoch,
            loss: done.loss,
            lr: done.lr,
            grad_norm: done.grad_norm,
            tokens: done.tokens,
            input_tokens: done.input_tokens,
            tokens_per_sec: done.input_tokens as f64 / done.secs.max(1e-9),
            elapsed_secs: elapsed,
            eta_secs: elapsed / steps_done * steps_left,
            rss_bytes: crate::memory::process_rss_bytes(),
            device_bytes: backend::device_memory_used(self.model.device()),
        }));
    }

    /// Evaluates on the validation set, keeps the best adapter and reports `Eval`; `None`
    /// without a validation set.
    fn evaluate(&mut self) -> anyhow::Result<Option<f64>> {
        let Some(valid) = &self.valid else {
            return Ok(None);
        };
        let val = validation_loss(&self.model, valid, &self.config, &self.options)?;
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
        self.last_val = Some(val);
        self.reporter.send(Event::Eval {
            step: self.state.step,
            val_loss: val,
            best,
        });
        self.report_samples();
        Ok(Some(val))
    }

    /// Answers the sample prompts and reports them; a failure is reported, not fatal.
    fn report_samples(&self) {
        if self.sample_prompts.is_empty() {
            return;
        }
        let tok = &self.tokenizer;
        match samples::answer(&self.model, tok, &self.sample_prompts, &self.stop_ids) {
            Ok(answers) => self.reporter.send(Event::Samples {
                step: self.state.step,
                answers,
            }),
            Err(e) => self
                .reporter
                .send(Event::Log(format!("sample answers failed: {e:#}"))),
        }
    }

    /// Early stopping: validation loss has not improved for `early_stop_patience` evaluations.
    fn early_stop(&self) -> Option<StopReason> {
        let patience = self.config.early_stop_patience;
        (patience > 0 && self.state.evals_since_best >= patience)
            .then_some(StopReason::EarlyStopped { patience })
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

    /// The best-validation adapter folder, once one was written.
    fn best_adapter(&self) -> Option<PathBuf> {
        let best = self.out("best");
        best.join(adapter::ADAPTER_WEIGHTS)
            .is_file()
            .then_some(best)
    }

    /// Saves the adapter of the last finished step and names the run's end.
    fn finish(&self, reason: StopReason) -> anyhow::Result<Event> {
        let adapter = self.save()?;
        let best = self.best_adapter();
        Ok(match reason {
            StopReason::Finished => Event::Finished {
                adapter,
                best,
                final_loss: self.state.last_loss,
                final_val_loss: self.last_val,
            },
            reason => Event::Stopped {
                adapter,
                best,
                step: self.state.step,
                reason,
            },
        })
    }
}
