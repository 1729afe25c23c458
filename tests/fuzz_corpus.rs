//! The fuzz corpora replayed through the same entry points the fuzz targets call (issue 20), in
//! the plain test build: every seed and every input a fuzzer ever found wrong
//! (`fuzz/regressions/TARGET/`) must end without a panic. The coverage-guided runs themselves are
//! `fuzz/tools/smoke.sh` (30 s each in .ci/run).
// Tests panic on purpose: unwrap/expect are how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 7] = [
    ("config_json", finetune::fuzzing::config_json),
    ("safetensors", finetune::fuzzing::safetensors),
    ("gguf", finetune::fuzzing::gguf),
    ("pytorch_bin", finetune::fuzzing::pytorch_bin),
    ("adapter_config", finetune::fuzzing::adapter_config),
    ("jsonl", finetune::fuzzing::jsonl),
    ("chat_template", finetune::fuzzing::chat_template),
];

#[test]
fn every_corpus_and_regression_input_ends_without_a_panic() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for (name, target) in TARGETS {
        let mut inputs = 0;
        for dir in [
            fuzz.join("corpus").join(name),
            fuzz.join("regressions").join(name),
        ] {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let bytes = std::fs::read(&path).unwrap();
                let run = std::panic::catch_unwind(|| target(&bytes));
                assert!(run.is_ok(), "{name}: {} panicked", path.display());
                inputs += 1;
            }
        }
        assert!(inputs > 0, "{name}: no corpus");
        replayed += inputs;
    }
    println!("{replayed} inputs replayed");
}
