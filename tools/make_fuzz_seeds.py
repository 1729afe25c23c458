#!/usr/bin/env python3
"""Writes the small seed inputs of the fuzz corpora (fuzz/corpus/*/seed-*): a tiny safetensors
file, a torch.save zip, a GGUF with a few metadata keys and tensors (llama.cpp's gguf-py), and
JSONL/template seeds. The fixtures' own configs and templates are copied beside them by hand.

    PY=$(tools/pyref-setup.sh | tail -1)
    PYTHONPATH=$LLAMA_CPP/gguf-py $PY tools/make_fuzz_seeds.py
"""
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

C = Path(__file__).resolve().parent.parent / "fuzz/corpus"

save_file({"model.embed_tokens.weight": torch.ones(4, 2), "lm_head.weight": torch.zeros(4, 2, dtype=torch.float16)},
          C / "safetensors/seed-small.safetensors")
torch.save({"model.embed_tokens.weight": torch.ones(4, 2), "b": torch.arange(3)}, C / "pytorch_bin/seed-small.bin")

import gguf  # noqa: E402

w = gguf.GGUFWriter(str(C / "gguf/seed-small.gguf"), "llama")
w.add_context_length(64)
w.add_embedding_length(8)
w.add_block_count(1)
w.add_feed_forward_length(16)
w.add_head_count(2)
w.add_layer_norm_rms_eps(1e-5)
w.add_tokenizer_model("gpt2")
w.add_token_list(["a", "b", "ab", "<s>"])
w.add_token_merges(["a b"])
w.add_token_types([1, 1, 1, 3])
w.add_bos_token_id(3)
w.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
w.add_tensor("blk.0.attn_norm.weight", np.ones(8, dtype=np.float32))
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()

(C / "jsonl/seed-chat.jsonl").write_text(
    '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
    '{"prompt": "2+2?", "completion": "4"}\n{"text": "plain"}\n'
    '{"instruction": "i", "input": "x", "output": "o"}\n')
(C / "jsonl/seed-bad.jsonl").write_bytes(b'{"text": "ok"}\n{bad json\n\xff\xfe\n{"messages": []}\n')
