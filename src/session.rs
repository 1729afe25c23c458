//! The boundary between the UI (or CLI) and the engine: [`start`] spawns the training thread and
//! returns a [`Session`] handle with a command sender, an event receiver and a stop flag. Nothing
//! above this module touches tensors; nothing below it touches egui.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::train::config::TrainConfig;
use crate::train::events::Event;

/// Capacity of the event channel. The trainer blocks when the UI falls this far behind, which
/// bounds memory; steps are far slower than the UI drains, so this never stalls in practice.
pub const EVENT_CAPACITY: usize = 1024;

/// Requests from the UI to the running session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Finish the current step, save adapter + optimizer state, and end with `Event::Stopped`.
    Stop,
}

/// Called by the training thread after each event so the UI wakes up (egui's `request_repaint`).
pub type Repaint = Arc<dyn Fn() + Send + Sync>;

/// A running (or finished) training session.
pub struct Session {
    pub commands: Sender<Command>,
    pub events: Receiver<Event>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Session {
    /// Asks the run to stop after the current step.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        // The flag alone suffices; the command is for symmetry with future commands.
        let _ = self.commands.try_send(Command::Stop);
    }

    /// True once the training thread has exited.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Waits for the training thread to exit.
    pub fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Observer called on the training thread with each event before it is sent (tests use it to
/// act at an exact point of a run, e.g. stop right after step N).
pub type Hook = Arc<dyn Fn(&Event) + Send + Sync>;

/// Sink the engine reports through: the channel plus the repaint callback and stop flag.
#[derive(Clone)]
pub struct Reporter {
    events: Sender<Event>,
    repaint: Option<Repaint>,
    hook: Option<Hook>,
    stop: Arc<AtomicBool>,
    commands: Receiver<Command>,
}

impl Reporter {
    /// Sends an event (blocking if the receiver is far behind; dropped if it has gone away).
    pub fn send(&self, event: Event) {
        if let Some(h) = &self.hook {
            h(&event);
        }
        let _ = self.events.send(event);
        if let Some(r) = &self.repaint {
            r();
        }
    }

    /// Asks the run to stop after the current step (same as [`Session::stop`]).
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// True when a stop was requested.
    pub fn stop_requested(&self) -> bool {
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                Command::Stop => self.stop.store(true, Ordering::SeqCst),
            }
        }
        self.stop.load(Ordering::SeqCst)
    }

    /// A reporter whose events go to the returned receiver (for the CLI and tests).
    pub fn channel() -> (Self, Receiver<Event>, Arc<AtomicBool>) {
        let (tx, rx) = bounded(EVENT_CAPACITY);
        let (_ctx, crx) = bounded(1);
        let stop = Arc::new(AtomicBool::new(false));
        (
            Self {
                events: tx,
                repaint: None,
                hook: None,
                stop: stop.clone(),
                commands: crx,
            },
            rx,
            stop,
        )
    }
}

impl Reporter {
    /// The same reporter with `hook` called on every event.
    pub fn with_hook(mut self, hook: Hook) -> Self {
        self.hook = Some(hook);
        self
    }
}

/// Spawns the training thread for `config` (already validated). `run` is the engine entry point
/// (normally [`crate::train::run`]); tests pass a scripted fake.
pub fn start_with<F>(config: TrainConfig, repaint: Option<Repaint>, run: F) -> Session
where
    F: FnOnce(TrainConfig, Reporter) + Send + 'static,
{
    let (etx, erx) = bounded(EVENT_CAPACITY);
    let (ctx, crx) = bounded(16);
    let stop = Arc::new(AtomicBool::new(false));
    let reporter = Reporter {
        events: etx,
        repaint,
        hook: None,
        stop: stop.clone(),
        commands: crx,
    };
    let thread = std::thread::Builder::new()
        .name("finetune-train".into())
        .spawn(move || run(config, reporter));
    let thread = match thread {
        Ok(t) => Some(t),
        Err(e) => {
            // No thread: report the failure on the channel so the UI shows it.
            let (tx, rx) = bounded(1);
            let _ = tx.send(Event::Failed {
                error: format!("could not start the training thread: {e}"),
            });
            return Session {
                commands: ctx,
                events: rx,
                stop,
                thread: None,
            };
        }
    };
    Session {
        commands: ctx,
        events: erx,
        stop,
        thread,
    }
}

/// Spawns a real training run. Its compute threads (a rayon pool of its own) run at a lower
/// priority than the window, so the UI keeps its frame rate while training takes every core.
pub fn start(config: TrainConfig, repaint: Option<Repaint>) -> Session {
    start_with(config, repaint, |config, reporter| {
        lower_priority();
        let pool = rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("finetune-compute-{i}"))
            .start_handler(|_| lower_priority())
            .build();
        match pool {
            Ok(pool) => pool.install(|| crate::train::run(config, reporter)),
            // Without a pool of its own the run uses the global one, at normal priority.
            Err(_) => crate::train::run(config, reporter),
        }
    })
}

/// Lowers the calling thread's scheduling priority (Linux: nice 10 for this thread only). On
/// macOS threads spawned by the app already run below the main thread's user-interactive QoS.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid has no preconditions; setpriority on our own thread id only changes that
    // thread's nice value.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid);
        if let Ok(tid) = libc::id_t::try_from(tid) {
            libc::setpriority(libc::PRIO_PROCESS, tid, 10);
        }
    }
}
