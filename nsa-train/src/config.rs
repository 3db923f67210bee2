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
    /// Peak TFLOP/s of one device for the MFU (default: the GPU's dense spec at the run's
    /// precision, see `flops::peak`; unset on the CPU and unknown GPUs: no MFU).
    pub peak_tflops: Option<f64>,
    /// Bit-reproducible training: libtorch's deterministic algorithms (an op without a
    /// deterministic implementation is an error naming it), cuDNN deterministic without
    /// benchmarking, `CUBLAS_WORKSPACE_CONFIG=:4096:8` ([`cublas_workspace_for`]); the fused
    /// kernels' backward is deterministic either way. Two runs of one config then give the same
    /// losses bit for bit on the same GPU and software, and a resumed run equals an
    /// uninterrupted one (`nsa-train check --determinism` shows it and the cost in tokens/s).
    pub deterministic: bool,
    /// Start from another run's weights: a run folder (its newest checkpoint that verifies) or
    /// one of its checkpoint folders (`…/checkpoints/step-NNNNNNNN`). The model config must be
    /// the same; the step count, the optimizer state and the data start afresh, so a run can
    /// continue another at a new sequence length or on a new task (a curriculum). Ignored when
    /// `--resume` finds a checkpoint of this run.
    pub init_from: Option<std::path::PathBuf>,
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
            peak_tflops: None,
            deterministic: false,
            init_from: None,
        }
    }
}

/// Switches for every fast path, so any of them can be turned off to compare with its twin.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FastPaths {
    /// `vectorized` | `reference` (env `NSA_SEL_RANGES_V2=1|0`).
    pub select: SelectImpl,
    /// `fused` (on CUDA: the compressed branch on cuDNN, the selection and the selected branch
    /// on NVRTC kernels, the window on flash, and for NSA and dense models alike RoPE, the
    /// norms and the MLP's SwiGLU on NVRTC kernels; the lean path on the CPU) | `lean` |
    /// `reference`.
    pub attn_path: AttnPathChoice,
    /// NVTX ranges around forward, branches, backward, sync and optimizer (env `NSA_NVTX`), for
    /// Nsight; the same ranges are user annotations in `--profile`'s trace.
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
    /// The training loss applies the output head itself, over chunks of rows
    /// (`nsa_sys::loss`; on CUDA one kernel per chunk for the loss and the logits' gradient): no
    /// `[B·S, V]` logits in float32 (6.6 GB each for the logits, their log-softmax and
    /// gradients at 32,768 tokens of `125m`: its peak memory halves, and it trains 6–13 %
    /// faster on an H200, BENCHMARKS.md round 11). Off: logits, then libtorch's cross-entropy.
    /// Evaluation always takes the logits (it scores answers from them).
    pub fused_loss: bool,
    /// Bound, in MiB, on the partial results of one launch of the selected branch's key-outer
    /// kernels (its forward and its dQ, used for small groups on long sequences): a batch whose
    /// partials would exceed it runs in chunks of sequences, each with its own partials
    /// (`nsa_sys::fused::set_key_outer_chunk_bytes`; the same results up to the dK/dV work
    /// split, deterministic either way). The partials grow with batch × sequence (0.8 GB of
    /// dQ partials for `125m` at 32,768 tokens a step, as much in the forward) and sit on top
    /// of every saved activation during the last layer's backward: a lower bound lowers the
    /// peak memory at a few more launches.
    pub key_outer_chunk_mib: f64,
    /// Activation recomputation (gradient checkpointing per block, `nsa_model::Recompute`):
    /// the forward keeps only each block's input (and an NSA block's selected block ids, which
    /// the second forward reuses instead of selecting again), and the backward runs each
    /// block's forward again right before its backward. Less memory (what the blocks save for
    /// their backward lives for one block at a time) for about one more forward of compute;
    /// the same gradients. With data parallelism the gradient buckets are reduced after the backward
    /// rather than during it.
    pub recompute: bool,
}

impl Default for FastPaths {
    fn default() -> Self {
        FastPaths {
            select: SelectImpl::Vectorized,
            attn_path: AttnPathChoice::Fused,
            nvtx: false,
            sdpa_audit: true,
            ddp_compress: Compression::None,
            ddp_bucket_mb: 25.0,
            ddp_overlap: true,
            ddp_timeout_s: 600.0,
            fused_loss: true,
            key_outer_chunk_mib: (nsa_sys::fused::KEY_OUTER_MAX_PARTIAL_BYTES >> 20) as f64,
            recompute: false,
        }
    }
}

/// `run.device`: where the run computes, written `auto`, `cpu`, `cuda` or `cuda:N` (anything
/// else is an error that lists these). The type lives in nsa-bench, so the benchmarks' `--device`
/// and the trainer parse devices by one rule.
pub use nsa_bench::DeviceChoice;

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
    /// `AttnPath::Fused`: the CUDA kernels (selected branch, flash window), the lean path
    /// elsewhere (CPU, the compressed branch).
    Fused,
}

impl AttnPathChoice {
    /// The `nsa_attn` path this choice names.
    pub fn path(self) -> nsa_attn::AttnPath {
        match self {
            AttnPathChoice::Reference => nsa_attn::AttnPath::Reference,
            AttnPathChoice::Lean => nsa_attn::AttnPath::Lean(nsa_attn::LeanOpts::default()),
            AttnPathChoice::Fused => nsa_attn::AttnPath::Fused(nsa_attn::LeanOpts::default()),
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

/// Which launcher's convention placed this process in a data-parallel run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// `RANK` / `WORLD_SIZE` / … set by `nsa-train --nproc-per-node` or any launcher that
    /// follows PyTorch's convention.
    Env,
    /// torchrun (its `TORCHELASTIC_*` variables are set).
    Torchrun,
    /// A Slurm step (`srun`): `SLURM_PROCID`, `SLURM_NTASKS`, …
    Slurm,
    /// `--nnodes` / `--node-rank` / `--master-addr` / `--master-port` flags alone.
    Flags,
}

impl std::fmt::Display for Launcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Launcher::Env => "launcher environment",
            Launcher::Torchrun => "torchrun",
            Launcher::Slurm => "Slurm",
            Launcher::Flags => "flags",
        })
    }
}

/// Where this process sits in a data-parallel run, whoever launched it (see [`dist_plan`]).
#[derive(Debug, Clone, PartialEq)]
pub struct DistEnv {
    pub rank: usize,
    pub world: usize,
    /// Index of this rank's GPU on its host.
    pub local_rank: usize,
    /// The rendezvous store's host and port.
    pub master_addr: String,
    pub master_port: u16,
    /// Who hosts the rendezvous store: rank 0, or the launcher (torchrun's agent store).
    pub store: nsa_ddp::StoreHost,
    /// Key prefix of the rendezvous (one per torchrun restart: the agent's store outlives it).
    pub namespace: String,
    pub launcher: Launcher,
}

impl DistEnv {
    /// A process that is a whole data-parallel run by itself (world size 1; no store is used).
    pub fn solo(master_port: u16) -> Self {
        DistEnv {
            rank: 0,
            world: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port,
            store: nsa_ddp::StoreHost::Rank0,
            namespace: DEFAULT_NAMESPACE.into(),
            launcher: Launcher::Env,
        }
    }

    /// The rendezvous of this rank, every wait bounded by `timeout`.
    pub fn rendezvous(&self, timeout: std::time::Duration) -> nsa_ddp::RendezvousConfig {
        nsa_ddp::RendezvousConfig::new(self.master_addr.clone(), self.master_port, timeout)
            .with_store(self.store)
            .with_namespace(self.namespace.clone())
    }
}

const DEFAULT_NAMESPACE: &str = "nsa-ddp";
/// torchrun's and PyTorch's default `MASTER_PORT`.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// Our own launcher's flags (`train` and the hidden `rendezvous` command).
#[derive(Debug, Clone, Default, PartialEq, clap::Args)]
pub struct LaunchFlags {
    /// Start N training processes on this host, one per GPU (data parallel over NCCL). With 1, a
    /// single rank still syncs gradients through NCCL (measures the sync overhead). Processes
    /// started by torchrun, Slurm's srun or any launcher that sets RANK / WORLD_SIZE /
    /// LOCAL_RANK / MASTER_ADDR / MASTER_PORT need no flag.
    #[arg(long, value_name = "N")]
    pub nproc_per_node: Option<usize>,
    /// Hosts taking part, each running `--nproc-per-node N` (default 1; under srun with one task
    /// per node: SLURM_NNODES).
    #[arg(long, value_name = "N", requires = "nproc_per_node")]
    pub nnodes: Option<usize>,
    /// This host's index among the `--nnodes` (default 0; under srun: SLURM_PROCID).
    #[arg(long, value_name = "R", requires = "nproc_per_node")]
    pub node_rank: Option<usize>,
    /// Host of node rank 0, where rank 0 hosts the rendezvous store (default: MASTER_ADDR, the
    /// first host of Slurm's node list, or 127.0.0.1 on one node).
    #[arg(long, value_name = "HOST")]
    pub master_addr: Option<String>,
    /// Port of the rendezvous store (default: MASTER_PORT; under Slurm 29500 + SLURM_JOB_ID mod
    /// 1000; on several nodes 29500; on one node a free port).
    #[arg(long, value_name = "PORT")]
    pub master_port: Option<u16>,
}

/// Our launcher's part on this node: start `nproc_per_node` ranks.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeLaunch {
    pub nproc_per_node: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    /// `None`: a free local port (one node only).
    pub master_port: Option<u16>,
    /// Where `nnodes` / `node_rank` / the master came from.
    pub launcher: Launcher,
}

/// What this process does in a run.
#[derive(Debug, Clone, PartialEq)]
pub enum DistPlan {
    /// Trains alone.
    Single,
    /// Trains as one rank of a data-parallel run.
    Rank(DistEnv),
    /// Starts the ranks of this node (our launcher), then waits for them.
    Launch(NodeLaunch),
}

/// The one place that maps launchers' environments and our launcher flags onto a [`DistPlan`].
/// `env` yields (name, value) pairs (pass `std::env::vars()`).
///
/// Precedence: flags > torchrun's convention (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
/// `MASTER_ADDR`, `MASTER_PORT`, also set by our own launcher for its ranks) > Slurm's
/// (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, `SLURM_STEP_NODELIST`, … read only inside an
/// srun step, i.e. with `SLURM_STEP_ID` set; the batch script itself is not a launcher).
/// - `WORLD_SIZE` set: this process is rank `RANK`. Under torchrun with
///   `TORCHELASTIC_USE_AGENT_STORE=True` the agent hosts the store at `MASTER_ADDR:MASTER_PORT`
///   and every rank is its client (unless `--master-addr`/`--master-port` move the store
///   elsewhere: then rank 0 hosts it there). Launcher flags are an error here: the launcher
///   already started the processes.
/// - In an srun step without `--nproc-per-node`: rank `SLURM_PROCID` of `SLURM_NTASKS` (one task
///   per GPU), master = first host of the step's node list; a one-task step trains alone.
///   With `--nproc-per-node`: one task per node, each our launcher for its node.
/// - Otherwise `--nproc-per-node` starts our launcher, `None` trains alone.
pub fn dist_plan(
    flags: &LaunchFlags,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<DistPlan> {
    let vars: std::collections::HashMap<String, String> = env.into_iter().collect();
    let get = |name: &str| vars.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
    let num = |name: &str, raw: &str| -> Result<usize> {
        raw.parse()
            .with_context(|| format!("{name}={raw:?}: expected a non-negative integer"))
    };
    let port = |name: &str, raw: &str| -> Result<u16> {
        raw.parse()
            .with_context(|| format!("{name}={raw:?}: expected a port number"))
    };
    let env_port = get("MASTER_PORT")
        .map(|p| port("MASTER_PORT", p))
        .transpose()?;
    let master_addr = flags
        .master_addr
        .clone()
        .or_else(|| get("MASTER_ADDR").map(str::to_string));
    let master_port = flags.master_port.or(env_port);
    let launching = flags.nproc_per_node.is_some();
    for (name, v) in [
        ("--nproc-per-node", flags.nproc_per_node),
        ("--nnodes", flags.nnodes),
    ] {
        if v == Some(0) {
            bail!("{name} must be at least 1");
        }
    }

    if let Some(world) = get("WORLD_SIZE") {
        let world = num("WORLD_SIZE", world)?;
        let rank = num(
            "RANK",
            get("RANK").context("WORLD_SIZE is set but RANK is not")?,
        )?;
        if world == 0 || rank >= world {
            bail!("RANK={rank} and WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE");
        }
        if launching {
            bail!(
                "--nproc-per-node/--nnodes/--node-rank: this process is already rank {rank} of \
                 {world} started by a launcher (WORLD_SIZE is set); leave starting processes to it"
            );
        }
        let local_rank = get("LOCAL_RANK")
            .map(|v| num("LOCAL_RANK", v))
            .transpose()?
            .unwrap_or(rank);
        let torchrun = get("TORCHELASTIC_RUN_ID").is_some()
            || get("TORCHELASTIC_RESTART_COUNT").is_some()
            || get("TORCHELASTIC_USE_AGENT_STORE").is_some();
        let agent_store = get("TORCHELASTIC_USE_AGENT_STORE")
            .is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
            && flags.master_addr.is_none()
            && flags.master_port.is_none();
        let attempt = get("TORCHELASTIC_RESTART_COUNT")
            .map(|v| num("TORCHELASTIC_RESTART_COUNT", v))
            .transpose()?;
        return Ok(DistPlan::Rank(DistEnv {
            rank,
            world,
            local_rank,
            master_addr: master_addr.unwrap_or_else(|| "127.0.0.1".into()),
            master_port: master_port.unwrap_or(DEFAULT_MASTER_PORT),
            store: if agent_store {
                nsa_ddp::StoreHost::Launcher
            } else {
                nsa_ddp::StoreHost::Rank0
            },
            namespace: match attempt {
                Some(a) => format!("{DEFAULT_NAMESPACE}/attempt-{a}"),
                None => DEFAULT_NAMESPACE.into(),
            },
            launcher: if torchrun {
                Launcher::Torchrun
            } else {
                Launcher::Env
            },
        }));
    }

    let in_srun_step = get("SLURM_STEP_ID").or(get("SLURM_STEPID")).is_some();
    if let (true, Some(procid)) = (in_srun_step, get("SLURM_PROCID")) {
        let procid = num("SLURM_PROCID", procid)?;
        let (tasks_name, tasks) = ["SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"]
            .into_iter()
            .find_map(|n| get(n).map(|v| (n, v)))
            .context("SLURM_PROCID is set but neither SLURM_STEP_NUM_TASKS nor SLURM_NTASKS")?;
        let tasks = num(tasks_name, tasks)?;
        if procid >= tasks {
            bail!("SLURM_PROCID={procid} and {tasks_name}={tasks}: need SLURM_PROCID < tasks");
        }
        if tasks == 1 && flags.nproc_per_node.is_none() {
            return Ok(DistPlan::Single);
        }
        let nodelist = [
            "SLURM_STEP_NODELIST",
            "SLURM_JOB_NODELIST",
            "SLURM_NODELIST",
        ]
        .into_iter()
        .find_map(|n| get(n).map(|v| (n, v)));
        let master_addr = match (master_addr, nodelist) {
            (Some(a), _) => a,
            (None, Some((name, list))) => first_host(list)
                .with_context(|| format!("{name}={list:?}: cannot read its first host"))?,
            (None, None) => bail!(
                "in a Slurm step without a node list (SLURM_STEP_NODELIST): pass --master-addr \
                 or set MASTER_ADDR"
            ),
        };
        let master_port = match (master_port, get("SLURM_JOB_ID")) {
            (Some(p), _) => p,
            (None, Some(job)) => DEFAULT_MASTER_PORT + (num("SLURM_JOB_ID", job)? % 1000) as u16,
            (None, None) => DEFAULT_MASTER_PORT,
        };
        if let Some(nproc_per_node) = flags.nproc_per_node {
            let (nodes_name, nodes) = ["SLURM_STEP_NUM_NODES", "SLURM_NNODES"]
                .into_iter()
                .find_map(|n| get(n).map(|v| (n, v)))
                .unwrap_or(("SLURM_NNODES", "1"));
            let nodes = num(nodes_name, nodes)?;
            if tasks != nodes && flags.nnodes.is_none() {
                bail!(
                    "--nproc-per-node under srun: run one task per node (srun \
                     --ntasks-per-node=1), not {tasks_name}={tasks} on {nodes_name}={nodes}; or \
                     let srun start one task per GPU without --nproc-per-node"
                );
            }
            let nnodes = flags.nnodes.unwrap_or(nodes);
            let node_rank = flags.node_rank.unwrap_or(procid);
            if node_rank >= nnodes {
                bail!("node rank {node_rank} of {nnodes} nodes: need node rank < nodes");
            }
            return Ok(DistPlan::Launch(NodeLaunch {
                nproc_per_node,
                nnodes,
                node_rank,
                master_addr,
                master_port: Some(master_port),
                launcher: Launcher::Slurm,
            }));
        }
        let local_rank = get("SLURM_LOCALID")
            .map(|v| num("SLURM_LOCALID", v))
            .transpose()?
            .unwrap_or(0);
        return Ok(DistPlan::Rank(DistEnv {
            rank: procid,
            world: tasks,
            local_rank,
            master_addr,
            master_port,
            store: nsa_ddp::StoreHost::Rank0,
            namespace: DEFAULT_NAMESPACE.into(),
            launcher: Launcher::Slurm,
        }));
    }

    let Some(nproc_per_node) = flags.nproc_per_node else {
        return Ok(DistPlan::Single);
    };
    let nnodes = flags.nnodes.unwrap_or(1);
    let node_rank = flags.node_rank.unwrap_or(0);
    if node_rank >= nnodes {
        bail!("--node-rank {node_rank} with --nnodes {nnodes}: need node rank < nodes");
    }
    let master_addr = match master_addr {
        Some(a) => a,
        None if nnodes == 1 => "127.0.0.1".into(),
        None => bail!(
            "--nnodes {nnodes}: pass --master-addr (or set MASTER_ADDR), the host of node rank 0"
        ),
    };
    Ok(DistPlan::Launch(NodeLaunch {
        nproc_per_node,
        nnodes,
        node_rank,
        master_addr,
        master_port: master_port.or((nnodes > 1).then_some(DEFAULT_MASTER_PORT)),
        launcher: if nnodes > 1 {
            Launcher::Flags
        } else {
            Launcher::Env
        },
    }))
}

/// The first host of a Slurm host list: `node[07-09,12],gpu5` → `node07`; `a[1-2]-b[3,4]` →
/// `a1-b3`. Zero padding is kept. `None` when the list is malformed.
pub fn first_host(list: &str) -> Option<String> {
    let mut depth = 0i32;
    let end = list
        .char_indices()
        .find(|&(_, c)| {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                _ => {}
            }
            c == ',' && depth == 0
        })
        .map_or(list.len(), |(i, _)| i);
    let mut rest = list[..end].trim();
    let mut out = String::new();
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        let close = open + rest[open..].find(']')?;
        let first = rest[open + 1..close].split(',').next()?.split('-').next()?;
        if first.is_empty() || !first.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        out.push_str(first);
        rest = &rest[close + 1..];
    }
    if rest.contains(']') {
        return None;
    }
    out.push_str(rest);
    (!out.is_empty()).then_some(out)
}

/// [`kernel_cache_dir`] of this process's environment.
pub fn process_kernel_cache_dir() -> Option<std::path::PathBuf> {
    kernel_cache_dir(std::env::vars())
}

/// Where compiled CUDA kernels are cached between runs: `$XDG_CACHE_HOME/nsa/kernels`, else
/// `$HOME/.cache/nsa/kernels` (`None` without either: kernels compile in memory at each start).
pub fn kernel_cache_dir(
    env: impl IntoIterator<Item = (String, String)>,
) -> Option<std::path::PathBuf> {
    let vars: std::collections::HashMap<String, String> = env.into_iter().collect();
    let base = match (vars.get("XDG_CACHE_HOME"), vars.get("HOME")) {
        (Some(x), _) if !x.is_empty() => std::path::PathBuf::from(x),
        (_, Some(h)) if !h.is_empty() => std::path::Path::new(h).join(".cache"),
        _ => return None,
    };
    Some(base.join("nsa").join("kernels"))
}

/// The cuBLAS setting deterministic training needs, when it is not already in `env`:
/// `Some(("CUBLAS_WORKSPACE_CONFIG", ":4096:8"))` for a `run.deterministic` config unless the
/// variable already holds one of cuBLAS's reproducible values (`:4096:8`, `:16:8`, optionally
/// followed by more `:SIZE:COUNT` pairs). cuBLAS reads it when libtorch creates its first handle
/// (the first matmul on a device), so the binary sets it before building the model; libtorch
/// refuses cuBLAS calls in deterministic mode without it.
pub fn cublas_workspace_for(
    cfg: &TrainConfig,
    env: impl IntoIterator<Item = (String, String)>,
) -> Option<(&'static str, &'static str)> {
    const NAME: &str = "CUBLAS_WORKSPACE_CONFIG";
    if !cfg.run.deterministic {
        return None;
    }
    let current = env.into_iter().find(|(n, _)| n == NAME).map(|(_, v)| v);
    let reproducible = current.is_some_and(|v| {
        let v = v.trim();
        [":4096:8", ":16:8"]
            .iter()
            .any(|p| v == *p || v.starts_with(&format!("{p}:")))
    });
    (!reproducible).then_some((NAME, ":4096:8"))
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
        let literal = parse_literal(raw.trim()).with_context(|| format!("--set {s}"))?;
        set_path(&mut value, key.trim(), literal).with_context(|| format!("--set {s}"))?;
    }
    let cfg: TrainConfig = value
        .try_into()
        .map_err(|e: toml::de::Error| anyhow::anyhow!("config: {e}"))?;
    cfg.validate()?;
    Ok(cfg)
}

/// `3` → integer, `0.5` → float, `true` → bool, `"x"` → string, anything else → the bare text
/// as a string. A value that starts like a TOML string, array or table but does not parse (an
/// unterminated quote, say) is an error, not a string that keeps the stray quote.
fn parse_literal(raw: &str) -> Result<toml::Value> {
    match format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
    {
        Some(v) => Ok(v),
        None if raw.starts_with(['"', '\'', '[', '{']) => {
            bail!("{raw} is not a valid TOML value (unbalanced quote or bracket?)")
        }
        None => Ok(toml::Value::String(raw.to_string())),
    }
}

fn set_path(root: &mut toml::Value, key: &str, value: toml::Value) -> Result<()> {
    let parts: Vec<&str> = key.split('.').collect();
    if parts.len() < 2 {
        bail!("key {key:?} must name a section and a field, e.g. optim.lr");
    }
    let mut node = root;
    for (depth, p) in parts[..parts.len() - 1].iter().enumerate() {
        let table = node
            .as_table_mut()
            .with_context(|| format!("{key}: {p} is not a section"))?;
        if !table.contains_key(*p) {
            // `[model]` holds only the keys given (the preset supplies the rest), so its
            // sub-tables (`model.nsa.window`) are created here and checked against
            // `nsa_model::ModelConfig` when the model config is built. Elsewhere sections exist
            // in the defaults, and a missing one is an unknown key.
            if depth > 0 && parts[0] == "model" {
                table.insert(p.to_string(), toml::Value::Table(toml::Table::new()));
            } else {
                bail!("unknown config key {key:?} (no section {p:?})");
            }
        }
        node = table
            .get_mut(*p)
            .with_context(|| format!("{key}: no section {p:?}"))?;
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
        if r.eval_batches == 0 {
            bail!("run.eval_batches must be at least 1");
        }
        if let Some(name) = &r.name {
            crate::run_dir::validate_name(name)?;
        }
        if r.keep_checkpoints == 0 {
            bail!("run.keep_checkpoints must be at least 1");
        }
        if !r.profile.is_empty() {
            self.profile_range()?;
        }
        if let Some(p) = r.peak_tflops {
            if !(p.is_finite() && p > 0.0) {
                bail!("run.peak_tflops must be a positive number of TFLOP/s (got {p})");
            }
        }
        if self.fast.ddp_bucket_mb.is_nan() || self.fast.ddp_bucket_mb <= 0.0 {
            bail!(
                "fast.ddp_bucket_mb must be > 0 (got {})",
                self.fast.ddp_bucket_mb
            );
        }
        let chunk = self.fast.key_outer_chunk_mib;
        if !(chunk.is_finite() && chunk >= 1.0) {
            bail!("fast.key_outer_chunk_mib must be a number of MiB ≥ 1 (got {chunk})");
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

    /// `run.profile` as an inclusive range of step numbers as the log prints them (the first
    /// step is 1).
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
        if a < 1 || b > self.run.steps {
            bail!(
                "run.profile {:?}: steps are numbered as the log numbers them, 1 to run.steps = {}",
                self.run.profile,
                self.run.steps
            );
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
    use crate::data::{DataSource, ShardFormat};

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    #[test]
    fn deterministic_runs_get_a_reproducible_cublas_workspace() {
        let cfg = |on: bool| {
            let set = format!("run.deterministic={on}");
            resolve(None, &[set], no_env()).unwrap()
        };
        let env = |v: &str| vec![("CUBLAS_WORKSPACE_CONFIG".to_string(), v.to_string())];
        let want = Some(("CUBLAS_WORKSPACE_CONFIG", ":4096:8"));
        assert_eq!(cublas_workspace_for(&cfg(false), no_env()), None);
        assert_eq!(cublas_workspace_for(&cfg(true), no_env()), want);
        for kept in [":4096:8", ":16:8", " :16:8", ":4096:8:16:8"] {
            assert_eq!(
                cublas_workspace_for(&cfg(true), env(kept)),
                None,
                "{kept:?}"
            );
        }
        for replaced in ["", ":4096:2", ":4096:80", "4096:8"] {
            assert_eq!(
                cublas_workspace_for(&cfg(true), env(replaced)),
                want,
                "{replaced:?}"
            );
        }
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
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path().to_path_buf();
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
            "data.source=\"bin\"".into(),
            "data.format=\"raw-u16\"".into(),
        ];
        let c = resolve(None, &sets, no_env()).unwrap();
        assert_eq!(c.run.device, DeviceChoice::Cuda(3));
        assert_eq!(c.run.precision, Precision::Bf16);
        assert_eq!(c.fast.select, SelectImpl::Reference);
        assert_eq!(c.fast.attn_path, AttnPathChoice::Reference);
        assert_eq!(c.fast.ddp_compress, Compression::Fp16);
        assert_eq!(c.data.source, DataSource::Bin);
        assert_eq!(c.data.format, ShardFormat::RawU16);
        // The resolved config renders back to the same values.
        let text = c.to_toml();
        assert!(text.contains("device = \"cuda:3\""), "{text}");
        assert!(text.contains("ddp_compress = \"fp16\""), "{text}");
        assert!(text.contains("source = \"bin\""), "{text}");
        assert!(text.contains("format = \"raw-u16\""), "{text}");
        for (key, value, allowed) in [
            ("run.device", "tpu", ["auto", "cpu", "cuda"].as_slice()),
            ("run.device", "cuda:x", &["cuda:N"]),
            ("run.precision", "fp8", &["auto", "f32", "bf16"]),
            ("fast.select", "fast", &["vectorized", "reference"]),
            ("fast.attn_path", "fused2", &["lean", "reference"]),
            ("fast.ddp_compress", "int8", &["none", "bf16", "fp16"]),
            ("data.source", "bogus", &["needle", "recall", "text", "bin"]),
            ("data.format", "u16", &["llmc", "raw-u16"]),
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

    /// Every experiment config under configs/ resolves and builds its model config (no data
    /// or device needed), so a script never meets a typo on the GPU host.
    #[test]
    fn experiment_configs_resolve() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut seen = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            if path.extension().is_some_and(|x| x == "toml") {
                let c = resolve(Some(&path), &[], no_env())
                    .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                crate::train::model_config(&c)
                    .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                seen += 1;
            }
        }
        assert!(seen >= 5, "{seen} configs");
    }

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn rank_of(flags: &LaunchFlags, pairs: &[(&str, &str)]) -> DistEnv {
        match dist_plan(flags, vars(pairs)).unwrap() {
            DistPlan::Rank(d) => d,
            other => panic!("expected a rank, got {other:?}"),
        }
    }

    fn launch_of(flags: &LaunchFlags, pairs: &[(&str, &str)]) -> NodeLaunch {
        match dist_plan(flags, vars(pairs)).unwrap() {
            DistPlan::Launch(l) => l,
            other => panic!("expected a launch, got {other:?}"),
        }
    }

    fn plan_err(flags: &LaunchFlags, pairs: &[(&str, &str)]) -> String {
        format!("{:#}", dist_plan(flags, vars(pairs)).unwrap_err())
    }

    #[test]
    fn dist_plan_follows_the_launcher_convention() {
        let none = LaunchFlags::default();
        assert_eq!(dist_plan(&none, vars(&[])).unwrap(), DistPlan::Single);
        let d = rank_of(
            &none,
            &[("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_PORT", "1234")],
        );
        assert_eq!(
            (d.rank, d.world, d.local_rank, d.master_port),
            (1, 2, 1, 1234)
        );
        assert_eq!(d.master_addr, "127.0.0.1");
        assert_eq!(d.store, nsa_ddp::StoreHost::Rank0);
        assert_eq!(d.launcher, Launcher::Env);
        let e = plan_err(&none, &[("WORLD_SIZE", "2")]);
        assert!(e.contains("RANK is not"), "{e}");
        let e = plan_err(&none, &[("WORLD_SIZE", "2"), ("RANK", "2")]);
        assert!(e.contains("RANK < WORLD_SIZE"), "{e}");
        let e = plan_err(&none, &[("WORLD_SIZE", "x"), ("RANK", "0")]);
        assert!(e.contains("WORLD_SIZE"), "{e}");
        let e = plan_err(
            &none,
            &[("WORLD_SIZE", "1"), ("RANK", "0"), ("MASTER_PORT", "x")],
        );
        assert!(e.contains("MASTER_PORT"), "{e}");
    }

    #[test]
    fn torchrun_workers_are_clients_of_the_agent_store() {
        let env = [
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("GROUP_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29400"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
            ("TORCHELASTIC_RUN_ID", "none"),
            // Slurm's variables lose to torchrun's.
            ("SLURM_STEP_ID", "0"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
        ];
        let none = LaunchFlags::default();
        let d = rank_of(&none, &env);
        assert_eq!((d.rank, d.world, d.local_rank), (3, 4, 1));
        assert_eq!((d.master_addr.as_str(), d.master_port), ("node0", 29400));
        assert_eq!(d.store, nsa_ddp::StoreHost::Launcher);
        assert_eq!(d.launcher, Launcher::Torchrun);
        assert_eq!(d.namespace, "nsa-ddp/attempt-2");
        let rdv = d.rendezvous(std::time::Duration::from_secs(7));
        assert_eq!(rdv.store, nsa_ddp::StoreHost::Launcher);
        assert_eq!(rdv.timeout, std::time::Duration::from_secs(7));
        assert_eq!(rdv.namespace, "nsa-ddp/attempt-2");
        // Flags win: a store moved elsewhere is hosted by rank 0 there.
        let moved = LaunchFlags {
            master_port: Some(1111),
            ..Default::default()
        };
        let d = rank_of(&moved, &env);
        assert_eq!((d.master_port, d.store), (1111, nsa_ddp::StoreHost::Rank0));
        // The agent already started the processes.
        let twice = LaunchFlags {
            nproc_per_node: Some(2),
            ..Default::default()
        };
        assert!(plan_err(&twice, &env).contains("already rank 3 of 4"));
    }

    #[test]
    fn slurm_steps_map_onto_ranks_or_node_launchers() {
        let step = [
            ("SLURM_JOB_ID", "4242"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NNODES", "2"),
            ("SLURM_STEP_NODELIST", "gpu[07-08]"),
            ("SLURM_JOB_NODELIST", "gpu[01-08]"),
        ];
        let none = LaunchFlags::default();
        let d = rank_of(&none, &step);
        assert_eq!((d.rank, d.world, d.local_rank), (5, 8, 1));
        assert_eq!(d.master_addr, "gpu07");
        assert_eq!(d.master_port, 29500 + 242);
        assert_eq!(d.store, nsa_ddp::StoreHost::Rank0);
        assert_eq!(d.launcher, Launcher::Slurm);
        // MASTER_ADDR / MASTER_PORT (torchrun's names) beat the node list; flags beat both.
        let mut env = step.to_vec();
        env.extend([("MASTER_ADDR", "head"), ("MASTER_PORT", "7000")]);
        let d = rank_of(&none, &env);
        assert_eq!((d.master_addr.as_str(), d.master_port), ("head", 7000));
        let flags = LaunchFlags {
            master_addr: Some("flag-host".into()),
            ..Default::default()
        };
        assert_eq!(rank_of(&flags, &env).master_addr, "flag-host");

        // One task per node, each our launcher for 4 GPUs.
        let per_node = [
            ("SLURM_STEP_ID", "1"),
            ("SLURM_PROCID", "1"),
            ("SLURM_STEP_NUM_TASKS", "2"),
            ("SLURM_STEP_NUM_NODES", "2"),
            ("SLURM_STEP_NODELIST", "n[3,9]"),
        ];
        let four = LaunchFlags {
            nproc_per_node: Some(4),
            ..Default::default()
        };
        let l = launch_of(&four, &per_node);
        assert_eq!((l.nproc_per_node, l.nnodes, l.node_rank), (4, 2, 1));
        assert_eq!((l.master_addr.as_str(), l.master_port), ("n3", Some(29500)));
        assert!(plan_err(&four, &step).contains("one task per node"));

        // The batch script (no step) and a one-task step are no launchers.
        let batch = [("SLURM_PROCID", "0"), ("SLURM_NTASKS", "8")];
        assert_eq!(dist_plan(&none, vars(&batch)).unwrap(), DistPlan::Single);
        let one = [
            ("SLURM_STEP_ID", "0"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
        ];
        assert_eq!(dist_plan(&none, vars(&one)).unwrap(), DistPlan::Single);
        let e = plan_err(
            &none,
            &[
                ("SLURM_STEP_ID", "0"),
                ("SLURM_PROCID", "0"),
                ("SLURM_NTASKS", "2"),
            ],
        );
        assert!(e.contains("--master-addr"), "{e}");
    }

    #[test]
    fn our_launcher_flags_cover_several_nodes() {
        let single = LaunchFlags {
            nproc_per_node: Some(2),
            ..Default::default()
        };
        let l = launch_of(&single, &[]);
        assert_eq!((l.nnodes, l.node_rank, l.master_port), (1, 0, None));
        assert_eq!(l.master_addr, "127.0.0.1");
        let multi = LaunchFlags {
            nproc_per_node: Some(8),
            nnodes: Some(2),
            node_rank: Some(1),
            master_addr: Some("10.0.0.1".into()),
            master_port: None,
        };
        let l = launch_of(&multi, &[]);
        assert_eq!((l.nnodes, l.node_rank, l.master_port), (2, 1, Some(29500)));
        assert_eq!(l.launcher, Launcher::Flags);
        // MASTER_ADDR / MASTER_PORT fill in what the flags leave out.
        let bare = LaunchFlags {
            master_addr: None,
            ..multi.clone()
        };
        let l = launch_of(&bare, &[("MASTER_ADDR", "h0"), ("MASTER_PORT", "6000")]);
        assert_eq!((l.master_addr.as_str(), l.master_port), ("h0", Some(6000)));
        assert!(plan_err(&bare, &[]).contains("--master-addr"));
        let bad = LaunchFlags {
            node_rank: Some(2),
            ..multi
        };
        assert!(plan_err(&bad, &[]).contains("need node rank < nodes"));
        let zero = LaunchFlags {
            nproc_per_node: Some(0),
            ..Default::default()
        };
        assert!(plan_err(&zero, &[]).contains("at least 1"));
    }

    #[test]
    fn slurm_host_lists_give_their_first_host() {
        assert_eq!(first_host("node17").as_deref(), Some("node17"));
        assert_eq!(first_host("a,b").as_deref(), Some("a"));
        assert_eq!(first_host("node[07-09,12],gpu5").as_deref(), Some("node07"));
        assert_eq!(first_host("gpu[3,1]").as_deref(), Some("gpu3"));
        assert_eq!(first_host("r[1-2]-n[003-004]").as_deref(), Some("r1-n003"));
        assert_eq!(first_host("127.0.0.[1-2]").as_deref(), Some("127.0.0.1"));
        assert_eq!(first_host(""), None);
        assert_eq!(first_host("node[07"), None);
        assert_eq!(first_host("node[]"), None);
        assert_eq!(first_host("node]"), None);
    }

    #[test]
    fn profile_range_parses() {
        let c = resolve(None, &["run.profile=\"3..5\"".to_string()], no_env()).unwrap();
        assert_eq!(c.profile_range().unwrap(), Some((3, 5)));
        assert!(resolve(None, &["run.profile=\"5..3\"".to_string()], no_env()).is_err());
        // Numbered as the log numbers steps: 1 to run.steps.
        let with = |range: &str| {
            resolve(
                None,
                &["run.steps=5".to_string(), format!("run.profile={range:?}")],
                no_env(),
            )
        };
        assert_eq!(with("4..5").unwrap().profile_range().unwrap(), Some((4, 5)));
        for bad in ["0..2", "4..6"] {
            let err = format!("{:#}", with(bad).unwrap_err());
            assert!(err.contains("1 to run.steps = 5"), "{bad}: {err}");
        }
    }
}
