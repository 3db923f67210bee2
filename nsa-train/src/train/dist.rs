//! The data-parallel side of a run: gradient sync, parameter broadcast, checksums, and the stop
//! request every rank agrees on.
use anyhow::{ensure, Context, Result};
use tch::{Device, Tensor};

use crate::config::{DistEnv, TrainConfig};
use crate::signals::StopRequest;

pub(super) struct Dist {
    pub(super) dp: nsa_ddp::DataParallel<Box<dyn nsa_ddp::Communicator>>,
    pub(super) world: usize,
}

impl Dist {
    pub(super) fn new(
        env: &DistEnv,
        cfg: &TrainConfig,
        device: Device,
        params: &[(String, Tensor)],
    ) -> Result<Self> {
        let timeout = std::time::Duration::from_secs_f64(cfg.fast.ddp_timeout_s);
        let comm: Box<dyn nsa_ddp::Communicator> = if device.is_cuda() {
            let rdv = env.rendezvous(timeout);
            let id = nsa_ddp::rendezvous_nccl(&rdv, env.rank, env.world).with_context(|| {
                format!(
                    "rank {}: rendezvous at {}:{}",
                    env.rank, env.master_addr, env.master_port
                )
            })?;
            Box::new(
                nsa_ddp::NcclGroup::new(env.rank, env.world, &id, env.local_rank)?
                    .with_timeout(timeout),
            )
        } else {
            ensure!(
                env.world == 1,
                "data parallel across {} processes needs CUDA GPUs (NCCL); on the CPU only world size 1 (the in-process backend) runs",
                env.world
            );
            Box::new(
                nsa_ddp::LocalGroup::new(1, timeout)?
                    .pop()
                    .context("the in-process backend made no rank")?,
            )
        };
        let compression = cfg.fast.ddp_compress;
        let mut dp = nsa_ddp::DataParallel::new(comm, params, cfg.fast.ddp_bucket_mb, compression)?;
        if cfg.fast.ddp_overlap {
            dp.enable_overlap()?;
        }
        Ok(Dist {
            dp,
            world: env.world,
        })
    }

    /// Sums `values` over ranks (one small all-reduce on `device`).
    pub(super) fn sum_over_ranks(&mut self, values: &[f64], device: Device) -> Result<Vec<f64>> {
        let mut t = Tensor::f_from_slice(values)?.f_to_device(device)?;
        self.dp.with_comm(|c| -> Result<(), nsa_ddp::DdpError> {
            c.all_reduce_sum(&mut t)?;
            c.synchronize()
        })??;
        Ok(Vec::<f64>::try_from(t.f_to_device(Device::Cpu)?)?)
    }
}

/// The stop request every rank agrees on: in a data-parallel run a request on any rank stops
/// all of them at the same point (a rank that stopped alone would leave the others waiting in a
/// collective), at the cost of one tiny all-reduce.
pub(super) fn agreed_stop(
    stop: &StopRequest,
    dist: Option<&mut Dist>,
    device: Device,
) -> Result<Option<i32>> {
    let local = stop.signal();
    let Some(d) = dist else {
        return Ok(local);
    };
    let any = d.sum_over_ranks(&[f64::from(u8::from(local.is_some()))], device)?[0] > 0.0;
    if !any {
        return Ok(None);
    }
    // Another rank's request: the launcher forwards SIGTERM, so that is what this rank reports.
    let sig = local.unwrap_or(signal_hook::consts::SIGTERM);
    stop.request(sig);
    Ok(Some(sig))
}
