//! Issue 20, long runs: 10,000 tiny `finetune train` steps (about a minute with the dev profile on
//! two cores; it runs in CI as is) with flat memory: the least-squares slope of the resident set
//! over steps 1,000–10,000 stays under 200 bytes a step (2 MB over the run), and the process holds
//! as many open files and threads at step 9,000 as at step 1,000 (the least over 50 steps at each:
//! every step opens /proc for its resident set for a moment). `FINETUNE_LONG_STEPS` changes
//! the length.
#![cfg(target_os = "linux")]
// Tests panic on purpose: unwrap/expect are how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// (open files, threads) of process `pid`, from /proc.
fn handles(pid: u32) -> (usize, usize) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    (fds, threads)
}

#[test]
fn ten_thousand_steps_keep_memory_files_and_threads_flat() {
    let steps: usize = std::env::var("FINETUNE_LONG_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let warm = steps / 10;
    let out = tempfile::tempdir().unwrap();
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo/train.jsonl");
    let mut child = Command::new(env!("CARGO_BIN_EXE_finetune"))
        .arg("train")
        .arg("--model")
        .arg(common::fixture("tiny-llama"))
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(out.path())
        .args(["--steps", &steps.to_string(), "--json", "--device", "cpu"])
        .args(["--max-seq-len", "32", "--batch-size", "1", "--rank", "1"])
        .args(["--eval-every", "0", "--save-every", "0", "--log-every", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut rss: Vec<(f64, f64)> = Vec::new();
    // Each step reads the resident set from /proc, which opens a file for a moment: a single
    // sample can catch it. The least over 50 steps is what the process holds.
    let (mut at_warm, mut at_end) = ((usize::MAX, usize::MAX), (usize::MAX, usize::MAX));
    let window = 50.min(warm.max(1));
    let least = |a: (usize, usize), b: (usize, usize)| (a.0.min(b.0), a.1.min(b.1));
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if !line.starts_with(r#"{"event":"step""#) {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let step = v["data"]["step"].as_u64().unwrap() as usize;
        if step >= warm {
            rss.push((step as f64, v["data"]["rss_bytes"].as_f64().unwrap()));
        }
        if (warm..warm + window).contains(&step) {
            at_warm = least(at_warm, handles(pid));
        }
        // Well before the last step, so that the child is still training, not saving.
        if (steps - warm - window..steps - warm).contains(&step) {
            at_end = least(at_end, handles(pid));
        }
    }
    assert!(child.wait().unwrap().success());
    assert!(rss.len() >= steps - warm, "{} step events", rss.len());
    let n = rss.len() as f64;
    let (mx, my) = (
        rss.iter().map(|p| p.0).sum::<f64>() / n,
        rss.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let slope = rss.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum::<f64>()
        / rss.iter().map(|p| (p.0 - mx).powi(2)).sum::<f64>();
    let first = rss.first().unwrap().1 / 1e6;
    let last = rss.last().unwrap().1 / 1e6;
    println!(
        "{steps} steps: RSS {first:.1} MB at step {warm} → {last:.1} MB, slope {slope:.1} bytes/step; \
         open files {} → {}, threads {} → {}",
        at_warm.0, at_end.0, at_warm.1, at_end.1
    );
    assert!(slope.abs() < 200.0, "RSS grows {slope:.1} bytes a step");
    assert_eq!(at_warm.0, at_end.0, "open files");
    assert_eq!(at_warm.1, at_end.1, "threads");
}
