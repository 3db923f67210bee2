//! The data-parallel front: [`DataParallel`].
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use nsa_sys::autograd::GradReadyHooks;
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
/// with optional compression (after backward, or overlapped with it), and a cross-rank
/// parameter check.
///
/// Every rank must create it with the same parameter list (same names, shapes, dtypes, order) and
/// the same `bucket_mb` and `compression`, and call the collective methods in the same order.
///
/// # Overlap with backward
///
/// After [`DataParallel::enable_overlap`], gradient-ready hooks (`nsa_sys::autograd`) see each
/// parameter's gradient become final during backward; when every parameter of the next bucket
/// (in bucket order, the same on every rank) is ready, the hook packs the bucket and starts its
/// all-reduce while backward goes on computing the remaining gradients. Arm them with
/// [`DataParallel::prepare_backward`] right before the backward pass whose gradients are final
/// (the last micro-step when accumulating); [`DataParallel::sync_gradients`] then reduces the
/// buckets that are left and finishes. Without arming, `sync_gradients` does all the work after
/// backward (the fallback path): the same arithmetic, so the same result.
///
/// The first armed backward also records the order in which gradients became ready; rank 0's
/// order is broadcast and the buckets are re-planned in it (as PyTorch DDP rebuilds its buckets
/// after the first iteration), so that later steps can start reducing early.
#[derive(Debug)]
pub struct DataParallel<C: Communicator + 'static> {
    // Declared first so that it drops first: the hooks go before the state they point to.
    hooks: Option<GradReadyHooks>,
    core: Arc<Mutex<Core<C>>>,
    rank: usize,
    world: usize,
    compression: Compression,
}

#[derive(Debug)]
struct Core<C> {
    comm: C,
    buckets: GradBuckets,
    compression: Compression,
    /// Per bucket: the persistent wire-dtype buffer when compression changes the dtype.
    wire: Vec<Option<Tensor>>,
    /// Per parameter: its bucket.
    bucket_of: Vec<usize>,
    step: StepState,
    /// Re-plan the buckets by the ready order after the next armed step.
    rebuild_pending: bool,
}

/// What one sync (one optimizer step) has done so far.
#[derive(Debug, Default)]
struct StepState {
    /// Hooks act only while armed.
    armed: bool,
    /// Per parameter: its gradient became ready in this armed backward.
    ready: Vec<bool>,
    /// Per bucket: parameters whose gradient is not ready yet.
    waiting: Vec<usize>,
    /// Buckets `0 .. launched` have been packed and their all-reduce issued, in order.
    launched: usize,
    /// Parameters in the order their gradients became ready.
    order: Vec<usize>,
    /// Parameters that had no gradient when their bucket was packed.
    missing: Vec<String>,
    /// The first error a hook met; reported by `sync_gradients`.
    error: Option<DdpError>,
}

impl<C: Communicator> Core<C> {
    fn new(comm: C, buckets: GradBuckets, compression: Compression) -> Result<Self, DdpError> {
        let mut core = Core {
            comm,
            buckets,
            compression,
            wire: Vec::new(),
            bucket_of: Vec::new(),
            step: StepState::default(),
            rebuild_pending: false,
        };
        core.index_buckets()?;
        Ok(core)
    }

    /// Wire buffers and the parameter → bucket map for the current plan.
    fn index_buckets(&mut self) -> Result<(), DdpError> {
        let compression = self.compression;
        self.wire = self
            .buckets
            .buckets()
            .iter()
            .map(|b| {
                let kind = compression.wire_kind(b.kind());
                (kind != b.kind())
                    .then(|| tch::no_grad(|| Tensor::f_zeros([b.numel()], (kind, b.device()))))
                    .transpose()
            })
            .collect::<Result<_, _>>()?;
        self.bucket_of = vec![0; self.buckets.params().len()];
        for (i, b) in self.buckets.buckets().iter().enumerate() {
            for e in b.entries() {
                self.bucket_of[e.param] = i;
            }
        }
        Ok(())
    }

    /// Where the buffers live (collective scratch tensors go there too).
    fn device(&self) -> Device {
        self.buckets
            .buckets()
            .first()
            .map(|b| b.device())
            .unwrap_or(Device::Cpu)
    }

    /// Clears the per-step state; `armed` says whether hooks may launch buckets.
    fn reset(&mut self, armed: bool) {
        let n = self.buckets.params().len();
        self.step = StepState {
            armed,
            ready: vec![false; n],
            waiting: self
                .buckets
                .buckets()
                .iter()
                .map(|b| b.entries().len())
                .collect(),
            launched: 0,
            order: Vec::with_capacity(n),
            missing: Vec::new(),
            error: None,
        };
    }

    /// Packs bucket `i`, casts it to the wire dtype and issues its all-reduce.
    fn launch(&mut self, i: usize) -> Result<(), DdpError> {
        self.step.missing.extend(self.buckets.pack(i)?);
        let flat = self.buckets.buckets_mut()[i].flat_mut();
        tch::no_grad(|| match &mut self.wire[i] {
            None => self.comm.all_reduce_sum(flat),
            Some(wire) => {
                wire.f_copy_(flat)?;
                self.comm.all_reduce_sum(wire)
            }
        })
    }

    /// Launches buckets in order while the next one is complete.
    fn launch_ready(&mut self) -> Result<(), DdpError> {
        while self.step.launched < self.step.waiting.len()
            && self.step.waiting[self.step.launched] == 0
        {
            self.launch(self.step.launched)?;
            self.step.launched += 1;
        }
        Ok(())
    }

    /// The hook: parameter `param`'s gradient is final.
    fn on_ready(&mut self, param: usize) {
        if !self.step.armed || self.step.error.is_some() {
            return;
        }
        if self.step.ready[param] {
            let name = &self.buckets.params()[param].0;
            self.step.error = Some(DdpError::Overlap {
                rank: self.comm.rank(),
                detail: format!(
                    "the gradient of {name} was accumulated twice after prepare_backward (arm \
                     only the last backward before sync_gradients)"
                ),
            });
            return;
        }
        self.step.ready[param] = true;
        self.step.order.push(param);
        self.step.waiting[self.bucket_of[param]] -= 1;
        if let Err(e) = self.launch_ready() {
            self.step.error = Some(e);
        }
    }

    /// Launches what is left, waits for every bucket, averages and unpacks.
    fn finish(&mut self) -> Result<(), DdpError> {
        let armed = self.step.armed;
        if armed {
            self.step.armed = false;
        } else {
            // The fallback path: nothing was launched during backward.
            self.reset(false);
        }
        if let Some(e) = self.step.error.take() {
            return Err(e);
        }
        for i in self.step.launched..self.buckets.buckets().len() {
            self.launch(i)?;
        }
        self.step.launched = self.buckets.buckets().len();
        self.comm.join()?;
        let world = self.comm.world_size() as f64;
        for i in 0..self.buckets.buckets().len() {
            let flat = self.buckets.buckets_mut()[i].flat_mut();
            tch::no_grad(|| -> Result<(), DdpError> {
                if let Some(wire) = &self.wire[i] {
                    flat.f_copy_(wire)?;
                }
                let _ = flat.f_div_scalar_(world)?;
                Ok(())
            })?;
            self.buckets.unpack(i)?;
        }
        self.comm.synchronize()?;
        let missing = std::mem::take(&mut self.step.missing);
        if !missing.is_empty() {
            return Err(DdpError::MissingGradients {
                rank: self.comm.rank(),
                names: missing,
            });
        }
        if armed && self.rebuild_pending {
            self.rebuild_pending = false;
            self.rebuild_by_ready_order()?;
        }
        Ok(())
    }

    /// Re-plans the buckets in rank 0's observed ready order (a collective: every rank calls
    /// it after the same step).
    fn rebuild_by_ready_order(&mut self) -> Result<(), DdpError> {
        let mut order: Vec<i64> = self.step.order.iter().map(|&i| i as i64).collect();
        // Parameters whose hooks did not fire (possible only on ranks other than 0 with unused
        // parameters, which fail above) keep their place at the end.
        let not_ready = (0..self.step.ready.len()).filter(|&i| !self.step.ready[i]);
        order.extend(not_ready.map(|i| i as i64));
        let mut table = Tensor::f_from_slice(&order)?.f_to_device(self.device())?;
        self.comm.broadcast(&mut table)?;
        self.comm.synchronize()?;
        let order: Vec<usize> = Vec::<i64>::try_from(table.f_to_device(Device::Cpu)?)?
            .into_iter()
            .map(|i| i as usize)
            .collect();
        if order != self.buckets.order() {
            self.buckets =
                GradBuckets::with_order(self.buckets.params(), self.buckets.bucket_mb(), &order)?;
            self.index_buckets()?;
        }
        Ok(())
    }
}

fn poisoned(rank: usize) -> DdpError {
    DdpError::Broken {
        rank,
        reason: "a gradient hook panicked while holding the sync state".into(),
    }
}

impl<C: Communicator + 'static> DataParallel<C> {
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
        let (rank, world) = (comm.rank(), comm.world_size());
        Ok(DataParallel {
            hooks: None,
            core: Arc::new(Mutex::new(Core::new(comm, buckets, compression)?)),
            rank,
            world,
            compression,
        })
    }

    fn core(&self) -> Result<MutexGuard<'_, Core<C>>, DdpError> {
        self.core.lock().map_err(|_| poisoned(self.rank))
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// Runs `f` on the communicator (for the caller's own collectives, e.g. averaging a loss).
    pub fn with_comm<R>(&mut self, f: impl FnOnce(&mut C) -> R) -> Result<R, DdpError> {
        Ok(f(&mut self.core()?.comm))
    }

    /// Gives the communicator back (e.g. to build another front over other parameters).
    pub fn into_comm(self) -> Result<C, DdpError> {
        let DataParallel {
            hooks, core, rank, ..
        } = self;
        // The hooks hold only weak references; once they are gone the state is ours alone.
        drop(hooks);
        Arc::try_unwrap(core)
            .map_err(|_| poisoned(rank))?
            .into_inner()
            .map(|c| c.comm)
            .map_err(|_| poisoned(rank))
    }

    /// Number of buckets in the current plan.
    pub fn bucket_count(&self) -> Result<usize, DdpError> {
        Ok(self.core()?.buckets.buckets().len())
    }

    /// The current plan: parameter names per bucket, in communication order.
    pub fn bucket_names(&self) -> Result<Vec<Vec<String>>, DdpError> {
        Ok(self
            .core()?
            .buckets
            .buckets()
            .iter()
            .map(|b| b.entries().iter().map(|e| e.name.clone()).collect())
            .collect())
    }

    /// The gradient compression in use.
    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// Installs the gradient-ready hooks (see "Overlap with backward"). Idempotent. From the next
    /// armed step on, buckets are reduced during backward; the first armed step also re-plans
    /// the buckets by the observed ready order.
    pub fn enable_overlap(&mut self) -> Result<(), DdpError> {
        if self.hooks.is_some() {
            return Ok(());
        }
        let params: Vec<Tensor> = {
            let mut core = self.core()?;
            core.rebuild_pending = true;
            core.buckets
                .params()
                .iter()
                .map(|(_, t)| t.shallow_clone())
                .collect()
        };
        let weak: Weak<Mutex<Core<C>>> = Arc::downgrade(&self.core);
        let hooks = GradReadyHooks::new(&params, move |param| {
            if let Some(core) = weak.upgrade() {
                // A poisoned lock is reported by `sync_gradients`.
                if let Ok(mut core) = core.lock() {
                    core.on_ready(param);
                }
            }
        })?;
        self.hooks = Some(hooks);
        Ok(())
    }

    /// Whether [`DataParallel::enable_overlap`] installed the hooks.
    pub fn overlap_enabled(&self) -> bool {
        self.hooks.is_some()
    }

    /// Arms the hooks for the next backward pass: its gradients are final, so buckets may be
    /// reduced as they complete. Call right before that `backward()` (with gradient
    /// accumulation: before the last micro-step's), then [`DataParallel::sync_gradients`].
    /// Without [`DataParallel::enable_overlap`] this does nothing.
    pub fn prepare_backward(&mut self) -> Result<(), DdpError> {
        let armed = self.hooks.is_some();
        self.core()?.reset(armed);
        Ok(())
    }

    /// Overwrites every rank's parameters with rank 0's (bucket by bucket, in the parameters'
    /// own dtype: no compression), then waits for completion. Call once after building the model
    /// and after loading a checkpoint, before the first step.
    pub fn broadcast_parameters(&mut self) -> Result<(), DdpError> {
        let mut core = self.core()?;
        let core = &mut *core;
        for i in 0..core.buckets.buckets().len() {
            core.buckets.pack_values(i)?;
            core.comm
                .broadcast(core.buckets.buckets_mut()[i].flat_mut())?;
            // The flat buffer is read back below: order that after the broadcast.
            core.comm.join()?;
            core.buckets.unpack_values(i)?;
        }
        core.comm.synchronize()
    }

    /// Replaces every parameter's gradient by the average over ranks, bucket by bucket: pack the
    /// gradients into the flat buffer, cast to the wire dtype (compression), all-reduce (sum), cast
    /// back, divide by the world size, unpack. Buckets that hooks already launched during an armed
    /// backward are only finished here. Returns the wall time spent here (the communication that
    /// did not overlap with backward), including waiting for the collectives to complete. Call
    /// after `backward()` and before the optimizer step.
    ///
    /// A parameter without a gradient on this rank contributes zeros; the collectives still run on
    /// every rank, and the call then fails with [`DdpError::MissingGradients`] naming it (as
    /// PyTorch DDP does without `find_unused_parameters`).
    pub fn sync_gradients(&mut self) -> Result<Duration, DdpError> {
        let start = Instant::now();
        self.core()?.finish()?;
        Ok(start.elapsed())
    }

    /// This rank's parameter [`Checksum`], without communicating.
    pub fn local_checksum(&self) -> Result<Checksum, DdpError> {
        let core = self.core()?;
        tch::no_grad(|| {
            let mut c = Checksum {
                sum: 0.0,
                sum_sq: 0.0,
                weighted: 0.0,
            };
            for (k, (_, p)) in core.buckets.params().iter().enumerate() {
                let v = p.f_detach()?.f_to_kind(Kind::Double)?.f_reshape([-1])?;
                let ramp = Tensor::f_arange(v.numel() as i64, (Kind::Double, v.device()))?
                    .f_fmod(97)?
                    .f_add_scalar(1.0)?;
                c.sum += v.f_sum(Kind::Double)?.f_double_value(&[])?;
                c.sum_sq += v.f_mul(&v)?.f_sum(Kind::Double)?.f_double_value(&[])?;
                c.weighted +=
                    (k + 1) as f64 * v.f_mul(&ramp)?.f_sum(Kind::Double)?.f_double_value(&[])?;
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
        let (world, rank) = (self.world, self.rank);
        let mut core = self.core()?;
        let mut row = vec![0.0f64; world * 3];
        row[rank * 3..rank * 3 + 3].copy_from_slice(&mine.as_array());
        let mut table = Tensor::f_from_slice(&row)?.f_to_device(core.device())?;
        core.comm.all_reduce_sum(&mut table)?;
        core.comm.synchronize()?;
        let all = Vec::<f64>::try_from(table.f_to_device(Device::Cpu)?)?;
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
