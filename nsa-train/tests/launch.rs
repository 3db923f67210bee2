//! Launching data-parallel runs, on the CPU: the rendezvous of 2 and 4 real processes through
//! libtorch's c10d TCPStore, started by our launcher (one node, and two "nodes" on this host), by
//! a plain environment, by Slurm's variables (as srun sets them) and by the torch venv's own
//! torchrun (one and two agents); and the errors for a peer that never comes and a wrong world
//! size, within the timeout. The ranks run the hidden `nsa-train rendezvous` command: the NCCL
//! id exchange (128 bytes from rank 0) without libnccl or a GPU.
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The nsa-train binary with no launcher variables inherited from the shell that runs the tests.
fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nsa-train"));
    scrub(&mut c);
    c
}

fn scrub(c: &mut Command) {
    c.env("RUST_BACKTRACE", "0");
    for (name, _) in std::env::vars().filter(|(n, _)| {
        n.starts_with("SLURM_")
            || n.starts_with("TORCHELASTIC_")
            || n.starts_with("NSA_")
            || [
                "RANK",
                "WORLD_SIZE",
                "LOCAL_RANK",
                "LOCAL_WORLD_SIZE",
                "GROUP_RANK",
                "MASTER_ADDR",
                "MASTER_PORT",
            ]
            .contains(&n.as_str())
    }) {
        c.env_remove(name);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(mut c: Command) -> Child {
    c.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the process starts")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Waits for every child; all must succeed. Returns their stdout and stderr, concatenated.
fn all_ok(children: Vec<Child>) -> String {
    let outs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let all: String = outs.iter().map(text).collect();
    for o in &outs {
        assert!(
            o.status.success(),
            "a process failed ({}):\n{all}",
            o.status
        );
    }
    all
}

/// Checks that `out` reports exactly ranks 0..world of one rendezvous, all with rank 0's
/// 128-byte payload; returns the payload.
fn one_meeting(out: &str, world: usize) -> String {
    let mut seen = vec![0usize; world];
    let mut payload: Option<&str> = None;
    for line in out.lines().filter(|l| l.starts_with("rendezvous: rank ")) {
        let mut words = line["rendezvous: rank ".len()..].split(' ');
        let rank: usize = words.next().unwrap().parse().unwrap();
        assert_eq!(words.next(), Some("of"), "{line}");
        let w: usize = words.next().unwrap().parse().unwrap();
        assert_eq!(w, world, "{line}");
        seen[rank] += 1;
        let p = line.rsplit("payload ").next().unwrap();
        assert_eq!(p.len(), 2 * 128, "{line}");
        match payload {
            None => payload = Some(p),
            Some(first) => assert_eq!(first, p, "ranks disagree on the payload:\n{out}"),
        }
    }
    assert_eq!(seen, vec![1; world], "every rank once:\n{out}");
    payload.unwrap().to_string()
}

#[test]
fn our_launcher_on_one_and_two_nodes() {
    let out = bin()
        .args(["rendezvous", "--nproc-per-node", "2", "--timeout-s", "60"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let first = one_meeting(&text(&out), 2);

    // Two launchers on this host play two nodes of two ranks each; node 1 starts first.
    let port = free_port().to_string();
    let node = |r: &str| {
        let mut c = bin();
        c.args([
            "rendezvous",
            "--nproc-per-node",
            "2",
            "--nnodes",
            "2",
            "--node-rank",
            r,
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            &port,
            "--timeout-s",
            "60",
        ]);
        spawn(c)
    };
    let children = vec![node("1"), node("0")];
    let out = all_ok(children);
    assert!(
        out.contains("launched ranks 2..3 of 4 (node 1 of 2"),
        "{out}"
    );
    // A new run, a new payload: nothing is left over from the first.
    assert_ne!(one_meeting(&out, 4), first);
}

#[test]
fn plain_environment_and_slurm_variables() {
    let port = free_port().to_string();
    let children = (0..2)
        .rev()
        .map(|r| {
            let mut c = bin();
            c.args(["rendezvous", "--timeout-s", "60"])
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port);
            spawn(c)
        })
        .collect();
    one_meeting(&all_ok(children), 2);

    // srun with one task per GPU: rank = SLURM_PROCID, master = first host of the node list.
    let port = free_port().to_string();
    let slurm = |c: &mut Command, procid: usize, tasks: usize| {
        c.env("SLURM_JOB_ID", "77")
            .env("SLURM_STEP_ID", "0")
            .env("SLURM_PROCID", procid.to_string())
            .env("SLURM_LOCALID", procid.to_string())
            .env("SLURM_NTASKS", tasks.to_string())
            .env("SLURM_NNODES", tasks.to_string())
            .env("SLURM_STEP_NODELIST", "127.0.0.[1-2]");
    };
    let children = (0..2)
        .map(|r| {
            let mut c = bin();
            c.args(["rendezvous", "--timeout-s", "60", "--master-port", &port]);
            slurm(&mut c, r, 2);
            spawn(c)
        })
        .collect();
    let out = all_ok(children);
    assert!(out.contains("Slurm"), "{out}");
    one_meeting(&out, 2);

    // srun with one task per node, each our launcher for two ranks: 4 ranks.
    let port = free_port().to_string();
    let children = (0..2)
        .map(|r| {
            let mut c = bin();
            c.args([
                "rendezvous",
                "--timeout-s",
                "60",
                "--nproc-per-node",
                "2",
                "--master-port",
                &port,
            ]);
            slurm(&mut c, r, 2);
            spawn(c)
        })
        .collect();
    let out = all_ok(children);
    assert!(out.contains("of 4 (node 1 of 2, Slurm)"), "{out}");
    one_meeting(&out, 4);
}

/// The torch venv's torchrun (`cargo xtask setup` installs it), found next to the libtorch
/// this workspace links (`.tools/torch-venv/bin`, or the venv behind `.libtorch` / `LIBTORCH`),
/// else on `PATH`.
fn torchrun() -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut starts = vec![root.join(".tools/torch-venv"), root.join(".libtorch")];
    if let Some(l) = std::env::var_os("LIBTORCH") {
        starts.push(PathBuf::from(l));
    }
    for start in starts {
        let Ok(start) = start.canonicalize() else {
            continue;
        };
        for dir in start.ancestors() {
            let cand = dir.join("bin/torchrun");
            if cand.is_file() {
                return Some(cand);
            }
        }
    }
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("torchrun"))
            .find(|c| c.is_file())
    })
}

#[test]
fn torchrun_on_one_and_two_nodes() {
    let Some(torchrun) = torchrun() else {
        eprintln!(
            "skipped: no torchrun (run `cargo xtask setup`, which installs it in .tools/torch-venv)"
        );
        return;
    };
    let run = |extra: &[&str], port: &str| {
        let mut c = Command::new(&torchrun);
        scrub(&mut c);
        c.arg("--no-python")
            .args(extra)
            .args(["--master-addr", "127.0.0.1", "--master-port", port])
            .arg(env!("CARGO_BIN_EXE_nsa-train"))
            .args(["rendezvous", "--timeout-s", "60"]);
        spawn(c)
    };
    let port = free_port().to_string();
    let out = all_ok(vec![run(&["--nproc-per-node", "2"], &port)]);
    // The workers were clients of the agent's store (its port was taken, so hosting would fail).
    assert!(out.contains("torchrun, store Launcher"), "{out}");
    one_meeting(&out, 2);

    let port = free_port().to_string();
    let node = |r: &str| {
        run(
            &["--nnodes", "2", "--node-rank", r, "--nproc-per-node", "2"],
            &port,
        )
    };
    let out = all_ok(vec![node("0"), node("1")]);
    one_meeting(&out, 4);
}

/// Runs one rank in a plain environment; returns its output and how long it took.
fn lone_rank(rank: usize, world: usize, port: &str, timeout_s: &str) -> Child {
    let mut c = bin();
    c.args(["rendezvous", "--timeout-s", timeout_s])
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port);
    spawn(c)
}

fn failed(child: Child) -> String {
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "should have failed:\n{}", text(&out));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn missing_peers_and_wrong_world_sizes_fail_within_the_timeout() {
    // Rank 0 waits 1.5 s for a rank 1 that never comes, a lone rank 1 for a rank 0, and our
    // launcher's node 0 for a node 1 that never starts: each names whom it missed.
    let start = Instant::now();
    let leader = lone_rank(0, 2, &free_port().to_string(), "1.5");
    let peer = lone_rank(1, 2, &free_port().to_string(), "1.5");
    let mut c = bin();
    c.args([
        "rendezvous",
        "--nproc-per-node",
        "1",
        "--nnodes",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        &free_port().to_string(),
        "--timeout-s",
        "1.5",
    ]);
    let launcher = spawn(c);
    let e = failed(leader);
    assert!(
        e.contains("rank 0: rendezvous timed out after") && e.contains("not heard from: [1]"),
        "{e}"
    );
    let e = failed(peer);
    assert!(
        e.contains("rank 1: rendezvous timed out after")
            && e.contains("connecting to rank 0's store")
            && e.contains("not heard from: [0]"),
        "{e}"
    );
    let e = failed(launcher);
    assert!(e.contains("not heard from: [1]"), "{e}");
    assert!(e.contains("rank 0 failed"), "{e}");
    // 1.5 s of waiting plus process start-up on a busy 2-core machine, not a hang.
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );

    // Rank 1 believes in a world of 3, rank 0 in 2: both stop at once (long before their 60 s
    // timeout) and say why.
    let start = Instant::now();
    let port = free_port().to_string();
    let peer = lone_rank(1, 3, &port, "60");
    let leader = lone_rank(0, 2, &port, "60");
    for e in [failed(leader), failed(peer)] {
        assert!(e.contains("rank 1 has world size 3, rank 0 has 2"), "{e}");
    }
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
}
