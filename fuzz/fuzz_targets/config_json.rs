//! Fuzz target: `finetune::fuzzing::config_json` (see src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| finetune::fuzzing::config_json(data));
