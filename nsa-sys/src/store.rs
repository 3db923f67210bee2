//! [`TcpStore`]: libtorch's c10d TCPStore (from `glue/store.cpp`), the key-value store that
//! torchrun's agent hosts for its workers and that PyTorch's own `env://` rendezvous uses.
//!
//! A store is either the **host** (runs the server in a background thread of this process and
//! talks to it through a client connection of its own) or a **client** of a server elsewhere.
//! Keys are strings, values bytes; [`TcpStore::add`] keeps a counter under a key. Calls that wait
//! ([`TcpStore::get`], [`TcpStore::wait`], opening a client) give up after a timeout; every C++
//! exception comes back as a typed [`StoreError`].
use std::ffi::CString;
use std::os::raw::{c_char, c_int, c_void};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

extern "C" {
    fn nsa_store_new(
        host: *const c_char,
        port: u16,
        is_server: c_int,
        timeout_ms: i64,
        out: *mut *mut c_void,
        port_out: *mut u16,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn nsa_store_free(store: *mut c_void);
    fn nsa_store_set_timeout(store: *mut c_void, timeout_ms: i64);
    fn nsa_store_set(
        store: *mut c_void,
        key: *const c_char,
        data: *const u8,
        len: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn nsa_store_get(
        store: *mut c_void,
        key: *const c_char,
        sink: extern "C" fn(*mut c_void, *const u8, usize),
        ctx: *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn nsa_store_add(
        store: *mut c_void,
        key: *const c_char,
        delta: i64,
        out: *mut i64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn nsa_store_check(
        store: *mut c_void,
        keys: *const *const c_char,
        n: usize,
        out: *mut c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn nsa_store_wait(
        store: *mut c_void,
        keys: *const *const c_char,
        n: usize,
        timeout_ms: i64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// What went wrong in a store call.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A wait (opening a client, `get`, `wait`) ran out of time.
    #[error("{call}: timed out after {waited:?}: {message}")]
    Timeout {
        call: &'static str,
        waited: Duration,
        message: String,
    },
    /// Connecting, binding or a socket failed (c10::DistNetworkError), e.g. the port is taken.
    #[error("{call}: network error: {message}")]
    Network { call: &'static str, message: String },
    /// The store refused or failed the request (c10::DistStoreError or another exception).
    #[error("{call}: {message}")]
    Failed { call: &'static str, message: String },
    /// A key or host name with a NUL byte.
    #[error("{call}: {what} contains a NUL byte")]
    Nul {
        call: &'static str,
        what: &'static str,
    },
}

const ERR_LEN: usize = 4096;
const KIND_OK: c_int = 0;
const KIND_NETWORK: c_int = 2;

/// Turns the glue's kind code and message into a [`StoreError`]. A failed wait that used up its
/// time is a timeout whatever libtorch called it (its timeout messages vary between versions).
fn check(
    call: &'static str,
    kind: c_int,
    err: &[u8],
    started: Instant,
    timeout: Option<Duration>,
) -> Result<(), StoreError> {
    if kind == KIND_OK {
        return Ok(());
    }
    let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
    let message = String::from_utf8_lossy(&err[..end]).trim().to_string();
    let waited = started.elapsed();
    if timeout.is_some_and(|t| waited >= t) {
        return Err(StoreError::Timeout {
            call,
            waited,
            message,
        });
    }
    Err(if kind == KIND_NETWORK {
        StoreError::Network { call, message }
    } else {
        StoreError::Failed { call, message }
    })
}

fn c_string(call: &'static str, what: &'static str, s: &str) -> Result<CString, StoreError> {
    CString::new(s).map_err(|_| StoreError::Nul { call, what })
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

/// One handle on a c10d TCPStore (host or client). Dropping the host stops the server: peers
/// that still need it must be done first.
#[derive(Debug)]
pub struct TcpStore {
    ptr: NonNull<c_void>,
    host: String,
    port: u16,
    is_host: bool,
    timeout: Duration,
}

// SAFETY: c10d::TCPStore serialises every request on its client connection with a mutex of its
// own (`activeOpLock_`), and its server runs in its own thread; the handle is a plain pointer
// to it, freed once in Drop.
unsafe impl Send for TcpStore {}
// SAFETY: as above: concurrent calls through `&TcpStore` are serialised inside TCPStore.
unsafe impl Sync for TcpStore {}

impl TcpStore {
    fn open(host: &str, port: u16, is_host: bool, timeout: Duration) -> Result<Self, StoreError> {
        let call = if is_host {
            "hosting a TCPStore"
        } else {
            "connecting to a TCPStore"
        };
        let c_host = c_string(call, "host name", host)?;
        let mut out: *mut c_void = std::ptr::null_mut();
        let mut port_out = 0u16;
        let mut err = vec![0u8; ERR_LEN];
        let started = Instant::now();
        // SAFETY: every pointer is valid for the call; the glue catches all exceptions and
        // writes at most ERR_LEN bytes (NUL-terminated) into err.
        let kind = unsafe {
            nsa_store_new(
                c_host.as_ptr(),
                port,
                c_int::from(is_host),
                millis(timeout),
                &mut out,
                &mut port_out,
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        // Only a client waits (for the server to come up); a host fails at once if it cannot
        // bind, so its errors are never timeouts.
        check(call, kind, &err, started, (!is_host).then_some(timeout))?;
        let ptr = NonNull::new(out).ok_or(StoreError::Failed {
            call,
            message: "the glue returned no store".into(),
        })?;
        Ok(TcpStore {
            ptr,
            host: host.to_string(),
            port: port_out,
            is_host,
            timeout,
        })
    }

    /// Hosts a store: binds `port` on every interface (0: a free port, see [`TcpStore::port`])
    /// and connects to it through `host` (an address of this machine). `timeout` applies to
    /// later waits. Fails at once ([`StoreError::Network`]) when the port is taken.
    pub fn host(host: &str, port: u16, timeout: Duration) -> Result<Self, StoreError> {
        Self::open(host, port, true, timeout)
    }

    /// Connects to a store hosted at `host:port`, retrying until `timeout` (the host may start
    /// later); `timeout` also applies to later waits.
    pub fn connect(host: &str, port: u16, timeout: Duration) -> Result<Self, StoreError> {
        c_string("connecting to a TCPStore", "host name", host)?;
        let started = Instant::now();
        // Wait until the port accepts connections before libtorch's client tries: after a
        // refused attempt the client sleeps about a second before the next one, which would
        // add that second to every rendezvous whose peers start before its host.
        let mut last = String::new();
        let ready = loop {
            match std::net::TcpStream::connect((host, port)) {
                Ok(_) => break true,
                Err(e) => last = e.to_string(),
            }
            if started.elapsed() >= timeout {
                break false;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if !ready {
            return Err(StoreError::Timeout {
                call: "connecting to a TCPStore",
                waited: started.elapsed(),
                message: format!("nothing accepts connections at {host}:{port} ({last})"),
            });
        }
        Self::open(host, port, false, timeout.saturating_sub(started.elapsed()))
    }

    /// The port the store listens on (the chosen one when hosted with port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The host name this handle connects through.
    pub fn host_name(&self) -> &str {
        &self.host
    }

    /// Whether this handle runs the server.
    pub fn is_host(&self) -> bool {
        self.is_host
    }

    /// The timeout of [`TcpStore::get`].
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Changes the timeout of [`TcpStore::get`].
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
        // SAFETY: the pointer is live (owned by self); setTimeout cannot throw.
        unsafe { nsa_store_set_timeout(self.ptr.as_ptr(), millis(timeout)) }
    }

    /// Stores `value` under `key` (replacing any previous value).
    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        const CALL: &str = "TCPStore set";
        let k = c_string(CALL, "key", key)?;
        let mut err = vec![0u8; ERR_LEN];
        let started = Instant::now();
        // SAFETY: live store, valid key and value for the call, error buffer as above.
        let kind = unsafe {
            nsa_store_set(
                self.ptr.as_ptr(),
                k.as_ptr(),
                value.as_ptr(),
                value.len(),
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        check(CALL, kind, &err, started, None)
    }

    /// The value under `key`, waiting until it exists for at most [`TcpStore::timeout`].
    pub fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        const CALL: &str = "TCPStore get";
        extern "C" fn sink(ctx: *mut c_void, data: *const u8, len: usize) {
            // SAFETY: ctx is the &mut Vec<u8> passed below, alive for the whole call; data
            // points at len bytes owned by the glue for the duration of this callback.
            unsafe {
                let out = &mut *ctx.cast::<Vec<u8>>();
                if len > 0 {
                    out.extend_from_slice(std::slice::from_raw_parts(data, len));
                }
            }
        }
        let k = c_string(CALL, "key", key)?;
        let mut value: Vec<u8> = Vec::new();
        let mut err = vec![0u8; ERR_LEN];
        let started = Instant::now();
        // SAFETY: live store and key; sink writes only into `value`, which outlives the call.
        let kind = unsafe {
            nsa_store_get(
                self.ptr.as_ptr(),
                k.as_ptr(),
                sink,
                (&mut value as *mut Vec<u8>).cast(),
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        check(CALL, kind, &err, started, Some(self.timeout))?;
        Ok(value)
    }

    /// Adds `delta` to the integer counter under `key` (a missing key counts as 0) and returns
    /// the new value; `add(key, 0)` reads it.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        const CALL: &str = "TCPStore add";
        let k = c_string(CALL, "key", key)?;
        let mut out = 0i64;
        let mut err = vec![0u8; ERR_LEN];
        let started = Instant::now();
        // SAFETY: live store, valid key and out pointer, error buffer as above.
        let kind = unsafe {
            nsa_store_add(
                self.ptr.as_ptr(),
                k.as_ptr(),
                delta,
                &mut out,
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        check(CALL, kind, &err, started, None)?;
        Ok(out)
    }

    fn with_keys<R>(
        call: &'static str,
        keys: &[&str],
        f: impl FnOnce(&[*const c_char]) -> R,
    ) -> Result<R, StoreError> {
        let owned = keys
            .iter()
            .map(|k| c_string(call, "key", k))
            .collect::<Result<Vec<_>, _>>()?;
        let ptrs: Vec<*const c_char> = owned.iter().map(|k| k.as_ptr()).collect();
        Ok(f(&ptrs))
    }

    /// Whether every key exists (does not wait).
    pub fn check(&self, keys: &[&str]) -> Result<bool, StoreError> {
        const CALL: &str = "TCPStore check";
        let mut out: c_int = 0;
        let mut err = vec![0u8; ERR_LEN];
        let started = Instant::now();
        let kind = Self::with_keys(CALL, keys, |ptrs| {
            // SAFETY: live store; ptrs point at NUL-terminated keys alive for the call.
            unsafe {
                nsa_store_check(
                    self.ptr.as_ptr(),
                    ptrs.as_ptr(),
                    ptrs.len(),
                    &mut out,
                    err.as_mut_ptr().cast(),
                    err.len(),
                )
            }
        })?;
        check(CALL, kind, &err, started, None)?;
        Ok(out != 0)
    }

    /// Waits until every key exists, at most `timeout` ([`StoreError::Timeout`] after it).
    pub fn wait(&self, keys: &[&str], timeout: Duration) -> Result<(), StoreError> {
        const CALL: &str = "TCPStore wait";
        let mut err = vec![0u8; ERR_LEN];
        let started = Instant::now();
        let kind = Self::with_keys(CALL, keys, |ptrs| {
            // SAFETY: as in `check`.
            unsafe {
                nsa_store_wait(
                    self.ptr.as_ptr(),
                    ptrs.as_ptr(),
                    ptrs.len(),
                    millis(timeout),
                    err.as_mut_ptr().cast(),
                    err.len(),
                )
            }
        })?;
        check(CALL, kind, &err, started, Some(timeout))
    }
}

impl Drop for TcpStore {
    fn drop(&mut self) {
        // SAFETY: the pointer came from nsa_store_new and is freed exactly once, here.
        unsafe { nsa_store_free(self.ptr.as_ptr()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn host_and_client_share_keys_counters_and_waits() {
        let host = TcpStore::host("127.0.0.1", 0, T).unwrap();
        assert!(host.is_host() && host.port() != 0);
        let client = TcpStore::connect("127.0.0.1", host.port(), T).unwrap();
        assert!(!client.is_host());
        let value: Vec<u8> = (0..=255u8).rev().collect();
        host.set("id", &value).unwrap();
        assert_eq!(client.get("id").unwrap(), value);
        // Empty values and binary zeros survive.
        client.set("empty", &[]).unwrap();
        assert_eq!(host.get("empty").unwrap(), Vec::<u8>::new());
        assert_eq!(client.add("n", 2).unwrap(), 2);
        assert_eq!(host.add("n", 3).unwrap(), 5);
        assert_eq!(client.add("n", 0).unwrap(), 5);
        assert!(client.check(&["id", "n"]).unwrap());
        assert!(!client.check(&["id", "absent"]).unwrap());
        // A wait returns once another thread sets the key.
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(100));
                host.set("late", b"x").unwrap();
            });
            client.wait(&["late"], T).unwrap();
        });
        assert_eq!(client.get("late").unwrap(), b"x");
    }

    #[test]
    fn waits_time_out_with_a_typed_error() {
        let mut host = TcpStore::host("127.0.0.1", 0, T).unwrap();
        let t = Duration::from_millis(200);
        match host.wait(&["never"], t) {
            Err(StoreError::Timeout { waited, .. }) => assert!(waited >= t, "{waited:?}"),
            other => panic!("expected a timeout, got {other:?}"),
        }
        host.set_timeout(t);
        assert!(matches!(host.get("never"), Err(StoreError::Timeout { .. })));
    }

    #[test]
    fn a_taken_port_and_a_missing_server_are_errors() {
        let host = TcpStore::host("127.0.0.1", 0, T).unwrap();
        match TcpStore::host("127.0.0.1", host.port(), T) {
            Err(StoreError::Network { message, .. }) => {
                assert!(!message.is_empty())
            }
            other => panic!("expected a network error for a taken port, got {other:?}"),
        }
        let port = host.port();
        drop(host);
        let t = Duration::from_millis(500);
        let started = Instant::now();
        match TcpStore::connect("127.0.0.1", port, t) {
            Err(StoreError::Timeout { .. }) => {}
            other => panic!("expected a connect timeout, got {other:?}"),
        }
        // It gave up near its timeout, not much later.
        assert!(started.elapsed() < t + Duration::from_secs(5));
        assert!(matches!(
            TcpStore::connect("127.0.0.1\0x", port, t),
            Err(StoreError::Nul { .. })
        ));
    }
}
