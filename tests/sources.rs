//! One way in for a model (`model::source`): `finetune train --model` takes a GGUF file or a
//! folder with only PyTorch `.bin` weights, converts it once into the cache, and trains on the
//! converted folder (tokenizer, config, context cap and weights all from it), writing a PEFT
//! adapter that loads onto that model with the names a safetensors run writes.
// Tests panic on purpose: unwrap/expect are how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device};
use finetune::model::{adapter, Model, ModelFormat, ModelSource};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

/// Copies a fixture folder's plain files into `dest`.
fn copy_dir(from: &Path, dest: &Path) {
    std::fs::create_dir_all(dest).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, dest.join(p.file_name().unwrap())).unwrap();
        }
    }
}

/// Runs `finetune train` on `model` with its conversion cache under `home`; returns stdout.
fn train(model: &Path, home: &Path, out: &Path) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_finetune"))
        .env("HOME", home)
        .env("XDG_CACHE_HOME", home.join("cache"))
        .args(["train", "--model"])
        .arg(model)
        .arg("--data")
        .arg(root().join("assets/demo/train.jsonl"))
        .arg("--out")
        .arg(out)
        // Past the fixture's 256-token context: the cap must come from the converted config.
        .args(["--steps", "2", "--max-seq-len", "4096", "--rank", "4"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The adapter in `out/adapter` loads onto the converted model and names the base as `name`.
fn check_adapter(out: &Path, model: &Path, home: &Path, name: &str) {
    // Where `convert::converted_cache_dir` puts conversions for this HOME / XDG_CACHE_HOME.
    let cache = if cfg!(target_os = "macos") {
        home.join("Library/Caches/FineTune/converted")
    } else {
        home.join("cache/finetune/converted")
    };
    let prepared = ModelSource::open(model).unwrap().prepare(&cache).unwrap();
    assert!(prepared.dir.starts_with(&cache), "{:?}", prepared.dir);
    assert!(
        prepared.converted.is_none(),
        "the run's conversion is reused"
    );
    let dir = out.join("adapter");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["base_model_name_or_path"], name);
    let mut loaded = Model::load(&prepared.dir, DType::F32, &Device::Cpu).unwrap();
    let state = adapter::load(&dir, &mut loaded).unwrap();
    assert_eq!(state.config.rank, 4);
    // The same PEFT tensor names as an adapter trained on the safetensors fixture.
    let names = |d: &Path| {
        let mut n: Vec<String> =
            candle_core::safetensors::load(d.join("adapter_model.safetensors"), &Device::Cpu)
                .unwrap()
                .into_keys()
                .collect();
        n.sort();
        n
    };
    let reference = tempfile::tempdir().unwrap();
    train(&fixture("tiny-llama"), home, reference.path());
    assert_eq!(names(&dir), names(&reference.path().join("adapter")));
}

#[test]
fn train_takes_a_gguf_file() {
    let home = tempfile::tempdir().unwrap();
    let gguf = home.path().join("tiny-llama.Q8_0.gguf");
    std::fs::copy(fixture("convert/tiny-llama.Q8_0.gguf"), &gguf).unwrap();
    assert!(matches!(
        ModelSource::open(&gguf).unwrap().format,
        ModelFormat::Gguf(_)
    ));
    let out = home.path().join("out");
    let stdout = train(&gguf, home.path(), &out);
    assert!(
        stdout.contains("converted the GGUF file to safetensors once"),
        "{stdout}"
    );
    assert!(
        stdout.contains("max sequence length lowered from 4096 to 256 tokens"),
        "{stdout}"
    );
    assert!(stdout.contains("finished"), "{stdout}");
    check_adapter(&out, &gguf, home.path(), "tiny-llama.Q8_0");
}

#[test]
fn train_takes_a_folder_with_only_pytorch_bin_weights() {
    let home = tempfile::tempdir().unwrap();
    let bin = home.path().join("tiny-llama-bin");
    copy_dir(&fixture("convert/tiny-llama-bin"), &bin);
    assert!(matches!(
        ModelSource::open(&bin).unwrap().format,
        ModelFormat::PytorchBin(_)
    ));
    let out = home.path().join("out");
    let stdout = train(&bin, home.path(), &out);
    assert!(
        stdout.contains("converted PyTorch .bin weights to safetensors once"),
        "{stdout}"
    );
    assert!(
        stdout.contains("max sequence length lowered from 4096 to 256 tokens"),
        "{stdout}"
    );
    check_adapter(&out, &bin, home.path(), "tiny-llama-bin");
}

#[test]
fn info_describes_a_gguf_file() {
    let home = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_finetune"))
        .env("HOME", home.path())
        .env("XDG_CACHE_HOME", home.path().join("cache"))
        .arg("info")
        .arg(fixture("convert/tiny-llama.Q8_0.gguf"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("LlamaForCausalLM"), "{stdout}");
    assert!(stdout.contains("context        256"), "{stdout}");
}
