//! The trainer's configuration: a TOML file, `--set key=value` overrides, and — for users of the
//! system we replace — its environment names, all resolved in this one place.
//!
//! Precedence, lowest first: built-in defaults → environment (`NSA_SEL_RANGES_V2`,
//! `NSA_DDP_COMPRESS`, `NSA_DDP_BUCKET_MB`, `NSA_NVTX`, `NSA_SDPA_AUDIT`) → the config file →
//! `--set` flags. Unknown keys anywhere are errors that name the key; so are bad values.
use std::fmt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use nsa_ddp::Compression;
use nsa_select::SelectImpl;
use serde::{Deserialize, Serialize};
use tch::Device;

use crate::data::DataConfig;
use crate::optim::OptimConfig;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub run: RunConfig,
    /// `preset` plus any `nsa_model::ModelConfig` field to override.
    pub model: toml::Table,
    pub data: DataConfig,
    pub optim: OptimConfig,
    pub fast: FastPaths,
}

impl Default for TrainConfig {
    fn default() -> Self {
        let mut model = toml::Table::new();
        model.insert("preset".into(), toml::Value::String("tiny".into()));
        TrainConfig {
            run: RunConfig::default(),
            model,
            data: DataConfig::default(),
            optim: OptimConfig::default(),
            fast: FastPaths::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Run folder name under `out_dir` (default: `<preset>-<attention>-<source>`).
    pub name: Option<String>,
    pub out_dir: std::path::PathBuf,
    pub seed: u64,
    /// `auto` (CUDA when present) | `cpu` | `cuda` | `cuda:N`.
    pub device: DeviceChoice,
    /// `auto` (bf16 autocast on CUDA, f32 on CPU) | `f32` | `bf16`.
    pub precision: Precision,
    pub steps: u64,
    pub log_every: u64,
    /// Evaluate on held-out batches every N steps (0 = only at the end).
    pub eval_every: u64,
    pub eval_batches: u64,
    /// Checkpoint every N steps (0 = only at the end and on SIGINT/SIGTERM).
    pub ckpt_every: u64,
    pub keep_checkpoints: usize,
    /// Stop after this many non-finite steps in a row.
    pub max_bad_steps: u64,
    /// Write a Chrome trace of steps A..B (e.g. "10..12"); empty = off.
    pub profile: String,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            name: None,
            out_dir: "runs".into(),
            seed: 0,
            device: DeviceChoice::Auto,
            precision: Precision::Auto,
            steps: 300,
            log_every: 10,
            eval_every: 0,
            eval_batches: 8,
            ckpt_every: 100,
            keep_checkpoints: 2,
            max_bad_steps: 8,
            profile: String::new(),
        }
    }
}

/// Switches for every fast path, so any of them can be turned off to compare with its twin.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FastPaths {
    /// `vectorized` | `reference` (env `NSA_SEL_RANGES_V2=1|0`).
    pub select: SelectImpl,
    /// `lean` | `reference`.
    pub attn_path: AttnPathChoice,
    /// NVTX ranges around forward, branches, backward, sync and optimizer (env `NSA_NVTX`).
    pub nvtx: bool,
    /// Record which SDPA backend each attention branch uses (env `NSA_SDPA_AUDIT`).
    pub sdpa_audit: bool,
    /// DDP gradient compression `none | bf16 | fp16` (env `NSA_DDP_COMPRESS`).
    pub ddp_compress: Compression,
    /// DDP gradient bucket size in MB (env `NSA_DDP_BUCKET_MB`).
    pub ddp_bucket_mb: f64,
    /// DDP: start each gradient bucket's all-reduce during backward, as soon as its gradients are
    /// ready (false: all buckets after backward).
    pub ddp_overlap: bool,
    /// DDP timeout in seconds: rendezvous, and any collective (a dead or hung rank makes the
    /// others fail with an error after this long instead of hanging).
    pub ddp_timeout_s: f64,
}

impl Default for FastPaths {
    fn default() -> Self {
        FastPaths {
            select: SelectImpl::Vectorized,
            attn_path: AttnPathChoice::Lean,
            nvtx: false,
            sdpa_audit: true,
            ddp_compress: Compression::None,
            ddp_bucket_mb: 25.0,
            ddp_overlap: true,
            ddp_timeout_s: 600.0,
        }
    }
}

/// `run.device`: where the run computes. Written `auto`, `cpu`, `cuda` or `cuda:N`; anything
/// else is an error that lists these.
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

impl DeviceChoice {
    /// The libtorch device; an error when a GPU is asked for but none is visible.
    pub fn resolve(self, has_gpu: bool) -> Result<Device> {
        Ok(match self {
            DeviceChoice::Auto if has_gpu => Device::Cuda(0),
            DeviceChoice::Auto | DeviceChoice::Cpu => Device::Cpu,
            DeviceChoice::Cuda(i) => {
                if !has_gpu {
                    bail!("run.device = \"{self}\" but no GPU is visible");
                }
                Device::Cuda(i)
            }
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

/// `run.precision`: `auto` (bf16 autocast on CUDA, f32 on CPU), `f32` or `bf16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bf16 autocast on CUDA, f32 on the CPU.
    Auto,
    /// f32 everywhere.
    F32,
    /// bf16 autocast (CUDA only).
    Bf16,
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::Auto => "auto",
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

/// `fast.attn_path`: which `nsa_attn::AttnPath` computes the NSA layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttnPathChoice {
    /// `AttnPath::Reference`: explicit masks, O(S²) memory.
    Reference,
    /// `AttnPath::Lean` with the default chunk sizes.
    Lean,
}

impl AttnPathChoice {
    /// The `nsa_attn` path this choice names.
    pub fn path(self) -> nsa_attn::AttnPath {
        match self {
            AttnPathChoice::Reference => nsa_attn::AttnPath::Reference,
            AttnPathChoice::Lean => nsa_attn::AttnPath::Lean(nsa_attn::LeanOpts::default()),
        }
    }
}

/// The environment names of the system we replace, mapped onto config keys.
pub const ENV_NAMES: [(&str, &str); 5] = [
    ("NSA_SEL_RANGES_V2", "fast.select"),
    ("NSA_DDP_COMPRESS", "fast.ddp_compress"),
    ("NSA_DDP_BUCKET_MB", "fast.ddp_bucket_mb"),
    ("NSA_NVTX", "fast.nvtx"),
    ("NSA_SDPA_AUDIT", "fast.sdpa_audit"),
];

fn env_value(name: &str, raw: &str) -> Result<toml::Value> {
    let flag = |raw: &str| match raw {
        "1" | "true" | "on" | "yes" => Ok(true),
        "0" | "false" | "off" | "no" | "" => Ok(false),
        other => bail!("{name}={other:?}: expected 0 or 1"),
    };
    Ok(match name {
        "NSA_SEL_RANGES_V2" => toml::Value::String(
            if flag(raw)? {
                "vectorized"
            } else {
                "reference"
            }
            .into(),
        ),
        "NSA_NVTX" | "NSA_SDPA_AUDIT" => toml::Value::Boolean(flag(raw)?),
        "NSA_DDP_BUCKET_MB" => toml::Value::Float(
            raw.parse::<f64>()
                .with_context(|| format!("{name}={raw:?}: expected a number of MB"))?,
        ),
        // Parsed into `Compression` with the rest of the config (an unknown value names the key).
        "NSA_DDP_COMPRESS" => toml::Value::String(raw.to_string()),
        other => bail!("{other} is not one of the environment names in ENV_NAMES"),
    })
}

/// Where this process sits in a data-parallel run: the usual launcher convention (`RANK`,
/// `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`, as torchrun and slurm wrappers set
/// them), read here and nowhere else.
#[derive(Debug, Clone, PartialEq)]
pub struct DistEnv {
    pub rank: usize,
    pub world: usize,
    /// Index of this rank's GPU on its host.
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

/// The data-parallel position from the environment: `None` when `WORLD_SIZE` is unset.
pub fn dist_env(env: impl IntoIterator<Item = (String, String)>) -> Result<Option<DistEnv>> {
    let vars: std::collections::HashMap<String, String> = env.into_iter().collect();
    let Some(world) = vars.get("WORLD_SIZE") else {
        return Ok(None);
    };
    let num = |name: &str, raw: &str| -> Result<usize> {
        raw.trim()
            .parse()
            .with_context(|| format!("{name}={raw:?}: expected a non-negative integer"))
    };
    let world = num("WORLD_SIZE", world)?;
    let rank = num(
        "RANK",
        vars.get("RANK")
            .context("WORLD_SIZE is set but RANK is not")?,
    )?;
    let local_rank = match vars.get("LOCAL_RANK") {
        Some(v) => num("LOCAL_RANK", v)?,
        None => rank,
    };
    if world == 0 || rank >= world {
        bail!("RANK={rank} and WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE");
    }
    let master_addr = vars
        .get("MASTER_ADDR")
        .cloned()
        .unwrap_or_else(|| "127.0.0.1".into());
    let master_port = match vars.get("MASTER_PORT") {
        Some(p) => p
            .trim()
            .parse()
            .with_context(|| format!("MASTER_PORT={p:?}: expected a port number"))?,
        None => 29500,
    };
    Ok(Some(DistEnv {
        rank,
        world,
        local_rank,
        master_addr,
        master_port,
    }))
}

/// Resolves the configuration. `env` yields (name, value) pairs (pass `std::env::vars()`).
pub fn resolve(
    file: Option<&Path>,
    sets: &[String],
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<TrainConfig> {
    let mut value = toml::Value::try_from(TrainConfig::default())?;
    for (name, raw) in env {
        if let Some((_, key)) = ENV_NAMES.iter().find(|(n, _)| *n == name) {
            set_path(&mut value, key, env_value(&name, &raw)?)
                .with_context(|| format!("environment {name}"))?;
        }
    }
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        let table: toml::Table = text
            .parse()
            .with_context(|| format!("parsing config {}", path.display()))?;
        merge(&mut value, toml::Value::Table(table));
    }
    for s in sets {
        let (key, raw) = s
            .split_once('=')
            .with_context(|| format!("--set {s:?}: expected key=value"))?;
        set_path(&mut value, key.trim(), parse_literal(raw.trim()))
            .with_context(|| format!("--set {s}"))?;
    }
    let cfg: TrainConfig = value
        .try_into()
        .map_err(|e: toml::de::Error| anyhow::anyhow!("config: {e}"))?;
    cfg.validate()?;
    Ok(cfg)
}

/// `3` → integer, `0.5` → float, `true` → bool, anything else → string.
fn parse_literal(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

fn set_path(root: &mut toml::Value, key: &str, value: toml::Value) -> Result<()> {
    let parts: Vec<&str> = key.split('.').collect();
    if parts.len() < 2 {
        bail!("key {key:?} must name a section and a field, e.g. optim.lr");
    }
    let mut node = root;
    for p in &parts[..parts.len() - 1] {
        let table = node
            .as_table_mut()
            .with_context(|| format!("{key}: {p} is not a section"))?;
        if !table.contains_key(*p) {
            // Sections exist in the defaults; a missing one is an unknown key.
            bail!("unknown config key {key:?} (no section {p:?})");
        }
        node = table.get_mut(*p).expect("checked above");
    }
    let table = node
        .as_table_mut()
        .with_context(|| format!("{key}: not inside a section"))?;
    table.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

fn merge(dst: &mut toml::Value, src: toml::Value) {
    match (dst, src) {
        (toml::Value::Table(d), toml::Value::Table(s)) => {
            for (k, v) in s {
                match d.get_mut(&k) {
                    Some(slot) if slot.is_table() && v.is_table() => merge(slot, v),
                    _ => {
                        d.insert(k, v);
                    }
                }
            }
        }
        (d, s) => *d = s,
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        let r = &self.run;
        if r.steps == 0 {
            bail!("run.steps must be at least 1");
        }
        if r.log_every == 0 {
            bail!("run.log_every must be at least 1");
        }
        if r.keep_checkpoints == 0 {
            bail!("run.keep_checkpoints must be at least 1");
        }
        if !r.profile.is_empty() {
            self.profile_range()?;
        }
        if self.fast.ddp_bucket_mb.is_nan() || self.fast.ddp_bucket_mb <= 0.0 {
            bail!(
                "fast.ddp_bucket_mb must be > 0 (got {})",
                self.fast.ddp_bucket_mb
            );
        }
        if self.fast.ddp_timeout_s.is_nan() || self.fast.ddp_timeout_s <= 0.0 {
            bail!(
                "fast.ddp_timeout_s must be > 0 (got {})",
                self.fast.ddp_timeout_s
            );
        }
        self.optim.validate()?;
        Ok(())
    }

    /// `run.profile` as an inclusive step range.
    pub fn profile_range(&self) -> Result<Option<(u64, u64)>> {
        if self.run.profile.is_empty() {
            return Ok(None);
        }
        let (a, b) = self
            .run
            .profile
            .split_once("..")
            .with_context(|| format!("run.profile {:?}: expected A..B", self.run.profile))?;
        let (a, b): (u64, u64) = (
            a.trim()
                .parse()
                .with_context(|| format!("run.profile start {a:?}"))?,
            b.trim()
                .parse()
                .with_context(|| format!("run.profile end {b:?}"))?,
        );
        if a > b {
            bail!("run.profile {:?}: start after end", self.run.profile);
        }
        Ok(Some((a, b)))
    }

    /// The resolved config as TOML text (printed and saved with the run).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# could not render config: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    #[test]
    fn defaults_resolve() {
        let c = resolve(None, &[], no_env()).unwrap();
        assert_eq!(c, TrainConfig::default());
    }

    #[test]
    fn sets_override_and_parse_types() {
        let sets = [
            "optim.lr=0.01".to_string(),
            "run.steps=7".into(),
            "fast.nvtx=true".into(),
            "model.attention=dense".into(),
        ];
        let c = resolve(None, &sets, no_env()).unwrap();
        assert_eq!(c.optim.lr, 0.01);
        assert_eq!(c.run.steps, 7);
        assert!(c.fast.nvtx);
        assert_eq!(
            c.model.get("attention").and_then(|v| v.as_str()),
            Some("dense")
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = resolve(None, &["optim.lrr=1".to_string()], no_env()).unwrap_err();
        assert!(format!("{e:#}").contains("lrr"), "{e:#}");
        let e = resolve(None, &["nosuch.x=1".to_string()], no_env()).unwrap_err();
        assert!(format!("{e:#}").contains("nosuch"), "{e:#}");
        let dir = std::env::temp_dir().join(format!("nsa-cfg-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(&f, "[run]\nstepz = 3\n").unwrap();
        let e = resolve(Some(&f), &[], no_env()).unwrap_err();
        assert!(format!("{e:#}").contains("stepz"), "{e:#}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_values_are_named() {
        let e = resolve(None, &["run.device=tpu".to_string()], no_env()).unwrap_err();
        assert!(format!("{e:#}").contains("run.device"), "{e:#}");
        let e = resolve(None, &["optim.lr=-1".to_string()], no_env()).unwrap_err();
        assert!(format!("{e:#}").contains("optim.lr"), "{e:#}");
        let e = resolve(None, &["run.steps=many".to_string()], no_env()).unwrap_err();
        assert!(format!("{e:#}").contains("steps"), "{e:#}");
    }

    #[test]
    fn enum_values_are_typed_and_unknown_ones_list_the_allowed() {
        let sets = [
            "run.device=\"cuda:3\"".to_string(),
            "run.precision=\"bf16\"".into(),
            "fast.select=\"reference\"".into(),
            "fast.attn_path=\"reference\"".into(),
            "fast.ddp_compress=\"fp16\"".into(),
        ];
        let c = resolve(None, &sets, no_env()).unwrap();
        assert_eq!(c.run.device, DeviceChoice::Cuda(3));
        assert_eq!(c.run.precision, Precision::Bf16);
        assert_eq!(c.fast.select, SelectImpl::Reference);
        assert_eq!(c.fast.attn_path, AttnPathChoice::Reference);
        assert_eq!(c.fast.ddp_compress, Compression::Fp16);
        // The resolved config renders back to the same values.
        let text = c.to_toml();
        assert!(text.contains("device = \"cuda:3\""), "{text}");
        assert!(text.contains("ddp_compress = \"fp16\""), "{text}");
        for (key, value, allowed) in [
            ("run.device", "tpu", ["auto", "cpu", "cuda"].as_slice()),
            ("run.device", "cuda:x", &["cuda:N"]),
            ("run.precision", "fp8", &["auto", "f32", "bf16"]),
            ("fast.select", "fast", &["vectorized", "reference"]),
            ("fast.attn_path", "fused2", &["lean", "reference"]),
            ("fast.ddp_compress", "int8", &["none", "bf16", "fp16"]),
        ] {
            let e = resolve(None, &[format!("{key}=\"{value}\"")], no_env()).unwrap_err();
            let msg = format!("{e:#}");
            let field = key.rsplit('.').next().unwrap();
            assert!(msg.contains(field) && msg.contains(value), "{key}: {msg}");
            for a in allowed {
                assert!(msg.contains(a), "{key}: {a} missing from {msg}");
            }
        }
    }

    #[test]
    fn environment_is_below_file_and_flags() {
        let env = vec![
            ("NSA_SEL_RANGES_V2".to_string(), "0".to_string()),
            ("NSA_DDP_BUCKET_MB".to_string(), "50".to_string()),
            ("NSA_NVTX".to_string(), "1".to_string()),
            ("NSA_DDP_COMPRESS".to_string(), "bf16".to_string()),
            ("UNRELATED".to_string(), "x".to_string()),
        ];
        let c = resolve(None, &[], env.clone()).unwrap();
        assert_eq!(c.fast.select, SelectImpl::Reference);
        assert_eq!(c.fast.ddp_compress, Compression::Bf16);
        assert_eq!(c.fast.ddp_bucket_mb, 50.0);
        assert!(c.fast.nvtx);
        let c = resolve(None, &["fast.select=vectorized".to_string()], env).unwrap();
        assert_eq!(c.fast.select, SelectImpl::Vectorized);
        let bad = vec![("NSA_NVTX".to_string(), "maybe".to_string())];
        assert!(format!("{:#}", resolve(None, &[], bad).unwrap_err()).contains("NSA_NVTX"));
    }

    /// configs/example.toml documents every key with its default: it must resolve to exactly
    /// the defaults, so the file and the code cannot drift apart.
    #[test]
    fn example_config_lists_the_defaults() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/example.toml");
        let c = resolve(Some(&path), &[], no_env()).unwrap();
        assert_eq!(c, TrainConfig::default());
    }

    #[test]
    fn dist_env_follows_the_launcher_convention() {
        let v = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(dist_env(v(&[])).unwrap(), None);
        let d = dist_env(v(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "1"),
            ("MASTER_PORT", "1234"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (d.rank, d.world, d.local_rank, d.master_port),
            (1, 2, 1, 1234)
        );
        assert_eq!(d.master_addr, "127.0.0.1");
        let e = dist_env(v(&[("WORLD_SIZE", "2")])).unwrap_err();
        assert!(e.to_string().contains("RANK is not"), "{e}");
        let e = dist_env(v(&[("WORLD_SIZE", "2"), ("RANK", "2")])).unwrap_err();
        assert!(e.to_string().contains("RANK < WORLD_SIZE"), "{e}");
        let e = dist_env(v(&[("WORLD_SIZE", "x"), ("RANK", "0")])).unwrap_err();
        assert!(format!("{e:#}").contains("WORLD_SIZE"), "{e:#}");
    }

    #[test]
    fn profile_range_parses() {
        let c = resolve(None, &["run.profile=\"3..5\"".to_string()], no_env()).unwrap();
        assert_eq!(c.profile_range().unwrap(), Some((3, 5)));
        assert!(resolve(None, &["run.profile=\"5..3\"".to_string()], no_env()).is_err());
    }
}
