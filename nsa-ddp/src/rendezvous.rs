//! The rendezvous: every rank meets in a c10d TCPStore (`nsa_sys::store::TcpStore`, the store
//! torchrun and PyTorch's `env://` use), the ranks' world sizes are checked, and rank 0's payload
//! (the NCCL unique id, see [`crate::rendezvous_nccl`]; any bytes here) reaches every rank.
//!
//! Who hosts the store ([`StoreHost`]): rank 0 (our launcher, a plain environment, Slurm), or
//! the launcher itself (torchrun's agent, which tells its workers with
//! `TORCHELASTIC_USE_AGENT_STORE`); then every rank is a client.
//!
//! Keys, all under [`RendezvousConfig::namespace`] (`ns`):
//! - `ns/joined/R`: a counter each rank R bumps once; above 1, two processes claim rank R.
//! - `ns/world/R`: rank R's world size, set when it arrives; `ns/arrived` counts arrivals, so
//!   rank 0 polls one counter and looks at individual ranks only when it moves.
//! - `ns/error`: the first fatal problem any rank found (wrong world size, a rank twice), so the
//!   others fail at once with it instead of at their timeout.
//! - `ns/payload`: rank 0's bytes, set once every rank has arrived with the right world size.
//! - `ns/ack/R`: rank R read the payload. A rank 0 that hosts the store waits for these before
//!   returning (dropping the host stops the server).
//! - `ns/heard`: a counter of peers done with the store, successful or not: a failing rank 0
//!   that hosts the store keeps it up until the peers that arrived have read `ns/error`.
//!
//! Since rank 0 sets the payload only when all ranks are there, the rendezvous is also a
//! barrier: after it every rank is alive, so `ncclCommInitRank` will not wait for a missing one.
use std::time::{Duration, Instant};

use nsa_sys::store::{StoreError, TcpStore};

use crate::DdpError;

/// Who hosts the rendezvous store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreHost {
    /// Rank 0 hosts it on `master_port` (our launcher, a plain environment, Slurm).
    Rank0,
    /// The launcher already hosts it at `master_addr:master_port` (torchrun's agent store);
    /// every rank is a client.
    Launcher,
}

/// Where the store is, who hosts it and how long everyone waits. Filled by the binary from its
/// own configuration (e.g. `MASTER_ADDR` / `MASTER_PORT`); the library reads no environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RendezvousConfig {
    /// Host name or address of the store (rank 0's host, or the launcher's).
    pub master_addr: String,
    /// TCP port of the store.
    pub master_port: u16,
    /// How long each wait lasts: peers connecting to a store that is not up yet, rank 0 waiting
    /// for the last peer, peers waiting for the payload, a hosting rank 0 waiting for the acks.
    pub timeout: Duration,
    /// Who hosts the store.
    pub store: StoreHost,
    /// Prefix of every key, so that rendezvous sharing one store (torchrun's restarts, which
    /// keep the agent's store) never read each other's keys.
    pub namespace: String,
}

impl RendezvousConfig {
    /// `addr:port`, hosted by rank 0, namespace `nsa-ddp`.
    pub fn new(master_addr: impl Into<String>, master_port: u16, timeout: Duration) -> Self {
        RendezvousConfig {
            master_addr: master_addr.into(),
            master_port,
            timeout,
            store: StoreHost::Rank0,
            namespace: "nsa-ddp".into(),
        }
    }

    /// The same, with the store hosted by `store`.
    pub fn with_store(mut self, store: StoreHost) -> Self {
        self.store = store;
        self
    }

    /// The same, with keys under `namespace`.
    pub fn with_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    fn endpoint(&self) -> String {
        let who = match self.store {
            StoreHost::Rank0 => "rank 0's store",
            StoreHost::Launcher => "the launcher's store",
        };
        format!("{who} at {}:{}", self.master_addr, self.master_port)
    }
}

/// How often a waiting rank looks at the store again.
const POLL: Duration = Duration::from_millis(10);
/// How long a failing rank 0 that hosts the store keeps it up for the peers to read why.
const LINGER: Duration = Duration::from_secs(5);

/// Rank `rank` of `world` meets the others; rank 0 calls `make` (once everyone is there) and
/// every rank returns its bytes. See the module docs for the protocol.
///
/// Errors: [`DdpError::RendezvousTimeout`] when a wait runs out, naming the ranks not heard from
/// (rank 0 when a peer cannot reach the store rank 0 hosts); [`DdpError::Rendezvous`] for a
/// wrong world size (naming the rank and both sizes), a rank claimed twice, a taken port and
/// other store errors; [`DdpError::Invalid`] for `rank >= world`. With `world == 1` no store is
/// used.
pub fn rendezvous(
    cfg: &RendezvousConfig,
    rank: usize,
    world: usize,
    make: impl FnOnce() -> Result<Vec<u8>, DdpError>,
) -> Result<Vec<u8>, DdpError> {
    if world == 0 || rank >= world {
        return Err(DdpError::Invalid(format!(
            "rank {rank} of world size {world}"
        )));
    }
    if world == 1 {
        return make();
    }
    let start = Instant::now();
    let store = open(cfg, rank)?;
    let r = Meeting {
        cfg,
        store: &store,
        rank,
        world,
        start,
    };
    r.join()?;
    if rank == 0 {
        r.lead(make)
    } else {
        r.follow()
    }
}

fn open(cfg: &RendezvousConfig, rank: usize) -> Result<TcpStore, DdpError> {
    let host = cfg.store == StoreHost::Rank0 && rank == 0;
    let opened = if host {
        TcpStore::host(&cfg.master_addr, cfg.master_port, cfg.timeout)
    } else {
        TcpStore::connect(&cfg.master_addr, cfg.master_port, cfg.timeout)
    };
    opened.map_err(|e| match e {
        StoreError::Timeout {
            waited, message, ..
        } => DdpError::RendezvousTimeout {
            rank,
            what: format!("connecting to {} (last error: {message})", cfg.endpoint()),
            waited,
            // Only rank 0 can be named: the launcher's store is nobody's rank.
            missing: if cfg.store == StoreHost::Rank0 {
                vec![0]
            } else {
                Vec::new()
            },
        },
        e if host => DdpError::Rendezvous {
            rank,
            detail: format!(
                "cannot host the store on port {} ({e}); is another run, or a launcher that \
                 hosts its own store (torchrun), already using the port?",
                cfg.master_port
            ),
        },
        e => DdpError::Rendezvous {
            rank,
            detail: format!("connecting to {}: {e}", cfg.endpoint()),
        },
    })
}

/// One rank's side of one rendezvous.
struct Meeting<'a> {
    cfg: &'a RendezvousConfig,
    store: &'a TcpStore,
    rank: usize,
    world: usize,
    start: Instant,
}

impl Meeting<'_> {
    fn key(&self, what: &str) -> String {
        format!("{}/{what}", self.cfg.namespace)
    }

    fn store_err(&self, what: &str, e: StoreError) -> DdpError {
        // A peer that loses rank 0's store mid-way has most likely seen rank 0 give up.
        let hint = if self.cfg.store == StoreHost::Rank0 && !self.store.is_host() {
            "; rank 0 hosts the store: did it stop?"
        } else {
            ""
        };
        DdpError::Rendezvous {
            rank: self.rank,
            detail: format!("{what} ({}): {e}{hint}", self.cfg.endpoint()),
        }
    }

    fn timeout(&self, what: String, missing: Vec<usize>) -> DdpError {
        DdpError::RendezvousTimeout {
            rank: self.rank,
            what,
            waited: self.start.elapsed(),
            missing,
        }
    }

    /// Records `detail` for the other ranks (best effort: the store may be gone) and returns it
    /// as this rank's error.
    fn fail(&self, detail: String) -> DdpError {
        let _ = self.store.set(&self.key("error"), detail.as_bytes());
        DdpError::Rendezvous {
            rank: self.rank,
            detail,
        }
    }

    /// Another rank's recorded error, if any.
    fn reported_error(&self) -> Result<Option<String>, DdpError> {
        let key = self.key("error");
        let present = self
            .store
            .check(&[&key])
            .map_err(|e| self.store_err("reading the error key", e))?;
        if !present {
            return Ok(None);
        }
        let raw = self
            .store
            .get(&key)
            .map_err(|e| self.store_err("reading the error key", e))?;
        Ok(Some(String::from_utf8_lossy(&raw).into_owned()))
    }

    fn exists(&self, key: &str) -> Result<bool, DdpError> {
        self.store
            .check(&[key])
            .map_err(|e| self.store_err(&format!("checking {key}"), e))
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, DdpError> {
        self.store
            .get(key)
            .map_err(|e| self.store_err(&format!("reading {key}"), e))
    }

    /// The world size rank `r` announced.
    fn world_of(&self, r: usize) -> Result<String, DdpError> {
        let raw = self.get(&self.key(&format!("world/{r}")))?;
        Ok(String::from_utf8_lossy(&raw).into_owned())
    }

    /// Claims this rank and announces its world size.
    fn join(&self) -> Result<(), DdpError> {
        let claims = self
            .store
            .add(&self.key(&format!("joined/{}", self.rank)), 1)
            .map_err(|e| self.store_err("joining", e))?;
        if claims > 1 {
            return Err(self.fail(format!(
                "two processes claim rank {} (check RANK / SLURM_PROCID)",
                self.rank
            )));
        }
        self.store
            .set(
                &self.key(&format!("world/{}", self.rank)),
                self.world.to_string().as_bytes(),
            )
            .map_err(|e| self.store_err("announcing the world size", e))?;
        self.store
            .add(&self.key("arrived"), 1)
            .map_err(|e| self.store_err("announcing the arrival", e))?;
        Ok(())
    }

    /// Ranks in `ranks` whose `what/R` key does not exist yet.
    fn without(
        &self,
        what: &str,
        ranks: impl Iterator<Item = usize>,
    ) -> Result<Vec<usize>, DdpError> {
        let mut out = Vec::new();
        for r in ranks {
            if !self.exists(&self.key(&format!("{what}/{r}")))? {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Rank 0: [`Meeting::lead_steps`]; on failure it records the error for the peers (unless it
    /// came from one of them) and, if it hosts the store, keeps the store up until the peers
    /// that arrived have heard (at most [`LINGER`]), so they fail with the reason rather than
    /// with a lost connection.
    fn lead(&self, make: impl FnOnce() -> Result<Vec<u8>, DdpError>) -> Result<Vec<u8>, DdpError> {
        let result = self.lead_steps(make);
        if let Err(e) = &result {
            if !matches!(self.reported_error(), Ok(Some(_))) {
                let _ = self.store.set(&self.key("error"), e.to_string().as_bytes());
            }
            if self.store.is_host() {
                let until = Instant::now() + self.cfg.timeout.min(LINGER);
                while Instant::now() < until {
                    let heard = self.store.add(&self.key("heard"), 0).unwrap_or(i64::MAX);
                    let arrived = self.store.add(&self.key("arrived"), 0).unwrap_or(0);
                    if heard >= arrived - 1 {
                        break;
                    }
                    std::thread::sleep(POLL);
                }
            }
        }
        result
    }

    /// Waits for every peer (checking its world size as it arrives), then publishes the payload
    /// and, if this rank hosts the store, waits until every peer has read it.
    fn lead_steps(
        &self,
        make: impl FnOnce() -> Result<Vec<u8>, DdpError>,
    ) -> Result<Vec<u8>, DdpError> {
        let deadline = self.start + self.cfg.timeout;
        let mut waiting: Vec<usize> = (1..self.world).collect();
        let mut seen = 0i64;
        while !waiting.is_empty() {
            if let Some(e) = self.reported_error()? {
                return Err(DdpError::Rendezvous { rank: 0, detail: e });
            }
            let arrived = self
                .store
                .add(&self.key("arrived"), 0)
                .map_err(|e| self.store_err("counting arrivals", e))?;
            if arrived != seen {
                seen = arrived;
                let still = self.without("world", waiting.iter().copied())?;
                for r in waiting.iter().copied().filter(|r| !still.contains(r)) {
                    let theirs = self.world_of(r)?;
                    if theirs != self.world.to_string() {
                        return Err(self.fail(format!(
                            "rank {r} has world size {theirs}, rank 0 has {}; every rank must \
                             be started with the same WORLD_SIZE",
                            self.world
                        )));
                    }
                }
                waiting = still;
                continue;
            }
            if Instant::now() >= deadline {
                return Err(self.timeout(
                    format!(
                        "waiting for {} of {} peers at {}",
                        waiting.len(),
                        self.world - 1,
                        self.cfg.endpoint()
                    ),
                    waiting,
                ));
            }
            std::thread::sleep(POLL);
        }
        let payload = make()?;
        self.store
            .set(&self.key("payload"), &payload)
            .map_err(|e| self.store_err("publishing the payload", e))?;
        if self.store.is_host() {
            let deadline = Instant::now() + self.cfg.timeout;
            loop {
                let unread = self.without("ack", 1..self.world)?;
                if unread.is_empty() {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(self.timeout(
                        "waiting for the peers to read the payload before closing the store".into(),
                        unread,
                    ));
                }
                std::thread::sleep(POLL);
            }
        }
        Ok(payload)
    }

    /// A peer: [`Meeting::follow_steps`], then tells rank 0 it is done with the store, whatever
    /// the outcome (see [`Meeting::lead`]).
    fn follow(&self) -> Result<Vec<u8>, DdpError> {
        let result = self.follow_steps();
        let _ = self.store.add(&self.key("heard"), 1);
        result
    }

    /// Checks this rank's world size against rank 0's, then waits for the payload.
    fn follow_steps(&self) -> Result<Vec<u8>, DdpError> {
        let deadline = self.start + self.cfg.timeout;
        let world0 = self.key("world/0");
        let payload = self.key("payload");
        let mut checked = false;
        loop {
            if let Some(e) = self.reported_error()? {
                return Err(DdpError::Rendezvous {
                    rank: self.rank,
                    detail: e,
                });
            }
            if !checked && self.exists(&world0)? {
                let theirs = self.world_of(0)?;
                if theirs != self.world.to_string() {
                    return Err(self.fail(format!(
                        "rank {} has world size {}, rank 0 has {theirs}; every rank must be \
                         started with the same WORLD_SIZE",
                        self.rank, self.world
                    )));
                }
                checked = true;
            }
            if checked && self.exists(&payload)? {
                let bytes = self.get(&payload)?;
                self.store
                    .set(&self.key(&format!("ack/{}", self.rank)), b"1")
                    .map_err(|e| self.store_err("acknowledging the payload", e))?;
                return Ok(bytes);
            }
            if Instant::now() >= deadline {
                // Name every rank that has not arrived, as far as this peer can see.
                let missing = self.without("world", 0..self.world)?;
                let what = if checked {
                    format!("waiting for rank 0's payload at {}", self.cfg.endpoint())
                } else {
                    format!("waiting for rank 0 at {}", self.cfg.endpoint())
                };
                return Err(self.timeout(what, missing));
            }
            std::thread::sleep(POLL);
        }
    }
}
