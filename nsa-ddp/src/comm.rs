//! The [`Communicator`] trait and the in-process [`LocalGroup`] backend.
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use crate::DdpError;

/// A process group as the data-parallel front sees it: every rank calls the same collectives in
/// the same order with tensors of the same element count.
///
/// Collectives work in place on `t`. A backend may complete them asynchronously (NCCL does, on a
/// stream of its own): then `t` must be left alone until [`Communicator::join`], after which
/// later work on the device sees the result. [`Communicator::synchronize`] joins, waits for
/// everything issued so far, and is where timeouts of such backends surface.
pub trait Communicator: Send {
    /// This rank, `0 .. world_size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Replaces `t` on every rank by the element-wise sum over ranks.
    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<(), DdpError>;
    /// Replaces `t` on every rank by rank 0's `t`.
    fn broadcast(&mut self, t: &mut Tensor) -> Result<(), DdpError>;
    /// Returns once every rank has called `barrier` (and issued work has completed).
    fn barrier(&mut self) -> Result<(), DdpError>;
    /// Orders later device work after the collectives issued so far, without blocking the host.
    /// Backends that complete collectives before returning need not do anything.
    fn join(&mut self) -> Result<(), DdpError> {
        Ok(())
    }
    /// Waits for collectives issued so far to complete (joining first).
    fn synchronize(&mut self) -> Result<(), DdpError>;
}

impl<C: Communicator + ?Sized> Communicator for Box<C> {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn world_size(&self) -> usize {
        (**self).world_size()
    }
    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<(), DdpError> {
        (**self).all_reduce_sum(t)
    }
    fn broadcast(&mut self, t: &mut Tensor) -> Result<(), DdpError> {
        (**self).broadcast(t)
    }
    fn barrier(&mut self) -> Result<(), DdpError> {
        (**self).barrier()
    }
    fn join(&mut self) -> Result<(), DdpError> {
        (**self).join()
    }
    fn synchronize(&mut self) -> Result<(), DdpError> {
        (**self).synchronize()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Sum,
    Broadcast,
    Barrier,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Sum => "all_reduce_sum",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
        }
    }
}

/// Why a group stopped working; every later collective on any rank reports it.
#[derive(Debug, Clone)]
enum Failure {
    Timeout {
        op: &'static str,
        seq: u64,
        missing: Vec<usize>,
    },
    Mismatch(String),
}

#[derive(Debug)]
struct State {
    /// Collectives completed so far.
    seq: u64,
    /// The collective in progress: its kind and element count, fixed by the first arrival.
    current: Option<(Op, usize)>,
    contributions: Vec<Option<Vec<f64>>>,
    result: Arc<Vec<f64>>,
    failure: Option<Failure>,
}

#[derive(Debug)]
struct Shared {
    world: usize,
    timeout: Duration,
    state: Mutex<State>,
    cv: Condvar,
}

/// An in-process group: ranks are threads of one process, collectives meet in shared memory.
///
/// Tensors may live on any device and have any dtype libtorch converts to f64; values are summed
/// in f64 in rank order (deterministic) and rounded once into the tensor's dtype, so for f64 and
/// f32 data the result is the correctly rounded sum. Integer tensors are exact up to 2⁵³.
///
/// Every collective waits at most `timeout` for the other ranks. If one does not arrive, the
/// waiting ranks return [`DdpError::Timeout`] naming the ranks that did not arrive, and the group
/// is *broken*: every later collective on every rank fails at once with the same report (as an
/// aborted NCCL communicator would). A rank calling a different collective, or one with a
/// different element count, than the others breaks the group with [`DdpError::Mismatch`].
#[derive(Debug)]
pub struct LocalGroup {
    rank: usize,
    shared: Arc<Shared>,
}

impl LocalGroup {
    /// Creates the `world` ranks of one group; hand one to each thread.
    pub fn new(world: usize, timeout: Duration) -> Result<Vec<LocalGroup>, DdpError> {
        if world == 0 {
            return Err(DdpError::Invalid("world size must be at least 1".into()));
        }
        let shared = Arc::new(Shared {
            world,
            timeout,
            state: Mutex::new(State {
                seq: 0,
                current: None,
                contributions: vec![None; world],
                result: Arc::new(Vec::new()),
                failure: None,
            }),
            cv: Condvar::new(),
        });
        Ok((0..world)
            .map(|rank| LocalGroup {
                rank,
                shared: shared.clone(),
            })
            .collect())
    }

    /// The collective timeout.
    pub fn timeout(&self) -> Duration {
        self.shared.timeout
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>, DdpError> {
        self.shared.state.lock().map_err(|_| DdpError::Broken {
            rank: self.rank,
            reason: "a rank panicked inside a collective".into(),
        })
    }

    fn failure_error(&self, f: &Failure, waited: Duration) -> DdpError {
        match f {
            Failure::Timeout { op, seq, missing } => DdpError::Timeout {
                rank: self.rank,
                op,
                seq: *seq,
                waited,
                missing: missing.clone(),
            },
            Failure::Mismatch(detail) => DdpError::Mismatch {
                rank: self.rank,
                detail: detail.clone(),
            },
        }
    }

    /// Deposits this rank's data for collective `op` and returns the combined result.
    fn collective(&self, op: Op, data: Vec<f64>) -> Result<Arc<Vec<f64>>, DdpError> {
        let start = Instant::now();
        let shared = &*self.shared;
        let mut st = self.lock()?;
        if let Some(f) = &st.failure {
            return Err(self.failure_error(f, start.elapsed()));
        }
        match st.current {
            Some((o, n)) if o != op || n != data.len() => {
                let detail = format!(
                    "collective #{}: rank {} called {}({} elements) while others called {}({n} elements)",
                    st.seq,
                    self.rank,
                    op.name(),
                    data.len(),
                    o.name()
                );
                st.failure = Some(Failure::Mismatch(detail.clone()));
                shared.cv.notify_all();
                return Err(DdpError::Mismatch {
                    rank: self.rank,
                    detail,
                });
            }
            _ => st.current = Some((op, data.len())),
        }
        let my_seq = st.seq;
        st.contributions[self.rank] = Some(data);
        if st.contributions.iter().all(Option::is_some) {
            let contributions = std::mem::replace(&mut st.contributions, vec![None; shared.world]);
            let mut it = contributions.into_iter().flatten();
            let result = match op {
                Op::Sum => {
                    let mut acc = it.next().unwrap_or_default();
                    for c in it {
                        for (a, x) in acc.iter_mut().zip(c) {
                            *a += x;
                        }
                    }
                    acc
                }
                Op::Broadcast => it.next().unwrap_or_default(),
                Op::Barrier => Vec::new(),
            };
            st.result = Arc::new(result);
            st.current = None;
            st.seq += 1;
            shared.cv.notify_all();
            return Ok(st.result.clone());
        }
        let deadline = start + shared.timeout;
        loop {
            if st.seq != my_seq {
                return Ok(st.result.clone());
            }
            if let Some(f) = &st.failure {
                return Err(self.failure_error(f, start.elapsed()));
            }
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<usize> = st
                    .contributions
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.is_none())
                    .map(|(r, _)| r)
                    .collect();
                let f = Failure::Timeout {
                    op: op.name(),
                    seq: my_seq,
                    missing,
                };
                let err = self.failure_error(&f, start.elapsed());
                st.failure = Some(f);
                shared.cv.notify_all();
                return Err(err);
            }
            st = shared
                .cv
                .wait_timeout(st, deadline - now)
                .map_err(|_| DdpError::Broken {
                    rank: self.rank,
                    reason: "a rank panicked inside a collective".into(),
                })?
                .0;
        }
    }
}

fn to_f64(t: &Tensor) -> Result<Vec<f64>, DdpError> {
    let flat = t
        .f_detach()?
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Double)?
        .f_reshape([-1])?;
    Ok(Vec::<f64>::try_from(&flat)?)
}

fn write_back(t: &mut Tensor, values: &[f64]) -> Result<(), DdpError> {
    let src = Tensor::f_from_slice(values)?
        .f_to_kind(t.kind())?
        .f_to_device(t.device())?
        .f_view(&t.size()[..])?;
    tch::no_grad(|| t.f_copy_(&src))?;
    Ok(())
}

impl Communicator for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world
    }
    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<(), DdpError> {
        let r = self.collective(Op::Sum, to_f64(t)?)?;
        write_back(t, &r)
    }
    fn broadcast(&mut self, t: &mut Tensor) -> Result<(), DdpError> {
        let r = self.collective(Op::Broadcast, to_f64(t)?)?;
        if self.rank != 0 {
            write_back(t, &r)?;
        }
        Ok(())
    }
    fn barrier(&mut self) -> Result<(), DdpError> {
        self.collective(Op::Barrier, Vec::new()).map(|_| ())
    }
    fn synchronize(&mut self) -> Result<(), DdpError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<T: Send + 'static>(
        world: usize,
        timeout: Duration,
        f: impl Fn(LocalGroup) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let f = Arc::new(f);
        let handles: Vec<_> = LocalGroup::new(world, timeout)
            .unwrap()
            .into_iter()
            .map(|g| {
                let f = f.clone();
                std::thread::spawn(move || f(g))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn sum_broadcast_barrier() {
        let out = run(3, Duration::from_secs(10), |mut g| {
            let r = g.rank() as f32;
            let mut t = Tensor::from_slice(&[r, 10.0 * r]);
            g.all_reduce_sum(&mut t).unwrap();
            let sum = Vec::<f32>::try_from(&t).unwrap();
            let mut b = Tensor::from_slice(&[r + 1.0]);
            g.broadcast(&mut b).unwrap();
            g.barrier().unwrap();
            (sum, Vec::<f32>::try_from(&b).unwrap())
        });
        for (sum, b) in out {
            assert_eq!(sum, vec![3.0, 30.0]);
            assert_eq!(b, vec![1.0]);
        }
    }

    #[test]
    fn mismatched_collectives_break_the_group() {
        let out = run(2, Duration::from_secs(10), |mut g| {
            let mut t = Tensor::zeros([g.rank() as i64 + 1], (Kind::Float, Device::Cpu));
            g.all_reduce_sum(&mut t)
        });
        assert!(out
            .iter()
            .all(|r| matches!(r, Err(DdpError::Mismatch { .. }))));
    }
}
