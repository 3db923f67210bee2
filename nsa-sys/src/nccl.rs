//! The NCCL function table, loaded from `libnccl.so.2`.
//!
//! No Rust binding of NCCL exists; we open the library the torch wheel ships (or the system's)
//! and resolve the symbols we call. Search order: the system loader's paths, then the torch
//! wheel layout `<site-packages>/nvidia/nccl/lib/` beside the libtorch in use.
use std::os::raw::c_int;
use std::path::PathBuf;

use crate::SysError;

/// An opened `libnccl.so.2`.
#[derive(Debug)]
pub struct Nccl {
    lib: libloading::Library,
    path: String,
}

impl Nccl {
    /// Opens NCCL from the first place that has it (see the module docs).
    pub fn open() -> Result<Self, SysError> {
        let mut tried = Vec::new();
        for candidate in candidates() {
            // SAFETY: NCCL's initialisers have no preconditions.
            match unsafe { libloading::Library::new(&candidate) } {
                Ok(lib) => {
                    return Ok(Nccl {
                        lib,
                        path: candidate,
                    })
                }
                Err(e) => tried.push(format!("{candidate}: {e}")),
            }
        }
        Err(SysError::Load {
            name: "libnccl.so.2".into(),
            reason: tried.join("; "),
        })
    }

    /// Where the library was found.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// NCCL's version as (major, minor, patch), from `ncclGetVersion`.
    pub fn version(&self) -> Result<(i32, i32, i32), SysError> {
        // SAFETY: signature from nccl.h: ncclResult_t ncclGetVersion(int *version).
        let f: libloading::Symbol<'_, unsafe extern "C" fn(*mut c_int) -> c_int> =
            unsafe { self.lib.get(b"ncclGetVersion") }.map_err(|e| SysError::Symbol {
                library: self.path.clone(),
                symbol: "ncclGetVersion".into(),
                reason: e.to_string(),
            })?;
        let mut v = 0;
        // SAFETY: `v` is a valid out-pointer.
        let code = unsafe { f(&mut v) };
        if code != 0 {
            return Err(SysError::Call {
                call: "ncclGetVersion",
                code: code as i64,
            });
        }
        // NCCL >= 2.9 encodes major*10000 + minor*100 + patch.
        Ok((v / 10000, (v / 100) % 100, v % 100))
    }
}

fn candidates() -> Vec<String> {
    let mut out = vec!["libnccl.so.2".to_string()];
    if let Some(root) = crate::cuda::libtorch_root() {
        // <site-packages>/torch -> <site-packages>/nvidia/nccl/lib/libnccl.so.2
        if let Some(site) = root.parent() {
            let p: PathBuf = site.join("nvidia/nccl/lib/libnccl.so.2");
            out.push(p.display().to_string());
        }
    }
    out
}
