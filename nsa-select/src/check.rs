//! Input validation shared by the reference and vectorized paths, so that both reject exactly
//! the same inputs with the same [`SelectError`].
use tch::{Kind, Tensor};

use crate::{SelectConfig, SelectError};

/// Largest Nb the vectorized ordering key supports: the block index lives in the low 31 bits.
pub(crate) const MAX_BLOCKS: i64 = (1 << 31) - 1;

/// Sizes of a 4-D tensor, or a [`SelectError::Shape`] naming `what` and the expected layout.
pub(crate) fn dims4(
    tensor: &Tensor,
    what: &'static str,
    layout: &str,
) -> Result<[i64; 4], SelectError> {
    let size = tensor.size();
    <[i64; 4]>::try_from(size.as_slice()).map_err(|_| SelectError::Shape {
        what,
        expected: layout.to_string(),
        got: size.clone(),
    })
}

fn is_float(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    )
}

pub(crate) fn start(t0: i64) -> Result<(), SelectError> {
    if t0 < 0 {
        return Err(SelectError::NegativeStart { t0 });
    }
    Ok(())
}

/// Nb must give the current block of the last query row a score, and fit the ordering key.
pub(crate) fn block_count(
    num_blocks: i64,
    t0: i64,
    rows: i64,
    cfg: &SelectConfig,
) -> Result<(), SelectError> {
    if num_blocks > MAX_BLOCKS {
        return Err(SelectError::TooManyBlocks {
            num_blocks,
            max: MAX_BLOCKS,
        });
    }
    if rows > 0 {
        let last_query = t0 + rows - 1;
        let needed = cfg.current_block(last_query) + 1;
        if num_blocks < needed {
            return Err(SelectError::TooFewBlocks {
                num_blocks,
                last_query,
                needed,
                select_len: cfg.select_len,
            });
        }
    }
    Ok(())
}

/// `p_cmp: [B, T, H, Nc]` floating point, `h | H`, `num_blocks ≥ 1`; returns `[B, T, H, Nc]`.
pub(crate) fn compressed_probs_input(
    p_cmp: &Tensor,
    heads_per_group: i64,
    num_blocks: i64,
    cfg: &SelectConfig,
) -> Result<[i64; 4], SelectError> {
    cfg.validate()?;
    let dims = dims4(p_cmp, "p_cmp", "[B, T, H, Nc]")?;
    if !is_float(p_cmp.kind()) {
        return Err(SelectError::DType {
            what: "p_cmp",
            expected: "a floating-point type",
            got: p_cmp.kind(),
        });
    }
    if heads_per_group <= 0 {
        return Err(SelectError::NonPositive {
            name: "heads_per_group",
            value: heads_per_group,
        });
    }
    if dims[2] % heads_per_group != 0 {
        return Err(SelectError::HeadsNotDivisible {
            heads: dims[2],
            heads_per_group,
        });
    }
    if num_blocks <= 0 {
        return Err(SelectError::NonPositive {
            name: "num_blocks (Nb)",
            value: num_blocks,
        });
    }
    if num_blocks > MAX_BLOCKS {
        return Err(SelectError::TooManyBlocks {
            num_blocks,
            max: MAX_BLOCKS,
        });
    }
    Ok(dims)
}

/// `scores: [B, T, G, Nb]` f32 whose Nb covers rows `t0 .. t0 + T`; returns `[B, T, G, Nb]`.
pub(crate) fn block_scores_input(
    scores: &Tensor,
    t0: i64,
    cfg: &SelectConfig,
) -> Result<[i64; 4], SelectError> {
    cfg.validate()?;
    start(t0)?;
    let dims = dims4(scores, "block scores", "[B, T, G, Nb]")?;
    if scores.kind() != Kind::Float {
        return Err(SelectError::DType {
            what: "block scores",
            expected: "f32 (Kind::Float)",
            got: scores.kind(),
        });
    }
    block_count(dims[3], t0, dims[1], cfg)?;
    Ok(dims)
}

/// `blocks: [B, T, G, m]` i64; returns `[B, T, G, m]`.
pub(crate) fn block_ids_input(
    blocks: &Tensor,
    t0: i64,
    cfg: &SelectConfig,
) -> Result<[i64; 4], SelectError> {
    cfg.validate()?;
    start(t0)?;
    let dims = dims4(blocks, "block ids", "[B, T, G, m]")?;
    if blocks.kind() != Kind::Int64 {
        return Err(SelectError::DType {
            what: "block ids",
            expected: "i64 (Kind::Int64)",
            got: blocks.kind(),
        });
    }
    Ok(dims)
}

/// `q: [B, T, H, dk]` and `k_cmp: [B, Nc, Hkv, dk]`, floating point, same device, `Hkv | H`;
/// returns `(q dims, k dims)`.
pub(crate) fn attention_inputs(
    q: &Tensor,
    k_cmp: &Tensor,
    t0: i64,
    cfg: &SelectConfig,
) -> Result<([i64; 4], [i64; 4]), SelectError> {
    cfg.validate()?;
    start(t0)?;
    let q_dims = dims4(q, "q", "[B, T, H, dk]")?;
    let k_dims = dims4(k_cmp, "k_cmp", "[B, Nc, Hkv, dk]")?;
    for (what, tensor) in [("q", q), ("k_cmp", k_cmp)] {
        if !is_float(tensor.kind()) {
            return Err(SelectError::DType {
                what,
                expected: "a floating-point type",
                got: tensor.kind(),
            });
        }
    }
    if q.device() != k_cmp.device() {
        return Err(SelectError::Device {
            what: "k_cmp",
            other: "q",
            expected: q.device(),
            got: k_cmp.device(),
        });
    }
    let [qb, _, heads, qdk] = q_dims;
    let [kb, _, kv_heads, kdk] = k_dims;
    if kb != qb || kdk != qdk || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(SelectError::Shape {
            what: "k_cmp",
            expected: format!("[B = {qb}, Nc, Hkv, dk = {qdk}] with Hkv > 0 dividing H = {heads}"),
            got: k_dims.to_vec(),
        });
    }
    Ok((q_dims, k_dims))
}
