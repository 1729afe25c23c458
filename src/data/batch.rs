//! Batches on the host (plain vectors; the training thread turns them into tensors).
//!
//! Without packing, records are sorted by length and cut into batches of `batch_size`, so each batch
//! pads little; the batch order is shuffled per epoch. With packing, records (shuffled per epoch)
//! are placed best-fit into rows of up to `max_seq_len` tokens; each record in a row is a segment
//! with positions restarting at 0, and attention must stay inside a segment. Either way a batch is
//! padded to its longest row (optionally rounded up to a multiple, e.g. 8) and padding never reaches
//! the loss. Everything is deterministic for a (seed, epoch) pair.
//!
//! Labels follow the Hugging Face convention: not shifted, `labels[i] == input_ids[i]` where token
//! `i` is a target, the model shifts. The first token of every record is never a target (nothing of
//! its own segment precedes it), so packing never trains across records.

use std::collections::BTreeSet;

use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::dataset::Dataset;
use super::encode::Sample;

/// Label of positions without loss (masked prompt, first token of a record, padding).
pub const IGNORE_INDEX: i64 = -100;

/// One batch, `B` rows of `T` tokens, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// B
    pub batch_size: usize,
    /// T
    pub seq_len: usize,
    /// (B, T), padded with the pad id.
    pub input_ids: Vec<u32>,
    /// (B, T); `IGNORE_INDEX` where there is no loss, else the token at the same position (unshifted).
    pub labels: Vec<i64>,
    /// (B, T); 0-based position inside each record, 0 on padding.
    pub position_ids: Vec<u32>,
    /// (B, T); 1, 2, 3, ... per record inside a row, 0 on padding.
    pub segment_ids: Vec<u32>,
    /// Targets after the model's shift: positions `1..T` whose label is not `IGNORE_INDEX`.
    pub trained_tokens: usize,
}

/// How an epoch is cut into batches.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct BatchOptions {
    /// Rows per batch (B). Default 4. The last batch of an epoch may have fewer rows.
    pub batch_size: usize,
    /// Pack several records into each row. Default off.
    pub packing: bool,
    /// Row capacity in tokens when packing. Default 2048. A longer record gets a row of its own.
    pub max_seq_len: usize,
    /// Round T up to a multiple of this (1 = no rounding). Default 1.
    pub pad_to_multiple: usize,
}

impl Default for BatchOptions {
    fn default() -> Self {
        Self {
            batch_size: 4,
            packing: false,
            max_seq_len: 2048,
            pad_to_multiple: 1,
        }
    }
}

/// The batches of one epoch, in order. Rows are planned up front (indices only); each batch's
/// vectors are built when it is taken.
#[derive(Debug, Clone)]
pub struct EpochBatches<'a> {
    samples: &'a [Sample],
    pad_id: u32,
    pad_to_multiple: usize,
    /// batches → rows → sample indices
    plan: Vec<Vec<Vec<usize>>>,
    next: usize,
}

/// The batches of `epoch` for `seed`: the same arguments give the same batches in the same order.
pub fn batches<'a>(
    dataset: &'a Dataset,
    options: &BatchOptions,
    seed: u64,
    epoch: u64,
) -> EpochBatches<'a> {
    let samples = dataset.samples.as_slice();
    let batch_size = options.batch_size.max(1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(mix(seed, epoch));
    let rows: Vec<Vec<usize>> = if options.packing {
        let mut order: Vec<usize> = (0..samples.len()).collect();
        order.shuffle(&mut rng);
        pack(samples, &order, options.max_seq_len)
    } else {
        let mut order: Vec<usize> = (0..samples.len()).collect();
        order.sort_by_key(|&i| (samples[i].len(), i));
        order.into_iter().map(|i| vec![i]).collect()
    };
    let mut plan: Vec<Vec<Vec<usize>>> = rows.chunks(batch_size).map(<[_]>::to_vec).collect();
    plan.shuffle(&mut rng);
    EpochBatches {
        samples,
        pad_id: dataset.pad_id,
        pad_to_multiple: options.pad_to_multiple.max(1),
        plan,
        next: 0,
    }
}

impl Iterator for EpochBatches<'_> {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        let rows = self.plan.get(self.next)?;
        self.next += 1;
        let rows: Vec<Vec<&Sample>> = rows
            .iter()
            .map(|row| row.iter().map(|&i| &self.samples[i]).collect())
            .collect();
        Some(make_batch(&rows, self.pad_id, self.pad_to_multiple))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.plan.len() - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for EpochBatches<'_> {}

/// Builds a batch from rows of records (each row's records packed one after another).
pub fn make_batch(rows: &[Vec<&Sample>], pad_id: u32, pad_to_multiple: usize) -> Batch {
    let longest = rows
        .iter()
        .map(|row| row.iter().map(|s| s.len()).sum::<usize>())
        .max()
        .unwrap_or(0)
        .max(1);
    let seq_len = longest.div_ceil(pad_to_multiple.max(1)) * pad_to_multiple.max(1);
    let size = rows.len() * seq_len;
    let mut batch = Batch {
        batch_size: rows.len(),
        seq_len,
        input_ids: vec![pad_id; size],
        labels: vec![IGNORE_INDEX; size],
        position_ids: vec![0; size],
        segment_ids: vec![0; size],
        trained_tokens: 0,
    };
    for (r, row) in rows.iter().enumerate() {
        let mut at = r * seq_len;
        for (segment, sample) in (1u32..).zip(row) {
            for (j, (&token, &target)) in sample.tokens.iter().zip(&sample.loss_mask).enumerate() {
                batch.input_ids[at + j] = token;
                batch.position_ids[at + j] = j as u32;
                batch.segment_ids[at + j] = segment;
                if target && j > 0 {
                    batch.labels[at + j] = i64::from(token);
                }
            }
            at += sample.len();
        }
        let labels = &batch.labels[r * seq_len + 1..(r + 1) * seq_len];
        batch.trained_tokens += labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    }
    batch
}

/// Best-fit packing of `order` into rows of at most `capacity` tokens (a record longer than that
/// gets a row of its own). Rows come out in the order they were opened.
fn pack(samples: &[Sample], order: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let mut rows: Vec<Vec<usize>> = Vec::new();
    // (room left, row): the first entry at or above (len, 0) is the tightest fit, oldest row first.
    let mut open: BTreeSet<(usize, usize)> = BTreeSet::new();
    for &i in order {
        let len = samples[i].len();
        let fit = open.range((len.max(1), 0)..).next().copied();
        let (room, row) = match fit {
            Some((room, row)) => {
                open.remove(&(room, row));
                rows[row].push(i);
                (room - len, row)
            }
            None => {
                rows.push(vec![i]);
                (capacity.saturating_sub(len), rows.len() - 1)
            }
        };
        if room > 0 {
            open.insert((room, row));
        }
    }
    rows
}

/// Seed of an epoch's RNG (splitmix64 of both).
fn mix(seed: u64, epoch: u64) -> u64 {
    fn splitmix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    splitmix(seed ^ splitmix(epoch))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::format::Format;
    use crate::data::summary::{DatasetSummary, TemplateUse};

    /// A record of `len` tokens `line*100 + j`, prompt = the first `prompt` tokens.
    fn sample(line: usize, len: usize, prompt: usize) -> Sample {
        Sample {
            line,
            tokens: (0..len).map(|j| (line * 100 + j) as u32).collect(),
            loss_mask: (0..len).map(|j| j >= prompt && j > 0).collect(),
            truncated: false,
            approximate_mask: false,
        }
    }

    fn dataset(lens: &[usize]) -> Dataset {
        let samples: Vec<Sample> = lens
            .iter()
            .enumerate()
            .map(|(i, &l)| sample(i + 1, l, 2))
            .collect();
        Dataset {
            path: "t.jsonl".into(),
            summary: DatasetSummary::compute(
                &samples,
                Format::Text,
                TemplateUse::None,
                true,
                Default::default(),
            ),
            samples,
            pad_id: 0,
        }
    }

    #[test]
    fn padding_never_reaches_the_loss() {
        let a = sample(1, 5, 2);
        let b = sample(2, 3, 1);
        let batch = make_batch(&[vec![&a], vec![&b]], 9, 8);
        assert_eq!((batch.batch_size, batch.seq_len), (2, 8));
        assert_eq!(&batch.input_ids[..8], &[100, 101, 102, 103, 104, 9, 9, 9]);
        assert_eq!(
            &batch.labels[..8],
            &[-100, -100, 102, 103, 104, -100, -100, -100]
        );
        assert_eq!(&batch.input_ids[8..], &[200, 201, 202, 9, 9, 9, 9, 9]);
        assert_eq!(
            &batch.labels[8..],
            &[-100, 201, 202, -100, -100, -100, -100, -100]
        );
        assert_eq!(&batch.segment_ids[8..], &[1, 1, 1, 0, 0, 0, 0, 0]);
        assert_eq!(batch.trained_tokens, 5);
        // Without rounding, T is the longest row.
        assert_eq!(make_batch(&[vec![&a], vec![&b]], 9, 1).seq_len, 5);
    }

    #[test]
    fn packed_rows_restart_positions_and_segments() {
        let a = sample(1, 3, 1);
        let b = sample(2, 2, 0);
        let batch = make_batch(&[vec![&a, &b]], 0, 1);
        assert_eq!(batch.input_ids, vec![100, 101, 102, 200, 201]);
        assert_eq!(batch.position_ids, vec![0, 1, 2, 0, 1]);
        assert_eq!(batch.segment_ids, vec![1, 1, 1, 2, 2]);
        // The first token of the second record is not predicted from the first record.
        assert_eq!(batch.labels, vec![-100, 101, 102, -100, 201]);
        assert_eq!(batch.trained_tokens, 3);
    }

    #[test]
    fn length_bucketed_and_deterministic() {
        let data = dataset(&[9, 3, 7, 5, 1, 8, 2, 6, 4, 10]);
        let opts = BatchOptions {
            batch_size: 3,
            ..Default::default()
        };
        let epoch0: Vec<Batch> = batches(&data, &opts, 42, 0).collect();
        assert_eq!(epoch0.len(), 4);
        assert_eq!(batches(&data, &opts, 42, 0).len(), 4);
        // Each batch holds neighbours in length: sorted lengths cut into threes.
        let mut widths: Vec<usize> = epoch0.iter().map(|b| b.seq_len).collect();
        widths.sort_unstable();
        assert_eq!(widths, vec![3, 6, 9, 10]);
        assert_eq!(epoch0, batches(&data, &opts, 42, 0).collect::<Vec<_>>());
        // Some epoch reorders the batches, and the same batches appear.
        let orders: Vec<Vec<usize>> = (0..8)
            .map(|e| batches(&data, &opts, 42, e).map(|b| b.seq_len).collect())
            .collect();
        assert!(orders.iter().any(|o| o != &orders[0]));
        assert!(orders.iter().all(|o| {
            let mut o = o.clone();
            o.sort_unstable();
            o == widths
        }));
    }

    #[test]
    fn packing_fills_rows_without_overflow() {
        let data = dataset(&[5, 3, 4, 2, 6, 1, 7, 3, 12]);
        let opts = BatchOptions {
            batch_size: 2,
            packing: true,
            max_seq_len: 8,
            pad_to_multiple: 1,
        };
        let all: Vec<Batch> = batches(&data, &opts, 1, 0).collect();
        let mut seen = 0;
        for batch in &all {
            for r in 0..batch.batch_size {
                let segs = &batch.segment_ids[r * batch.seq_len..(r + 1) * batch.seq_len];
                let used = segs.iter().filter(|&&s| s > 0).count();
                assert!(
                    used <= 8 || segs.iter().all(|&s| s <= 1),
                    "row overflow {segs:?}"
                );
                seen += segs.iter().max().copied().unwrap_or(0) as usize;
            }
        }
        assert_eq!(seen, 9, "every record packed exactly once");
        let tokens: usize = all
            .iter()
            .map(|b| b.segment_ids.iter().filter(|&&s| s > 0).count())
            .sum();
        assert_eq!(tokens, 5 + 3 + 4 + 2 + 6 + 1 + 7 + 3 + 12);
        assert_eq!(all, batches(&data, &opts, 1, 0).collect::<Vec<_>>());
        assert!(all.len() < 9, "packing uses fewer rows than records");
    }

    #[test]
    fn best_fit_prefers_the_tightest_row() {
        let samples: Vec<Sample> = [6, 4, 2]
            .iter()
            .enumerate()
            .map(|(i, &l)| sample(i, l, 0))
            .collect();
        // 6 → row0 (room 2); 4 → row1 (room 4); 2 → row0, the tightest fit.
        assert_eq!(pack(&samples, &[0, 1, 2], 8), vec![vec![0, 2], vec![1]]);
    }
}
