//! The environment snapshot stored with every run and written by `cargo xtask env`: the code
//! (git revision, rustc), the host (CPU, memory, NVIDIA driver) and the runtime facts from
//! `nsa_sys::RuntimeFacts` (libtorch, CUDA, cuDNN, NCCL, GPUs, SDPA backend choice).
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct EnvSnapshot {
    pub created_unix: u64,
    pub nsa_version: &'static str,
    pub git_sha: &'static str,
    pub rustc: &'static str,
    pub host: HostFacts,
    pub runtime: nsa_sys::RuntimeFacts,
}

#[derive(Debug, Serialize)]
pub struct HostFacts {
    pub hostname: String,
    pub os: String,
    pub cpu_model: String,
    pub cpu_cores: usize,
    pub memory_gib: f64,
    pub nvidia_driver: Option<String>,
}

impl EnvSnapshot {
    pub fn collect() -> Self {
        EnvSnapshot {
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            nsa_version: env!("CARGO_PKG_VERSION"),
            git_sha: env!("NSA_GIT_SHA"),
            rustc: env!("NSA_RUSTC_VERSION"),
            host: HostFacts::collect(),
            runtime: nsa_sys::RuntimeFacts::collect(),
        }
    }

    pub fn report(&self) -> String {
        let h = &self.host;
        let mut s = format!(
            "{:<14} {} ({})\n{:<14} {}\n{:<14} {} ({} cores, {:.0} GiB), {}\n",
            "nsa",
            self.nsa_version,
            self.git_sha,
            "rustc",
            self.rustc,
            "host",
            h.cpu_model,
            h.cpu_cores,
            h.memory_gib,
            h.os
        );
        if let Some(d) = &h.nvidia_driver {
            s.push_str(&format!("{:<14} {d}\n", "nvidia driver"));
        }
        s.push_str(&self.runtime.report());
        s
    }
}

impl HostFacts {
    fn collect() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .and_then(|r| r.split(':').nth(1))
            })
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| std::env::consts::ARCH.to_string());
        let memory_gib = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|r| r.split_whitespace().next()?.parse::<f64>().ok())
            .map(|kb| kb / (1024.0 * 1024.0))
            .unwrap_or(0.0);
        let os = read("/etc/os-release")
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map(|s| s.trim_matches('"').to_string())
            .unwrap_or_else(|| std::env::consts::OS.to_string());
        // "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.04  ..." -> "580.159.04"
        let nvidia_driver = read("/proc/driver/nvidia/version")
            .lines()
            .next()
            .and_then(|l| {
                l.split_whitespace()
                    .find(|w| {
                        w.chars().filter(|c| *c == '.').count() >= 1
                            && w.chars().next().is_some_and(|c| c.is_ascii_digit())
                    })
                    .map(str::to_string)
            });
        HostFacts {
            hostname: read("/proc/sys/kernel/hostname").trim().to_string(),
            os,
            cpu_model,
            cpu_cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            memory_gib,
            nvidia_driver,
        }
    }
}
