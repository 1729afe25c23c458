//! Fuzz target: `finetune::fuzzing::adapter_config` (see src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| finetune::fuzzing::adapter_config(data));
