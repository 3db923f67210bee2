//! A [`DecodeStep`]'s four launches captured as one CUDA graph and replayed.
use super::{current_stream, DecodeStep, FusedError};
use crate::driver::{self, check, CuGraph, CuGraphExec, CuStream};

impl DecodeStep {
    /// Captures the four launches as a CUDA graph (on a stream of its own: libtorch's legacy
    /// default stream cannot capture). Replays read the step's inputs as they are then
    /// (overwrite them in place to decode the next token).
    pub fn capture(&self) -> Result<DecodeGraph, FusedError> {
        let drv = driver::shared()?;
        let mut stream: CuStream = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the stream is destroyed below.
        check("cuStreamCreate", unsafe {
            (drv.stream_create)(&mut stream, driver::STREAM_NON_BLOCKING)
        })?;
        let captured = (|| -> Result<CuGraphExec, FusedError> {
            // SAFETY: `stream` is a live stream of this context.
            check("cuStreamBeginCapture", unsafe {
                (drv.stream_begin_capture)(stream, driver::CAPTURE_MODE_THREAD_LOCAL)
            })?;
            let launched = self.launch_on(stream, &mut |_| Ok(()));
            let mut graph: CuGraph = std::ptr::null_mut();
            // SAFETY: ends the capture begun above (also after a failed launch).
            let ended = check("cuStreamEndCapture", unsafe {
                (drv.stream_end_capture)(stream, &mut graph)
            });
            launched?;
            ended?;
            let mut exec: CuGraphExec = std::ptr::null_mut();
            // SAFETY: `graph` is the captured graph, destroyed right after instantiation (the
            // executable does not need it).
            let inst = check("cuGraphInstantiate", unsafe {
                (drv.graph_instantiate)(&mut exec, graph, 0)
            });
            // SAFETY: as above.
            unsafe {
                (drv.graph_destroy)(graph);
            }
            inst?;
            Ok(exec)
        })();
        // SAFETY: nothing was launched on the capturing stream outside the capture.
        unsafe {
            (drv.stream_destroy)(stream);
        }
        Ok(DecodeGraph {
            exec: captured?,
            device: self.kernels.device,
        })
    }
}

/// A captured [`DecodeStep`]: its four kernels in one launch.
#[derive(Debug)]
pub struct DecodeGraph {
    exec: CuGraphExec,
    device: usize,
}

impl DecodeGraph {
    /// Replays the graph on libtorch's current stream (ordered after the work queued there).
    pub fn replay(&self) -> Result<(), FusedError> {
        let drv = driver::shared()?;
        let torch = current_stream(self.device)?;
        // SAFETY: a live executable of this device's context, launched on its stream.
        check("cuGraphLaunch", unsafe {
            (drv.graph_launch)(self.exec, torch)
        })?;
        Ok(())
    }
}

impl Drop for DecodeGraph {
    fn drop(&mut self) {
        let Ok(drv) = driver::shared() else { return };
        // SAFETY: the executable made in `capture`, destroyed once; the driver defers the
        // destruction until replays already queued have finished.
        unsafe {
            (drv.graph_exec_destroy)(self.exec);
        }
    }
}
