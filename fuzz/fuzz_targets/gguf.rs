//! Fuzz target: `finetune::fuzzing::gguf` (see src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| finetune::fuzzing::gguf(data));
