//! Kernel families built in the background before their first use ([`prebuild`]), and the wait
//! for those builds before the process exits ([`finish_prebuilds`]).
use std::sync::Mutex;

use super::{cubin, current_options, device_attribute, FusedError, FusedOptions};
use crate::driver;
use crate::nvrtc::KernelSource;
use crate::SysError;

/// The build threads [`prebuild`] started that nobody has joined yet.
static PREBUILDS: Mutex<Vec<std::thread::JoinHandle<()>>> = Mutex::new(Vec::new());

/// Starts building the kernel families `sources` (e.g. [`crate::nvrtc::ALL_SOURCES`]; a dense
/// model needs only [`crate::nvrtc::POINTWISE`]) for CUDA device `device`'s architecture in the
/// background (one thread per family it builds for, [`super::configure`]'s options) and
/// returns at once.
/// Later loads take the builds (or wait for the ones still running), so a first start costs the
/// slowest family's compile rather than all of them in turn; with a warm disk cache it reads
/// files. Build errors surface where a loader needs that family. The process calls
/// [`finish_prebuilds`] before it exits.
pub fn prebuild(device: usize, sources: &[KernelSource]) -> Result<(), FusedError> {
    let arch = (
        device_attribute(device, driver::ATTR_CC_MAJOR)?,
        device_attribute(device, driver::ATTR_CC_MINOR)?,
    );
    spawn_builds(arch, sources, &current_options())
}

/// [`prebuild`] for compute capability `arch` with `opts` (no device needed).
pub(super) fn spawn_builds(
    arch: (i32, i32),
    sources: &[KernelSource],
    opts: &FusedOptions,
) -> Result<(), FusedError> {
    let mut threads = PREBUILDS.lock().unwrap_or_else(|e| e.into_inner());
    for src in sources.iter().copied().filter(|s| s.builds_for(arch)) {
        let opts = opts.clone();
        let thread = std::thread::Builder::new()
            .name(format!("nvrtc {}", src.name))
            .spawn(move || {
                let _ = cubin(&src, arch, &opts);
            })
            .map_err(|e| SysError::Load {
                name: format!("a build thread for {}", src.name),
                reason: e.to_string(),
            })?;
        threads.push(thread);
    }
    Ok(())
}

/// Waits for every build [`prebuild`] started; returns at once when none is running. A process
/// that called [`prebuild`] calls this before it exits: `exit` tears NVRTC's static state down
/// under a compile still running on a build thread, and the process that had finished its work
/// crashes on the way out. Seen on an H100 with a cold kernel cache: a 600-step dense run (16 s;
/// the slowest family compiles for 26 s there) wrote its results, then died with glibc's
/// `free(): invalid pointer` (status 134); under cuda-gdb a 3-step run stopped on SIGSEGV inside
/// `nvrtcCompileProgram` on a build thread of a `selected_*` family after its last line. What the
/// builds write stays in the disk cache for the next start.
pub fn finish_prebuilds() {
    let threads = std::mem::take(&mut *PREBUILDS.lock().unwrap_or_else(|e| e.into_inner()));
    for thread in threads {
        // A build thread hands its errors to the loaders, not here; a panic in one (none is
        // expected) leaves nothing to clean up.
        let _ = thread.join();
    }
}
