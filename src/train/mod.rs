//! Training: the optimizer and learning-rate schedule, the run loop, checkpoints and events.
//! [`run`] is the engine entry [`crate::session`] starts; it reports through a [`Reporter`].

pub mod checkpoint;
pub mod config;
pub mod events;
pub mod optim;
pub mod run;
pub mod samples;
mod stream;

pub use config::{
    capped_seq_len, DeviceChoice, DtypeChoice, Duration, FieldError, Schedule, TrainConfig,
    ValidConfig,
};
pub use events::{format_duration, Event, Reporter, StepStats, StopReason};

pub use run::run;
pub use samples::SampleAnswer;
