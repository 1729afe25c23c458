#!/usr/bin/env python3
"""Makes the fixtures of the architectures added in issue 19, computed by transformers + PEFT:
tests/fixtures/tiny-{gemma2,gemma3,phi3,smollm3}/ (+ `-sharded`), and tiny-gemma3-vlm/ (the same
text weights inside a Gemma3ForConditionalGeneration checkpoint).

Tiny random configs that exercise every feature the forward pass must reproduce:
- gemma2: (1 + w) RMSNorms, pre/post norms around attention and MLP, GeGLU (gelu_pytorch_tanh),
  embeddings scaled by sqrt(hidden), attention-logit and final-logit soft-capping that bite,
  alternating sliding-window layers (window 6 < sequence 24), query_pre_attn_scalar != head_dim.
- gemma3: q/k norms, six layers (five sliding, one global: Gemma 3's pattern) with local RoPE
  base 10k and global base 1e6 with linear scaling (factor 8, as Gemma 3 4B+), window 5,
  head_dim 32 != hidden/heads, tied.
- phi3: fused qkv_proj and gate_up_proj, longrope with short/long factors and
  original_max_position_embeddings 16 < 24 (so the 24-token rows run on the long factors; the
  `short_logits` reference, rows cut to 16 tokens, on the short ones), partial_rotary_factor 0.5,
  sliding window 20 on every layer, untied.
- smollm3: Llama-like with RoPE skipped on the no_rope_layers (every fourth), tied.

The tokenizer is tiny-llama's (byte-level BPE, vocab 512); gemma fixtures get Gemma 3's chat
template (no system role). Inputs and labels are tiny-llama's reference rows. Each fixture holds
`peft-adapter/` (PEFT LoRA r=4, alpha=8, A and B seeded non-zero, on every linear PEFT names for
that architecture), `reference.safetensors` (`input_ids`, `labels`, `base_logits`, `lora_logits`,
`grad.<PEFT key>` for every LoRA tensor) and `reference.json` (the masked loss). Soft-capping and
the sliding window are checked to change the logits (printed), so they cannot pass by accident.

    PY=$(tools/pyref-setup.sh | tail -1); $PY tools/make_arch_fixtures.py

Deterministic (seeded; CPU, float32, eager attention).
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
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json"]

GEMMA3_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

COMMON = dict(vocab_size=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def configs():
    return {
        "tiny-gemma2": (
            transformers.Gemma2Config(
                **COMMON, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
                hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=24,
                sliding_window=6, attn_logit_softcapping=1.5, final_logit_softcapping=2.0,
                initializer_range=0.2, tie_word_embeddings=True,
            ),
            ALL7,
        ),
        "tiny-gemma3": (
            transformers.Gemma3TextConfig(
                **COMMON, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                max_position_embeddings=256, rms_norm_eps=1e-6,
                hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=32,
                # layer_types from Gemma 3's pattern (five sliding, one global), the one
                # llama.cpp assumes for GGUF files.
                sliding_window=5,
                rope_parameters={
                    "full_attention": {"rope_type": "linear", "factor": 8.0,
                                       "rope_theta": 1000000.0},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                },
                initializer_range=0.2, tie_word_embeddings=True,
            ),
            ALL7,
        ),
        "tiny-phi3": (
            transformers.Phi3Config(
                **COMMON, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                original_max_position_embeddings=16, rms_norm_eps=1e-5,
                rope_parameters={
                    "rope_type": "longrope", "rope_theta": 10000.0,
                    "partial_rotary_factor": 0.5,
                    "short_factor": [1.0, 1.1, 1.3, 1.7],
                    "long_factor": [1.2, 2.5, 4.0, 9.0],
                },
                sliding_window=20, tie_word_embeddings=False, initializer_range=0.02,
            ),
            ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        ),
        "tiny-smollm3": (
            transformers.SmolLM3Config(
                **COMMON, hidden_size=64, intermediate_size=144, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
                # no_rope_layers from the default interval (4): layer 3 has no RoPE, as
                # llama.cpp assumes for GGUF files.
                tie_word_embeddings=True, initializer_range=0.05,
            ),
            ALL7,
        ),
    }


def set_lora(pm, gen):
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def masked_loss(logits, labels):
    shift = logits[:, :-1].reshape(-1, logits.shape[-1])
    return torch.nn.functional.cross_entropy(shift, labels[:, 1:].reshape(-1), ignore_index=-100)


def write_model(model, dst, arch, sharded=False):
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    kw = {"max_shard_size": "40KB"} if sharded else {}
    model.save_pretrained(dst, **kw)
    src = FIX / "tiny-llama"
    for f in TOKENIZER_FILES:
        shutil.copy(src / f, dst / f)
    if "gemma" in arch:
        (dst / "chat_template.jinja").write_text(GEMMA3_TEMPLATE)
    else:
        shutil.copy(src / "chat_template.jinja", dst / "chat_template.jinja")


def main():
    ref_llama = load_file(FIX / "tiny-llama/reference.safetensors")
    ids = ref_llama["input_ids"].long()
    labels = ref_llama["labels"].long()
    for i, (arch, (cfg, targets)) in enumerate(configs().items()):
        torch.manual_seed(100 + i)
        cfg._attn_implementation = "eager"
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
        model.eval()
        with torch.no_grad():
            # Norm weights start at 0 (Gemma) or 1; move them so a wrong norm formula shows.
            for name, p in model.named_parameters():
                if p.dim() == 1:
                    p.add_(0.3 * torch.randn(p.shape))
        dst = FIX / arch
        write_model(model, dst, arch)
        write_model(model, FIX / f"{arch}-sharded", arch, sharded=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            dst, dtype=torch.float32, attn_implementation="eager")
        model.eval()
        with torch.no_grad():
            base = model(input_ids=ids).logits
            extra = {}
            if arch == "tiny-phi3":
                extra["short_logits"] = model(input_ids=ids[:, :16]).logits.contiguous()
            report_features(arch, model, ids, base)
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                            task_type="CAUSAL_LM")
        pm = get_peft_model(model, config)
        set_lora(pm, torch.Generator().manual_seed(7 + i))
        pm.zero_grad()
        out = pm(input_ids=ids)
        loss = masked_loss(out.logits, labels)
        loss.backward()
        pm.save_pretrained(dst / "peft-adapter")
        cfg_path = dst / "peft-adapter/adapter_config.json"
        saved_cfg = json.load(open(cfg_path))
        saved_cfg["base_model_name_or_path"] = arch
        json.dump(saved_cfg, open(cfg_path, "w"), indent=2, sort_keys=True)
        os.remove(dst / "peft-adapter/README.md")
        saved = load_file(dst / "peft-adapter/adapter_model.safetensors")
        params = dict(pm.named_parameters())
        grads = {}
        for key in saved:
            live = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
                ".lora_B.weight", ".lora_B.default.weight")
            grads["grad." + key] = params[live].grad.detach().clone().contiguous()
        save_file({
            "input_ids": ref_llama["input_ids"], "labels": ref_llama["labels"],
            "base_logits": base.contiguous(), "lora_logits": out.logits.detach().contiguous(),
            **extra, **grads,
        }, dst / "reference.safetensors")
        info = {
            "made_by": "tools/make_arch_fixtures.py",
            "made_with": {"torch": torch.__version__, "transformers": transformers.__version__,
                          "peft": peft.__version__},
            "model_type": cfg.model_type,
            "loss": float(loss),
            "loss_definition": "mean token cross-entropy over positions whose label != -100, labels shifted by one inside the model (HF convention)",
            "lora": {"r": 4, "lora_alpha": 8, "scaling": 2.0, "target_modules": targets},
            "tensors": {"grads": len(grads)},
        }
        json.dump(info, open(dst / "reference.json", "w"), indent=2)
        print(f"{arch}: loss {float(loss):.6f}, {len(grads)} gradients")
        if arch == "tiny-gemma3":
            make_vlm(model_dir=dst)


def report_features(arch, model, ids, base):
    """Prints how much each feature moves the logits: a feature that does not bite is no test."""
    cfg = model.config
    def diff(**changes):
        saved = {k: getattr(cfg, k) for k in changes}
        for k, v in changes.items():
            setattr(cfg, k, v)
        for layer in model.model.layers:
            a = layer.self_attn
            if "attn_logit_softcapping" in changes:
                a.attn_logit_softcapping = changes["attn_logit_softcapping"]
        other = model(input_ids=ids).logits
        for k, v in saved.items():
            setattr(cfg, k, v)
        for layer in model.model.layers:
            if "attn_logit_softcapping" in changes:
                layer.self_attn.attn_logit_softcapping = saved["attn_logit_softcapping"]
        return float((other - base).abs().max())
    if arch == "tiny-gemma2":
        print(f"  final softcap moves logits by {diff(final_logit_softcapping=None):.3f}")
        print(f"  attention softcap moves logits by {diff(attn_logit_softcapping=None):.3f}")
    if arch in ("tiny-gemma2", "tiny-gemma3", "tiny-phi3"):
        print(f"  sliding window moves logits by {diff(sliding_window=4096):.3f}")


def make_vlm(model_dir):
    """tiny-gemma3's text weights inside a Gemma3ForConditionalGeneration checkpoint (with a tiny
    SigLIP vision tower); its text logits must equal tiny-gemma3's."""
    text_cfg = transformers.AutoConfig.from_pretrained(model_dir)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             image_size=28, patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text_cfg.to_dict(), vision_config=vision.to_dict(),
                                    mm_tokens_per_image=4, image_token_index=500,
                                    boi_token_index=498, eoi_token_index=499)
    torch.manual_seed(5)
    vlm = transformers.Gemma3ForConditionalGeneration(cfg)
    text = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    missing = vlm.model.language_model.load_state_dict(text.model.state_dict())
    assert not missing.missing_keys, missing
    vlm.lm_head.weight = vlm.model.language_model.embed_tokens.weight
    dst = FIX / "tiny-gemma3-vlm"
    write_model(vlm, dst, "gemma3")
    cfg_path = dst / "config.json"
    saved = json.load(open(cfg_path))
    saved["text_config"].pop("_name_or_path", None)  # not this machine's path
    json.dump(saved, open(cfg_path, "w"), indent=2, sort_keys=True)
    ref = load_file(model_dir / "reference.safetensors")
    vlm = transformers.Gemma3ForConditionalGeneration.from_pretrained(dst, dtype=torch.float32)
    vlm.eval()
    with torch.no_grad():
        logits = vlm(input_ids=ref["input_ids"].long()).logits
    d = float((logits - ref["base_logits"]).abs().max())
    print(f"tiny-gemma3-vlm: text logits vs tiny-gemma3 max|diff| {d:.2e}")
    assert d < 1e-4, d
    make_vlm_adapter(model_dir)


def make_vlm_adapter(model_dir):
    """tiny-gemma3's PEFT adapter as PEFT saves it on the multimodal checkpoint (module paths
    `model.language_model.layers.N...`, the vision tower left alone): its logits must equal
    tiny-gemma3's `lora_logits`. Run alone with `--vlm-adapter`."""
    dst = FIX / "tiny-gemma3-vlm"
    vlm = transformers.Gemma3ForConditionalGeneration.from_pretrained(dst, dtype=torch.float32)
    text_adapter = load_file(model_dir / "peft-adapter/adapter_model.safetensors")
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                     target_modules=r".*language_model\.layers\.\d+\..*"
                                    r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    model = get_peft_model(vlm, cfg)
    renamed = {k.replace("base_model.model.model.layers.",
                         "base_model.model.model.language_model.layers."): v
               for k, v in text_adapter.items()}
    result = peft.set_peft_model_state_dict(model, renamed)
    assert not result.unexpected_keys, result.unexpected_keys
    out = dst / "peft-adapter"
    model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's model card; the other fixtures have none
    cfg_path = out / "adapter_config.json"
    saved_cfg = json.load(open(cfg_path))
    saved_cfg["base_model_name_or_path"] = None  # not this machine's path
    json.dump(saved_cfg, open(cfg_path, "w"), indent=2, sort_keys=True)
    saved = load_file(out / "adapter_model.safetensors")
    assert set(saved) == set(renamed), sorted(set(saved) ^ set(renamed))[:4]
    ref = load_file(model_dir / "reference.safetensors")
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"].long()).logits
    d = float((logits - ref["lora_logits"]).abs().max())
    print(f"tiny-gemma3-vlm/peft-adapter: logits vs tiny-gemma3's lora_logits max|diff| {d:.2e}")
    assert d < 1e-4, d


if __name__ == "__main__":
    if sys.argv[1:] == ["--vlm-adapter"]:
        sys.exit(make_vlm_adapter(FIX / "tiny-gemma3"))
    sys.exit(main())
