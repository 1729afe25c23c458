#!/usr/bin/env python3
"""Makes tests/fixtures/convert/tiny-{gemma2,gemma3,phi3,smollm3}.{F32,Q8_0}.gguf with llama.cpp's
own converter (convert_hf_to_gguf.py of the llama.cpp that llama-cpp-python's sdist vendors) from
the issue-19 fixtures, so FineTune's GGUF import is judged on the files llama.cpp writes: its
tensor names (attn_qkv, fused ffn_up, post_attention_norm, post_ffw_norm), Gemma's norms stored
as 1 + w, Phi-3's rope_factors_long/short tensors, its metadata.

One change to the converter: the fixtures' tokenizer is a tiny byte-level BPE whose pre-tokenizer
llama.cpp does not know by hash, and Gemma 2's and Phi-3's vocab code wants a SentencePiece file,
so every model's vocabulary is written by the converter's own GPT-2 path with the pre-tokenizer
named "gpt-2". Tensors and model metadata are untouched.

    PY=$(tools/pyref-setup.sh | tail -1)   # torch, transformers
    LLAMA=~/.cache/finetune/sdist/src/llama_cpp_python-0.3.36/vendor/llama.cpp
    $PY tools/make_arch_gguf.py $LLAMA
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests/fixtures"
ARCHS = ["tiny-gemma2", "tiny-gemma3", "tiny-phi3", "tiny-smollm3"]


def main(llama):
    llama = Path(llama)
    sys.path.insert(0, str(llama / "gguf-py"))
    sys.path.insert(0, str(llama))
    import convert_hf_to_gguf as conv
    from conversion.base import TextModel

    TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    prepare = TextModel.prepare_metadata

    def prepare_gpt2_vocab(self, vocab_only):
        # An instance attribute wins over each architecture's own set_vocab.
        self.set_vocab = lambda: TextModel._set_vocab_gpt2(self)
        return prepare(self, vocab_only)

    TextModel.prepare_metadata = prepare_gpt2_vocab
    for arch in ARCHS:
        for outtype in ["f32", "q8_0"]:
            out = FIX / "convert" / f"{arch}.{outtype.upper()}.gguf"
            sys.argv = ["convert_hf_to_gguf.py", str(FIX / arch), "--outfile", str(out),
                        "--outtype", outtype]
            conv.main()
            print(f"{out.relative_to(ROOT)}: {out.stat().st_size} bytes")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
