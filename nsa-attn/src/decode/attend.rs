//! The decode step's attention: one query per sequence against a key set per K/V group.
use tch::{Kind, Tensor};

use super::plan::PlanTensors;
use crate::config::AttnError;
use crate::reference::softmax_kind;

/// Softmax attention of one query per (sequence, head) over `K` keys per (sequence, group).
///
/// `q` `[B, Hkv, h, dk]` (query head `g·h + i` is row `i` of group `g`), `k` `[B, Hkv, K, dk]`,
/// `v` `[B, Hkv, K, dv]`, `visible` bool `[B, Hkv or 1, 1, K]`. Returns the output
/// `[B, Hkv, h, dv]` in `v`'s kind and the probabilities `[B, Hkv, h, K]` (float32, float64 for
/// float64 inputs): `softmax(q·k / √dk)` over the visible keys, computed as
/// [`crate::reference::masked_probs`] computes it (scores in the input kind, scaled, then the
/// softmax in float32), without repeating keys per head. Rows with no visible key are zeros.
pub(crate) fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    visible: &Tensor,
) -> Result<(Tensor, Tensor), AttnError> {
    let scale = 1.0 / (q.size()[3] as f64).sqrt();
    let scores = q.f_matmul(&k.f_transpose(2, 3)?)?.f_mul_scalar(scale)?;
    // As in masked_probs: a row without a visible key sees all of them for the softmax and is
    // zeroed afterwards, so no NaN appears.
    let any = visible.f_any_dims(&[-1i64][..], true)?;
    let softmax_visible = visible.f_logical_or(&any.f_logical_not()?)?;
    let acc = softmax_kind(q.kind());
    let probs = scores
        .f_to_kind(acc)?
        .f_masked_fill(&softmax_visible.f_logical_not()?, f64::NEG_INFINITY)?
        .f_softmax(-1, None::<Kind>)?
        .f_mul(&any.f_to_kind(acc)?)?;
    let out = probs.f_to_kind(v.kind())?.f_matmul(v)?;
    Ok((out, probs))
}

/// The raw-buffer slots the selected branch reads and which of them count: for `blocks`
/// `[B, Hkv, n]` (ids, `−1` padding) the positions `j·l' + u` (`u < l'`) as int64
/// `[B, Hkv, n·l']`, clamped into the buffer, and bool `[B, Hkv, n·l']` true where the id is
/// valid and the position `≤ t_b` (keys after the new token and blocks past the current one are
/// never read).
pub(crate) fn selected_slots(
    blocks: &Tensor,
    dev: &PlanTensors,
    select_len: i64,
    capacity: i64,
) -> Result<(Tensor, Tensor), AttnError> {
    let sz = blocks.size();
    let (b, g, n) = (sz[0], sz[1], sz[2]);
    let ids = blocks.f_unsqueeze(-1)?;
    let positions = ids
        .f_mul_scalar(select_len)?
        .f_add(&dev.select_offsets.f_view([1, 1, 1, select_len])?)?;
    let valid = ids
        .f_ge(0)?
        .f_logical_and(&positions.f_le_tensor(&dev.positions.f_view([b, 1, 1, 1])?)?)?
        .f_reshape([b, g, n * select_len])?;
    let slots = positions
        .f_clamp(0, capacity - 1)?
        .f_reshape([b, g, n * select_len])?;
    Ok((slots, valid))
}
