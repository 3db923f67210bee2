//! Devices: the one parser of `auto | cpu | cuda | cuda:N` ([`DeviceChoice`], also the trainer's
//! `run.device`), the benchmarks' `--device` ([`bench_device`]) and how tables name a device
//! ([`device_description`]).
use std::fmt;

use serde::{Deserialize, Serialize};
use tch::Device;

use crate::BenchError;

/// Where to compute, as a user writes it: `auto`, `cpu`, `cuda` or `cuda:N`; anything else is
/// an error that lists these. The trainer's `run.device` and every bench's `--device` use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceChoice {
    /// The first GPU when one is visible, else the CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// GPU `N` (`cuda` is `cuda:0`).
    Cuda(usize),
}

/// A GPU was asked for but libtorch sees none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("\"{0}\" but no GPU is visible")]
pub struct NoGpu(pub DeviceChoice);

impl DeviceChoice {
    /// The libtorch device; an error when a GPU is asked for but none is visible.
    pub fn resolve(self, has_gpu: bool) -> Result<Device, NoGpu> {
        Ok(match self {
            DeviceChoice::Auto if has_gpu => Device::Cuda(0),
            DeviceChoice::Auto | DeviceChoice::Cpu => Device::Cpu,
            DeviceChoice::Cuda(_) if !has_gpu => return Err(NoGpu(self)),
            DeviceChoice::Cuda(i) => Device::Cuda(i),
        })
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl TryFrom<String> for DeviceChoice {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        let bad = || format!("expected auto, cpu, cuda or cuda:N, got {s:?}");
        Ok(match s.as_str() {
            "auto" => DeviceChoice::Auto,
            "cpu" => DeviceChoice::Cpu,
            "cuda" => DeviceChoice::Cuda(0),
            other => DeviceChoice::Cuda(
                other
                    .strip_prefix("cuda:")
                    .and_then(|i| i.parse().ok())
                    .ok_or_else(bad)?,
            ),
        })
    }
}

impl From<DeviceChoice> for String {
    fn from(d: DeviceChoice) -> String {
        d.to_string()
    }
}

/// The benchmarks' `--device`: `auto` (CUDA when visible; also when `arg` is `None`), `cpu`,
/// `cuda`, `cuda:N`, checked against the GPUs libtorch sees.
pub fn bench_device(arg: Option<&str>) -> Result<Device, BenchError> {
    let choice = DeviceChoice::try_from(arg.unwrap_or("auto").to_string())
        .map_err(|e| BenchError::Flag(format!("--device: {e}")))?;
    let device = choice
        .resolve(tch::Cuda::is_available())
        .map_err(|e| BenchError::Unavailable(format!("--device {e}")))?;
    if let Device::Cuda(i) = device {
        if i >= tch::Cuda::device_count() as usize {
            return Err(BenchError::Unavailable(format!(
                "--device cuda:{i}: no such CUDA device is visible to libtorch"
            )));
        }
        // Every kernel family compiles in the background (or comes from the disk cache) while
        // the benchmark sets up; a failure shows where a family is first used.
        let _ = nsa_sys::fused::prebuild(i, &nsa_sys::nvrtc::ALL_SOURCES);
    }
    Ok(device)
}

/// The device as the tables name it: `cuda:N (<GPU name>)` or `cpu (N libtorch threads)`.
pub fn device_description(device: Device) -> String {
    match device {
        Device::Cuda(index) => {
            let name = nsa_sys::driver::driver_info()
                .ok()
                .and_then(|d| d.devices.into_iter().find(|g| g.index == index))
                .map(|g| g.name)
                .unwrap_or_else(|| "unknown GPU".into());
            format!("cuda:{index} ({name})")
        }
        _ => format!("cpu ({} libtorch threads)", tch::get_num_threads()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_choices_parse_render_and_resolve() {
        for (text, choice) in [
            ("auto", DeviceChoice::Auto),
            ("cpu", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda(0)),
            ("cuda:3", DeviceChoice::Cuda(3)),
        ] {
            assert_eq!(DeviceChoice::try_from(text.to_string()), Ok(choice));
            let back = if text == "cuda" { "cuda:0" } else { text };
            assert_eq!(String::from(choice), back);
        }
        for bad in ["tpu", "cuda:", "cuda:x", "cuda:-1", "CPU", ""] {
            let e = DeviceChoice::try_from(bad.to_string()).unwrap_err();
            assert!(e.contains("auto, cpu, cuda or cuda:N"), "{bad}: {e}");
        }
        assert_eq!(DeviceChoice::Auto.resolve(false), Ok(Device::Cpu));
        assert_eq!(DeviceChoice::Auto.resolve(true), Ok(Device::Cuda(0)));
        assert_eq!(DeviceChoice::Cuda(2).resolve(true), Ok(Device::Cuda(2)));
        let e = DeviceChoice::Cuda(1).resolve(false).unwrap_err();
        assert_eq!(e.to_string(), "\"cuda:1\" but no GPU is visible");
    }

    #[test]
    fn bad_device_flags_are_flag_errors() {
        let e = bench_device(Some("gpu")).unwrap_err();
        assert!(matches!(e, BenchError::Flag(_)), "{e}");
        assert!(e.to_string().starts_with("--device: expected"), "{e}");
        assert_eq!(bench_device(Some("cpu")).unwrap(), Device::Cpu);
    }
}
