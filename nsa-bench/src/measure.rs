//! The benchmarks' one timing helper ([`time_runs`], [`Timing`], [`median`]) and one memory
//! probe ([`peak_cuda_bytes`]).
use tch::Device;

use crate::BenchError;

/// Median, min and max of repeated measurements: wall times in ms unless a caller says
/// otherwise (`bench train` keeps tokens/s in one).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Timing {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Timing {
    /// The median (upper middle for even counts), min and max of `times`; `None` when empty.
    pub fn of(mut times: Vec<f64>) -> Option<Timing> {
        times.sort_by(f64::total_cmp);
        Some(Timing {
            median: *times.get(times.len() / 2)?,
            min: *times.first()?,
            max: *times.last()?,
        })
    }

    /// `median (min–max)` with two decimals.
    pub fn cell(&self) -> String {
        self.cell_to(2)
    }

    /// `median (min–max)` with `decimals` decimals.
    pub fn cell_to(&self, decimals: usize) -> String {
        let d = decimals;
        format!("{:.d$} ({:.d$}–{:.d$})", self.median, self.min, self.max)
    }
}

/// The median (upper middle for even counts) of `v`; `None` when empty.
pub fn median(v: Vec<f64>) -> Option<f64> {
    Timing::of(v).map(|t| t.median)
}

/// Times `repeats` runs of `f` (after one untimed warm-up run when `warm_up`), synchronising
/// the device around each, and returns the timing and the last run's result.
pub fn time_runs<T>(
    device: Device,
    repeats: usize,
    warm_up: bool,
    mut f: impl FnMut() -> Result<T, BenchError>,
) -> Result<(Timing, T), BenchError> {
    let sync = || {
        if let Device::Cuda(index) = device {
            tch::Cuda::synchronize(index as i64);
        }
    };
    if repeats == 0 {
        return Err(BenchError::Flag(
            "at least one timed run is needed".to_string(),
        ));
    }
    if warm_up {
        drop(f()?);
    }
    sync();
    let mut times = Vec::with_capacity(repeats);
    let mut last = None;
    for _ in 0..repeats {
        let start = std::time::Instant::now();
        last = Some(f()?);
        sync();
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    match (Timing::of(times), last) {
        (Some(timing), Some(last)) => Ok((timing, last)),
        _ => Err(BenchError::Flag(
            "at least one timed run is needed".to_string(),
        )),
    }
}

/// The one memory probe of the benchmarks: the peak of libtorch's CUDA caching allocator while
/// `f` runs, minus what was allocated before (bytes), read from the allocator's own statistics
/// (nothing else on the GPU is counted, and no external tool is needed).
pub fn peak_cuda_bytes<T>(
    index: usize,
    f: impl FnOnce() -> Result<T, BenchError>,
) -> Result<(T, u64), BenchError> {
    tch::Cuda::synchronize(index as i64);
    let before = nsa_sys::train::cuda_memory(index)
        .map(|m| m.allocated)
        .unwrap_or(0);
    nsa_sys::train::cuda_reset_peak(index);
    let out = f()?;
    tch::Cuda::synchronize(index as i64);
    let peak = nsa_sys::train::cuda_memory(index)
        .map(|m| m.peak_allocated)
        .ok_or_else(|| {
            BenchError::Unavailable(
                "libtorch's CUDA allocator statistics are unavailable".to_string(),
            )
        })?;
    Ok((out, peak.saturating_sub(before)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a naive reference: sort, take the middle, the ends.
    #[test]
    fn timing_and_median_of_random_samples() {
        let mut state = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 10_000) as f64 / 7.0
        };
        for len in 1..40 {
            let v: Vec<f64> = (0..len).map(|_| next()).collect();
            let mut sorted = v.clone();
            sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let t = Timing::of(v.clone()).unwrap();
            assert_eq!(t.median, sorted[len / 2], "{v:?}");
            assert_eq!(t.min, sorted[0]);
            assert_eq!(t.max, sorted[len - 1]);
            assert_eq!(median(v), Some(sorted[len / 2]));
        }
        assert_eq!(median(Vec::new()), None);
        assert_eq!(
            Timing::of(vec![3.0, 1.0, 2.0]).unwrap().cell(),
            "2.00 (1.00–3.00)"
        );
    }

    #[test]
    fn time_runs_counts_runs_and_returns_the_last_result() {
        let mut calls = 0;
        let (timing, last) = time_runs(Device::Cpu, 3, true, || {
            calls += 1;
            Ok(calls)
        })
        .unwrap();
        assert_eq!((calls, last), (4, 4), "one warm-up and three timed runs");
        assert!(timing.min <= timing.median && timing.median <= timing.max);
        assert!(matches!(
            time_runs(Device::Cpu, 0, false, || Ok(())),
            Err(BenchError::Flag(_))
        ));
        let failing = time_runs(Device::Cpu, 2, false, || -> Result<(), BenchError> {
            Err(BenchError::Unavailable("no".into()))
        });
        assert!(matches!(failing, Err(BenchError::Unavailable(_))));
    }
}
