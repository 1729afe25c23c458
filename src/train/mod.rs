//! Training: the optimizer and learning-rate schedule, the run loop, checkpoints and events.

pub mod checkpoint;
pub mod config;
pub mod events;
pub mod optim;
pub mod run;

pub use config::{DeviceChoice, DtypeChoice, Duration, FieldError, Schedule, TrainConfig};
pub use events::{Event, StepStats};

pub use run::run;
