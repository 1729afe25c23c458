//! Datasets end to end: format detection and masks with the fixture tokenizers (tiny-llama keeps its
//! ChatML template in chat_template.jinja, tiny-qwen2 in tokenizer_config.json), bad-data reports,
//! length policies, the hold-out split, and batches built from the demo slice of the WWDC25 dataset.
// Tests panic on purpose: unwrap/expect are how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};

use finetune::data::{
    self, Batch, BatchOptions, DataOptions, Format, ModelTokenizer, OverLong, Problem,
    PromptCompletionStyle, TemplateUse, ValidSource, IGNORE_INDEX,
};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tokenizer(name: &str) -> ModelTokenizer {
    ModelTokenizer::from_dir(&root().join("tests/fixtures").join(name)).unwrap()
}

fn jsonl(lines: &[&str]) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new()
        .suffix(".jsonl")
        .tempfile()
        .unwrap();
    for line in lines {
        writeln!(f, "{line}").unwrap();
    }
    f
}

fn no_split() -> DataOptions {
    DataOptions {
        valid_fraction: 0.0,
        ..Default::default()
    }
}

/// (masked text, trained text) of the first record.
fn first_record(path: &Path, tok: &ModelTokenizer, opts: &DataOptions) -> (String, String) {
    let records = data::preview(path, tok, opts, 1).unwrap();
    let mut masked = String::new();
    let mut trained = String::new();
    for seg in &records[0].segments {
        if seg.trained {
            trained.push_str(&seg.text);
        } else {
            masked.push_str(&seg.text);
        }
    }
    (masked, trained)
}

#[test]
fn each_format_is_detected_and_masked() {
    let tok = tokenizer("tiny-llama");
    let opts = no_split();
    let cases: [(&str, Format, &str, &str); 5] = [
        (
            r#"{"text": "The sky is blue."}"#,
            Format::Text,
            // Token 0 ("T" in this 512-token vocabulary) is never a target; EOS is appended and
            // trained.
            "T",
            "he sky is blue.<|im_end|>",
        ),
        (
            r#"{"prompt": "What color is the sky?", "completion": "Blue."}"#,
            Format::PromptCompletion,
            "<|im_start|>user\nWhat color is the sky?<|im_end|>\n<|im_start|>assistant\n",
            "Blue.<|im_end|>\n",
        ),
        (
            r#"{"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Grass?"}, {"role": "assistant", "content": "Green."}]}"#,
            Format::Messages,
            "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nSky?<|im_end|>\n<|im_start|>assistant\n<|im_start|>user\nGrass?<|im_end|>\n<|im_start|>assistant\n",
            "Blue.<|im_end|>\nGreen.<|im_end|>\n",
        ),
        (
            r#"{"instruction": "Translate to English.", "input": "hola", "output": "hello"}"#,
            Format::Alpaca,
            "<|im_start|>user\nTranslate to English.\n\nhola<|im_end|>\n<|im_start|>assistant\n",
            "hello<|im_end|>\n",
        ),
        (
            r#"{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}"#,
            Format::ShareGpt,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
            "Hello<|im_end|>\n",
        ),
    ];
    for (line, format, masked, trained) in cases {
        let f = jsonl(&[line, line]);
        let loaded = data::load(f.path(), None, &tok, &opts).unwrap();
        assert_eq!(loaded.train.format(), format, "{line}");
        assert_eq!(loaded.train.len(), 2);
        let (m, t) = first_record(f.path(), &tok, &opts);
        assert_eq!((m.as_str(), t.as_str()), (masked, trained), "{format}");
        // The summary counts exactly the trained tokens of the preview.
        let trained_ids = tok.encode(trained, false).unwrap().len();
        assert_eq!(
            loaded.train.summary.trained_tokens,
            2 * trained_ids,
            "{format}"
        );
    }
}

#[test]
fn both_template_conventions_give_the_same_tokens() {
    let line = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}"#;
    let f = jsonl(&[line]);
    let a = data::load(f.path(), None, &tokenizer("tiny-llama"), &no_split()).unwrap();
    let b = data::load(f.path(), None, &tokenizer("tiny-qwen2"), &no_split()).unwrap();
    assert_eq!(a.train.samples, b.train.samples);
    assert_eq!(a.train.summary.template, TemplateUse::Model);
}

#[test]
fn masking_can_be_turned_off_and_plain_style_chosen() {
    let tok = tokenizer("tiny-llama");
    let f = jsonl(&[r#"{"prompt": "Q: 1+1?", "completion": " A: 2"}"#]);
    let plain = DataOptions {
        prompt_completion: PromptCompletionStyle::Plain,
        ..no_split()
    };
    assert_eq!(
        first_record(f.path(), &tok, &plain),
        ("Q: 1+1?".to_owned(), " A: 2<|im_end|>".to_owned())
    );
    let unmasked = DataOptions {
        mask_prompt: false,
        ..plain
    };
    let loaded = data::load(f.path(), None, &tok, &unmasked).unwrap();
    let s = &loaded.train.samples[0];
    assert_eq!(s.trained_tokens(), s.len() - 1);
    assert_eq!(loaded.train.summary.template, TemplateUse::None);
    assert!(!loaded.train.summary.prompt_masked);
}

#[test]
fn every_problem_is_reported_with_its_line() {
    let tok = tokenizer("tiny-llama");
    let mut f = tempfile::Builder::new()
        .suffix(".jsonl")
        .tempfile()
        .unwrap();
    let lines: [&[u8]; 13] = [
        br#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}"#,
        br#"{"messages": [{"role": "user", "content": "Hi"}"#, // 2 invalid JSON
        br#"{"prompt": "a", "completion": "b"}"#,             // 3 mixed formats
        br#"{"question": "a"}"#,                              // 4 missing keys
        br#"{"messages": "hello"}"#,                          // 5 wrong type
        br#"{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}"#, // 6 empty text
        br#"{"messages": [{"role": "robot", "content": "x"}]}"#, // 7 unknown role
        b"{\"messages\": [{\"role\": \"user\", \"content\": \"caf\xe9\"}]}", // 8 invalid UTF-8
        b"",                                                 // 9 blank: ignored
        br#"{"messages": [{"role": "user", "content": "only a question"}]}"#, // 10 nothing to train
        br#"["not", "an", "object"]"#,                          // 11 not an object
        br#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}"#,
        br#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a very long answer that goes past the limit"}]}"#, // 13 over the line size limit
    ];
    for line in lines {
        f.write_all(line).unwrap();
        f.write_all(b"\n").unwrap();
    }
    let opts = DataOptions {
        max_line_bytes: 120,
        ..no_split()
    };
    let err = data::load(f.path(), None, &tok, &opts).unwrap_err();
    assert_eq!(err.lines(), vec![2, 3, 4, 5, 6, 7, 8, 10, 11, 13]);
    let problems: Vec<&Problem> = err.errors.iter().map(|e| &e.problem).collect();
    assert!(matches!(problems[0], Problem::InvalidJson { .. }));
    assert_eq!(
        problems[1],
        &Problem::MixedFormats {
            found: Format::PromptCompletion,
            first: Format::Messages,
            first_line: 1
        }
    );
    assert_eq!(
        problems[2],
        &Problem::MissingKeys {
            expected: Format::Messages,
            first_line: 1
        }
    );
    assert!(matches!(
        problems[3],
        Problem::WrongType {
            found: "a string",
            ..
        }
    ));
    assert!(matches!(problems[4], Problem::EmptyText { key } if key == "messages[0].content"));
    assert!(matches!(problems[5], Problem::UnknownRole { role, .. } if role == "robot"));
    assert!(matches!(problems[6], Problem::InvalidUtf8 { .. }));
    assert_eq!(problems[7], &Problem::NoAssistantTurn);
    assert!(matches!(problems[8], Problem::NotAnObject { .. }));
    assert!(matches!(
        problems[9],
        Problem::LineTooLong { limit: 120, .. }
    ));

    let path = f.path().display().to_string();
    let line4 = err.errors[2].to_string();
    assert_eq!(
        line4,
        format!("line 4: expected a \"messages\" array like the first record on line 1 (see README#datasets): {path}")
    );
    let all = err.to_string();
    assert!(all.starts_with("10 problems in the dataset"));
    assert_eq!(all.lines().count(), 11);
    assert!(all
        .lines()
        .skip(1)
        .all(|l| l.starts_with("  line ") && l.ends_with(&path)));
}

#[test]
fn skip_bad_lines_counts_and_keeps_the_good() {
    let tok = tokenizer("tiny-llama");
    let f = jsonl(&[
        r#"{"text": "one"}"#,
        r#"{"text": 2}"#,
        r#"{"text": "three"}"#,
        r#"not json"#,
        r#"{"text": "five"}"#,
    ]);
    let opts = DataOptions {
        skip_bad_lines: true,
        ..no_split()
    };
    let loaded = data::load(f.path(), None, &tok, &opts).unwrap();
    let lines: Vec<usize> = loaded.train.samples.iter().map(|s| s.line).collect();
    assert_eq!(lines, vec![1, 3, 5]);
    assert_eq!(loaded.train.summary.skipped_lines, 2);
    assert_eq!(
        loaded.skipped.iter().map(|e| e.line).collect::<Vec<_>>(),
        vec![Some(2), Some(4)]
    );
    assert!(loaded
        .train
        .summary
        .to_string()
        .contains("2 bad lines skipped"));
    // Without the option the same file fails.
    assert_eq!(
        data::load(f.path(), None, &tok, &no_split())
            .unwrap_err()
            .lines(),
        vec![2, 4]
    );
}

#[test]
fn file_level_problems() {
    let tok = tokenizer("tiny-llama");
    let empty = jsonl(&["", "  "]);
    let err = data::load(empty.path(), None, &tok, &no_split()).unwrap_err();
    assert_eq!(err.errors[0].problem, Problem::EmptyFile);
    assert_eq!(err.errors[0].line, None);
    // All bad + skipping leaves nothing: an error, not an empty run.
    let bad = jsonl(&["{", "}"]);
    let opts = DataOptions {
        skip_bad_lines: true,
        ..no_split()
    };
    let err = data::load(bad.path(), None, &tok, &opts).unwrap_err();
    assert!(err
        .errors
        .iter()
        .any(|e| matches!(e.problem, Problem::NoRecords { skipped: 2, .. })));
    // A broken validation file is reported against its own path.
    let good = jsonl(&[r#"{"text": "a b c"}"#]);
    let err = data::load(good.path(), Some(empty.path()), &tok, &no_split()).unwrap_err();
    assert_eq!(err.errors[0].path, empty.path());
}

#[test]
fn over_long_records_are_truncated_or_dropped() {
    let tok = tokenizer("tiny-llama");
    let long = format!(
        r#"{{"prompt": "Tell me.", "completion": "{}"}}"#,
        "word ".repeat(50)
    );
    let long_prompt = format!(
        r#"{{"prompt": "{}", "completion": "ok"}}"#,
        "word ".repeat(50)
    );
    let short = r#"{"prompt": "Hi", "completion": "Hello"}"#;
    let f = jsonl(&[short, &long, &long_prompt, short]);
    let truncate = DataOptions {
        max_seq_len: 32,
        ..no_split()
    };
    let t = data::load(f.path(), None, &tok, &truncate).unwrap();
    // The long completion is cut to 32 tokens; the long prompt leaves nothing to train on.
    assert_eq!(
        (
            t.train.len(),
            t.train.summary.truncated,
            t.train.summary.untrainable
        ),
        (3, 1, 1)
    );
    assert!(t.train.samples.iter().all(|s| s.len() <= 32));
    assert_eq!(t.train.samples[1].line, 2);
    assert!(t.train.samples[1].truncated);
    let drop = DataOptions {
        over_long: OverLong::Drop,
        ..truncate
    };
    let d = data::load(f.path(), None, &tok, &drop).unwrap();
    assert_eq!(
        (
            d.train.len(),
            d.train.summary.dropped,
            d.train.summary.truncated
        ),
        (2, 2, 0)
    );
    assert!(d
        .train
        .summary
        .to_string()
        .contains("2 dropped as too long"));
}

#[test]
fn demo_data_hold_out_split_is_seeded() {
    let tok = tokenizer("tiny-llama");
    let train = root().join("assets/demo/train.jsonl");
    let opts = DataOptions::default();
    let a = data::load(&train, None, &tok, &opts).unwrap();
    let b = data::load(&train, None, &tok, &opts).unwrap();
    let valid_lines = |d: &data::LoadedData| -> Vec<usize> {
        d.valid
            .as_ref()
            .unwrap()
            .samples
            .iter()
            .map(|s| s.line)
            .collect()
    };
    assert_eq!(a.train.len() + a.valid.as_ref().unwrap().len(), 200);
    assert_eq!(valid_lines(&a).len(), 20);
    assert_eq!(valid_lines(&a), valid_lines(&b));
    assert_eq!(
        a.valid_source,
        ValidSource::HeldOut {
            fraction: 0.1,
            seed: 0
        }
    );
    let c = data::load(
        &train,
        None,
        &tok,
        &DataOptions {
            seed: 1,
            ..opts.clone()
        },
    )
    .unwrap();
    assert_ne!(valid_lines(&a), valid_lines(&c));
    // No record is in both sets.
    let train_lines: Vec<usize> = a.train.samples.iter().map(|s| s.line).collect();
    assert!(valid_lines(&a).iter().all(|l| !train_lines.contains(l)));
    // With two records, one is held out.
    let two = jsonl(&[r#"{"text": "a b"}"#, r#"{"text": "c d"}"#]);
    let d = data::load(two.path(), None, &tok, &opts).unwrap();
    assert_eq!((d.train.len(), d.valid.map(|v| v.len())), (1, Some(1)));
}

#[test]
fn demo_data_with_validation_file() {
    let tok = tokenizer("tiny-qwen2");
    let train = root().join("assets/demo/train.jsonl");
    let valid = root().join("assets/demo/valid.jsonl");
    let loaded = data::load(&train, Some(&valid), &tok, &DataOptions::default()).unwrap();
    assert_eq!(loaded.train.len(), 200);
    assert_eq!(loaded.valid.as_ref().map(|v| v.len()), Some(40));
    assert_eq!(loaded.valid_source, ValidSource::File(valid.clone()));
    let s = &loaded.train.summary;
    assert_eq!(s.format, Format::PromptCompletion);
    assert!(s.trained_tokens < s.total_tokens && s.masked_fraction > 0.0);
    assert!(
        s.length_p50 <= s.length_p90
            && s.length_p90 <= s.length_p99
            && s.length_p99 <= s.length_max
    );
    assert_eq!(s.histogram.iter().map(|b| b.1).sum::<usize>(), 200);
    let text = s.to_string();
    assert!(
        text.starts_with(
            "200 records, prompt/completion format, model chat template, prompt masked"
        ),
        "{text}"
    );
}

/// Checks the invariants every batch must keep.
fn check_batch(batch: &Batch, pad_id: u32) {
    let (b, t) = (batch.batch_size, batch.seq_len);
    for v in [
        batch.input_ids.len(),
        batch.labels.len(),
        batch.position_ids.len(),
        batch.segment_ids.len(),
    ] {
        assert_eq!(v, b * t);
    }
    let mut trained = 0;
    for i in 0..b * t {
        if batch.segment_ids[i] == 0 {
            assert_eq!(batch.labels[i], IGNORE_INDEX, "padding has no loss");
            assert_eq!(batch.input_ids[i], pad_id);
        } else if batch.labels[i] != IGNORE_INDEX {
            assert_eq!(
                batch.labels[i],
                i64::from(batch.input_ids[i]),
                "labels are not shifted"
            );
            assert_ne!(
                batch.position_ids[i], 0,
                "a record's first token is no target"
            );
        }
        if i % t > 0 && batch.labels[i] != IGNORE_INDEX {
            trained += 1;
        }
    }
    assert_eq!(batch.trained_tokens, trained);
}

#[test]
fn demo_data_batches() {
    let tok = tokenizer("tiny-llama");
    let train = root().join("assets/demo/train.jsonl");
    let loaded = data::load(&train, None, &tok, &DataOptions::default()).unwrap();
    let dataset = &loaded.train;
    let opts = BatchOptions {
        batch_size: 4,
        pad_to_multiple: 8,
        ..Default::default()
    };
    let epoch: Vec<Batch> = data::batches(dataset, &opts, 3, 0).collect();
    assert_eq!(epoch.len(), dataset.len().div_ceil(4));
    for batch in &epoch {
        check_batch(batch, dataset.pad_id);
        assert_eq!(batch.seq_len % 8, 0);
    }
    let total: usize = epoch.iter().map(|b| b.trained_tokens).sum();
    assert_eq!(total, dataset.summary.trained_tokens);
    assert_eq!(
        epoch,
        data::batches(dataset, &opts, 3, 0).collect::<Vec<_>>()
    );
    assert_ne!(
        epoch,
        data::batches(dataset, &opts, 3, 1).collect::<Vec<_>>()
    );

    let packed_opts = BatchOptions {
        packing: true,
        max_seq_len: 1024,
        ..opts
    };
    let packed: Vec<Batch> = data::batches(dataset, &packed_opts, 3, 0).collect();
    let mut records = 0;
    for batch in &packed {
        check_batch(batch, dataset.pad_id);
        for row in batch.segment_ids.chunks(batch.seq_len) {
            assert!(row.iter().filter(|&&s| s > 0).count() <= 1024);
            records += row.iter().max().copied().unwrap_or(0) as usize;
        }
        // Positions restart at 0 exactly where a new segment starts.
        for (row_pos, row_seg) in batch
            .position_ids
            .chunks(batch.seq_len)
            .zip(batch.segment_ids.chunks(batch.seq_len))
        {
            for j in 1..batch.seq_len {
                if row_seg[j] > 0 {
                    assert_eq!(row_pos[j] == 0, row_seg[j] != row_seg[j - 1]);
                }
            }
        }
    }
    assert_eq!(records, dataset.len());
    assert!(packed.len() < epoch.len());
    assert_eq!(
        packed.iter().map(|b| b.trained_tokens).sum::<usize>(),
        total
    );
}

#[test]
fn full_wwdc25_dataset_loads_cleanly() {
    let train = root().join("../shared/data/wwdc25-train.jsonl");
    let valid = root().join("../shared/data/wwdc25-valid.jsonl");
    if !train.is_file() {
        eprintln!("skipping: {} is not here", train.display());
        return;
    }
    let loaded = data::load(
        &train,
        Some(&valid),
        &tokenizer("tiny-llama"),
        &DataOptions::default(),
    )
    .unwrap();
    assert_eq!(loaded.train.len(), 1800);
    assert_eq!(loaded.valid.map(|v| v.len()), Some(144));
    assert_eq!(loaded.train.summary.approximate_masks, 0);
}

/// Issue 20, big inputs: a file with a bad line in every other line lists the first 1,000
/// problems and counts the rest, so a broken 1 GB file gives a readable report, not millions of
/// lines; skipping bad lines counts all of them.
#[test]
fn problems_past_the_first_thousand_are_counted_not_listed() {
    let good = r#"{"text": "fine"}"#;
    let lines: Vec<&str> = (0..3000)
        .map(|i| if i % 2 == 0 { good } else { "{oops" })
        .collect();
    let f = jsonl(&lines);
    let tok = tokenizer("tiny-llama");
    let err = data::load(f.path(), None, &tok, &no_split()).unwrap_err();
    assert_eq!(err.errors.len(), 1001);
    assert_eq!(err.errors[999].line, Some(2000));
    assert_eq!(
        err.errors[1000].problem,
        Problem::MoreProblems { count: 500 }
    );
    assert!(err.to_string().contains("500 more lines have problems"));
    let skip = DataOptions {
        skip_bad_lines: true,
        ..no_split()
    };
    let loaded = data::load(f.path(), None, &tok, &skip).unwrap();
    assert_eq!(loaded.train.len(), 1500);
    assert_eq!(loaded.train.summary.skipped_lines, 1500);
}

/// A copy of tiny-llama's tokenizer folder with `edit` applied to its tokenizer.json.
fn edited_tokenizer(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let src = root().join("tests/fixtures/tiny-llama");
    let dir = tempfile::tempdir().unwrap();
    let mut t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap())
            .unwrap();
    edit(&mut t);
    std::fs::write(dir.path().join("tokenizer.json"), t.to_string()).unwrap();
    std::fs::copy(
        src.join("tokenizer_config.json"),
        dir.path().join("tokenizer_config.json"),
    )
    .unwrap();
    dir
}

/// Issue 20, hostile tokenizers: a normalizer that inserts a page per character is refused when
/// read, naming the file; a pre-tokenizer regex that backtracks catastrophically (a backreference
/// forces fancy-regex's backtracking engine) ends at the engine's limit, so reading records with
/// it finishes.
#[test]
fn tokenizers_that_blow_up_or_backtrack_are_cut_off() {
    let bomb = edited_tokenizer(|t| {
        t["normalizer"] = serde_json::json!({"type": "Sequence", "normalizers": [
            {"type": "Replace", "pattern": {"String": "a"}, "content": "b".repeat(100_000)}
        ]});
    });
    let Err(err) = ModelTokenizer::from_dir(bomb.path()) else {
        panic!("a 100 kB-per-match normalizer was accepted")
    };
    let text = err.to_string();
    assert!(
        text.contains("Replace normalizer inserts 100000 bytes") && text.contains("tokenizer.json"),
        "{text}"
    );
    let backtracking = edited_tokenizer(|t| {
        let byte_level = t["pre_tokenizer"].clone();
        t["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(a|a?)+\\1b"}, "behavior": "Isolated", "invert": false},
            byte_level
        ]});
    });
    let tok = ModelTokenizer::from_dir(backtracking.path()).unwrap();
    let long_a = format!(r#"{{"text": "{}c"}}"#, "a".repeat(5000));
    let f = jsonl(&[&long_a, r#"{"text": "fine"}"#]);
    let loaded = data::load(f.path(), None, &tok, &no_split());
    match loaded {
        Ok(l) => assert_eq!(l.train.len(), 2),
        Err(e) => assert!(e.to_string().contains("line 1"), "{e}"),
    }
}
