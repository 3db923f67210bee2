//! The NCCL backend ([`NcclGroup`]) and the TCP rendezvous that hands rank 0's NCCL unique id to
//! the other ranks ([`rendezvous`]).
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nsa_sys::nccl::{Nccl, NcclComm, UniqueId, UNIQUE_ID_BYTES};
use tch::{Device, Kind, Tensor};

use crate::{Communicator, DdpError};

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
    /// 0 made (see [`rendezvous`]). Blocks until all ranks have joined. Collective timeout:
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

/// Where rank 0 listens and how long everyone waits. Filled by the binary from its own
/// configuration (e.g. `MASTER_ADDR` / `MASTER_PORT`); the library reads no environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RendezvousConfig {
    /// Host name or address rank 0 binds and the others connect to.
    pub master_addr: String,
    /// TCP port.
    pub master_port: u16,
    /// Rank 0: how long it waits for all peers to connect. Peers: how long they keep retrying to
    /// connect (rank 0 may start later than they do).
    pub connect_timeout: Duration,
    /// Per read/write on an open connection. A peer waits for the id while rank 0 waits for the
    /// slowest peer, so make this at least `connect_timeout`.
    pub read_timeout: Duration,
}

impl RendezvousConfig {
    /// `addr:port` with both timeouts set to `timeout`.
    pub fn new(master_addr: impl Into<String>, master_port: u16, timeout: Duration) -> Self {
        RendezvousConfig {
            master_addr: master_addr.into(),
            master_port,
            connect_timeout: timeout,
            read_timeout: timeout,
        }
    }
}

const MAGIC: [u8; 8] = *b"NSADDP01";

fn resolve(cfg: &RendezvousConfig, rank: usize) -> Result<Vec<SocketAddr>, DdpError> {
    let addrs: Vec<SocketAddr> = (cfg.master_addr.as_str(), cfg.master_port)
        .to_socket_addrs()
        .map_err(|e| DdpError::Rendezvous {
            rank,
            detail: format!(
                "cannot resolve {}:{}: {e}",
                cfg.master_addr, cfg.master_port
            ),
        })?
        .collect();
    if addrs.is_empty() {
        return Err(DdpError::Rendezvous {
            rank,
            detail: format!(
                "{}:{} resolves to nothing",
                cfg.master_addr, cfg.master_port
            ),
        });
    }
    Ok(addrs)
}

fn io_err(rank: usize, what: &str, e: std::io::Error, waited: Duration) -> DdpError {
    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
        DdpError::RendezvousTimeout {
            rank,
            what: what.to_string(),
            waited,
            missing: Vec::new(),
        }
    } else {
        DdpError::Rendezvous {
            rank,
            detail: format!("{what}: {e}"),
        }
    }
}

/// Exchanges the NCCL unique id: rank 0 binds `master_addr:master_port`, waits until all
/// `world − 1` peers have connected and said hello (rank and world size), then calls `make_id`
/// and sends the 128 bytes to each; the other ranks connect (retrying until `connect_timeout`)
/// and receive them. Every rank returns the same id. Because rank 0 answers only once everyone
/// is there, the rendezvous is also a barrier: after it, all ranks are alive and
/// `ncclCommInitRank` will not wait for a missing one.
///
/// Errors: [`DdpError::RendezvousTimeout`] (naming the ranks rank 0 did not hear from, if any)
/// when a wait runs out, [`DdpError::Rendezvous`] for protocol and network errors.
pub fn rendezvous(
    cfg: &RendezvousConfig,
    rank: usize,
    world: usize,
    make_id: impl FnOnce() -> Result<UniqueId, DdpError>,
) -> Result<UniqueId, DdpError> {
    if world == 0 || rank >= world {
        return Err(DdpError::Invalid(format!(
            "rank {rank} of world size {world}"
        )));
    }
    if world == 1 {
        return make_id();
    }
    let addrs = resolve(cfg, rank)?;
    if rank == 0 {
        serve(cfg, &addrs, world, make_id)
    } else {
        fetch(cfg, &addrs, rank, world)
    }
}

fn serve(
    cfg: &RendezvousConfig,
    addrs: &[SocketAddr],
    world: usize,
    make_id: impl FnOnce() -> Result<UniqueId, DdpError>,
) -> Result<UniqueId, DdpError> {
    let start = Instant::now();
    let listener = TcpListener::bind(addrs).map_err(|e| DdpError::Rendezvous {
        rank: 0,
        detail: format!("bind {}:{}: {e}", cfg.master_addr, cfg.master_port),
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| io_err(0, "listen", e, start.elapsed()))?;
    let mut peers: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
    let deadline = start + cfg.connect_timeout;
    while peers.iter().skip(1).any(Option::is_none) {
        match listener.accept() {
            Ok((mut stream, from)) => {
                let hello = (|| -> std::io::Result<[u8; 24]> {
                    stream.set_nonblocking(false)?;
                    stream.set_read_timeout(Some(cfg.read_timeout))?;
                    stream.set_write_timeout(Some(cfg.read_timeout))?;
                    let mut buf = [0u8; 24];
                    stream.read_exact(&mut buf)?;
                    Ok(buf)
                })()
                .map_err(|e| io_err(0, &format!("hello from {from}"), e, start.elapsed()))?;
                let peer_rank = u64::from_le_bytes(hello[8..16].try_into().unwrap_or_default());
                let peer_world = u64::from_le_bytes(hello[16..24].try_into().unwrap_or_default());
                if hello[..8] != MAGIC {
                    return Err(DdpError::Rendezvous {
                        rank: 0,
                        detail: format!("{from} is not an nsa-ddp peer (bad magic)"),
                    });
                }
                if peer_world != world as u64 {
                    return Err(DdpError::Rendezvous {
                        rank: 0,
                        detail: format!(
                            "{from} (rank {peer_rank}) has world size {peer_world}, rank 0 has {world}"
                        ),
                    });
                }
                let slot = peers
                    .get_mut(peer_rank as usize)
                    .filter(|_| peer_rank != 0)
                    .ok_or_else(|| DdpError::Rendezvous {
                        rank: 0,
                        detail: format!("{from} claims rank {peer_rank} of {world}"),
                    })?;
                if slot.is_some() {
                    return Err(DdpError::Rendezvous {
                        rank: 0,
                        detail: format!("rank {peer_rank} connected twice (second from {from})"),
                    });
                }
                *slot = Some(stream);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(DdpError::RendezvousTimeout {
                        rank: 0,
                        what: format!(
                            "waiting for peers on {}:{}",
                            cfg.master_addr, cfg.master_port
                        ),
                        waited: start.elapsed(),
                        missing: (1..world).filter(|&r| peers[r].is_none()).collect(),
                    });
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(io_err(0, "accept", e, start.elapsed())),
        }
    }
    let id = make_id()?;
    let mut msg = Vec::with_capacity(8 + UNIQUE_ID_BYTES);
    msg.extend_from_slice(&MAGIC);
    msg.extend_from_slice(&id);
    for (r, stream) in peers.iter_mut().enumerate().skip(1) {
        if let Some(s) = stream {
            s.write_all(&msg)
                .and_then(|_| s.flush())
                .map_err(|e| io_err(0, &format!("sending id to rank {r}"), e, start.elapsed()))?;
        }
    }
    Ok(id)
}

fn fetch(
    cfg: &RendezvousConfig,
    addrs: &[SocketAddr],
    rank: usize,
    world: usize,
) -> Result<UniqueId, DdpError> {
    let start = Instant::now();
    let deadline = start + cfg.connect_timeout;
    let mut stream = loop {
        let mut last_err = None;
        let mut connected = None;
        for a in addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            match TcpStream::connect_timeout(a, left.max(Duration::from_millis(1))) {
                Ok(s) => {
                    connected = Some(s);
                    break;
                }
                Err(e) => last_err = Some(e),
            }
        }
        if let Some(s) = connected {
            break s;
        }
        if Instant::now() >= deadline {
            let last = last_err.map(|e| e.to_string()).unwrap_or_default();
            return Err(DdpError::RendezvousTimeout {
                rank,
                what: format!(
                    "connecting to rank 0 at {}:{} (last error: {last})",
                    cfg.master_addr, cfg.master_port
                ),
                waited: start.elapsed(),
                missing: vec![0],
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let what = format!(
        "waiting for the id from {}:{}",
        cfg.master_addr, cfg.master_port
    );
    let reply = (|| -> std::io::Result<[u8; 8 + UNIQUE_ID_BYTES]> {
        stream.set_read_timeout(Some(cfg.read_timeout))?;
        stream.set_write_timeout(Some(cfg.read_timeout))?;
        let mut hello = [0u8; 24];
        hello[..8].copy_from_slice(&MAGIC);
        hello[8..16].copy_from_slice(&(rank as u64).to_le_bytes());
        hello[16..24].copy_from_slice(&(world as u64).to_le_bytes());
        stream.write_all(&hello)?;
        stream.flush()?;
        let mut buf = [0u8; 8 + UNIQUE_ID_BYTES];
        stream.read_exact(&mut buf)?;
        Ok(buf)
    })()
    .map_err(|e| io_err(rank, &what, e, start.elapsed()))?;
    if reply[..8] != MAGIC {
        return Err(DdpError::Rendezvous {
            rank,
            detail: "rank 0 answered with a bad magic".into(),
        });
    }
    let mut id = [0u8; UNIQUE_ID_BYTES];
    id.copy_from_slice(&reply[8..]);
    Ok(id)
}

/// [`rendezvous`] with rank 0's id from `ncclGetUniqueId`: what a trainer calls before
/// [`NcclGroup::new`].
pub fn rendezvous_nccl(
    cfg: &RendezvousConfig,
    rank: usize,
    world: usize,
) -> Result<UniqueId, DdpError> {
    rendezvous(cfg, rank, world, || {
        let nccl = Nccl::open().map_err(nsa_sys::nccl::NcclError::from)?;
        Ok(nccl.unique_id()?)
    })
}
