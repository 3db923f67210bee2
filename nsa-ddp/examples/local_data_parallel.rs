//! Data parallelism with nsa-ddp, on the CPU: two ranks as two threads of one process
//! (`LocalGroup`), each with its own copy of a small model and its own half of every batch.
//! After each step both ranks hold the same parameters as one process training on the whole
//! batch would. With GPUs, one process per GPU uses `rendezvous_nccl` and `NcclGroup` instead;
//! the rest is the same.
//!
//! Run: `cargo run -p nsa-ddp --example local_data_parallel`.
use std::time::Duration;

use nsa_ddp::{Compression, DataParallel, DdpError, LocalGroup};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// One rank's training loop: `steps` steps of least squares on its shard of a fixed batch.
fn rank_main(rank: usize, group: LocalGroup, steps: usize) -> Result<Vec<f64>, DdpError> {
    let vs = nn::VarStore::new(Device::Cpu);
    // Ranks start from different random weights on purpose: broadcast_parameters fixes that.
    tch::manual_seed(rank as i64);
    let model = nn::seq()
        .add(nn::linear(vs.root() / "l1", 8, 32, Default::default()))
        .add_fn(|x| x.tanh())
        .add(nn::linear(vs.root() / "l2", 32, 1, Default::default()));
    // Same names and order on every rank: sort the VarStore's map by name.
    let mut params: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    let mut dp = DataParallel::new(group, &params, 1.0, Compression::None)?;
    dp.broadcast_parameters()?;
    let mut opt = nn::Sgd::default()
        .build(&vs, 0.1)
        .map_err(DdpError::Torch)?;

    // The whole batch is the same on every rank (computed, not drawn: the threads share
    // libtorch's global RNG); each rank takes its half.
    let x = Tensor::f_arange(64 * 8, (Kind::Float, Device::Cpu))?
        .f_mul_scalar(0.37)?
        .f_sin()?
        .f_reshape([64, 8])?;
    let y = x.f_sum_dim_intlist(1, true, Kind::Float)?.f_cos()?;
    let world = dp.world_size() as i64;
    let shard = 64 / world;
    let (x, y) = (
        x.f_narrow(0, rank as i64 * shard, shard)?,
        y.f_narrow(0, rank as i64 * shard, shard)?,
    );
    let mut losses = Vec::new();
    for _ in 0..steps {
        opt.zero_grad();
        // Each rank's loss is the mean over its own examples; averaging gradients over ranks
        // gives the gradient of the mean over the whole batch.
        let loss = model.forward(&x).f_mse_loss(&y, tch::Reduction::Mean)?;
        loss.f_backward()?;
        dp.sync_gradients()?;
        opt.step();
        losses.push(loss.f_double_value(&[])?);
    }
    // Fails on every rank if any rank's parameters drifted from rank 0's.
    let checksum = dp.parameter_checksum()?;
    println!("rank {rank}: parameters agree across ranks (checksum {checksum:?})");
    Ok(losses)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let world = 2;
    let groups = LocalGroup::new(world, Duration::from_secs(30))?;
    let handles: Vec<_> = groups
        .into_iter()
        .enumerate()
        .map(|(rank, group)| std::thread::spawn(move || rank_main(rank, group, 20)))
        .collect();
    let mut per_rank = Vec::new();
    for h in handles {
        per_rank.push(h.join().map_err(|_| "a rank panicked")??);
    }
    for (step, (a, b)) in per_rank[0].iter().zip(&per_rank[1]).enumerate().step_by(5) {
        println!("step {step:2}: rank 0 shard loss {a:.4}, rank 1 shard loss {b:.4}");
    }
    Ok(())
}
