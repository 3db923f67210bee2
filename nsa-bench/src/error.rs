//! [`BenchError`]: why a benchmark could not run or could not finish.
use nsa_attn::AttnError;
use nsa_model::ModelError;
use nsa_select::SelectError;
use tch::TchError;

/// Everything a benchmark can fail with.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A flag's value is out of range or does not fit the others (the message names the flag).
    #[error("{0}")]
    Flag(String),
    /// The benchmark needs something this machine lacks (a GPU, allocator statistics).
    #[error("{0}")]
    Unavailable(String),
    /// `bench select`: the vectorized outputs differ from the reference loops' for these rows.
    #[error("vectorized and reference outputs differ for: {0}")]
    OutputsDiffer(String),
    /// Reading, writing or starting a process failed; `what` says which.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A benchmark child process's result line could not be read or written.
    #[error("result line: {0}")]
    Json(#[from] serde_json::Error),
    /// libtorch refused an operation.
    #[error("libtorch: {0}")]
    Torch(#[from] TchError),
    /// Block selection failed.
    #[error("selection: {0}")]
    Select(#[from] SelectError),
    /// The NSA layer failed.
    #[error("nsa attention: {0}")]
    Attn(#[from] AttnError),
    /// A model preset could not be built.
    #[error("model: {0}")]
    Model(#[from] ModelError),
    /// Loading libtorch's CUDA backend or reading the driver failed.
    #[error("{0}")]
    Sys(#[from] nsa_sys::SysError),
    /// A call through nsa-sys's C++ glue failed (e.g. autograd's backward).
    #[error("{0}")]
    Glue(#[from] nsa_sys::autograd::GlueError),
}

impl BenchError {
    /// An [`BenchError::Io`] error with what was being done.
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        BenchError::Io {
            what: what.into(),
            source,
        }
    }
}
