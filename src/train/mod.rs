//! Training: the optimizer and learning-rate schedule, the run loop, checkpoints and events.

pub mod optim;
