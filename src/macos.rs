//! Files that macOS hands to FineTune: dropped on the Dock icon, opened with Finder's "Open With" or
//! a double-click, or `open -a FineTune data.jsonl`. winit (under eframe) does not deliver these
//! (`application:openURLs:`), and without a handler AppKit answers "FineTune cannot open files of
//! this type". [`install`] registers a handler for the "open documents" Apple Event
//! (kAEOpenDocuments) that queues the paths; the app takes them with [`take_opened_paths`] every
//! frame and opens them like a drop on the window; [`set_waker`] lets it be woken when paths
//! arrive while it is idle.
//!
//! The queue is plain Rust and builds everywhere (on other systems nothing fills it); only the
//! Apple Event handler is macOS code. It was type-checked but has not been run on a Mac by its
//! author: the macOS workflow builds it, and a Dock drop is the manual check (see
//! packaging/README-sections.md).

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

/// Called when paths arrive (the app passes `egui::Context::request_repaint`).
type Waker = Box<dyn Fn() + Send + Sync>;

/// While alive, macOS keeps the machine from idle sleep and the app out of App Nap (an
/// `NSProcessInfo` activity, `NSActivityUserInitiated`), so an overnight run is not slowed or put to
/// sleep when the person walks away; a closed lid still sleeps, and the run carries on after wake
/// (tests/signals.rs pauses a run to check). Does nothing on other systems. Held by the training
/// thread for the length of a run; ended on drop.
pub struct KeepAwake {
    #[cfg(target_os = "macos")]
    activity:
        objc2::rc::Retained<objc2::runtime::ProtocolObject<dyn objc2::runtime::NSObjectProtocol>>,
}

impl KeepAwake {
    /// Begins the activity; `reason` is what Activity Monitor and `pmset -g assertions` show.
    pub fn begin(reason: &str) -> Self {
        #[cfg(target_os = "macos")]
        {
            use objc2_foundation::{NSActivityOptions, NSProcessInfo, NSString};
            let info = NSProcessInfo::processInfo();
            let activity = info.beginActivityWithOptions_reason(
                NSActivityOptions::UserInitiated,
                &NSString::from_str(reason),
            );
            Self { activity }
        }
        #[cfg(not(target_os = "macos"))]
        {
            let _ = reason;
            Self {}
        }
    }
}

#[cfg(target_os = "macos")]
impl Drop for KeepAwake {
    fn drop(&mut self) {
        use objc2_foundation::NSProcessInfo;
        // SAFETY: the activity is the token beginActivityWithOptions:reason: returned, ended
        // once.
        unsafe { NSProcessInfo::processInfo().endActivity(&self.activity) };
    }
}

/// Paths opened through the system, waiting for the app to take them.
pub struct OpenedPaths {
    paths: Mutex<Vec<PathBuf>>,
    waker: Mutex<Option<Waker>>,
}

impl OpenedPaths {
    /// An empty queue without a waker (a `const fn`, for the process-wide static).
    pub const fn new() -> Self {
        Self {
            paths: Mutex::new(Vec::new()),
            waker: Mutex::new(None),
        }
    }

    /// Queues `paths` and wakes the app.
    pub fn push(&self, paths: Vec<PathBuf>) {
        if paths.is_empty() {
            return;
        }
        lock(&self.paths).extend(paths);
        if let Some(wake) = lock(&self.waker).as_ref() {
            wake();
        }
    }

    /// Everything queued since the last call, oldest first.
    pub fn take(&self) -> Vec<PathBuf> {
        std::mem::take(&mut *lock(&self.paths))
    }

    /// Replaces the function called when paths arrive.
    pub fn set_waker(&self, wake: impl Fn() + Send + Sync + 'static) {
        *lock(&self.waker) = Some(Box::new(wake));
    }
}

impl Default for OpenedPaths {
    fn default() -> Self {
        Self::new()
    }
}

/// A poisoned lock only means a waker panicked; the queue itself is still whole.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The process's queue, filled by the Apple Event handler.
static OPENED: OpenedPaths = OpenedPaths::new();

/// Installs the "open documents" handler. Call it on the main thread before the event loop starts
/// (before `eframe::run_native`) so the documents a launch was asked to open are caught too. Does
/// nothing on other systems, off the main thread, or when called again.
pub fn install() {
    #[cfg(target_os = "macos")]
    appkit::install();
}

/// Everything opened through the system since the last call (the app calls this every frame).
pub fn take_opened_paths() -> Vec<PathBuf> {
    OPENED.take()
}

/// Sets the function called (on the main thread) when paths arrive, e.g. one that requests a
/// repaint so the app's next frame takes them at once.
pub fn set_waker(wake: impl Fn() + Send + Sync + 'static) {
    OPENED.set_waker(wake);
}

/// Queues paths as if the system had opened them (what the handler calls; tests can too).
pub fn push_opened_paths(paths: Vec<PathBuf>) {
    OPENED.push(paths);
}

#[cfg(target_os = "macos")]
mod appkit {
    //! The kAEOpenDocuments handler: an Objective-C object whose method the Apple Event Manager
    //! calls with the event. Everything here runs on the main thread.

    use std::path::PathBuf;
    use std::sync::atomic::{AtomicBool, Ordering};

    use objc2::rc::Retained;
    use objc2::runtime::NSObject;
    use objc2::{define_class, msg_send, sel, MainThreadMarker, MainThreadOnly};
    use objc2_app_kit::NSApplicationWillFinishLaunchingNotification;
    use objc2_foundation::{
        NSAppleEventDescriptor, NSAppleEventManager, NSNotification, NSNotificationCenter,
    };

    /// A four-character code as the Apple Event Manager's headers spell them.
    const fn four_cc(code: &[u8; 4]) -> u32 {
        u32::from_be_bytes(*code)
    }
    /// kCoreEventClass (AppleEvents.h).
    const CORE_EVENT_CLASS: u32 = four_cc(b"aevt");
    /// kAEOpenDocuments (AppleEvents.h).
    const OPEN_DOCUMENTS: u32 = four_cc(b"odoc");
    /// keyDirectObject (AEDataModel.h): the event's list of files.
    const KEY_DIRECT_OBJECT: u32 = four_cc(b"----");
    /// typeAEList (AEDataModel.h).
    const TYPE_LIST: u32 = four_cc(b"list");

    define_class!(
        // SAFETY: NSObject has no subclassing requirements, and OpenDocuments has no Drop impl.
        #[unsafe(super(NSObject))]
        #[thread_kind = MainThreadOnly]
        #[name = "FineTuneOpenDocuments"]
        struct OpenDocuments;

        impl OpenDocuments {
            /// NSApplication installs its own open-documents handler while launching, before it
            /// posts this notification and before it dispatches the launch's documents: install
            /// ours again here so ours is the one called.
            // SAFETY: a notification observer's method takes the NSNotification and returns void.
            #[unsafe(method(applicationWillFinishLaunching:))]
            fn will_finish_launching(&self, _notification: &NSNotification) {
                self.register();
            }

            // SAFETY: the Apple Event Manager calls a handler with the event and the reply event
            // and ignores the return value (void).
            #[unsafe(method(handleOpenDocuments:withReplyEvent:))]
            fn handle_open_documents(
                &self,
                event: &NSAppleEventDescriptor,
                _reply: &NSAppleEventDescriptor,
            ) {
                super::push_opened_paths(file_paths(event));
            }
        }
    );

    impl OpenDocuments {
        fn new(mtm: MainThreadMarker) -> Retained<Self> {
            let this = Self::alloc(mtm).set_ivars(());
            // SAFETY: NSObject's `init` takes nothing and returns the initialized object.
            unsafe { msg_send![super(this), init] }
        }

        /// Makes this object the handler of kAEOpenDocuments (replacing AppKit's).
        fn register(&self) {
            let manager = NSAppleEventManager::sharedAppleEventManager();
            // SAFETY: `setEventHandler:andSelector:forEventClass:andEventID:` takes an object, a
            // selector and two FourCharCodes (u32). The selector names a method of `self` with
            // the (event, reply) signature handlers have. The manager does not retain `self`:
            // `install` keeps it alive for the rest of the process.
            unsafe {
                let _: () = msg_send![
                    &*manager,
                    setEventHandler: self,
                    andSelector: sel!(handleOpenDocuments:withReplyEvent:),
                    forEventClass: CORE_EVENT_CLASS,
                    andEventID: OPEN_DOCUMENTS
                ];
            }
        }
    }

    /// The files and folders an open-documents event names (its direct object: a list of file
    /// URLs, or a single one).
    fn file_paths(event: &NSAppleEventDescriptor) -> Vec<PathBuf> {
        // SAFETY: `paramDescriptorForKeyword:` takes an AEKeyword (u32) and returns a descriptor
        // or nil.
        let direct: Option<Retained<NSAppleEventDescriptor>> =
            unsafe { msg_send![event, paramDescriptorForKeyword: KEY_DIRECT_OBJECT] };
        let Some(direct) = direct else {
            return Vec::new();
        };
        // SAFETY: `descriptorType` takes nothing and returns a DescType (u32).
        let kind: u32 = unsafe { msg_send![&*direct, descriptorType] };
        if kind != TYPE_LIST {
            return file_path(&direct).into_iter().collect();
        }
        // Apple Event lists count from 1.
        (1..=direct.numberOfItems())
            .filter_map(|i| direct.descriptorAtIndex(i))
            .filter_map(|item| file_path(&item))
            .collect()
    }

    /// The path of a descriptor that is (or coerces to) a file URL.
    fn file_path(item: &NSAppleEventDescriptor) -> Option<PathBuf> {
        item.fileURLValue()?.to_file_path()
    }

    pub(super) fn install() {
        static INSTALLED: AtomicBool = AtomicBool::new(false);
        // AppKit objects belong to the main thread; eframe runs there on macOS.
        let Some(mtm) = MainThreadMarker::new() else {
            return;
        };
        if INSTALLED.swap(true, Ordering::SeqCst) {
            return;
        }
        let handler = OpenDocuments::new(mtm);
        // Now, for a call after launch; and again when launching ends (see will_finish_launching).
        handler.register();
        let center = NSNotificationCenter::defaultCenter();
        // SAFETY: the selector names a method of `handler` that takes the NSNotification; the
        // notification name is AppKit's constant, read once AppKit is loaded (it is linked in).
        unsafe {
            center.addObserver_selector_name_object(
                &handler,
                sel!(applicationWillFinishLaunching:),
                Some(NSApplicationWillFinishLaunchingNotification),
                None,
            );
        }
        // Neither the Apple Event Manager nor the notification centre retains the handler; it
        // must outlive every event, so it is never released.
        std::mem::forget(handler);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn queue_hands_over_paths_in_order_once_and_wakes() {
        // Its own queue: the process-wide one may be drained by app tests running alongside.
        let queue = OpenedPaths::new();
        let wakes = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&wakes);
        queue.set_waker(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });

        queue.push(vec![PathBuf::from("/data/train.jsonl")]);
        queue.push(vec![]);
        queue.push(vec![
            PathBuf::from("/data/valid.jsonl"),
            PathBuf::from("/models/tiny"),
        ]);
        assert_eq!(
            wakes.load(Ordering::SeqCst),
            2,
            "an empty push wakes nobody"
        );
        assert_eq!(
            queue.take(),
            vec![
                PathBuf::from("/data/train.jsonl"),
                PathBuf::from("/data/valid.jsonl"),
                PathBuf::from("/models/tiny"),
            ]
        );
        assert!(queue.take().is_empty());
    }

    #[test]
    fn install_is_harmless_where_there_is_no_dock() {
        // On Linux (and off the main thread on macOS) it does nothing; twice is fine everywhere.
        install();
        install();
    }
}
