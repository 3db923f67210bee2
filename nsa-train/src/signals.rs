//! Stop requests: SIGINT, SIGTERM and SIGHUP (a closed terminal or ssh session) ask a run to stop
//! at the next micro-step or evaluation batch, write a checkpoint and exit with 128 + the signal
//! number (130, 143, 129), so a launcher can tell an interrupted run from a finished one (exit
//! 0). A stop signal again, [`REPEAT_GRACE`] or more after the first (an impatient Ctrl-C),
//! exits at once; sooner, it is the same request delivered twice: `timeout` and many job
//! schedulers signal the process and then its process group, and a run that took the second
//! delivery for "exit now" lost everything since its last checkpoint.
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// The signals that stop a run.
pub const STOP_SIGNALS: [i32; 3] = [
    signal_hook::consts::SIGINT,
    signal_hook::consts::SIGTERM,
    signal_hook::consts::SIGHUP,
];

/// A stop signal this soon after the first one is a duplicate delivery, not a second request.
pub const REPEAT_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Flags {
    /// The signal number of the stop request (0: none), set in the signal handler.
    signal: Arc<AtomicUsize>,
    /// When the watcher thread saw the first stop signal: milliseconds since the thread
    /// started, plus 1 (0: none yet).
    first_seen_ms: Arc<AtomicU64>,
}

static FLAGS: OnceLock<Flags> = OnceLock::new();

/// The process-wide stop request. Cheap to clone and to poll.
#[derive(Debug, Clone)]
pub struct StopRequest {
    signal: Arc<AtomicUsize>,
}

impl StopRequest {
    /// Installs the handlers once per process and clears any earlier request.
    pub fn install() -> Result<Self> {
        let flags = match FLAGS.get() {
            Some(f) => f,
            None => {
                let f = Flags {
                    signal: Arc::new(AtomicUsize::new(0)),
                    first_seen_ms: Arc::new(AtomicU64::new(0)),
                };
                for sig in STOP_SIGNALS {
                    signal_hook::flag::register_usize(sig, Arc::clone(&f.signal), sig as usize)
                        .context("installing signal handlers")?;
                }
                // The exit-at-once rule needs a clock, so it runs on a thread that reads the
                // signals from signal-hook's self-pipe rather than in the handler.
                let mut signals = signal_hook::iterator::Signals::new(STOP_SIGNALS)
                    .context("installing signal handlers")?;
                let first_seen = Arc::clone(&f.first_seen_ms);
                let epoch = Instant::now();
                std::thread::Builder::new()
                    .name("stop-signals".into())
                    .spawn(move || {
                        for sig in signals.forever() {
                            let now = epoch.elapsed().as_millis() as u64 + 1;
                            if let Err(first) = first_seen.compare_exchange(
                                0,
                                now,
                                Ordering::SeqCst,
                                Ordering::SeqCst,
                            ) {
                                if now - first >= REPEAT_GRACE.as_millis() as u64 {
                                    signal_hook::low_level::exit(exit_code(sig));
                                }
                            }
                        }
                    })
                    .context("starting the signal watcher thread")?;
                FLAGS.get_or_init(|| f)
            }
        };
        flags.signal.store(0, Ordering::SeqCst);
        flags.first_seen_ms.store(0, Ordering::SeqCst);
        Ok(StopRequest {
            signal: Arc::clone(&flags.signal),
        })
    }

    /// The signal that asked to stop, if any.
    pub fn signal(&self) -> Option<i32> {
        match self.signal.load(Ordering::Relaxed) {
            0 => None,
            s => Some(s as i32),
        }
    }

    /// Records a stop requested elsewhere (another rank of a data-parallel run).
    pub fn request(&self, signal: i32) {
        let _ =
            self.signal
                .compare_exchange(0, signal as usize, Ordering::SeqCst, Ordering::SeqCst);
    }
}

/// The exit status for a run stopped by `signal` (the shell's convention).
pub fn exit_code(signal: i32) -> i32 {
    128 + signal
}

/// The signal's name for messages.
pub fn name(signal: i32) -> &'static str {
    match signal {
        signal_hook::consts::SIGINT => "SIGINT",
        signal_hook::consts::SIGTERM => "SIGTERM",
        signal_hook::consts::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}
