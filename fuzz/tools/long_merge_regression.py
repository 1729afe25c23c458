"""Writes fuzz/regressions/gguf/crash-merge-longer-than-vocab: the corpus seed with one more
merge, `ab <s>`, whose joined piece is longer than every token. tokenizers 0.23 sliced a buffer
of the longest token's length with it and panicked (found by CI's fuzz smoke, 2026-12-06).

    python -m pip install gguf && python fuzz/tools/long_merge_regression.py   (from the repo root)
"""
from gguf import GGUFReader, GGUFWriter, GGUFValueType

SEED = "fuzz/corpus/gguf/seed-small.gguf"
OUT = "fuzz/regressions/gguf/crash-merge-longer-than-vocab"

r = GGUFReader(SEED)
w = GGUFWriter(OUT, "llama")
for key, f in r.fields.items():
    if key.startswith("GGUF.") or key == "general.architecture":
        continue
    kind = f.types[0]
    if kind == GGUFValueType.ARRAY:
        items = [f.parts[i] for i in f.data]
        if f.types[1] == GGUFValueType.STRING:
            items = [bytes(x).decode() for x in items]
        else:
            items = [int(x[0]) for x in items]
        if key == "tokenizer.ggml.merges":
            items.append("ab <s>")
        w.add_array(key, items)
    elif kind == GGUFValueType.STRING:
        w.add_string(key, bytes(f.parts[f.data[0]]).decode())
    else:
        w.add_key_value(key, f.parts[f.data[0]][0], kind)
for t in r.tensors:
    w.add_tensor(t.name, t.data, raw_shape=list(reversed([int(x) for x in t.shape])), raw_dtype=t.tensor_type)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
