//! The training set as one endless stream of batches across epochs (each epoch reshuffled with
//! the run's seed), resumable at (epoch, batch index) so a resumed run sees the same batches.

use crate::data::{self, Batch, BatchOptions, Dataset, EpochBatches};

/// Batches of the training set across epochs, resumable at (epoch, batch index).
pub(crate) struct BatchStream<'a> {
    data: &'a Dataset,
    options: BatchOptions,
    seed: u64,
    pub(crate) epoch: u64,
    /// Batches of `epoch` already taken.
    pub(crate) pos: usize,
    iter: EpochBatches<'a>,
}

impl<'a> BatchStream<'a> {
    pub(crate) fn new(
        data: &'a Dataset,
        options: BatchOptions,
        seed: u64,
        epoch: u64,
        pos: usize,
    ) -> Self {
        let mut iter = data::batches(data, &options, seed, epoch);
        // Planning is indices only; skipping builds the skipped batches' vectors, which is cheap.
        for _ in 0..pos {
            iter.next();
        }
        Self {
            data,
            options,
            seed,
            epoch,
            pos,
            iter,
        }
    }

    pub(crate) fn next(&mut self) -> Option<Batch> {
        if let Some(b) = self.iter.next() {
            self.pos += 1;
            return Some(b);
        }
        self.epoch += 1;
        self.pos = 0;
        self.iter = data::batches(self.data, &self.options, self.seed, self.epoch);
        let b = self.iter.next()?;
        self.pos = 1;
        Some(b)
    }

    /// Fractional epochs completed.
    pub(crate) fn progress(&self) -> f64 {
        let len = data::batches(self.data, &self.options, self.seed, self.epoch).len();
        self.epoch as f64 + self.pos as f64 / len.max(1) as f64
    }
}
