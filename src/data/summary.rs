//! What a loaded dataset looks like in numbers: records, tokens, how many are trained, length
//! percentiles and a histogram for the UI's chart, and what loading did (truncated, dropped,
//! skipped). `Display` is the CLI's text.

use std::fmt;

use super::encode::Sample;
use super::format::Format;

/// Which chat template rendered the records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TemplateUse {
    /// Records are not chats (text, or plain prompt/completion).
    None,
    /// The model's own chat template.
    Model,
    /// The ChatML fallback (the model has no template).
    Fallback,
}

/// Numbers about one dataset (train or validation).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DatasetSummary {
    /// The records' format.
    pub format: Format,
    /// Which chat template rendered the records, if any.
    pub template: TemplateUse,
    /// Loss only on completions / assistant turns.
    pub prompt_masked: bool,
    /// Records kept (after dropping and skipping).
    pub records: usize,
    /// Tokens over all kept records, padding not counted.
    pub total_tokens: usize,
    /// Tokens that are training targets (not masked).
    pub trained_tokens: usize,
    /// Share of tokens that are not targets, 0..=1.
    pub masked_fraction: f64,
    /// Record length percentiles, in tokens (nearest rank).
    pub length_p50: usize,
    /// 90th percentile of record length, in tokens.
    pub length_p90: usize,
    /// 99th percentile of record length, in tokens.
    pub length_p99: usize,
    /// Longest record, in tokens.
    pub length_max: usize,
    /// (bucket start in tokens, records) for buckets of equal width (a power of two) from 0.
    pub histogram: Vec<(usize, usize)>,
    /// Records cut to `max_seq_len`.
    pub truncated: usize,
    /// Records dropped for being longer than `max_seq_len` (when over-long records are dropped).
    pub dropped: usize,
    /// Records dropped because no token was left to train on (e.g. the completion was cut off).
    pub untrainable: usize,
    /// Bad lines skipped (`skip_bad_lines`).
    pub skipped_lines: usize,
    /// Records whose assistant turns could only be located approximately.
    pub approximate_masks: usize,
}

/// Counts from loading that the samples alone don't show.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct LoadCounts {
    pub dropped: usize,
    pub untrainable: usize,
    pub skipped_lines: usize,
}

const HISTOGRAM_BUCKETS: usize = 16;

impl DatasetSummary {
    pub(crate) fn compute(
        samples: &[Sample],
        format: Format,
        template: TemplateUse,
        prompt_masked: bool,
        counts: LoadCounts,
    ) -> Self {
        let mut lengths: Vec<usize> = samples.iter().map(Sample::len).collect();
        lengths.sort_unstable();
        let total_tokens: usize = lengths.iter().sum();
        let trained_tokens: usize = samples.iter().map(Sample::trained_tokens).sum();
        let length_max = lengths.last().copied().unwrap_or(0);
        Self {
            format,
            template,
            prompt_masked,
            records: samples.len(),
            total_tokens,
            trained_tokens,
            masked_fraction: if total_tokens == 0 {
                0.0
            } else {
                1.0 - trained_tokens as f64 / total_tokens as f64
            },
            length_p50: percentile(&lengths, 50),
            length_p90: percentile(&lengths, 90),
            length_p99: percentile(&lengths, 99),
            length_max,
            histogram: histogram(&lengths, length_max),
            truncated: samples.iter().filter(|s| s.truncated).count(),
            dropped: counts.dropped,
            untrainable: counts.untrainable,
            skipped_lines: counts.skipped_lines,
            approximate_masks: samples.iter().filter(|s| s.approximate_mask).count(),
        }
    }
}

/// Nearest-rank percentile of sorted values (0 when empty).
fn percentile(sorted: &[usize], p: usize) -> usize {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

fn histogram(lengths: &[usize], max: usize) -> Vec<(usize, usize)> {
    if lengths.is_empty() {
        return Vec::new();
    }
    let width = (max / HISTOGRAM_BUCKETS + 1).next_power_of_two();
    let mut counts = vec![0usize; max / width + 1];
    for &len in lengths {
        counts[len / width] += 1;
    }
    counts
        .into_iter()
        .enumerate()
        .map(|(i, c)| (i * width, c))
        .collect()
}

/// 1234567 → "1,234,567".
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl fmt::Display for DatasetSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let template = match self.template {
            TemplateUse::None => "",
            TemplateUse::Model => ", model chat template",
            TemplateUse::Fallback => ", ChatML fallback template (the model has none)",
        };
        let masking = if self.prompt_masked {
            "prompt masked"
        } else {
            "trained on all tokens"
        };
        writeln!(
            f,
            "{} records, {} format{template}, {masking}",
            thousands(self.records),
            self.format
        )?;
        writeln!(
            f,
            "tokens: {} total, {} trained ({:.1}% masked)",
            thousands(self.total_tokens),
            thousands(self.trained_tokens),
            self.masked_fraction * 100.0
        )?;
        write!(
            f,
            "length in tokens: p50 {}, p90 {}, p99 {}, max {}",
            self.length_p50, self.length_p90, self.length_p99, self.length_max
        )?;
        let mut notes = Vec::new();
        if self.truncated > 0 {
            notes.push(format!(
                "{} truncated to max_seq_len",
                thousands(self.truncated)
            ));
        }
        if self.dropped > 0 {
            notes.push(format!("{} dropped as too long", thousands(self.dropped)));
        }
        if self.untrainable > 0 {
            notes.push(format!(
                "{} dropped with nothing to train on",
                thousands(self.untrainable)
            ));
        }
        if self.skipped_lines > 0 {
            notes.push(format!(
                "{} bad lines skipped",
                thousands(self.skipped_lines)
            ));
        }
        if self.approximate_masks > 0 {
            notes.push(format!(
                "{} with approximate assistant masks",
                thousands(self.approximate_masks)
            ));
        }
        if !notes.is_empty() {
            write!(f, "\n{}", notes.join(", "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize, trained: usize) -> Sample {
        let mut mask = vec![false; len];
        mask[len - trained..].fill(true);
        Sample {
            line: 1,
            tokens: vec![7; len],
            loss_mask: mask,
            truncated: len == 100,
            approximate_mask: false,
        }
    }

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<usize> = (1..=100).collect();
        assert_eq!(
            (percentile(&v, 50), percentile(&v, 90), percentile(&v, 99)),
            (50, 90, 99)
        );
        assert_eq!(percentile(&[5], 99), 5);
        assert_eq!(percentile(&[], 50), 0);
        assert_eq!(percentile(&[1, 2, 3], 50), 2);
    }

    #[test]
    fn numbers_and_text() {
        let samples: Vec<Sample> = vec![sample(10, 4), sample(20, 10), sample(100, 50)];
        let counts = LoadCounts {
            dropped: 2,
            untrainable: 0,
            skipped_lines: 1,
        };
        let s = DatasetSummary::compute(
            &samples,
            Format::PromptCompletion,
            TemplateUse::Model,
            true,
            counts,
        );
        assert_eq!((s.records, s.total_tokens, s.trained_tokens), (3, 130, 64));
        assert!((s.masked_fraction - 66.0 / 130.0).abs() < 1e-12);
        assert_eq!((s.length_p50, s.length_max, s.truncated), (20, 100, 1));
        // max 100 → width (100/16+1).next_power_of_two() = 8 → 13 buckets.
        assert_eq!(s.histogram.len(), 13);
        assert_eq!(s.histogram[1], (8, 1));
        assert_eq!(s.histogram[12], (96, 1));
        assert_eq!(s.histogram.iter().map(|b| b.1).sum::<usize>(), 3);
        let text = s.to_string();
        assert!(text.starts_with(
            "3 records, prompt/completion format, model chat template, prompt masked"
        ));
        assert!(text.contains("tokens: 130 total, 64 trained (50.8% masked)"));
        assert!(
            text.contains("1 truncated to max_seq_len, 2 dropped as too long, 1 bad lines skipped")
        );
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
