//! The data-parallel front: [`DataParallel`].
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use crate::{Communicator, Compression, DdpError, GradBuckets};

/// A fingerprint of one rank's parameters: `Σ p`, `Σ p²` and `Σ_k (k+1) Σ_j p_kj·(1 + j mod 97)`
/// over parameters `k` (in the order given to [`DataParallel::new`]) and their elements `j`, all
/// accumulated in f64. The last term catches swapped parameters and shifted elements that the first
/// two miss. Ranks with bitwise-equal parameters on the same kind of device compute equal
/// checksums (libtorch's reductions are deterministic for a given shape and device).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Checksum {
    pub sum: f64,
    pub sum_sq: f64,
    pub weighted: f64,
}

impl Checksum {
    fn as_array(self) -> [f64; 3] {
        [self.sum, self.sum_sq, self.weighted]
    }

    fn same(&self, other: &Checksum) -> bool {
        self.as_array()
            .iter()
            .zip(other.as_array())
            .all(|(a, b)| *a == b || (a.is_nan() && b.is_nan()))
    }
}

/// Data parallelism over a [`Communicator`]: parameter broadcast, bucketed gradient averaging
/// with optional compression, and a cross-rank parameter check.
///
/// Every rank must create it with the same parameter list (same names, shapes, dtypes, order) and
/// the same `bucket_mb` and `compression`, and call the collective methods in the same order.
#[derive(Debug)]
pub struct DataParallel<C: Communicator> {
    comm: C,
    buckets: GradBuckets,
    compression: Compression,
    /// Per bucket: the persistent wire-dtype buffer when compression changes the dtype.
    wire: Vec<Option<Tensor>>,
}

impl<C: Communicator> DataParallel<C> {
    /// Plans gradient buckets of at most `bucket_mb` MiB over `params` and allocates the flat and
    /// wire buffers. Nothing is communicated yet.
    ///
    /// `params` are the trainable parameters with their names, in the *same order on every rank*,
    /// ideally creation (forward) order so that the reversed list follows backward. tch's
    /// `VarStore::variables()` is a `HashMap`: sort it by name (deterministic, fine for
    /// correctness) or keep the order in which the model created its parameters.
    pub fn new(
        comm: C,
        params: &[(String, Tensor)],
        bucket_mb: f64,
        compression: Compression,
    ) -> Result<Self, DdpError> {
        let buckets = GradBuckets::new(params, bucket_mb)?;
        let wire = buckets
            .buckets()
            .iter()
            .map(|b| {
                let kind = compression.wire_kind(b.kind());
                (kind != b.kind())
                    .then(|| tch::no_grad(|| Tensor::zeros([b.numel()], (kind, b.device()))))
            })
            .collect();
        Ok(DataParallel {
            comm,
            buckets,
            compression,
            wire,
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// The communicator.
    pub fn comm(&self) -> &C {
        &self.comm
    }

    /// The communicator, mutable (for the caller's own collectives, e.g. averaging a loss).
    pub fn comm_mut(&mut self) -> &mut C {
        &mut self.comm
    }

    /// Gives the communicator back (e.g. to build another front over other parameters).
    pub fn into_comm(self) -> C {
        self.comm
    }

    /// The bucket plan.
    pub fn buckets(&self) -> &GradBuckets {
        &self.buckets
    }

    /// The gradient compression in use.
    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// Overwrites every rank's parameters with rank 0's (bucket by bucket, in the parameters'
    /// own dtype: no compression), then waits for completion. Call once after building the model
    /// and after loading a checkpoint, before the first step.
    pub fn broadcast_parameters(&mut self) -> Result<(), DdpError> {
        for i in 0..self.buckets.buckets().len() {
            self.buckets.pack_values(i);
            self.comm
                .broadcast(self.buckets.buckets_mut()[i].flat_mut())?;
            self.buckets.unpack_values(i);
        }
        self.comm.synchronize()
    }

    /// Replaces every parameter's gradient by the average over ranks, bucket by bucket: pack the
    /// gradients into the flat buffer, cast to the wire dtype (compression), all-reduce (sum), cast
    /// back, divide by the world size, unpack. Returns the wall time spent, including waiting for
    /// the collectives to complete. Call after `backward()` and before the optimizer step.
    ///
    /// A parameter without a gradient on this rank contributes zeros; the collectives still run on
    /// every rank, and the call then fails with [`DdpError::MissingGradients`] naming it (as
    /// PyTorch DDP does without `find_unused_parameters`).
    pub fn sync_gradients(&mut self) -> Result<Duration, DdpError> {
        let start = Instant::now();
        let world = self.comm.world_size() as f64;
        let mut missing = Vec::new();
        for i in 0..self.buckets.buckets().len() {
            missing.extend(self.buckets.pack(i));
            let flat = self.buckets.buckets_mut()[i].flat_mut();
            tch::no_grad(|| -> Result<(), DdpError> {
                match &mut self.wire[i] {
                    None => self.comm.all_reduce_sum(flat)?,
                    Some(wire) => {
                        wire.f_copy_(flat)?;
                        self.comm.all_reduce_sum(wire)?;
                        flat.f_copy_(wire)?;
                    }
                }
                let _ = flat.f_div_scalar_(world)?;
                Ok(())
            })?;
            self.buckets.unpack(i);
        }
        self.comm.synchronize()?;
        if !missing.is_empty() {
            return Err(DdpError::MissingGradients {
                rank: self.comm.rank(),
                names: missing,
            });
        }
        Ok(start.elapsed())
    }

    /// This rank's parameter [`Checksum`], without communicating.
    pub fn local_checksum(&self) -> Result<Checksum, DdpError> {
        tch::no_grad(|| {
            let mut c = Checksum {
                sum: 0.0,
                sum_sq: 0.0,
                weighted: 0.0,
            };
            for (k, (_, p)) in self.buckets.params().iter().enumerate() {
                let v = p.detach().f_to_kind(Kind::Double)?.f_reshape([-1])?;
                let ramp = Tensor::f_arange(v.numel() as i64, (Kind::Double, v.device()))?
                    .f_fmod(97)?
                    .f_add_scalar(1.0)?;
                c.sum += v.f_sum(Kind::Double)?.f_double_value(&[])?;
                c.sum_sq += (&v * &v).f_sum(Kind::Double)?.f_double_value(&[])?;
                c.weighted +=
                    (k + 1) as f64 * (&v * &ramp).f_sum(Kind::Double)?.f_double_value(&[])?;
            }
            Ok(c)
        })
    }

    /// Computes every rank's [`Checksum`], shares them (one all-reduce of a `[world, 3]` f64
    /// table in which each rank fills its own row) and compares them with rank 0's. Returns this
    /// rank's checksum when all agree, else [`DdpError::ChecksumMismatch`] naming the ranks that
    /// differ — on every rank, so all of them stop together.
    pub fn parameter_checksum(&mut self) -> Result<Checksum, DdpError> {
        let mine = self.local_checksum()?;
        let world = self.comm.world_size();
        let rank = self.comm.rank();
        let device = self
            .buckets
            .buckets()
            .first()
            .map(|b| b.device())
            .unwrap_or(Device::Cpu);
        let mut row = vec![0.0f64; world * 3];
        row[rank * 3..rank * 3 + 3].copy_from_slice(&mine.as_array());
        let mut table = Tensor::from_slice(&row).to_device(device);
        self.comm.all_reduce_sum(&mut table)?;
        self.comm.synchronize()?;
        let all = Vec::<f64>::try_from(table.to_device(Device::Cpu))?;
        let checksums: Vec<Checksum> = all
            .chunks(3)
            .map(|c| Checksum {
                sum: c[0],
                sum_sq: c[1],
                weighted: c[2],
            })
            .collect();
        let differing: Vec<usize> = (1..world)
            .filter(|&r| !checksums[r].same(&checksums[0]))
            .collect();
        if differing.is_empty() {
            Ok(mine)
        } else {
            Err(DdpError::ChecksumMismatch {
                rank,
                differing,
                checksums,
            })
        }
    }
}
