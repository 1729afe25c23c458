//! Fuzz target: `finetune::fuzzing::safetensors` (see src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| finetune::fuzzing::safetensors(data));
