//! Fuzz target: `finetune::fuzzing::chat_template` (see src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| finetune::fuzzing::chat_template(data));
