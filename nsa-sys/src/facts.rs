//! A snapshot of the runtime: libtorch, CUDA, cuDNN, NCCL, GPUs and the SDPA backend choice.
//!
//! This is the "backend audit": it is printed by `nsa-train env`, written by `cargo xtask env`,
//! and stored with every run so that a number can always be traced to the stack that made it.
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::cuda::{self, CudaBackend};
use crate::driver::{self, DriverInfo};
use crate::glue;

/// The libtorch version `tch =0.24.0` is built for.
pub const EXPECTED_TORCH: (i32, i32, i32) = (2, 11, 0);

/// Which kernel `scaled_dot_product_attention` dispatches to (ATen's `SDPBackend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SdpaBackend {
    Error,
    Math,
    FlashAttention,
    EfficientAttention,
    CudnnAttention,
    Overrideable,
    Unknown,
}

impl SdpaBackend {
    /// Maps ATen's `sdp::SDPBackend` integer.
    pub fn from_aten(code: i64) -> Self {
        match code {
            -1 => SdpaBackend::Error,
            0 => SdpaBackend::Math,
            1 => SdpaBackend::FlashAttention,
            2 => SdpaBackend::EfficientAttention,
            3 => SdpaBackend::CudnnAttention,
            4 => SdpaBackend::Overrideable,
            _ => SdpaBackend::Unknown,
        }
    }

    /// The backend SDPA would pick for these inputs.
    ///
    /// Layout: `q` `[B, H, S, dk]`, `k` `[B, Hk, S, dk]`, `v` `[B, Hk, S, dv]`; `enable_gqa` when
    /// `Hk < H`. Errors from libtorch (bad shapes) map to [`SdpaBackend::Error`].
    pub fn choice(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Self {
        let gqa = q.size().get(1) != k.size().get(1);
        match Tensor::f_internal_fused_sdp_choice(q, k, v, None::<Tensor>, 0.0, causal, None, gqa) {
            Ok(code) => Self::from_aten(code),
            Err(_) => SdpaBackend::Error,
        }
    }
}

impl std::fmt::Display for SdpaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            SdpaBackend::Error => "error (no backend accepts these inputs)",
            SdpaBackend::Math => "math",
            SdpaBackend::FlashAttention => "flash",
            SdpaBackend::EfficientAttention => "mem-efficient",
            SdpaBackend::CudnnAttention => "cudnn",
            SdpaBackend::Overrideable => "overrideable",
            SdpaBackend::Unknown => "unknown",
        };
        f.write_str(s)
    }
}

/// One SDPA probe: the shape asked about and the backend chosen.
#[derive(Debug, Clone, Serialize)]
pub struct SdpaProbe {
    pub what: String,
    pub device: String,
    pub dtype: String,
    pub backend: SdpaBackend,
}

/// One GPU.
#[derive(Debug, Clone, Serialize)]
pub struct GpuFacts {
    pub index: usize,
    pub name: String,
    pub memory_gib: f64,
    pub compute_capability: String,
    pub multiprocessors: i32,
}

/// Everything [`RuntimeFacts::collect`] found.
#[derive(Debug, Clone, Serialize)]
pub struct RuntimeFacts {
    pub libtorch_version: String,
    pub libtorch_path: Option<String>,
    pub version_ok: bool,
    pub cuda_backend: String,
    pub cuda_available: bool,
    pub cuda_runtime: Option<String>,
    pub cudnn: Option<String>,
    pub driver_cuda: Option<String>,
    pub driver_error: Option<String>,
    pub gpus: Vec<GpuFacts>,
    pub nccl: Option<String>,
    pub nccl_path: Option<String>,
    pub nccl_error: Option<String>,
    pub sdpa: Vec<SdpaProbe>,
    pub threads: i32,
}

fn fmt_cuda_version(v: i64) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

fn fmt_cudnn_version(v: i64) -> String {
    // cuDNN >= 9 encodes major*10000 + minor*100 + patch.
    format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100)
}

impl RuntimeFacts {
    /// Loads the CUDA backend (if not done yet) and gathers the snapshot. Never fails: what
    /// cannot be read is recorded as an error string in the snapshot.
    pub fn collect() -> Self {
        let backend = cuda::load_backend();
        let (cuda_backend, has_gpu) = match &backend {
            Ok(b) => (b.to_string(), b.has_gpu()),
            Err(e) => (format!("failed: {e}"), false),
        };
        let (maj, min, pat) = glue::torch_version();
        let (driver_cuda, gpus, driver_error) = match driver::driver_info() {
            Ok(DriverInfo {
                driver_cuda_version,
                devices,
            }) => (
                Some(fmt_cuda_version(driver_cuda_version as i64)),
                devices
                    .into_iter()
                    .map(|d| GpuFacts {
                        index: d.index,
                        name: d.name,
                        memory_gib: d.total_memory_bytes as f64 / (1u64 << 30) as f64,
                        compute_capability: format!(
                            "{}.{}",
                            d.compute_capability.0, d.compute_capability.1
                        ),
                        multiprocessors: d.multiprocessors,
                    })
                    .collect(),
                None,
            ),
            Err(e) => (None, Vec::new(), Some(e.to_string())),
        };
        let (nccl, nccl_path, nccl_error) = if matches!(backend, Ok(CudaBackend::NotBuilt { .. })) {
            (None, None, Some("CPU-only libtorch".to_string()))
        } else {
            match crate::nccl::Nccl::open().and_then(|n| Ok((n.version()?, n.path().to_string()))) {
                Ok(((a, b, c), p)) => (Some(format!("{a}.{b}.{c}")), Some(p), None),
                Err(e) => (None, None, Some(e.to_string())),
            }
        };
        RuntimeFacts {
            libtorch_version: format!("{maj}.{min}.{pat}"),
            libtorch_path: cuda::libtorch_root().map(|p| p.display().to_string()),
            version_ok: (maj, min, pat) == EXPECTED_TORCH,
            cuda_backend,
            cuda_available: has_gpu,
            cuda_runtime: glue::cuda_runtime_version().map(fmt_cuda_version),
            cudnn: glue::cudnn_version().map(fmt_cudnn_version),
            driver_cuda,
            driver_error,
            gpus,
            nccl,
            nccl_path,
            nccl_error,
            sdpa: sdpa_probes(if has_gpu {
                Device::Cuda(0)
            } else {
                Device::Cpu
            }),
            threads: tch::get_num_threads(),
        }
    }

    /// Human-readable lines, one fact per line.
    pub fn report(&self) -> String {
        let mut s = String::new();
        let mut line = |k: &str, v: String| s.push_str(&format!("{k:<14} {v}\n"));
        let ok = if self.version_ok {
            ""
        } else {
            "  (MISMATCH: tch 0.24 expects 2.11.0)"
        };
        line("libtorch", format!("{}{ok}", self.libtorch_version));
        if let Some(p) = &self.libtorch_path {
            line("libtorch path", p.clone());
        }
        line("cuda backend", self.cuda_backend.clone());
        line(
            "cuda runtime",
            self.cuda_runtime.clone().unwrap_or_else(|| "-".into()),
        );
        line("cudnn", self.cudnn.clone().unwrap_or_else(|| "-".into()));
        line(
            "driver",
            match (&self.driver_cuda, &self.driver_error) {
                (Some(v), _) => format!("CUDA {v}"),
                (None, Some(e)) => format!("- ({e})"),
                _ => "-".into(),
            },
        );
        for g in &self.gpus {
            line(
                &format!("gpu {}", g.index),
                format!(
                    "{} ({:.1} GiB, sm_{}, {} SMs)",
                    g.name,
                    g.memory_gib,
                    g.compute_capability.replace('.', ""),
                    g.multiprocessors
                ),
            );
        }
        line(
            "nccl",
            match (&self.nccl, &self.nccl_error) {
                (Some(v), _) => format!("{v} ({})", self.nccl_path.clone().unwrap_or_default()),
                (None, Some(e)) => format!("- ({e})"),
                _ => "-".into(),
            },
        );
        line("cpu threads", self.threads.to_string());
        for p in &self.sdpa {
            line(
                "sdpa",
                format!("{} on {} {}: {}", p.what, p.device, p.dtype, p.backend),
            );
        }
        s
    }
}

/// Probes SDPA's backend choice for the shapes this project runs: equal head dims (dense
/// baseline, dk = dv = 128) and the NSA paper shape (dk = 192, dv = 128, GQA 64/4).
fn sdpa_probes(device: Device) -> Vec<SdpaProbe> {
    let kind = if device.is_cuda() {
        Kind::BFloat16
    } else {
        Kind::Float
    };
    let shapes: [(&str, i64, i64, i64, i64); 3] = [
        ("dense causal H=16 d=128", 16, 16, 128, 128),
        ("gqa causal H=64 Hkv=4 d=128", 64, 4, 128, 128),
        ("nsa paper H=64 Hkv=4 dk=192 dv=128", 64, 4, 192, 128),
    ];
    let _guard = tch::no_grad_guard();
    shapes
        .iter()
        .map(|&(what, h, hk, dk, dv)| {
            let s = 256;
            let q = Tensor::randn([1, h, s, dk], (kind, device));
            let k = Tensor::randn([1, hk, s, dk], (kind, device));
            let v = Tensor::randn([1, hk, s, dv], (kind, device));
            SdpaProbe {
                what: what.to_string(),
                device: format!("{device:?}").to_lowercase(),
                dtype: format!("{kind:?}").to_lowercase(),
                backend: SdpaBackend::choice(&q, &k, &v, true),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aten_codes_map_to_backends() {
        assert_eq!(SdpaBackend::from_aten(-1), SdpaBackend::Error);
        assert_eq!(SdpaBackend::from_aten(0), SdpaBackend::Math);
        assert_eq!(SdpaBackend::from_aten(1), SdpaBackend::FlashAttention);
        assert_eq!(SdpaBackend::from_aten(2), SdpaBackend::EfficientAttention);
        assert_eq!(SdpaBackend::from_aten(3), SdpaBackend::CudnnAttention);
        assert_eq!(SdpaBackend::from_aten(9), SdpaBackend::Unknown);
    }

    #[test]
    fn versions_format_like_their_projects_do() {
        assert_eq!(fmt_cuda_version(13000), "13.0");
        assert_eq!(fmt_cuda_version(12080), "12.8");
        assert_eq!(fmt_cudnn_version(91900), "9.19.0");
    }

    #[test]
    fn snapshot_reports_the_libtorch_we_link() {
        let facts = RuntimeFacts::collect();
        assert!(
            facts.version_ok,
            "linked libtorch {} is not 2.11.0",
            facts.libtorch_version
        );
        assert!(facts.libtorch_path.is_some());
        // On a machine without GPUs the snapshot still has a CPU SDPA probe per shape.
        assert_eq!(facts.sdpa.len(), 3);
        assert!(facts.report().contains("libtorch       2.11.0"));
    }
}
