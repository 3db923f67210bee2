//! Each kernel's GPU time in one launch of a [`DecodeStep`]: CUDA events between the launches.
use super::{current_stream, DecodeStep, FusedError};
use crate::driver::{self, check, CuEvent};

/// GPU milliseconds of each of a step's four kernels in one eager launch (events recorded on
/// the stream between them: about 0.5 µs resolution, and each event adds a little to the time
/// of the kernel after it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeKernelTimes {
    /// The compressed tiles (and the log-sum-exp merge of each group's last CTA).
    pub compressed: f64,
    /// The selection (block scores and top n).
    pub selection: f64,
    /// The selected and window tiles.
    pub attend: f64,
    /// The merge of every branch's partials and the gated mix.
    pub combine: f64,
}

impl DecodeStep {
    /// Launches the step once on libtorch's current stream with a timing event before each
    /// kernel and after the last, waits for the last event, and returns each kernel's time.
    pub fn launch_timed(&self) -> Result<DecodeKernelTimes, FusedError> {
        let drv = driver::shared()?;
        let stream = current_stream(self.kernels.device)?;
        let mut events: [CuEvent; 5] = [std::ptr::null_mut(); 5];
        let mut created = Ok(());
        for event in events.iter_mut() {
            // SAFETY: a valid out-pointer; flags 0 make an event that records time.
            created = check("cuEventCreate", unsafe { (drv.event_create)(event, 0) });
            if created.is_err() {
                break;
            }
        }
        let timed = created.map_err(FusedError::from).and_then(|()| {
            self.launch_on(stream, &mut |i| {
                // SAFETY: events[i] is a live event of this context, `stream` its stream.
                Ok(check("cuEventRecord", unsafe {
                    (drv.event_record)(events[i], stream)
                })?)
            })?;
            // SAFETY: the last event was recorded above.
            check("cuEventSynchronize", unsafe {
                (drv.event_synchronize)(events[4])
            })?;
            let mut ms = [0f32; 4];
            for (i, slot) in ms.iter_mut().enumerate() {
                // SAFETY: both events were recorded and the later one has completed.
                check("cuEventElapsedTime", unsafe {
                    (drv.event_elapsed_time)(slot, events[i], events[i + 1])
                })?;
            }
            let [compressed, selection, attend, combine] = ms.map(f64::from);
            Ok(DecodeKernelTimes {
                compressed,
                selection,
                attend,
                combine,
            })
        });
        for event in events.into_iter().filter(|e| !e.is_null()) {
            // SAFETY: made above and destroyed once; the driver defers the destruction of an
            // event still pending.
            unsafe {
                (drv.event_destroy)(event);
            }
        }
        timed
    }
}
