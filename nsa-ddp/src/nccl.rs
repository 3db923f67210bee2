//! The NCCL backend ([`NcclGroup`]) and [`rendezvous_nccl`], which hands rank 0's NCCL unique id
//! to the other ranks through the store rendezvous ([`mod@crate::rendezvous`]).
use std::sync::Arc;
use std::time::Duration;

use nsa_sys::nccl::{Nccl, NcclComm, UniqueId, UNIQUE_ID_BYTES};
use tch::{Device, Kind, Tensor};

use crate::{rendezvous, Communicator, DdpError, RendezvousConfig};

/// Default collective timeout of [`NcclGroup`] (as PyTorch's NCCL process group: 10 minutes).
pub const DEFAULT_NCCL_TIMEOUT: Duration = Duration::from_secs(600);

/// One rank of an NCCL process group on one CUDA device.
///
/// Collectives run on the communicator's own CUDA stream, after the work enqueued on the legacy
/// default stream (where every libtorch op of a `tch` program runs) before the call;
/// [`Communicator::join`] makes later default-stream work wait for them (see `nsa_sys::nccl`).
/// [`Communicator::synchronize`] waits for the stream, checks `ncclCommGetAsyncError`, and past the
/// timeout aborts the communicator and returns [`DdpError::Nccl`] with a timeout inside. Tensors
/// must be contiguous, on this group's device, of dtype f32, f64, f16, bf16 or i64.
#[derive(Debug)]
pub struct NcclGroup {
    comm: NcclComm,
    timeout: Duration,
    scratch: Option<Tensor>,
}

impl NcclGroup {
    /// Joins the group as `rank` of `world` on CUDA device `device`, with the unique id that rank
    /// 0 made (see [`rendezvous_nccl`]). Blocks until all ranks have joined. Collective timeout:
    /// [`DEFAULT_NCCL_TIMEOUT`]; change it with [`NcclGroup::with_timeout`].
    pub fn new(
        rank: usize,
        world: usize,
        unique_id: &UniqueId,
        device: usize,
    ) -> Result<Self, DdpError> {
        let nccl = Arc::new(Nccl::open().map_err(nsa_sys::nccl::NcclError::from)?);
        let comm = NcclComm::init(nccl, rank, world, unique_id, device)?;
        Ok(NcclGroup {
            comm,
            timeout: DEFAULT_NCCL_TIMEOUT,
            scratch: None,
        })
    }

    /// Sets the time [`Communicator::synchronize`] waits before aborting.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The CUDA device of this rank.
    pub fn device(&self) -> Device {
        Device::Cuda(self.comm.device())
    }
}

impl Communicator for NcclGroup {
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn world_size(&self) -> usize {
        self.comm.world_size()
    }
    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<(), DdpError> {
        Ok(self.comm.all_reduce_sum(t)?)
    }
    fn broadcast(&mut self, t: &mut Tensor) -> Result<(), DdpError> {
        Ok(self.comm.broadcast(t, 0)?)
    }
    fn barrier(&mut self) -> Result<(), DdpError> {
        let device = self.device();
        if self.scratch.is_none() {
            self.scratch = Some(Tensor::f_zeros([1], (Kind::Float, device))?);
        }
        let scratch = self.scratch.as_mut().ok_or_else(|| DdpError::Broken {
            rank: self.comm.rank(),
            reason: "barrier scratch buffer missing".into(),
        })?;
        self.comm.all_reduce_sum(scratch)?;
        self.synchronize()
    }
    fn join(&mut self) -> Result<(), DdpError> {
        Ok(self.comm.join()?)
    }
    fn synchronize(&mut self) -> Result<(), DdpError> {
        Ok(self.comm.synchronize(self.timeout)?)
    }
}

/// [`rendezvous()`] with rank 0's id from `ncclGetUniqueId` as the payload: what a trainer calls
/// before [`NcclGroup::new`].
pub fn rendezvous_nccl(
    cfg: &RendezvousConfig,
    rank: usize,
    world: usize,
) -> Result<UniqueId, DdpError> {
    let bytes = rendezvous(cfg, rank, world, || {
        let nccl = Nccl::open().map_err(nsa_sys::nccl::NcclError::from)?;
        Ok(nccl.unique_id()?.to_vec())
    })?;
    UniqueId::try_from(bytes.as_slice()).map_err(|_| DdpError::Rendezvous {
        rank,
        detail: format!(
            "the NCCL id from rank 0 has {} bytes, expected {UNIQUE_ID_BYTES}",
            bytes.len()
        ),
    })
}
