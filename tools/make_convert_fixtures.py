#!/usr/bin/env python3
"""Makes the converter's test inputs in tests/fixtures/convert/ from tests/fixtures/tiny-llama.

    pip install gguf==0.19.0 numpy sentencepiece==0.2.1
    python3 tools/make_convert_fixtures.py

PyTorch .bin: torch itself is not installable here, so the files are written the way
`torch.save(state_dict, path)` (torch >= 1.6, protocol 2) writes them: a zip archive holding
`archive/data.pkl` (an OrderedDict of `torch._utils._rebuild_tensor_v2(...)` reductions whose
storages are persistent ids `('storage', torch.FloatStorage, key, 'cpu', numel)`, plus the
`_metadata` attribute torch adds), `archive/data/<key>` raw little-endian storages,
`archive/byteorder` and `archive/version`. Two tensors share one storage at different offsets, as
fused or tied weights do. The pickle only *names* torch classes; no torch code is needed to write
it, and FineTune reads it without executing anything.

GGUF: written with gguf-py (llama.cpp's own writer) the way convert_hf_to_gguf.py writes a llama
model: tensor names `blk.N.attn_q` etc., Q and K rows permuted with llama.cpp's `permute`, 1-D
tensors kept F32, 2-D tensors quantized when their rows fit the block size (else F16, as llama.cpp
falls back), the byte-level BPE vocabulary with token types and merges, the chat template.
"""
import collections
import io
import json
import pickle
import struct
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import gguf
import sentencepiece as spm

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "tests/fixtures/tiny-llama"
OUT = ROOT / "tests/fixtures/convert"


def read_safetensors(path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    out = collections.OrderedDict()
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", info
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(body[a:b], dtype="<f4").reshape(info["shape"]).copy()
    return out


# ---- torch.save format without torch -------------------------------------------------------

torch_mod = types.ModuleType("torch")
utils_mod = types.ModuleType("torch._utils")
sys.modules.setdefault("torch", torch_mod)
sys.modules.setdefault("torch._utils", utils_mod)


class FloatStorage:
    pass


class HalfStorage:
    pass


for cls in (FloatStorage, HalfStorage):
    cls.__module__ = "torch"
    setattr(torch_mod, cls.__name__, cls)


def _rebuild_tensor_v2(*args):
    raise RuntimeError("only named in the pickle, never called")


_rebuild_tensor_v2.__module__ = "torch._utils"
utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2


class Storage:
    def __init__(self, key, cls, numel):
        self.key, self.cls, self.numel = key, cls, numel


class Tensor:
    def __init__(self, storage, offset, shape):
        self.storage, self.offset, self.shape = storage, offset, tuple(shape)

    def __reduce__(self):
        stride = []
        acc = 1
        for d in reversed(self.shape):
            stride.append(acc)
            acc *= d
        return (
            _rebuild_tensor_v2,
            (self.storage, self.offset, self.shape, tuple(reversed(stride)), False, collections.OrderedDict()),
        )


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", obj.cls, obj.key, "cpu", obj.numel)
        return None


def torch_save(tensors, path, share=()):
    """tensors: name -> float32 array. `share`: names stored back to back in one storage."""
    storages = {}  # key -> bytes
    state = collections.OrderedDict()
    state._metadata = collections.OrderedDict([("", {"version": 1})])
    shared = [n for n in share if n in tensors]
    if shared:
        key = str(len(storages))
        blob = b"".join(tensors[n].astype("<f4").tobytes() for n in shared)
        st = Storage(key, FloatStorage, len(blob) // 4)
        storages[key] = blob
        offset = 0
        for n in shared:
            state[n] = Tensor(st, offset, tensors[n].shape)
            offset += tensors[n].size
    for name, arr in tensors.items():
        if name in shared:
            continue
        key = str(len(storages))
        storages[key] = arr.astype("<f4").tobytes()
        state[name] = Tensor(Storage(key, FloatStorage, arr.size), 0, arr.shape)
    # keep the checkpoint's order
    state2 = collections.OrderedDict((n, state[n]) for n in tensors)
    state2._metadata = state._metadata
    buf = io.BytesIO()
    TorchPickler(buf, protocol=2).dump(state2)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        for key, blob in storages.items():
            z.writestr(f"archive/data/{key}", blob)
        z.writestr("archive/version", "3\n")


SUPPORT = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def write_bins(tensors):
    single = OUT / "tiny-llama-bin"
    single.mkdir(parents=True, exist_ok=True)
    for d in (single, OUT / "tiny-llama-bin-sharded"):
        d.mkdir(parents=True, exist_ok=True)
        for f in SUPPORT:
            (d / f).write_bytes((SRC / f).read_bytes())
    torch_save(
        tensors,
        single / "pytorch_model.bin",
        share=("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"),
    )
    sharded = OUT / "tiny-llama-bin-sharded"
    sharded.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    half = len(names) // 2
    weight_map = {}
    total = 0
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch_save({n: tensors[n] for n in part}, sharded / fname)
        for n in part:
            weight_map[n] = fname
            total += tensors[n].size * 4
    (sharded / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )


# ---- GGUF as convert_hf_to_gguf.py writes a llama model ------------------------------------


def permute(w, n_head, n_head_kv):
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf):
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")
    i, rest = parts[2], ".".join(parts[3:])
    table = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    return f"blk.{i}.{table[rest]}"


def write_gguf(tensors, qtype, path):
    cfg = json.loads((SRC / "config.json").read_text())
    tok = json.loads((SRC / "tokenizer.json").read_text())
    tok_cfg = json.loads((SRC / "tokenizer_config.json").read_text())
    template = (SRC / "chat_template.jinja").read_text()
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type({"F16": 1, "Q8_0": 7, "Q4_0": 2}[qtype.name])

    vocab = tok["model"]["vocab"]
    added = {t["id"]: t for t in tok["added_tokens"]}
    tokens, types_ = [], []
    by_id = {i: t for t, i in vocab.items()}
    for t in added.values():
        by_id[t["id"]] = t["content"]
    for i in range(cfg["vocab_size"]):
        tokens.append(by_id[i])
        if i in added:
            types_.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
        else:
            types_.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types_)
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    ids = {t: i for i, t in enumerate(tokens)}
    w.add_bos_token_id(ids[tok_cfg["bos_token"]])
    w.add_eos_token_id(ids[tok_cfg["eos_token"]])
    w.add_unk_token_id(ids[tok_cfg["unk_token"]])
    w.add_pad_token_id(ids[tok_cfg["pad_token"]])
    w.add_chat_template(template)

    for name, arr in tensors.items():
        if name.endswith("q_proj.weight"):
            arr = permute(arr, n_head, n_head)
        elif name.endswith("k_proj.weight"):
            arr = permute(arr, n_head, n_kv)
        g = gguf_name(name)
        if arr.ndim == 1:
            w.add_tensor(g, arr.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16 or arr.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] != 0:
            w.add_tensor(g, arr.astype(np.float16))
        else:
            q = gguf.quants.quantize(arr.astype(np.float32), qtype)
            w.add_tensor(g, q, raw_dtype=qtype)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


CORPUS = """FineTune fine-tunes language models with LoRA on your own machine. The person browses
models, drops a JSONL file, presses Start and watches the loss fall. Stop whenever; the adapter
is saved. In 2024 and 2025 small models such as SmolLM2, Qwen2.5 and Llama 3.2 became good enough
to run on a laptop: 135M, 360M, 1.7B parameters. Tokenizers split text into pieces; SentencePiece
keeps spaces as the meta symbol and falls back to bytes for characters it has never seen.
The quick brown fox jumps over the lazy dog. Numbers like 42, 3.14159 and 1000000 appear too.
"""


def write_spm_gguf(tensors):
    """A SentencePiece BPE vocabulary (Llama 2 style: byte fallback, dummy prefix, identity
    normalization, whitespace kept) trained here,
    written into a GGUF like convert_hf_to_gguf.py's _create_vocab_sentencepiece, with the ids
    sentencepiece itself produces for a few texts as the expectation."""
    work = OUT / "spm-work"
    work.mkdir(exist_ok=True)
    corpus = work / "corpus.txt"
    corpus.write_text((CORPUS + "\n") * 20)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(work / "spm"), vocab_size=512, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, add_dummy_prefix=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, num_threads=1, minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(work / "spm.model"))
    tokens, scores, types_ = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types_.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types_.append(gguf.TokenType.CONTROL)
        elif sp.is_unused(i):
            types_.append(gguf.TokenType.UNUSED)
        elif sp.is_byte(i):
            types_.append(gguf.TokenType.BYTE)
        else:
            types_.append(gguf.TokenType.NORMAL)
    texts = [
        "Hello world",
        "The quick brown fox jumps over the lazy dog.",
        "FineTune fine-tunes 135M models in 2025!",
        "unseen: ünïcödé 😀 and\nnew lines",
        "  two leading spaces",
    ]
    expected = [{"text": t, "ids": [sp.bos_id()] + sp.encode(t)} for t in texts]
    (OUT / "spm-expected.json").write_text(
        "[\n" + ",\n".join(json.dumps(e, ensure_ascii=False) for e in expected) + "\n]\n"
    )

    cfg = json.loads((SRC / "config.json").read_text())
    w = gguf.GGUFWriter(str(OUT / "tiny-llama-spm.F16.gguf"), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types_)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    for name, arr in tensors.items():
        if name.endswith("q_proj.weight"):
            arr = permute(arr, cfg["num_attention_heads"], cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            arr = permute(arr, cfg["num_attention_heads"], cfg["num_key_value_heads"])
        w.add_tensor(gguf_name(name), arr.astype(np.float32 if arr.ndim == 1 else np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for f in work.iterdir():
        f.unlink()
    work.rmdir()


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    tensors = read_safetensors(SRC / "model.safetensors")
    write_bins(tensors)
    for q in ("F16", "Q8_0", "Q4_0"):
        write_gguf(tensors, gguf.GGMLQuantizationType[q], OUT / f"tiny-llama.{q}.gguf")
    write_spm_gguf(tensors)
    print("wrote", sorted(p.name for p in OUT.rglob("*") if p.is_file()))


if __name__ == "__main__":
    main()
