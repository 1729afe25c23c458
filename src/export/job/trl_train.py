"""FineTune job, run with TRL's SFTTrainer + PEFT (written by `finetune job export --to trl`).

The data in data/*.jsonl is FineTune's own encoding of the records: `input_ids` with the chat
template applied and `labels` equal to the token where it is trained and -100 where it is masked,
in the order of FineTune's first epoch. So this trains the same tokens with the same mask as
FineTune. Settings come from job.json; env MAX_STEPS, CPU=1, MODEL and OUT override.
"""

import json
import math
import os
import sys

import torch
from datasets import load_dataset
from peft import LoraConfig
from torch.utils.data import SequentialSampler
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

HERE = os.path.dirname(os.path.abspath(__file__))
job = json.load(open(os.path.join(HERE, "job.json")))
cpu = os.environ.get("CPU", "0") == "1"
model_id = os.environ.get("MODEL", job["model"])
out = os.environ.get("OUT", os.path.join(HERE, "output"))
max_steps = int(os.environ.get("MAX_STEPS", job["max_steps"]))
dtype = torch.float32 if cpu or job["dtype"] == "f32" else torch.bfloat16


def lr_lambda(step):
    """FineTune's schedule (TrainConfig::lr_at) as a multiple of the peak learning rate."""
    total, warmup, floor = max_steps, job["warmup_steps"], job["min_lr_ratio"]
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    if job["schedule"] == "constant":
        return 1.0
    if job["schedule"] == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class FineTuneTrainer(SFTTrainer):
    """Keeps FineTune's record order and schedule, and records the first step's exact loss."""

    first_loss = None

    def _get_train_sampler(self, *args, **kwargs):
        if self.args.world_size > 1:
            return super()._get_train_sampler(*args, **kwargs)
        return SequentialSampler(self.train_dataset)

    def create_scheduler(self, num_training_steps, optimizer=None):
        if self.lr_scheduler is None:
            opt = optimizer if optimizer is not None else self.optimizer
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        return self.lr_scheduler

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        if FineTuneTrainer.first_loss is None:
            value = loss[0] if isinstance(loss, tuple) else loss
            FineTuneTrainer.first_loss = float(value.detach())
        return loss


def main():
    lora = job["lora"]
    peft_config = LoraConfig(
        r=lora["rank"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["targets"] or "all-linear",
        layers_to_transform=lora["layers"],
        use_rslora=lora["use_rslora"],
        use_dora=lora["use_dora"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    files = {"train": os.path.join(HERE, "data", "train.jsonl")}
    valid = os.path.join(HERE, "data", "valid.jsonl")
    if os.path.exists(valid):
        files["validation"] = valid
    data = load_dataset("json", data_files=files)
    opt = job["adamw"]
    args = SFTConfig(
        output_dir=out,
        max_steps=max_steps,
        per_device_train_batch_size=job["batch_size"],
        per_device_eval_batch_size=job["batch_size"],
        gradient_accumulation_steps=job["grad_accum"],
        learning_rate=job["lr"],
        adam_beta1=opt["beta1"],
        adam_beta2=opt["beta2"],
        adam_epsilon=opt["eps"],
        weight_decay=opt["weight_decay"],
        optim="adamw_torch",
        max_grad_norm=job["max_grad_norm"] if job["max_grad_norm"] > 0 else None,
        max_length=job["max_seq_len"],
        gradient_checkpointing=job["gradient_checkpointing"],
        eval_strategy="steps" if job["eval_every"] and "validation" in data else "no",
        eval_steps=job["eval_every"] or None,
        save_steps=job["save_every"] or max_steps,
        logging_steps=1,
        seed=job["seed"],
        bf16=dtype == torch.bfloat16,
        use_cpu=cpu,
        ddp_backend="gloo" if cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        report_to="none",
        dataloader_drop_last=False,
    )
    model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    trainer = FineTuneTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data.get("validation"),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    if trainer.is_world_process_zero():
        print(f"processes: {args.world_size}", file=sys.stderr)
    trainer.train()
    adapter = os.path.join(out, "adapter")
    trainer.save_model(adapter)
    if trainer.is_world_process_zero():
        with open(os.path.join(out, "first_step_loss.json"), "w") as f:
            json.dump({"loss": FineTuneTrainer.first_loss}, f)
        print(f"adapter: {adapter}", file=sys.stderr)


if __name__ == "__main__":
    main()
