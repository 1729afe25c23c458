//! Fuzz target: `finetune::fuzzing::pytorch_bin` (see src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| finetune::fuzzing::pytorch_bin(data));
