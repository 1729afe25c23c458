#!/usr/bin/env python3
"""Makes tests/fixtures/<arch>-dora/: DoRA fixtures computed by transformers + PEFT (issue 18), for
every fixture architecture (tiny-llama, tiny-qwen2, tiny-qwen3, tiny-gpt2 in tests/fixtures). Each
is a complete fixture in the usual format (the model's files copied from tests/fixtures/<arch>), so
the parity suite checks it as it checks every fixture: it reads `use_dora` from the adapter config.

For each model: PEFT's LoRA with `use_dora=True` on the same targets as the fixture's LoRA adapter
(r=4, lora_alpha=8, dropout 0; GPT-2's Conv1D with fan_in_fan_out), A and B set to the LoRA
fixture's values (both non-zero) and the magnitude vector moved off its initial value (the row
norms of W + s·B·A) by a seeded ±10 %, so a wrong DoRA formula cannot match by accident. Written:
- `peft-adapter/`: the adapter as PEFT saves it (`adapter_model.safetensors` with
  `...lora_magnitude_vector` tensors, `adapter_config.json` with `use_dora: true`);
- `reference.safetensors`: `input_ids`, `labels`, `base_logits` (the LoRA fixture's),
  `lora_logits` (2, 24, V) of the DoRA model, and `grad.<PEFT key>` for every lora_A, lora_B and
  lora_magnitude_vector tensor: the gradient of the masked mean cross-entropy (HF convention, as
  reference.json says);
- `reference.json`: the loss, the settings and the versions.

    PY=$(tools/pyref-setup.sh | tail -1); $PY tools/make_dora_fixtures.py

Deterministic: rerunning gives the same files (seeded; CPU, float32).
"""
import json
import os
import shutil
import sys
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests/fixtures"
MODEL_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt",
               "special_tokens_map.json"]
ARCHS = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-gpt2"]


def main():
    torch.manual_seed(0)
    for arch in ARCHS:
        src = FIX / arch
        ref = load_file(src / "reference.safetensors")
        lora_cfg = json.load(open(src / "peft-adapter/adapter_config.json"))
        model = transformers.AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32)
        model.eval()
        config = LoraConfig(
            r=lora_cfg["r"],
            lora_alpha=lora_cfg["lora_alpha"],
            lora_dropout=0.0,
            target_modules=lora_cfg["target_modules"],
            fan_in_fan_out=lora_cfg.get("fan_in_fan_out", False),
            use_dora=True,
            task_type="CAUSAL_LM",
        )
        pm = get_peft_model(model, config)
        # A and B from the LoRA fixture (PEFT's saved names lack the adapter name).
        lora = load_file(src / "peft-adapter/adapter_model.safetensors")
        state = pm.state_dict()
        loaded = 0
        for key, value in lora.items():
            live = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
                ".lora_B.weight", ".lora_B.default.weight"
            )
            assert live in state, (arch, live)
            state[live].copy_(value)
            loaded += 1
        # Re-initialise each magnitude from the new W + s·B·A, then move it off that value.
        g = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            for name, module in pm.named_modules():
                mags = getattr(module, "lora_magnitude_vector", None)
                if mags is not None and "default" in mags:
                    mags["default"].update_layer(
                        base_layer=module.get_base_layer(),
                        lora_A=module.lora_A["default"].weight,
                        lora_B=module.lora_B["default"].weight,
                        scaling=module.scaling["default"],
                    )
                    m = mags["default"].weight
                    m.mul_(1 + 0.1 * (2 * torch.rand(m.shape, generator=g) - 1))
        ids = ref["input_ids"].long()
        labels = ref["labels"].long()
        pm.zero_grad()
        out = pm(input_ids=ids, labels=labels)
        out.loss.backward()
        dst = FIX / f"{arch}-dora"
        if dst.exists():
            shutil.rmtree(dst)
        (dst / "peft-adapter").mkdir(parents=True)
        for f in MODEL_FILES:
            if (src / f).is_file():
                shutil.copy(src / f, dst / f)
        pm.save_pretrained(dst / "peft-adapter")
        cfg_path = dst / "peft-adapter/adapter_config.json"
        saved_cfg = json.load(open(cfg_path))
        saved_cfg["base_model_name_or_path"] = arch  # not this machine's path
        json.dump(saved_cfg, open(cfg_path, "w"), indent=2, sort_keys=True)
        saved = load_file(dst / "peft-adapter/adapter_model.safetensors")
        grads = {}
        for key in saved:
            live = (
                key.replace(".lora_A.weight", ".lora_A.default.weight")
                .replace(".lora_B.weight", ".lora_B.default.weight")
                .replace(".lora_magnitude_vector", ".lora_magnitude_vector.default.weight")
            )
            param = dict(pm.named_parameters())[live]
            grads["grad." + key] = param.grad.detach().clone().contiguous()
        tensors = {
            "input_ids": ref["input_ids"],
            "labels": ref["labels"],
            "base_logits": ref["base_logits"],
            "lora_logits": out.logits.detach().contiguous(),
            **grads,
        }
        save_file(tensors, dst / "reference.safetensors")
        info = {
            "made_by": "tools/make_dora_fixtures.py",
            "made_with": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
            },
            "model": f"copied from ../{arch}",
            "loss": float(out.loss),
            "loss_definition": "mean token cross-entropy over positions whose label != -100, labels shifted by one inside the model (HF convention)",
            "dora": {
                "r": lora_cfg["r"],
                "lora_alpha": lora_cfg["lora_alpha"],
                "target_modules": lora_cfg["target_modules"],
                "magnitude": "dora_init then scaled by a seeded uniform factor in [0.9, 1.1]",
                "lora_tensors_from": f"../{arch}/peft-adapter",
            },
            "tensors": {"lora": loaded, "grads": len(grads)},
        }
        json.dump(info, open(dst / "reference.json", "w"), indent=2)
        print(f"{arch}: loss {float(out.loss):.6f}, {len(grads)} gradients")
    for readme in FIX.glob("*-dora/peft-adapter/README.md"):
        os.remove(readme)


if __name__ == "__main__":
    sys.exit(main())
