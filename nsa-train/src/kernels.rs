//! `nsa-train kernels`: build every fused kernel family with NVRTC into the kernel cache, for
//! the architectures asked or those of the visible GPUs. NVRTC needs no GPU, so a cache can be
//! built on a machine without one (a container build, a login node) and used by every host with
//! the same torch wheel: the cache key covers the sources, the compile options, the
//! architecture and NVRTC's version, not where the wheel is installed. A first start on such a
//! host then compiles nothing.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use nsa_sys::nvrtc::{Build, Nvrtc, ALL_SOURCES};

#[derive(Debug, clap::Args)]
pub struct KernelsArgs {
    /// Compute capabilities to build for, comma-separated (`90`, `sm_90` or `9.0`). Default: those
    /// of the GPUs the driver shows.
    #[arg(long, value_delimiter = ',')]
    arch: Vec<String>,
    /// The cache folder. Default: the one every command reads, `$XDG_CACHE_HOME/nsa/kernels` or
    /// `~/.cache/nsa/kernels`.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

/// A compute capability as the flag takes it: `90`, `sm_90`, `sm90` or `9.0` → (9, 0).
fn parse_arch(text: &str) -> Result<(i32, i32)> {
    let t = text.trim();
    let digits = t
        .strip_prefix("sm_")
        .or_else(|| t.strip_prefix("sm"))
        .unwrap_or(t);
    let bad = || format!("--arch {text:?}: expected a compute capability such as 90, sm_90 or 9.0");
    let (major, minor) = match digits.split_once('.') {
        Some((a, b)) => (a, b),
        None if digits.len() >= 2 && digits.bytes().all(|b| b.is_ascii_digit()) => {
            digits.split_at(digits.len() - 1)
        }
        None => bail!(bad()),
    };
    let major: i32 = major.parse().with_context(bad)?;
    let minor: i32 = minor.parse().with_context(bad)?;
    if !(8..=12).contains(&major) || !(0..=9).contains(&minor) {
        bail!(
            "--arch {text:?}: compute capability {major}.{minor}: the kernels need 8.0 to 12.9 \
             (bf16 tensor cores and cp.async)"
        );
    }
    Ok((major, minor))
}

/// The architectures to build: the flag's, else the visible GPUs' (each once, ascending).
fn archs(args: &KernelsArgs) -> Result<Vec<(i32, i32)>> {
    let mut archs: Vec<(i32, i32)> = if args.arch.is_empty() {
        let info = nsa_sys::driver::driver_info().context(
            "no --arch given and the CUDA driver cannot be asked for the GPUs' architectures",
        )?;
        info.devices.iter().map(|d| d.compute_capability).collect()
    } else {
        args.arch
            .iter()
            .map(|a| parse_arch(a))
            .collect::<Result<_>>()?
    };
    archs.sort_unstable();
    archs.dedup();
    if archs.is_empty() {
        bail!("no GPU is visible: name the architectures with --arch (e.g. --arch 90)");
    }
    Ok(archs)
}

pub fn run(args: &KernelsArgs) -> Result<()> {
    let archs = archs(args)?;
    let dir = match &args.cache_dir {
        Some(d) => d.clone(),
        None => crate::config::process_kernel_cache_dir().context(
            "neither XDG_CACHE_HOME nor HOME is set: give the cache folder with --cache-dir",
        )?,
    };
    let nvrtc = Nvrtc::open().context("opening NVRTC from the torch wheel")?;
    let (major, minor) = nvrtc.version();
    let names: Vec<String> = archs.iter().map(|a| format!("sm_{}{}", a.0, a.1)).collect();
    println!(
        "building {} kernel families for {} with NVRTC {major}.{minor} into {}",
        ALL_SOURCES.len(),
        names.join(", "),
        dir.display()
    );
    let builds = nvrtc.build_all(&ALL_SOURCES, &archs, Some(&dir));
    print!("{}", table(&builds));
    let failed: Vec<String> = builds
        .iter()
        .filter_map(|b| b.result.as_ref().err().map(|e| e.to_string()))
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} builds failed:\n{}",
            failed.len(),
            builds.len(),
            failed.join("\n")
        );
    }
    Ok(())
}

/// One row per build: family, architecture, where it came from, seconds and CUBIN size.
fn table(builds: &[Build]) -> String {
    let mut out = String::from(
        "| kernel | arch | result | seconds | CUBIN bytes |\n| --- | --- | --- | ---: | ---: |\n",
    );
    for b in builds {
        let arch = b.source.target(b.arch);
        let (result, bytes) = match &b.result {
            Ok(c) if c.cached => ("in the cache".to_string(), c.cubin.len().to_string()),
            Ok(c) if c.log.is_empty() => ("compiled".to_string(), c.cubin.len().to_string()),
            Ok(c) => (
                format!(
                    "compiled with messages: {}",
                    c.log.lines().next().unwrap_or("")
                ),
                c.cubin.len().to_string(),
            ),
            Err(_) => ("FAILED".to_string(), "–".to_string()),
        };
        out.push_str(&format!(
            "| {} | {arch} | {result} | {:.1} | {bytes} |\n",
            b.source.name, b.seconds
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architectures_parse_in_every_spelling() {
        for (text, want) in [
            ("90", (9, 0)),
            ("sm_90", (9, 0)),
            ("sm90", (9, 0)),
            ("9.0", (9, 0)),
            ("80", (8, 0)),
            ("sm_86", (8, 6)),
            ("120", (12, 0)),
            (" 8.9 ", (8, 9)),
        ] {
            assert_eq!(parse_arch(text).unwrap(), want, "{text}");
        }
        for bad in ["", "sm_", "9", "x90", "9.x", "60", "75", "sm_130", "9.10"] {
            assert!(parse_arch(bad).is_err(), "{bad:?} parsed");
        }
        let args = KernelsArgs {
            arch: vec!["90".into(), "sm_80".into(), "9.0".into()],
            cache_dir: None,
        };
        assert_eq!(archs(&args).unwrap(), vec![(8, 0), (9, 0)]);
    }
}
