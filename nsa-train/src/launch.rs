//! `nsa-train train --nproc-per-node N`: starts one process per GPU on this host, each with the
//! launcher convention (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`) set,
//! and waits for them. If one rank fails, the others are asked to stop (SIGTERM: they write a
//! checkpoint) and, failing that, killed; the launcher then exits with the failing rank's error.
//! SIGINT/SIGTERM sent to the launcher are passed on to every rank.
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::config::DistEnv;

/// What this process does in a run started with an optional `--nproc-per-node`.
pub enum Role {
    /// It launched the ranks, and they have finished.
    Launcher,
    /// It trains: alone (`None`) or as the rank the environment names.
    Trainer(Option<DistEnv>),
}

/// With `--nproc-per-node N` and no launcher environment (`WORLD_SIZE` …): starts the ranks and
/// waits for them ([`Role::Launcher`]). Otherwise this process trains, as the rank the
/// environment describes if any.
pub fn role(nproc_per_node: Option<usize>) -> Result<Role> {
    let dist = crate::config::dist_env(std::env::vars())?;
    match (nproc_per_node, dist) {
        (Some(n), None) => {
            spawn_ranks(n, &strip_nproc(std::env::args().skip(1)))?;
            Ok(Role::Launcher)
        }
        (_, dist) => Ok(Role::Trainer(dist)),
    }
}

/// The command line without `--nproc-per-node N` / `--nproc-per-node=N` (for the ranks).
fn strip_nproc(args: impl Iterator<Item = String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut skip_next = false;
    for a in args {
        if skip_next {
            skip_next = false;
        } else if a == "--nproc-per-node" {
            skip_next = true;
        } else if !a.starts_with("--nproc-per-node=") {
            out.push(a);
        }
    }
    out
}

/// Runs this binary `n` times with `args` (the original arguments without `--nproc-per-node`).
fn spawn_ranks(n: usize, args: &[String]) -> Result<()> {
    anyhow::ensure!(n >= 1, "--nproc-per-node must be at least 1");
    let exe = std::env::current_exe().context("locating the nsa-train binary")?;
    let port = free_port()?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    let mut children: Vec<Child> = Vec::with_capacity(n);
    for rank in 0..n {
        let child = Command::new(&exe)
            .args(args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .spawn()
            .with_context(|| format!("starting rank {rank}"))?;
        children.push(child);
    }
    println!("launched {n} rank(s), rendezvous at 127.0.0.1:{port}");
    let mut status: Vec<Option<std::process::ExitStatus>> = vec![None; n];
    let mut failed: Option<(usize, std::process::ExitStatus)> = None;
    let mut forwarded = false;
    let mut kill_deadline: Option<Instant> = None;
    while status.iter().any(Option::is_none) {
        for (rank, child) in children.iter_mut().enumerate() {
            if status[rank].is_none() {
                if let Some(s) = child.try_wait()? {
                    status[rank] = Some(s);
                    if !s.success() && failed.is_none() {
                        failed = Some((rank, s));
                    }
                }
            }
        }
        if (failed.is_some() || stop.load(Ordering::Relaxed)) && !forwarded {
            forwarded = true;
            terminate(&children, &status);
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
        bail!("rank {rank} failed ({s}); the other ranks were stopped");
    }
    Ok(())
}

/// A free local port for a rendezvous: bind port 0, read what the OS chose, release it.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free port for the rendezvous")?
        .port())
}

/// SIGTERM to every rank still running (std's `Child::kill` is SIGKILL, which leaves no time
/// for the checkpoint a rank writes on SIGTERM).
fn terminate(children: &[Child], status: &[Option<std::process::ExitStatus>]) {
    for (child, s) in children.iter().zip(status) {
        if s.is_none() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
    }
}
