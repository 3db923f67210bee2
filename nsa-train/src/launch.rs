//! Starting and joining data-parallel runs.
//!
//! - [`role`]: what this process does, from [`crate::config::dist_plan`] (the one place that
//!   reads torchrun's, Slurm's and our own flags): train alone, train as one rank, or launch.
//! - Our launcher (`--nproc-per-node N`, with `--nnodes` / `--node-rank` / `--master-addr` /
//!   `--master-port` for several hosts): starts this node's N ranks, each with torchrun's
//!   convention (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`, `GROUP_RANK`,
//!   `MASTER_ADDR`, `MASTER_PORT`; rank 0 hosts the rendezvous store), and waits for them. If one
//!   rank fails, the others are asked to stop (SIGTERM: they write a checkpoint) and, failing
//!   that, killed; the launcher then exits with the failing rank's error. SIGINT, SIGTERM and
//!   SIGHUP sent to the launcher are passed on to every rank (each writes a checkpoint), and the
//!   launcher then exits with 128 + the signal, as the ranks do.
//! - [`check_rendezvous`]: the hidden `nsa-train rendezvous` command, which only meets the other
//!   ranks and prints what rank 0 sent (a launcher check that needs no GPU).
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::config::{DistEnv, DistPlan, LaunchFlags, NodeLaunch};

/// What this process does in a run.
pub enum Role {
    /// It launched this node's ranks, and they have finished.
    Launcher,
    /// It trains: alone (`None`) or as the rank the launcher's environment names.
    Trainer(Option<DistEnv>),
}

/// [`role_with`] with only `--nproc-per-node` (the `smoke` command).
pub fn role(nproc_per_node: Option<usize>) -> Result<Role> {
    role_with(&LaunchFlags {
        nproc_per_node,
        ..Default::default()
    })
}

/// Decides from the flags and the environment ([`crate::config::dist_plan`]): with our
/// launcher's flags and no other launcher around, starts this node's ranks and waits for them
/// ([`Role::Launcher`]); otherwise this process trains, as the rank the environment describes
/// if any.
pub fn role_with(flags: &LaunchFlags) -> Result<Role> {
    match crate::config::dist_plan(flags, std::env::vars())? {
        DistPlan::Single => Ok(Role::Trainer(None)),
        DistPlan::Rank(d) => {
            if d.world > 1 && d.rank == 0 {
                println!(
                    "rank 0 of {} ({}), rendezvous at {}:{} (store hosted by {})",
                    d.world,
                    d.launcher,
                    d.master_addr,
                    d.master_port,
                    match d.store {
                        nsa_ddp::StoreHost::Rank0 => "rank 0",
                        nsa_ddp::StoreHost::Launcher => "the launcher",
                    }
                );
            }
            Ok(Role::Trainer(Some(d)))
        }
        DistPlan::Launch(node) => {
            spawn_ranks(&node, &strip_launch_flags(std::env::args().skip(1)))?;
            Ok(Role::Launcher)
        }
    }
}

/// The command line without our launcher's flags (`--nproc-per-node N`, `--nnodes N`,
/// `--node-rank R`, `--master-addr H`, `--master-port P`, or their `--flag=value` forms): the
/// ranks get those through their environment.
fn strip_launch_flags(args: impl Iterator<Item = String>) -> Vec<String> {
    const FLAGS: [&str; 5] = [
        "--nproc-per-node",
        "--nnodes",
        "--node-rank",
        "--master-addr",
        "--master-port",
    ];
    let mut out = Vec::new();
    let mut skip_next = false;
    for a in args {
        if skip_next {
            skip_next = false;
        } else if FLAGS.contains(&a.as_str()) {
            skip_next = true;
        } else if !FLAGS
            .iter()
            .any(|f| a.strip_prefix(f).is_some_and(|rest| rest.starts_with('=')))
        {
            out.push(a);
        }
    }
    out
}

/// Runs this binary once per rank of this node with `args` (the original arguments without our
/// launcher's flags).
fn spawn_ranks(node: &NodeLaunch, args: &[String]) -> Result<()> {
    let n = node.nproc_per_node;
    anyhow::ensure!(n >= 1, "--nproc-per-node must be at least 1");
    let exe = std::env::current_exe().context("locating the nsa-train binary")?;
    let port = match node.master_port {
        Some(p) => p,
        None => free_port()?,
    };
    let world = node.nnodes * n;
    let first = node.node_rank * n;
    // The stop signal the launcher received (0: none), forwarded to the ranks.
    let stop = Arc::new(AtomicUsize::new(0));
    for sig in crate::signals::STOP_SIGNALS {
        signal_hook::flag::register_usize(sig, Arc::clone(&stop), sig as usize)?;
    }
    let mut children: Vec<Child> = Vec::with_capacity(n);
    for local in 0..n {
        let rank = first + local;
        let child = Command::new(&exe)
            .args(args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("GROUP_RANK", node.node_rank.to_string())
            .env("MASTER_ADDR", &node.master_addr)
            .env("MASTER_PORT", port.to_string())
            // A process group of its own: Ctrl-C in a terminal reaches the launcher alone, which
            // passes it on once (a rank that got it twice would take the second as "exit now",
            // before its checkpoint).
            .process_group(0)
            // Our ranks host their own store (rank 0); nothing of an outer torchrun applies.
            .env_remove("TORCHELASTIC_USE_AGENT_STORE")
            .env_remove("TORCHELASTIC_RESTART_COUNT")
            .env_remove("TORCHELASTIC_RUN_ID")
            .spawn()
            .with_context(|| format!("starting rank {rank}"))?;
        children.push(child);
    }
    if node.nnodes == 1 {
        println!(
            "launched {n} rank(s), rendezvous at {}:{port}",
            node.master_addr
        );
    } else {
        println!(
            "launched ranks {first}..{} of {world} (node {} of {}, {}), rendezvous at {}:{port}",
            first + n - 1,
            node.node_rank,
            node.nnodes,
            node.launcher,
            node.master_addr
        );
    }
    let mut status: Vec<Option<std::process::ExitStatus>> = vec![None; n];
    let mut failed: Option<(usize, std::process::ExitStatus)> = None;
    let mut forwarded = false;
    let mut kill_deadline: Option<Instant> = None;
    while status.iter().any(Option::is_none) {
        for (rank, child) in children.iter_mut().enumerate() {
            if status[rank].is_none() {
                if let Some(s) = child.try_wait()? {
                    status[rank] = Some(s);
                    // A rank that stopped for a signal (exit 128 + it) was interrupted, not
                    // broken: the others are stopped the same way.
                    match s.code().and_then(interrupt_signal) {
                        Some(sig) => {
                            let _ = stop.compare_exchange(
                                0,
                                sig as usize,
                                Ordering::SeqCst,
                                Ordering::SeqCst,
                            );
                        }
                        None if !s.success() && failed.is_none() => failed = Some((rank, s)),
                        None => {}
                    }
                }
            }
        }
        let requested = stop.load(Ordering::Relaxed);
        if (failed.is_some() || requested != 0) && !forwarded {
            forwarded = true;
            let sig = if requested != 0 {
                requested as i32
            } else {
                signal_hook::consts::SIGTERM
            };
            signal_ranks(&children, &status, sig);
            // Ranks get this long to save a checkpoint and leave before they are killed.
            kill_deadline = Some(Instant::now() + Duration::from_secs(120));
        }
        if kill_deadline.is_some_and(|d| Instant::now() > d) {
            for (rank, child) in children.iter_mut().enumerate() {
                if status[rank].is_none() {
                    let _ = child.kill();
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if let Some((rank, s)) = failed {
        bail!(
            "rank {} failed ({s}); the other ranks of this node were stopped",
            first + rank
        );
    }
    match stop.load(Ordering::Relaxed) {
        0 => Ok(()),
        sig => {
            eprintln!(
                "launcher: stopped by {}; every rank wrote its checkpoint and left",
                crate::signals::name(sig as i32)
            );
            std::process::exit(crate::signals::exit_code(sig as i32))
        }
    }
}

/// The stop signal behind an exit status of 128 + signal, if it is one of ours.
fn interrupt_signal(code: i32) -> Option<i32> {
    crate::signals::STOP_SIGNALS
        .into_iter()
        .find(|&sig| code == crate::signals::exit_code(sig))
}

/// A free local port for a rendezvous: bind port 0, read what the OS chose, release it.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free port for the rendezvous")?
        .port())
}

/// `sig` to every rank still running (std's `Child::kill` is SIGKILL, which leaves no time for
/// the checkpoint a rank writes on a stop signal).
fn signal_ranks(children: &[Child], status: &[Option<std::process::ExitStatus>], sig: i32) {
    let Some(signal) = rustix::process::Signal::from_named_raw(sig) else {
        return;
    };
    for (child, s) in children.iter().zip(status) {
        if s.is_none() {
            if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process(pid, signal);
            }
        }
    }
}

/// The hidden `nsa-train rendezvous` command: takes this process's place in a run like `train`
/// (our launcher, torchrun, Slurm or a plain environment), meets the other ranks through the
/// rendezvous store and prints what rank 0 sent: 128 random bytes, or with `nccl` a real NCCL
/// unique id (needs libnccl). Checks a launch setup end to end without a GPU.
pub fn check_rendezvous(flags: &LaunchFlags, timeout: Duration, nccl: bool) -> Result<()> {
    let Role::Trainer(dist) = role_with(flags)? else {
        return Ok(());
    };
    let Some(d) = dist else {
        bail!("rendezvous: this process is not part of a data-parallel run (no launcher environment and no --nproc-per-node)");
    };
    let cfg = d.rendezvous(timeout);
    let started = Instant::now();
    let context = || {
        format!(
            "rank {}: rendezvous at {}:{}",
            d.rank, d.master_addr, d.master_port
        )
    };
    let payload = if nccl {
        nsa_ddp::rendezvous_nccl(&cfg, d.rank, d.world)
            .with_context(context)?
            .to_vec()
    } else {
        nsa_ddp::rendezvous(&cfg, d.rank, d.world, || Ok(random_payload())).with_context(context)?
    };
    let hex: String = payload.iter().map(|b| format!("{b:02x}")).collect();
    println!(
        "rendezvous: rank {} of {} (local {}, {}, store {:?}) in {:.2} s: payload {hex}",
        d.rank,
        d.world,
        d.local_rank,
        d.launcher,
        d.store,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// 128 bytes that differ from run to run (time and process id through splitmix64), the size of
/// an NCCL unique id.
fn random_payload() -> Vec<u8> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut x = nanos ^ (u64::from(std::process::id()) << 32);
    (0..nsa_ddp::UNIQUE_ID_BYTES / 8)
        .flat_map(|_| {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)).to_le_bytes()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_get_the_command_line_without_launcher_flags() {
        let args = [
            "train",
            "--nproc-per-node",
            "2",
            "--nnodes=2",
            "--set",
            "run.name=\"--node-rank\"",
            "--node-rank",
            "1",
            "--master-addr=h",
            "--master-port",
            "9",
            "--steps",
            "3",
        ];
        assert_eq!(
            strip_launch_flags(args.iter().map(|s| s.to_string())),
            ["train", "--set", "run.name=\"--node-rank\"", "--steps", "3"]
        );
    }

    #[test]
    fn payloads_are_an_nccl_id_long_and_differ() {
        let a = random_payload();
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(a.len(), nsa_ddp::UNIQUE_ID_BYTES);
        assert_ne!(a, random_payload());
    }
}
