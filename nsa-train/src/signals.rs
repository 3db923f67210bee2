//! Stop requests: SIGINT, SIGTERM and SIGHUP (a closed terminal or ssh session) ask a run to stop
//! at the next micro-step or evaluation batch, write a checkpoint and exit with 128 + the signal
//! number (130, 143, 129), so a launcher can tell an interrupted run from a finished one (exit
//! 0). The same signal a second time (an impatient Ctrl-C) exits at once.
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result};

/// The signals that stop a run.
pub const STOP_SIGNALS: [i32; 3] = [
    signal_hook::consts::SIGINT,
    signal_hook::consts::SIGTERM,
    signal_hook::consts::SIGHUP,
];

#[derive(Debug)]
struct Flags {
    /// The signal number of the first stop request (0: none).
    signal: Arc<AtomicUsize>,
    /// Set together with `signal`; a stop signal that finds it set exits the process at once.
    any: Arc<AtomicBool>,
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
                    any: Arc::new(AtomicBool::new(false)),
                };
                for sig in STOP_SIGNALS {
                    // Registered first, so it sees the flag as the previous signal left it.
                    signal_hook::flag::register_conditional_shutdown(
                        sig,
                        128 + sig,
                        Arc::clone(&f.any),
                    )
                    .context("installing signal handlers")?;
                    signal_hook::flag::register_usize(sig, Arc::clone(&f.signal), sig as usize)
                        .context("installing signal handlers")?;
                    signal_hook::flag::register(sig, Arc::clone(&f.any))
                        .context("installing signal handlers")?;
                }
                FLAGS.get_or_init(|| f)
            }
        };
        flags.signal.store(0, Ordering::SeqCst);
        flags.any.store(false, Ordering::SeqCst);
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
