//! nsa-ddp on CPU: bucket plans, DDP over thread ranks against single-process training,
//! compression error bounds, broadcast, checksums, timeouts, rendezvous.
use std::net::TcpListener;
use std::time::{Duration, Instant};

use nsa_ddp::{
    rendezvous, Communicator, Compression, DataParallel, DdpError, GradBuckets, LocalGroup,
    RendezvousConfig, StoreHost, UniqueId,
};
use nsa_sys::store::TcpStore;
use tch::{Device, Kind, Tensor};

const TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `f(rank, group)` on `world` threads and returns the results in rank order.
fn on_ranks<T: Send + 'static>(
    world: usize,
    timeout: Duration,
    f: impl Fn(usize, LocalGroup) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = std::sync::Arc::new(f);
    let handles: Vec<_> = LocalGroup::new(world, timeout)
        .unwrap()
        .into_iter()
        .enumerate()
        .map(|(r, g)| {
            let f = f.clone();
            std::thread::spawn(move || f(r, g))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Deterministic pseudo-random numbers in [-1, 1) (no global RNG: threads share libtorch's).
fn lcg(seed: u64, n: usize) -> Vec<f64> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect()
}

fn flat(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.detach().to_kind(Kind::Double).reshape([-1])).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Buckets

#[test]
fn buckets_cover_every_parameter_once_in_reverse_order() {
    // A transformer-ish list: embedding (largest), per-layer matrices and vectors.
    let sizes: Vec<i64> = vec![5000, 64, 1024, 1024, 64, 2048, 2048, 64, 300];
    let params: Vec<(String, Tensor)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            (
                format!("p{i}"),
                Tensor::zeros([n], (Kind::Float, Device::Cpu)),
            )
        })
        .collect();
    let largest = 5000 * 4;
    // Caps in bytes: smaller than the largest parameter (twice), around it, and huge.
    for cap in [4096usize, 10_000, largest, 1 << 30] {
        let b = GradBuckets::new(&params, cap as f64 / nsa_ddp::bucket::MB).unwrap();
        let order: Vec<usize> = b
            .buckets()
            .iter()
            .flat_map(|b| b.entries().iter().map(|e| e.param))
            .collect();
        let expected: Vec<usize> = (0..sizes.len()).rev().collect();
        assert_eq!(order, expected, "cap {cap}: every parameter once, reversed");
        for bucket in b.buckets() {
            let mut offset = 0;
            for e in bucket.entries() {
                assert_eq!(
                    e.offset, offset,
                    "cap {cap}: entries are packed back to back"
                );
                assert_eq!(e.numel, sizes[e.param]);
                assert_eq!(e.name, format!("p{}", e.param));
                offset += e.numel;
            }
            assert_eq!(bucket.flat().size(), vec![offset]);
            assert!(
                bucket.bytes() <= cap || bucket.entries().len() == 1,
                "cap {cap}: a bucket over the cap must hold a single parameter"
            );
        }
        // Greedy packing: two consecutive buckets could not have been merged.
        for w in b.buckets().windows(2) {
            let next_first = w[1].entries()[0].numel as usize * 4;
            assert!(
                w[0].bytes() + next_first > cap,
                "cap {cap}: bucket closed too early"
            );
        }
        if cap < largest {
            let own = b
                .buckets()
                .iter()
                .find(|bk| bk.entries().iter().any(|e| e.param == 0))
                .unwrap();
            assert_eq!(own.entries().len(), 1, "the oversized parameter is alone");
        }
        if cap == 1 << 30 {
            assert_eq!(b.buckets().len(), 1);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Training: DDP on split batches vs one process on the whole batch

const IN: i64 = 6;
const HID: i64 = 10;
const OUT: i64 = 3;
const BATCH: i64 = 8;
const LR: f64 = 0.1;
const STEPS: usize = 3;
const SHAPES: [&[i64]; 4] = [&[HID, IN], &[HID], &[OUT, HID], &[OUT]];
const NAMES: [&str; 4] = ["l1.weight", "l1.bias", "l2.weight", "l2.bias"];

/// Initial parameters; rank-dependent so that the broadcast has something to do.
fn init(seed: u64) -> Vec<Vec<f64>> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n = s.iter().product::<i64>() as usize;
            lcg(seed * 10 + i as u64, n)
                .into_iter()
                .map(|x| x * 0.5)
                .collect()
        })
        .collect()
}

fn data() -> (Vec<f64>, Vec<f64>) {
    (
        lcg(1000, (BATCH * IN) as usize),
        lcg(2000, (BATCH * OUT) as usize),
    )
}

fn params_from(values: &[Vec<f64>], kind: Kind) -> Vec<(String, Tensor)> {
    values
        .iter()
        .zip(SHAPES)
        .zip(NAMES)
        .map(|((v, s), n)| {
            let t = Tensor::from_slice(v)
                .to_kind(kind)
                .view(s)
                .set_requires_grad(true);
            (n.to_string(), t)
        })
        .collect()
}

/// Two linear layers with tanh between, mean-squared error over the rows given.
fn loss(p: &[(String, Tensor)], x: &Tensor, y: &Tensor) -> Tensor {
    let h = x.linear(&p[0].1, Some(&p[1].1)).tanh();
    let out = h.linear(&p[2].1, Some(&p[3].1));
    (out - y).square().mean(x.kind())
}

fn sgd(p: &[(String, Tensor)]) {
    tch::no_grad(|| {
        for (_, t) in p {
            let mut t = t.shallow_clone();
            let g = t.grad();
            t -= g * LR;
        }
    });
}

fn zero_grads(p: &[(String, Tensor)]) {
    for (_, t) in p {
        let mut t = t.shallow_clone();
        t.zero_grad();
    }
}

fn all_grads(p: &[(String, Tensor)]) -> Vec<f64> {
    p.iter().flat_map(|(_, t)| flat(&t.grad())).collect()
}

fn all_values(p: &[(String, Tensor)]) -> Vec<f64> {
    p.iter().flat_map(|(_, t)| flat(t)).collect()
}

/// One process, whole batch, rank 0's initial parameters.
fn train_reference(kind: Kind) -> Vec<f64> {
    let p = params_from(&init(0), kind);
    let (xv, yv) = data();
    let x = Tensor::from_slice(&xv).to_kind(kind).view([BATCH, IN]);
    let y = Tensor::from_slice(&yv).to_kind(kind).view([BATCH, OUT]);
    for _ in 0..STEPS {
        zero_grads(&p);
        loss(&p, &x, &y).backward();
        sgd(&p);
    }
    all_values(&p)
}

struct RankRun {
    after_broadcast: Vec<f64>,
    /// Per step: this rank's own gradients (before sync) and the synchronised ones.
    local_grads: Vec<Vec<f64>>,
    synced_grads: Vec<Vec<f64>>,
    final_params: Vec<f64>,
}

/// DDP: `world` thread ranks, each on its contiguous shard of the batch.
fn train_ddp(world: usize, kind: Kind, compression: Compression, bucket_mb: f64) -> Vec<RankRun> {
    train_ddp_with(world, kind, compression, bucket_mb, false)
}

/// As [`train_ddp`]; with `overlap`, the gradient-ready hooks start the all-reduces in backward.
fn train_ddp_with(
    world: usize,
    kind: Kind,
    compression: Compression,
    bucket_mb: f64,
    overlap: bool,
) -> Vec<RankRun> {
    on_ranks(world, TIMEOUT, move |rank, group| {
        let p = params_from(&init(rank as u64), kind);
        let mut dp = DataParallel::new(group, &p, bucket_mb, compression).unwrap();
        if overlap {
            dp.enable_overlap().unwrap();
        }
        dp.broadcast_parameters().unwrap();
        let after_broadcast = all_values(&p);
        let (xv, yv) = data();
        let shard = BATCH / world as i64;
        let x = Tensor::from_slice(&xv)
            .to_kind(kind)
            .view([BATCH, IN])
            .narrow(0, rank as i64 * shard, shard);
        let y = Tensor::from_slice(&yv)
            .to_kind(kind)
            .view([BATCH, OUT])
            .narrow(0, rank as i64 * shard, shard);
        let mut run = RankRun {
            after_broadcast,
            local_grads: Vec::new(),
            synced_grads: Vec::new(),
            final_params: Vec::new(),
        };
        for _ in 0..STEPS {
            zero_grads(&p);
            dp.prepare_backward().unwrap();
            loss(&p, &x, &y).backward();
            run.local_grads.push(all_grads(&p));
            dp.sync_gradients().unwrap();
            run.synced_grads.push(all_grads(&p));
            sgd(&p);
        }
        dp.parameter_checksum().unwrap();
        run.final_params = all_values(&p);
        run
    })
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn ddp_fp64_equals_single_process_training() {
    let reference = train_reference(Kind::Double);
    let rank0_init: Vec<f64> = init(0).concat();
    for world in [2, 4] {
        // Buckets: 100 bytes splits the 4 parameters over 3 buckets (l1.weight alone, oversized).
        for bucket_mb in [100.0 / nsa_ddp::bucket::MB, 25.0] {
            let runs = train_ddp(world, Kind::Double, Compression::None, bucket_mb);
            for (r, run) in runs.iter().enumerate() {
                assert_eq!(run.after_broadcast, rank0_init, "rank {r} after broadcast");
                // Exact up to fp64 rounding: the per-shard means, summed and divided by W, equal
                // the whole-batch mean; only the order of additions differs (≈ 1e-16 relative).
                let d = max_abs_diff(&run.final_params, &reference);
                assert!(d < 1e-13, "world {world}, rank {r}: |ddp − single| = {d:e}");
                assert_eq!(
                    run.final_params, runs[0].final_params,
                    "ranks must agree bitwise"
                );
            }
            // Without compression the synced gradient is exactly Σ_r g_r / W (rank order).
            for step in 0..STEPS {
                let avg = exact_average(&runs, step);
                for run in &runs {
                    assert_eq!(run.synced_grads[step], avg);
                }
            }
        }
    }
    // The test can fail: a single rank's (unsynchronised) gradient is far from the average.
    let runs = train_ddp(2, Kind::Double, Compression::None, 25.0);
    assert!(max_abs_diff(&runs[0].local_grads[0], &runs[0].synced_grads[0]) > 1e-3);
}

/// A communicator that counts the all-reduces issued through it (to see when buckets start).
struct Counting {
    inner: LocalGroup,
    all_reduces: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Communicator for Counting {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<(), DdpError> {
        self.all_reduces
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.all_reduce_sum(t)
    }
    fn broadcast(&mut self, t: &mut Tensor) -> Result<(), DdpError> {
        self.inner.broadcast(t)
    }
    fn barrier(&mut self) -> Result<(), DdpError> {
        self.inner.barrier()
    }
    fn synchronize(&mut self) -> Result<(), DdpError> {
        self.inner.synchronize()
    }
}

struct OverlapRun {
    final_params: Vec<f64>,
    /// Per step: all-reduces issued before `sync_gradients` was called (i.e. during backward).
    during_backward: Vec<usize>,
    buckets: usize,
    /// The bucket plan before the first step and after it (re-planned by ready order).
    plan_before: Vec<Vec<String>>,
    plan_after: Vec<Vec<String>>,
}

/// DDP with gradient-ready hooks: `micro` accumulation micro-steps per step, the hooks armed
/// before the last one. The parameters are handed over in an order whose reverse is *not* the
/// backward order, so only the re-planning can put the first-ready gradients in bucket 0.
fn train_ddp_overlapped(world: usize, bucket_mb: f64, micro: i64) -> Vec<OverlapRun> {
    on_ranks(world, TIMEOUT, move |rank, group| {
        let p = params_from(&init(rank as u64), Kind::Double);
        let shuffled: Vec<(String, Tensor)> = [1, 3, 2, 0]
            .iter()
            .map(|&i| (p[i].0.clone(), p[i].1.shallow_clone()))
            .collect();
        let counter = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let comm = Counting {
            inner: group,
            all_reduces: counter.clone(),
        };
        let mut dp = DataParallel::new(comm, &shuffled, bucket_mb, Compression::None).unwrap();
        dp.enable_overlap().unwrap();
        assert!(dp.overlap_enabled());
        dp.broadcast_parameters().unwrap();
        let plan_before = dp.bucket_names().unwrap();
        let mut plan_after = Vec::new();
        let (xv, yv) = data();
        let shard = BATCH / world as i64;
        let part = shard / micro;
        let mut during_backward = Vec::new();
        for step in 0..STEPS {
            zero_grads(&p);
            for m in 0..micro {
                let rows = rank as i64 * shard + m * part;
                let x = Tensor::from_slice(&xv)
                    .view([BATCH, IN])
                    .narrow(0, rows, part);
                let y = Tensor::from_slice(&yv)
                    .view([BATCH, OUT])
                    .narrow(0, rows, part);
                if m == micro - 1 {
                    dp.prepare_backward().unwrap();
                }
                let before = counter.load(std::sync::atomic::Ordering::SeqCst);
                (loss(&p, &x, &y) / micro as f64).backward();
                if m == micro - 1 {
                    during_backward
                        .push(counter.load(std::sync::atomic::Ordering::SeqCst) - before);
                }
            }
            dp.sync_gradients().unwrap();
            sgd(&p);
            if step == 0 {
                plan_after = dp.bucket_names().unwrap();
            }
        }
        dp.parameter_checksum().unwrap();
        OverlapRun {
            final_params: all_values(&p),
            during_backward,
            buckets: dp.bucket_count().unwrap(),
            plan_before,
            plan_after,
        }
    })
}

#[test]
fn overlapped_sync_equals_sync_after_backward() {
    let reference = train_reference(Kind::Double);
    for world in [2, 4] {
        // 100 bytes: every parameter alone in its bucket; 25 MB: one bucket.
        for bucket_mb in [100.0 / nsa_ddp::bucket::MB, 25.0] {
            let after = train_ddp(world, Kind::Double, Compression::None, bucket_mb);
            let overlapped = train_ddp_overlapped(world, bucket_mb, 1);
            for (r, run) in overlapped.iter().enumerate() {
                // Per element the same sum and division: bitwise equal to the fallback path.
                assert_eq!(
                    run.final_params, after[r].final_params,
                    "world {world}, {bucket_mb} MB, rank {r}"
                );
                // Every bucket was started inside backward (the last one by the last hook).
                assert_eq!(run.during_backward, vec![run.buckets; STEPS], "rank {r}");
            }
            // With accumulation the hooks ignore the first micro-step and the result is still the
            // whole-batch gradient.
            for run in train_ddp_overlapped(world, bucket_mb, 2) {
                let d = max_abs_diff(&run.final_params, &reference);
                assert!(
                    d < 1e-13,
                    "world {world}, accumulation: |ddp − single| = {d:e}"
                );
            }
        }
    }
}

#[test]
fn buckets_are_replanned_in_the_order_gradients_become_ready() {
    let runs = train_ddp_overlapped(2, 100.0 / nsa_ddp::bucket::MB, 1);
    for run in &runs {
        // Handed over as [l1.bias, l2.bias, l2.weight, l1.weight]: reversed, l1.weight comes
        // first (and l1.bias in list order), although backward finishes layer 2's gradients
        // before layer 1's.
        assert_eq!(run.plan_before[0], vec!["l1.weight".to_string()]);
        assert!(
            run.plan_after[0][0].starts_with("l2."),
            "first bucket after re-planning: {:?}",
            run.plan_after
        );
        let mut names: Vec<String> = run.plan_after.concat();
        names.sort();
        assert_eq!(names, ["l1.bias", "l1.weight", "l2.bias", "l2.weight"]);
        assert_eq!(
            run.plan_after, runs[0].plan_after,
            "ranks share rank 0's plan"
        );
    }
}

#[test]
fn arming_before_an_accumulation_micro_step_is_an_error() {
    let out = on_ranks(1, TIMEOUT, |_, g| {
        let p = params_from(&init(0), Kind::Double);
        let mut dp = DataParallel::new(g, &p, 25.0, Compression::None).unwrap();
        dp.enable_overlap().unwrap();
        let x = Tensor::ones([2, IN], (Kind::Double, Device::Cpu));
        let y = Tensor::zeros([2, OUT], (Kind::Double, Device::Cpu));
        dp.prepare_backward().unwrap();
        loss(&p, &x, &y).backward();
        loss(&p, &x, &y).backward(); // the bucket was already reduced
        let wrong = dp.sync_gradients();
        // The next step, armed correctly, works again.
        zero_grads(&p);
        dp.prepare_backward().unwrap();
        loss(&p, &x, &y).backward();
        (wrong, dp.sync_gradients())
    });
    let (wrong, next) = &out[0];
    match wrong {
        Err(DdpError::Overlap { detail, .. }) => {
            assert!(detail.contains("accumulated twice"), "{detail}")
        }
        other => panic!("expected an overlap error, got {other:?}"),
    }
    assert!(next.is_ok(), "{next:?}");
}

fn exact_average(runs: &[RankRun], step: usize) -> Vec<f64> {
    let w = runs.len() as f64;
    let n = runs[0].local_grads[step].len();
    (0..n)
        .map(|i| runs.iter().map(|r| r.local_grads[step][i]).sum::<f64>() / w)
        .collect()
}

/// Checks the bound derived in `nsa_ddp::compress`:
/// |avg_compressed − ḡ| ≤ 1.04·u·Σ_r|g_r| + 2η  (W ≤ 8), per element, every step and rank.
/// Returns the largest error seen relative to its bound (to show the bound is not vacuous).
fn check_compression_bound(runs: &[RankRun], c: Compression) -> f64 {
    let u = c.unit_roundoff();
    let eta = c.underflow_error();
    let mut worst: f64 = 0.0;
    let mut any_error = false;
    for step in 0..STEPS {
        let avg = exact_average(runs, step);
        for (r, run) in runs.iter().enumerate() {
            for (i, (&got, &want)) in run.synced_grads[step].iter().zip(&avg).enumerate() {
                let mag: f64 = runs.iter().map(|q| q.local_grads[step][i].abs()).sum();
                let bound = 1.04 * u * mag + 2.0 * eta;
                let err = (got - want).abs();
                any_error |= err > 0.0;
                assert!(
                    err <= bound,
                    "{c}: step {step}, rank {r}, element {i}: error {err:e} > bound {bound:e}"
                );
                if bound > 0.0 {
                    worst = worst.max(err / bound);
                }
            }
        }
    }
    assert!(
        any_error,
        "{c}: no rounding at all — was the gradient really compressed?"
    );
    worst
}

#[test]
fn compressed_gradients_stay_within_the_derived_bound() {
    for kind in [Kind::Float, Kind::Double] {
        for c in [Compression::Bf16, Compression::Fp16] {
            for world in [2, 4] {
                let runs = train_ddp(world, kind, c, 25.0);
                // Casting in the hooks (during backward) does the same arithmetic.
                let overlapped = train_ddp_with(world, kind, c, 25.0, true);
                for (a, b) in runs.iter().zip(&overlapped) {
                    assert_eq!(a.final_params, b.final_params, "{c} W={world}: overlap");
                }
                let worst = check_compression_bound(&runs, c);
                eprintln!("{kind:?} {c} W={world}: worst error / bound = {worst:.3}");
                // The bound is tight to within a small factor (errors of a few ulps show up).
                assert!(
                    worst > 0.05,
                    "{c} W={world}: worst error/bound {worst} suspiciously small"
                );
                for run in &runs[1..] {
                    assert_eq!(
                        run.final_params, runs[0].final_params,
                        "ranks agree bitwise"
                    );
                }
            }
        }
    }
}

#[test]
fn bf16_keeps_the_range_fp16_overflows() {
    // bf16 keeps fp32's range: a 1e6 gradient survives. fp16 overflows to inf above 65504.
    for c in [Compression::Bf16, Compression::Fp16] {
        let got = on_ranks(2, TIMEOUT, move |_, g| {
            let p = Tensor::zeros([1], (Kind::Float, Device::Cpu)).set_requires_grad(true);
            let params = vec![("p".to_string(), p.shallow_clone())];
            let mut dp = DataParallel::new(g, &params, 1.0, c).unwrap();
            (&p * 1e6).sum(Kind::Float).backward();
            dp.sync_gradients().unwrap();
            flat(&p.grad())[0]
        });
        for v in got {
            match c {
                Compression::Fp16 => assert!(v.is_infinite(), "fp16 overflows at 1e6: {v}"),
                _ => assert!(
                    (v - 1e6).abs() <= 1e6 * 2f64.powi(-8),
                    "bf16 keeps 1e6: {v}"
                ),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Checksums, missing gradients, timeouts, parsing

#[test]
fn checksum_catches_a_desynced_rank() {
    // rank 1: two neighbouring elements swapped (same Σp and Σp²); rank 2: one element nudged.
    let out = on_ranks(4, TIMEOUT, |rank, g| {
        let p = params_from(&init(rank as u64), Kind::Float);
        let mut dp = DataParallel::new(g, &p, 25.0, Compression::None).unwrap();
        dp.broadcast_parameters().unwrap();
        let agreed = dp.parameter_checksum().map(|c| c.sum);
        tch::no_grad(|| {
            let w = p[0].1.detach();
            match rank {
                1 => {
                    let a = w.get(0).get(0).double_value(&[]);
                    let b = w.get(0).get(1).double_value(&[]);
                    let _ = w.get(0).get(0).fill_(b);
                    let _ = w.get(0).get(1).fill_(a);
                }
                2 => {
                    let _ = w.get(3).get(2).g_add_scalar_(1e-6);
                }
                _ => {}
            }
        });
        (agreed, dp.parameter_checksum())
    });
    let first = out[0].0.as_ref().unwrap();
    for (rank, (agreed, after)) in out.iter().enumerate() {
        assert_eq!(
            agreed.as_ref().unwrap(),
            first,
            "rank {rank}: equal after broadcast"
        );
        match after {
            Err(DdpError::ChecksumMismatch {
                differing,
                checksums,
                ..
            }) => {
                assert_eq!(differing, &vec![1, 2], "rank {rank}");
                assert_eq!(checksums.len(), 4);
                // The swap leaves the plain sums equal: only the weighted term catches it.
                assert_eq!(checksums[1].sum, checksums[0].sum);
                assert_ne!(checksums[1].weighted, checksums[0].weighted);
                let msg = after.as_ref().unwrap_err().to_string();
                assert!(msg.contains("[1, 2]"), "{msg}");
            }
            other => panic!("rank {rank}: expected a checksum mismatch, got {other:?}"),
        }
    }
}

#[test]
fn missing_gradient_is_reported_after_the_collectives() {
    let out = on_ranks(2, TIMEOUT, |rank, g| {
        let p = params_from(&init(0), Kind::Double);
        let mut dp = DataParallel::new(g, &p, 25.0, Compression::None).unwrap();
        // Rank 1 leaves l2.bias out of its loss; rank 0 uses everything.
        let x = Tensor::ones([2, IN], (Kind::Double, Device::Cpu));
        let out = x
            .linear(&p[0].1, Some(&p[1].1))
            .tanh()
            .linear::<&Tensor>(&p[2].1, None);
        let extra = if rank == 0 {
            p[3].1.sum(Kind::Double)
        } else {
            out.sum(Kind::Double) * 0.0
        };
        (out.sum(Kind::Double) + extra).backward();
        let r = dp.sync_gradients();
        (r, flat(&p[2].1.grad()))
    });
    assert!(out[0].0.is_ok());
    match &out[1].0 {
        Err(DdpError::MissingGradients { rank: 1, names }) => {
            assert_eq!(names, &vec!["l2.bias".to_string()])
        }
        other => panic!("expected MissingGradients, got {other:?}"),
    }
    // The other gradients were still averaged, identically on both ranks.
    assert_eq!(out[0].1, out[1].1);
}

#[test]
fn a_rank_that_never_arrives_times_out_the_others() {
    let timeout = Duration::from_millis(300);
    let start = Instant::now();
    let out = on_ranks(3, timeout, |rank, g| {
        if rank == 2 {
            drop(g); // never joins any collective
            return None;
        }
        let p = params_from(&init(0), Kind::Float);
        let mut dp = DataParallel::new(g, &p, 25.0, Compression::Bf16).unwrap();
        let first = dp.broadcast_parameters();
        let t0 = Instant::now();
        let later = dp.with_comm(|c| c.barrier()).unwrap();
        Some((first, later, t0.elapsed()))
    });
    let elapsed = start.elapsed();
    assert!(elapsed >= timeout, "{elapsed:?}");
    assert!(
        elapsed < timeout * 5,
        "took {elapsed:?} for a {timeout:?} timeout"
    );
    for (rank, r) in out.into_iter().enumerate().take(2) {
        let (first, later, later_time) = r.unwrap();
        match first {
            Err(DdpError::Timeout { missing, op, .. }) => {
                assert_eq!(missing, vec![2], "rank {rank}");
                assert_eq!(op, "broadcast");
            }
            other => panic!("rank {rank}: expected a timeout, got {other:?}"),
        }
        // The group is broken: later collectives fail at once with the same report.
        assert!(matches!(later, Err(DdpError::Timeout { ref missing, .. }) if missing == &vec![2]));
        assert!(later_time < Duration::from_millis(50), "{later_time:?}");
    }
}

#[test]
fn compression_parse_errors() {
    for bad in ["int8", "", "bf 16", "fp32"] {
        let err = bad.parse::<Compression>().unwrap_err();
        assert!(matches!(err, DdpError::UnknownCompression(ref s) if s == bad));
        let msg = err.to_string();
        assert!(msg.contains("none, bf16, fp16"), "{msg}");
    }
    assert_eq!("Fp16".parse::<Compression>().unwrap(), Compression::Fp16);
}

// ---------------------------------------------------------------------------------------------
// Rendezvous

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `rendezvous` for `ranks` (rank, world) on threads, peers first (they retry until rank
/// 0's store is up), and returns the results in the order given.
fn meet(
    cfg: &RendezvousConfig,
    ranks: &[(usize, usize)],
    payload: &[u8],
) -> Vec<Result<Vec<u8>, DdpError>> {
    let handles: Vec<_> = ranks
        .iter()
        .rev()
        .map(|&(rank, world)| {
            let (cfg, payload) = (cfg.clone(), payload.to_vec());
            std::thread::spawn(move || rendezvous(&cfg, rank, world, || Ok(payload)))
        })
        .collect();
    let mut out: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    out.reverse();
    out
}

#[test]
fn rendezvous_hands_the_id_to_every_rank() {
    let cfg = RendezvousConfig::new("127.0.0.1", free_port(), Duration::from_secs(10));
    let id: UniqueId = std::array::from_fn(|i| (i * 7 + 3) as u8);
    for r in meet(&cfg, &[(0, 4), (1, 4), (2, 4), (3, 4)], &id) {
        assert_eq!(r.unwrap(), id.to_vec());
    }
}

#[test]
fn rendezvous_through_a_store_the_launcher_hosts() {
    // As under torchrun: the launcher's store is up first, every rank is a client, and a second
    // rendezvous in another namespace of the same store (a restart) gets its own payload.
    let store = TcpStore::host("127.0.0.1", 0, Duration::from_secs(10)).unwrap();
    let cfg = RendezvousConfig::new("127.0.0.1", store.port(), Duration::from_secs(10))
        .with_store(StoreHost::Launcher)
        .with_namespace("attempt-0");
    for r in meet(&cfg, &[(0, 2), (1, 2)], b"first") {
        assert_eq!(r.unwrap(), b"first");
    }
    let cfg = cfg.with_namespace("attempt-1");
    for r in meet(&cfg, &[(0, 3), (1, 3), (2, 3)], b"second") {
        assert_eq!(r.unwrap(), b"second");
    }
}

#[test]
fn rendezvous_times_out_naming_the_missing_rank() {
    let port = free_port();
    let cfg = RendezvousConfig::new("127.0.0.1", port, Duration::from_millis(600));
    let start = Instant::now();
    // World of 3, rank 2 never comes.
    let results = meet(&cfg, &[(0, 3), (1, 3)], &[1u8; 128]);
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
    match &results[0] {
        Err(e @ DdpError::RendezvousTimeout { missing, .. }) => {
            assert_eq!(missing, &vec![2]);
            let msg = e.to_string();
            assert!(msg.contains("rank 0: rendezvous timed out after"), "{msg}");
            assert!(msg.contains("waiting for 1 of 2 peers"), "{msg}");
        }
        other => panic!("rank 0: {other:?}"),
    }
    // Rank 1 arrived, then waited for the payload in vain: it names rank 2 too, by its own
    // timeout or by rank 0's, which rank 0 leaves in the store before it closes it.
    match &results[1] {
        Err(e @ (DdpError::RendezvousTimeout { .. } | DdpError::Rendezvous { .. })) => {
            assert!(e.to_string().contains("not heard from: [2]"), "{e}")
        }
        other => panic!("rank 1: {other:?}"),
    }

    // A peer with no rank 0 at all: connect timeout, naming rank 0.
    let cfg = RendezvousConfig::new("127.0.0.1", free_port(), Duration::from_millis(500));
    let start = Instant::now();
    match rendezvous(&cfg, 1, 2, || Ok(vec![0u8; 128])) {
        Err(DdpError::RendezvousTimeout {
            rank: 1, missing, ..
        }) => assert_eq!(missing, vec![0]),
        other => panic!("peer alone: {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(4));
}

#[test]
fn rendezvous_rejects_a_wrong_world_size_at_once() {
    // Rank 1 thinks the world has 3 ranks, rank 0 says 2: both fail long before the timeout,
    // naming the rank and both sizes.
    let cfg = RendezvousConfig::new("127.0.0.1", free_port(), Duration::from_secs(20));
    let start = Instant::now();
    let results = meet(&cfg, &[(0, 2), (1, 3)], b"id");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    for (rank, r) in results.iter().enumerate() {
        match r {
            Err(DdpError::Rendezvous { detail, .. }) => assert!(
                detail.contains("rank 1 has world size 3, rank 0 has 2"),
                "rank {rank}: {detail}"
            ),
            other => panic!("rank {rank}: {other:?}"),
        }
    }
}

#[test]
fn rendezvous_rejects_a_rank_claimed_twice_and_a_taken_port() {
    let cfg = RendezvousConfig::new("127.0.0.1", free_port(), Duration::from_secs(20));
    let results = meet(&cfg, &[(0, 3), (1, 3), (1, 3)], b"id");
    assert!(results.iter().all(|r| r.is_err()), "{results:?}");
    let claimed = results
        .iter()
        .filter(|r| matches!(r, Err(DdpError::Rendezvous { detail, .. }) if detail.contains("two processes claim rank 1")))
        .count();
    assert_eq!(claimed, 3, "{results:?}");

    // Rank 0 cannot host where another store already listens (what happens under torchrun if
    // the agent store is not used).
    let other = TcpStore::host("127.0.0.1", 0, Duration::from_secs(10)).unwrap();
    let cfg = RendezvousConfig::new("127.0.0.1", other.port(), Duration::from_secs(10));
    match rendezvous(&cfg, 0, 2, || Ok(vec![1])) {
        Err(DdpError::Rendezvous { rank: 0, detail }) => {
            assert!(detail.contains("cannot host the store"), "{detail}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn rendezvous_checks_its_arguments_and_needs_no_store_alone() {
    let cfg = RendezvousConfig::new("127.0.0.1", free_port(), Duration::from_millis(100));
    assert!(matches!(
        rendezvous(&cfg, 2, 2, || Ok(vec![])),
        Err(DdpError::Invalid(_))
    ));
    assert_eq!(
        rendezvous(&cfg, 0, 1, || Ok(vec![5, 6])).unwrap(),
        vec![5, 6]
    );
}

#[test]
fn local_group_rejects_an_empty_world_and_serves_a_world_of_one() {
    assert!(matches!(
        LocalGroup::new(0, TIMEOUT),
        Err(DdpError::Invalid(_))
    ));
    let mut g = LocalGroup::new(1, TIMEOUT).unwrap().pop().unwrap();
    let mut t = Tensor::from_slice(&[1.5f64, -2.0]);
    g.all_reduce_sum(&mut t).unwrap();
    g.broadcast(&mut t).unwrap();
    g.barrier().unwrap();
    assert_eq!(flat(&t), vec![1.5, -2.0]);
}

// ---------------------------------------------------------------------------------------------
// NCCL on GPUs (ignored: CI has no GPU). Run on a GPU host with
//   cargo test -p nsa-ddp --test ddp -- --ignored nccl_on_gpus --nocapture
// One thread per visible GPU (at most 4), rank r on cuda:r.

/// Compression × overlap settings the GPU test runs.
const GPU_SETTINGS: [(Compression, bool); 4] = [
    (Compression::None, false),
    (Compression::Bf16, false),
    (Compression::None, true),
    (Compression::Bf16, true),
];

#[test]
#[ignore = "needs CUDA GPUs and NCCL"]
fn nccl_on_gpus() {
    use nsa_ddp::{rendezvous_nccl, NcclGroup};
    let backend = nsa_sys::cuda::load_backend().expect("load libtorch's CUDA backend");
    if !backend.has_gpu() {
        eprintln!("skipped: no GPU ({backend})");
        return;
    }
    let world = tch::Cuda::device_count().clamp(1, 4) as usize;
    let cfg = RendezvousConfig::new("127.0.0.1", free_port(), Duration::from_secs(60));
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let id = rendezvous_nccl(&cfg, rank, world).unwrap();
                let mut g = NcclGroup::new(rank, world, &id, rank)
                    .unwrap()
                    .with_timeout(Duration::from_secs(60));
                let dev = Device::Cuda(rank);
                let r = rank as f64;
                let w = world as f64;
                // Sum in every dtype NCCL gets from us.
                for kind in [
                    Kind::Float,
                    Kind::Double,
                    Kind::Half,
                    Kind::BFloat16,
                    Kind::Int64,
                ] {
                    let mut t = (Tensor::ones([1000], (kind, dev)) * (r + 1.0)).to_kind(kind);
                    g.all_reduce_sum(&mut t).unwrap();
                    g.synchronize().unwrap();
                    let v = flat(&t.to_device(Device::Cpu));
                    let want = w * (w + 1.0) / 2.0;
                    assert!(v.iter().all(|&x| x == want), "{kind:?}: {} != {want}", v[0]);
                }
                // Broadcast from rank 0.
                let mut b = Tensor::full([7], r + 5.0, (Kind::Float, dev));
                g.broadcast(&mut b).unwrap();
                g.barrier().unwrap();
                assert_eq!(flat(&b.to_device(Device::Cpu)), vec![5.0; 7]);
                // Wrong device and non-contiguous tensors are refused, not sent.
                let mut cpu = Tensor::zeros([3], (Kind::Float, Device::Cpu));
                assert!(matches!(g.all_reduce_sum(&mut cpu), Err(DdpError::Nccl(_))));
                // The front on GPU: broadcast, compressed and plain gradient averaging, checksum.
                let mut results = Vec::new();
                for (c, overlap) in GPU_SETTINGS {
                    let p = params_from(&init(rank as u64), Kind::Float);
                    let p: Vec<(String, Tensor)> = p
                        .into_iter()
                        .map(|(n, t)| (n, t.detach().to_device(dev).set_requires_grad(true)))
                        .collect();
                    let mut dp = DataParallel::new(g, &p, 100.0 / nsa_ddp::bucket::MB, c).unwrap();
                    dp.broadcast_parameters().unwrap();
                    assert_eq!(
                        all_values(&p),
                        init(0)
                            .iter()
                            .flatten()
                            .map(|&x| x as f32 as f64)
                            .collect::<Vec<_>>()
                    );
                    let (xv, yv) = data();
                    let x = Tensor::from_slice(&xv)
                        .to_kind(Kind::Float)
                        .view([BATCH, IN])
                        .to_device(dev);
                    let y = Tensor::from_slice(&yv)
                        .to_kind(Kind::Float)
                        .view([BATCH, OUT])
                        .to_device(dev);
                    let shard = BATCH / world as i64;
                    let (x, y) = (
                        x.narrow(0, rank as i64 * shard, shard),
                        y.narrow(0, rank as i64 * shard, shard),
                    );
                    if overlap {
                        // Hooks on the CUDA autograd thread start the all-reduces in backward.
                        dp.enable_overlap().unwrap();
                        dp.prepare_backward().unwrap();
                    }
                    loss(&p, &x, &y).backward();
                    // With overlap, buckets are in flight now; .grad still holds this rank's own
                    // gradient (the hooks only read it; sync_gradients writes the average).
                    let local = all_grads(&p);
                    let took = dp.sync_gradients().unwrap();
                    let synced = all_grads(&p);
                    dp.parameter_checksum().unwrap();
                    results.push((local, synced, took));
                    g = dp.into_comm().unwrap();
                }
                results
            })
        })
        .collect();
    let per_rank: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (ci, (c, overlap)) in GPU_SETTINGS.into_iter().enumerate() {
        let n = per_rank[0][ci].0.len();
        let u = c.unit_roundoff();
        for i in 0..n {
            let sum: f64 = per_rank.iter().map(|r| r[ci].0[i]).sum();
            let mag: f64 = per_rank.iter().map(|r| r[ci].0[i].abs()).sum();
            let avg = sum / world as f64;
            // fp32 sums on the GPU: ring order differs from ours, allow fp32 rounding.
            let bound = 1.04 * u * mag + 4.0 * f32::EPSILON as f64 * mag;
            for r in &per_rank {
                assert!(
                    (r[ci].1[i] - avg).abs() <= bound,
                    "{c} element {i}: {} vs {avg}",
                    r[ci].1[i]
                );
            }
        }
        eprintln!(
            "nccl {c}, overlap {overlap}: world {world}, sync_gradients took {:?} on rank 0",
            per_rank[0][ci].2
        );
    }
}

/// The timeout path with collectives on NCCL's own stream: a collective queued behind a long run
/// of default-stream kernels cannot finish within a 1 ms timeout, so `synchronize` must abort
/// the communicator and return at once, and the group must refuse later work. Run with
///   cargo test -p nsa-ddp --test ddp -- --ignored nccl_timeout_on_gpu --nocapture
#[test]
#[ignore = "needs a CUDA GPU and NCCL"]
fn nccl_timeout_on_gpu() {
    use nsa_ddp::{rendezvous_nccl, NcclGroup};
    let backend = nsa_sys::cuda::load_backend().expect("load libtorch's CUDA backend");
    if !backend.has_gpu() {
        eprintln!("skipped: no GPU ({backend})");
        return;
    }
    let cfg = RendezvousConfig::new("127.0.0.1", free_port(), Duration::from_secs(60));
    let id = rendezvous_nccl(&cfg, 0, 1).unwrap();
    let mut g = NcclGroup::new(0, 1, &id, 0)
        .unwrap()
        .with_timeout(Duration::from_millis(1));
    let dev = Device::Cuda(0);
    let a = Tensor::ones([8192, 8192], (Kind::Float, dev));
    let mut busy = a.shallow_clone();
    for _ in 0..40 {
        // About 40 TFLOP of fp32 matmuls: tens of ms on any current GPU.
        busy = busy.matmul(&a) / 8192.0;
    }
    let mut t = busy.narrow(0, 0, 1).contiguous();
    g.all_reduce_sum(&mut t).unwrap();
    let start = Instant::now();
    let r = g.synchronize();
    let took = start.elapsed();
    eprintln!("synchronize returned after {took:?}: {r:?}");
    assert!(
        matches!(&r, Err(DdpError::Nccl(e)) if e.to_string().contains("not complete")),
        "{r:?}"
    );
    assert!(took < Duration::from_secs(5), "abort took {took:?}");
    assert!(
        g.all_reduce_sum(&mut t).is_err(),
        "an aborted group refuses work"
    );
    tch::Cuda::synchronize(0);
}
