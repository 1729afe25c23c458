//! The one way to start a run: [`start`] takes a [`ValidConfig`], spawns the training thread and
//! returns a [`Session`] to read its events from and to stop it. The app and the CLI are two
//! consumers of the same events; how a run stops, and what its end means (see
//! [`Event::exit_code`]), is decided here and in [`crate::train`], not by them. Nothing above
//! this module touches tensors; nothing below it touches egui.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, RecvError, Sender, TryRecvError};

use crate::train::{Event, Reporter, ValidConfig};

/// Capacity of the event channel. The trainer blocks when the UI falls this far behind, which
/// bounds memory; steps are far slower than the UI drains, so this never stalls in practice.
pub const EVENT_CAPACITY: usize = 1024;

/// Called by the training thread after each event so the UI wakes up (egui's `request_repaint`).
pub type Repaint = Arc<dyn Fn() + Send + Sync>;

/// Asks a run to stop after its current step; cheap to clone into a Ctrl-C handler.
#[derive(Debug, Clone, Default)]
pub struct StopHandle(Arc<AtomicBool>);

impl StopHandle {
    /// Finish the current step, save adapter + optimizer state, and end with `Event::Stopped`.
    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// True once [`StopHandle::stop`] was called.
    pub fn is_stopping(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// A running (or finished) training session.
pub struct Session {
    events: Receiver<Event>,
    stop: StopHandle,
    thread: Option<JoinHandle<()>>,
    /// The terminal event was handed out.
    ended: bool,
}

impl Session {
    /// Asks the run to stop after the current step.
    pub fn stop(&self) {
        self.stop.stop();
    }

    /// A handle that stops this run from elsewhere (a signal handler).
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// The next event if one is waiting. A training thread that ended without a last event
    /// yields one `Failed`; after the last event: `Disconnected`.
    pub fn try_recv(&mut self) -> Result<Event, TryRecvError> {
        if self.ended {
            return Err(TryRecvError::Disconnected);
        }
        match self.events.try_recv() {
            Ok(event) => Ok(self.note(event)),
            Err(TryRecvError::Empty) => Err(TryRecvError::Empty),
            Err(TryRecvError::Disconnected) => Ok(self.note(vanished())),
        }
    }

    /// Waits for the next event; `None` after the last one (see [`Session::try_recv`]).
    pub fn recv(&mut self) -> Option<Event> {
        if self.ended {
            return None;
        }
        Some(match self.events.recv() {
            Ok(event) => self.note(event),
            Err(RecvError) => self.note(vanished()),
        })
    }

    fn note(&mut self, event: Event) -> Event {
        self.ended = event.is_terminal();
        event
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

/// What a run that ended without a last event reports.
fn vanished() -> Event {
    Event::Failed {
        error: "the training thread ended without reporting; see the log and try again".into(),
    }
}

/// The session's side of the engine's [`Reporter`]: the channel, the repaint callback and the stop
/// flag.
struct ChannelReporter {
    events: Sender<Event>,
    repaint: Option<Repaint>,
    stop: StopHandle,
}

impl Reporter for ChannelReporter {
    /// Sends an event (blocking if the receiver is far behind; dropped if it has gone away).
    fn send(&self, event: Event) {
        let _ = self.events.send(event);
        if let Some(r) = &self.repaint {
            r();
        }
    }

    fn stop_requested(&self) -> bool {
        self.stop.is_stopping()
    }
}

/// Spawns the training thread running `run` (normally [`crate::train::run`], as [`start`] does);
/// the test seam: tests pass a scripted fake engine, or wrap the real one.
pub fn start_with<F>(config: ValidConfig, repaint: Option<Repaint>, run: F) -> Session
where
    F: FnOnce(ValidConfig, &dyn Reporter) + Send + 'static,
{
    let (tx, rx) = bounded(EVENT_CAPACITY);
    let stop = StopHandle::default();
    let reporter = ChannelReporter {
        events: tx,
        repaint,
        stop: stop.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("finetune-train".into())
        .spawn(move || run(config, &reporter));
    let (events, thread) = match thread {
        Ok(t) => (rx, Some(t)),
        Err(e) => {
            // No thread: report the failure on the channel so the UI or CLI shows it.
            let (tx, rx) = bounded(1);
            let _ = tx.send(Event::Failed {
                error: format!("could not start the training thread: {e}"),
            });
            (rx, None)
        }
    };
    Session {
        events,
        stop,
        thread,
        ended: false,
    }
}

/// Starts a real training run. With a window to repaint, its compute threads (a rayon pool of
/// its own) run at a lower priority than the window, so the UI keeps its frame rate while
/// training takes every core; headless (the CLI) they run at normal priority.
pub fn start(config: ValidConfig, repaint: Option<Repaint>) -> Session {
    let behind_a_window = repaint.is_some();
    start_with(config, repaint, move |config, reporter| {
        // The Mac neither idle-sleeps nor App-Naps this process while it trains.
        let _awake = crate::macos::KeepAwake::begin("Training a LoRA adapter");
        if !behind_a_window {
            return crate::train::run(config, reporter);
        }
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
