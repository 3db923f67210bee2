//! [`SelectError`]: everything this crate reports instead of panicking.
use tch::{Device, Kind, TchError};

/// Errors of `nsa-select`: invalid configurations, tensors of the wrong shape, dtype or device,
/// arguments out of range, and failures reported by libtorch.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    /// A length or count that must be positive is not.
    #[error("{name} must be positive, got {value}")]
    NonPositive { name: &'static str, value: i64 },
    /// The stride d does not divide l or l' (Eq. 9's overlap form needs both).
    #[error("stride (d) = {stride} must divide {name} = {value}")]
    StrideDoesNotDivide {
        stride: i64,
        name: &'static str,
        value: i64,
    },
    /// Block 0 and the `n_local` local blocks do not fit into the `top_n` selected blocks.
    #[error("n = {top_n} (top_n) must be at least n_local + 1 = {} (block 0 and the n_local local blocks are always selected)", n_local + 1)]
    ForcedBlocksDoNotFit { top_n: i64, n_local: i64 },
    /// A query position below zero.
    #[error("t0 (position of the first query row) must be >= 0, got {t0}")]
    NegativeStart { t0: i64 },
    /// A tensor has the wrong number of dimensions or a size that disagrees with another input.
    #[error("{what}: expected {expected}, got shape {got:?}")]
    Shape {
        what: &'static str,
        expected: String,
        got: Vec<i64>,
    },
    /// A tensor has the wrong element type.
    #[error("{what}: expected dtype {expected}, got {got:?}")]
    DType {
        what: &'static str,
        expected: &'static str,
        got: Kind,
    },
    /// Two inputs live on different devices.
    #[error("{what} is on {got:?} but {other} is on {expected:?}")]
    Device {
        what: &'static str,
        other: &'static str,
        expected: Device,
        got: Device,
    },
    /// `heads_per_group` does not divide the number of heads.
    #[error("heads_per_group = {heads_per_group} must divide the number of heads H = {heads}")]
    HeadsNotDivisible { heads: i64, heads_per_group: i64 },
    /// The block-score tensor has too few blocks for the query rows (the current block of the
    /// last row must have a score).
    #[error("num_blocks (Nb) = {num_blocks} does not reach query position {last_query}: it needs at least {needed} blocks of l' = {select_len} tokens")]
    TooFewBlocks {
        num_blocks: i64,
        last_query: i64,
        needed: i64,
        select_len: i64,
    },
    /// More blocks than the 31-bit block index of the vectorized ordering key can hold.
    #[error("num_blocks (Nb) = {num_blocks} exceeds the supported maximum {max}")]
    TooManyBlocks { num_blocks: i64, max: i64 },
    /// libtorch refused an operation.
    #[error("libtorch: {0}")]
    Torch(#[from] TchError),
}

impl SelectError {
    /// The [`crate::SelectConfig`] field a configuration error is about (`"block_len"`,
    /// `"stride"`, `"select_len"`, `"top_n"` or `"n_local"`); `None` for every other error.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            SelectError::NonPositive { name, .. } => {
                let field = name.split(' ').next().unwrap_or(name);
                ["block_len", "stride", "select_len", "top_n", "n_local"]
                    .contains(&field)
                    .then_some(field)
            }
            SelectError::StrideDoesNotDivide { .. } => Some("stride"),
            SelectError::ForcedBlocksDoNotFit { .. } => Some("top_n"),
            _ => None,
        }
    }
}
