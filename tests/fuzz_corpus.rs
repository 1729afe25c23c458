//! The fuzz corpora replayed through the same entry points the fuzz targets call (issue 20), in
//! the plain test build: every seed and every input a fuzzer ever found wrong
//! (`fuzz/regressions/TARGET/`) must end without a panic and without asking for a single
//! allocation over 256 MB (this binary's allocator counts them: an out-of-memory found by
//! libFuzzer would otherwise pass here, the OS granting untouched pages). The coverage-guided runs themselves are
//! `fuzz/tools/smoke.sh` (30 s each in .ci/run).
// Tests panic on purpose: unwrap/expect are how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, remembering the largest single request.
struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const MAX_ALLOCATION: usize = 256 << 20;

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
                LARGEST.store(0, Ordering::Relaxed);
                let run = std::panic::catch_unwind(|| target(&bytes));
                assert!(run.is_ok(), "{name}: {} panicked", path.display());
                let largest = LARGEST.load(Ordering::Relaxed);
                assert!(
                    largest <= MAX_ALLOCATION,
                    "{name}: {} asked for {largest} bytes at once",
                    path.display()
                );
                inputs += 1;
            }
        }
        assert!(inputs > 0, "{name}: no corpus");
        replayed += inputs;
    }
    println!("{replayed} inputs replayed");
}
