//! The GGUF and Ollama exports, checked without llama.cpp (tools/gguf_check.py and
//! tools/gguf_quant_check.py run llama.cpp itself on them from .ci/run):
//! - the base model exported as F16 equals, tensor for tensor and byte for byte, with the same
//!   hyper-parameters and tokenizer metadata, the file llama.cpp's converter conventions give
//!   (tests/fixtures/convert/tiny-llama.F16.gguf, written by tools/make_convert_fixtures.py);
//! - a merged F32 export read back by FineTune's GGUF import gives the logits of the base model
//!   with the adapter, on every fixture architecture the import reads;
//! - a SentencePiece vocabulary survives GGUF → FineTune → GGUF with its pieces, types and the
//!   order of its scores;
//! - the sizes shown before exporting are the sizes written;
//! - the Ollama folder has the GGUF(s) and a Modelfile with FROM, ADAPTER, TEMPLATE and stops.
// Tests panic on purpose: unwrap/expect are how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use common::fixture;
use finetune::convert::{convert, ConvertOptions};
use finetune::export::gguf::{estimate_sizes, export_gguf, GgufQuant};
use finetune::export::ollama::{export_ollama, OllamaRequest};
use finetune::model::{adapter, Model, ModelInput};

fn read(path: &Path) -> (Content, std::fs::File) {
    let mut f = std::fs::File::open(path).unwrap();
    let c = Content::read(&mut f).unwrap();
    (c, f)
}

fn tensor_bytes(c: &Content, f: &mut std::fs::File, name: &str) -> Vec<u8> {
    let q = c.tensor(f, name, &Device::Cpu).unwrap();
    q.data().unwrap().into_owned()
}

fn no_progress(_: usize, _: usize) {}

fn logits(model: &Model) -> Vec<f32> {
    let ids = Tensor::new(&[1u32, 5, 9, 42, 7, 3, 11, 2], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model
        .logits(&ModelInput::causal(ids))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn base_f16_equals_llama_cpps_conventions_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny-llama-F16.gguf");
    export_gguf(
        None,
        &fixture("tiny-llama"),
        &out,
        GgufQuant::F16,
        &no_progress,
    )
    .unwrap();
    let (ours, mut fo) = read(&out);
    let (want, mut fw) = read(&fixture("convert/tiny-llama.F16.gguf"));

    let mut names: Vec<&String> = want.tensor_infos.keys().collect();
    names.sort();
    let mut got: Vec<&String> = ours.tensor_infos.keys().collect();
    got.sort();
    assert_eq!(got, names);
    for name in names {
        let (a, b) = (&ours.tensor_infos[name], &want.tensor_infos[name]);
        assert_eq!(
            (a.ggml_dtype, a.shape.dims()),
            (b.ggml_dtype, b.shape.dims()),
            "{name}"
        );
        assert_eq!(
            tensor_bytes(&ours, &mut fo, name),
            tensor_bytes(&want, &mut fw, name),
            "{name}"
        );
    }
    // Every key the reference file has, with the same value (the fixture's generator writes no
    // pre-tokenizer name of its own: it is checked apart).
    for (key, value) in &want.metadata {
        if key == "tokenizer.ggml.pre" || key == "general.name" {
            continue;
        }
        let mine = ours.metadata.get(key).unwrap_or_else(|| panic!("no {key}"));
        assert_eq!(format!("{mine:?}"), format!("{value:?}"), "{key}");
    }
    let pre = ours.metadata["tokenizer.ggml.pre"].to_string().unwrap();
    assert_eq!(
        pre, "gpt-2",
        "the fixture tokenizer is GPT-2's byte-level BPE"
    );
    assert_eq!(ours.metadata["general.file_type"].to_u32().unwrap(), 1);
    assert!(!ours.metadata["tokenizer.ggml.add_bos_token"]
        .to_bool()
        .unwrap());
}

#[test]
fn merged_f32_reads_back_as_base_plus_adapter() {
    for arch in ["tiny-llama", "tiny-qwen2", "tiny-qwen3"] {
        let dir = tempfile::tempdir().unwrap();
        let base = fixture(arch);
        let peft = base.join("peft-adapter");
        let file = dir.path().join("m.gguf");
        let e = export_gguf(Some(&peft), &base, &file, GgufQuant::F32, &no_progress).unwrap();
        assert!(e.merged > 0, "{arch}");
        let back = dir.path().join("back");
        let options = ConvertOptions {
            dtype: Some(DType::F32),
            ..ConvertOptions::default()
        };
        convert(&file, &back, &options).unwrap();
        let mut tuned = Model::load(&base, DType::F32, &Device::Cpu).unwrap();
        adapter::load(&peft, &mut tuned).unwrap();
        let folded = Model::load(&back, DType::F32, &Device::Cpu).unwrap();
        let (a, b) = (logits(&folded), logits(&tuned));
        let d = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-4, "{arch}: merged GGUF vs base + adapter: {d}");
        // The adapter moves the logits far more than that.
        let base_model = Model::load(&base, DType::F32, &Device::Cpu).unwrap();
        let moved = logits(&base_model)
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(moved > 100.0 * d.max(1e-6), "{arch}: adapter moves {moved}");
    }
}

#[test]
fn a_sentencepiece_vocabulary_survives_the_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let original = fixture("convert/tiny-llama-spm.F16.gguf");
    let hf = dir.path().join("hf");
    convert(&original, &hf, &ConvertOptions::default()).unwrap();
    let out = dir.path().join("spm.gguf");
    export_gguf(None, &hf, &out, GgufQuant::F16, &no_progress).unwrap();
    let (ours, _) = read(&out);
    let (want, _) = read(&original);
    for key in [
        "tokenizer.ggml.model",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.add_bos_token",
    ] {
        assert_eq!(
            format!("{:?}", ours.metadata[key]),
            format!("{:?}", want.metadata[key]),
            "{key}"
        );
    }
    assert!(ours.metadata["tokenizer.ggml.add_space_prefix"]
        .to_bool()
        .unwrap());
    // Scores: llama.cpp merges the pair whose result scores highest; what matters is their order
    // over the pieces that merges make.
    let scores = |c: &Content| -> Vec<f32> {
        c.metadata["tokenizer.ggml.scores"]
            .to_vec()
            .unwrap()
            .iter()
            .map(|v| v.to_f32().unwrap())
            .collect()
    };
    let (a, b) = (scores(&ours), scores(&want));
    let types: Vec<i32> = want.metadata["tokenizer.ggml.token_type"]
        .to_vec()
        .unwrap()
        .iter()
        .map(|v| v.to_i32().unwrap())
        .collect();
    let merged: Vec<usize> = (0..a.len())
        .filter(|&i| types[i] == 1 && a[i] != 0.0)
        .collect();
    assert!(merged.len() > 50, "{} merged pieces", merged.len());
    for w in merged.windows(2) {
        let (i, j) = (w[0], w[1]);
        assert_eq!(
            a[i].partial_cmp(&a[j]),
            b[i].partial_cmp(&b[j]),
            "pieces {i} and {j}"
        );
    }
}

#[test]
fn sizes_shown_are_sizes_written() {
    let base = fixture("tiny-qwen3");
    let sizes: HashMap<GgufQuant, u64> = estimate_sizes(&base).unwrap().into_iter().collect();
    assert_eq!(sizes.len(), GgufQuant::ALL.len());
    let dir = tempfile::tempdir().unwrap();
    for q in [GgufQuant::F32, GgufQuant::Q8_0, GgufQuant::Q4KM] {
        let out = dir.path().join(format!("{}.gguf", q.name()));
        export_gguf(None, &base, &out, q, &no_progress).unwrap();
        let (c, _) = read(&out);
        let data: u64 = c
            .tensor_infos
            .values()
            .map(|t| {
                (t.shape.elem_count() / t.ggml_dtype.block_size() * t.ggml_dtype.type_size()) as u64
            })
            .sum();
        assert_eq!(sizes[&q], data, "{}", q.name());
        let file = std::fs::metadata(&out).unwrap().len();
        assert!(
            file > data && file < data + 200_000,
            "{}: {file} vs {data}",
            q.name()
        );
    }
    assert!(sizes[&GgufQuant::F32] > sizes[&GgufQuant::F16]);
    assert!(sizes[&GgufQuant::F16] > sizes[&GgufQuant::Q8_0]);
}

#[test]
fn ollama_folders_hold_the_model_and_a_modelfile() {
    let base = fixture("tiny-qwen2");
    let peft = base.join("peft-adapter");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.jsonl");
    std::fs::write(
        &data,
        "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n"
            .repeat(3),
    )
    .unwrap();
    for separate in [false, true] {
        let out = dir.path().join(format!("ollama-{separate}"));
        let o = export_ollama(
            &OllamaRequest {
                adapter: &peft,
                base: &base,
                dir: &out,
                quant: GgufQuant::Q8_0,
                separate_adapter: separate,
                data: Some(&data),
            },
            &no_progress,
        )
        .unwrap();
        let modelfile = std::fs::read_to_string(out.join("Modelfile")).unwrap();
        let from = modelfile
            .lines()
            .find_map(|l| l.strip_prefix("FROM ./"))
            .unwrap();
        assert!(out.join(from).is_file(), "{modelfile}");
        match modelfile.lines().find_map(|l| l.strip_prefix("ADAPTER ./")) {
            Some(a) => {
                assert!(separate);
                let (c, _) = read(&out.join(a));
                assert_eq!(c.metadata["general.type"].to_string().unwrap(), "adapter");
            }
            None => assert!(!separate, "{modelfile}"),
        }
        assert!(
            modelfile.contains("TEMPLATE \"\"\"{{- $prev := \"\" }}"),
            "{modelfile}"
        );
        assert!(
            modelfile.contains("PARAMETER stop \"<|im_end|>\""),
            "{modelfile}"
        );
        assert!(
            modelfile.contains("SYSTEM \"\"\"Be brief.\"\"\""),
            "{modelfile}"
        );
        assert!(o.command.contains(&format!("ollama create {}", o.name)));
        assert_eq!(o.files.len(), if separate { 3 } else { 2 });
        let (c, _) = read(&out.join(from));
        let merged =
            matches!(c.metadata.get("general.type"), Some(Value::String(t)) if t == "model");
        assert!(merged);
    }
}

#[test]
fn llama3_rope_scaling_travels_as_rope_freqs_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("llama31");
    std::fs::create_dir(&model).unwrap();
    for e in std::fs::read_dir(fixture("tiny-llama")).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
        }
    }
    let cfg_path = model.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["rope_parameters"] = serde_json::json!({"rope_theta": 500000.0, "rope_type": "llama3",
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192});
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();

    let out = dir.path().join("llama31.gguf");
    export_gguf(None, &model, &out, GgufQuant::F32, &no_progress).unwrap();
    let (c, mut f) = read(&out);
    let freqs = c.tensor(&mut f, "rope_freqs.weight", &Device::Cpu).unwrap();
    let freqs: Vec<f32> = freqs.dequantize(&Device::Cpu).unwrap().to_vec1().unwrap();
    assert_eq!(freqs.len(), 16 / 2);
    // Short wavelengths kept, long ones divided by the factor.
    assert_eq!(freqs[0], 1.0);
    assert_eq!(*freqs.last().unwrap(), 8.0);

    // FineTune's import reads the scaling back from those factors: the same model.
    let back = dir.path().join("back");
    convert(&out, &back, &ConvertOptions::default()).unwrap();
    let got: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(back.join("config.json")).unwrap()).unwrap();
    let scaling = got
        .get("rope_scaling")
        .or_else(|| got.get("rope_parameters"))
        .unwrap();
    assert_eq!(scaling["rope_type"], "llama3", "{got}");
    assert_eq!(scaling["factor"].as_f64(), Some(8.0), "{got}");
    let a = logits(&Model::load(&model, DType::F32, &Device::Cpu).unwrap());
    let b = logits(&Model::load(&back, DType::F32, &Device::Cpu).unwrap());
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(d < 1e-2, "{d}");
}
