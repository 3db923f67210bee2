//! The reference path: every branch as explicit-mask softmax attention over full score
//! matrices. Readable first; O(S²) memory; differentiable end to end through plain libtorch ops.
use tch::{Kind, Tensor};

use crate::config::{AttnError, NsaConfig};

/// float32 for half types (softmax precision), the input's kind otherwise.
pub(crate) fn softmax_kind(kind: Kind) -> Kind {
    match kind {
        Kind::Double => Kind::Double,
        _ => Kind::Float,
    }
}

/// Softmax attention of every query over the keys `visible` allows.
///
/// `q` `[B, S, H, dk]`, `k` `[B, Sk, G, dk]`, `v` `[B, Sk, G, dv]`; `visible` bool
/// `[B or 1, S, G or 1, Sk]` (true = query may read the key). Query head `j` reads key head
/// `j / (H/G)`. Rows with no visible key output zeros. Returns the output `[B, S, H, dv]` and the
/// probabilities `[B, S, H, Sk]` (float32, or float64 for float64 inputs) of
/// [`masked_probs`].
pub fn masked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    visible: &Tensor,
) -> Result<(Tensor, Tensor), AttnError> {
    let per_group = q.size()[2] / k.size()[2];
    let probs = masked_probs(q, k, visible)?;
    let v_h = v.f_repeat_interleave_self_int(per_group, 2, None)?;
    let out = Tensor::f_einsum(
        "bshk,bkhd->bshd",
        &[&probs.f_to_kind(v.kind())?, &v_h],
        None::<i64>,
    )?;
    Ok((out, probs))
}

/// The attention probabilities of [`masked_attention`] (Eq. 2's weights, normalised):
/// `softmax(q·k / √dk)` over the keys `visible` allows, zero rows where none is. Same shapes as
/// [`masked_attention`]; float32 (float64 for float64 inputs). With the compressed keys and the
/// Eq. 7 mask this is `p_cmp` (Eq. 8): the compressed branch and the lean path's selection both
/// take it from here.
pub fn masked_probs(q: &Tensor, k: &Tensor, visible: &Tensor) -> Result<Tensor, AttnError> {
    let (heads, groups) = (q.size()[2], k.size()[2]);
    let per_group = heads / groups;
    let scale = 1.0 / (q.size()[3] as f64).sqrt();
    let k_h = k.f_repeat_interleave_self_int(per_group, 2, None)?;
    let visible = if visible.size()[2] == 1 {
        visible.shallow_clone()
    } else {
        visible.f_repeat_interleave_self_int(per_group, 2, None)?
    };
    let scores =
        Tensor::f_einsum("bshd,bkhd->bshk", &[q, &k_h], None::<i64>)?.f_mul_scalar(scale)?;
    // A row with no visible key would be softmax over nothing (NaN). Let such rows see every
    // key for the softmax and zero them afterwards, so no NaN reaches forward or backward.
    let any = visible.f_any_dims(&[-1i64][..], true)?;
    let softmax_visible = visible.f_logical_or(&any.f_logical_not()?)?;
    let acc = softmax_kind(q.kind());
    Ok(scores
        .f_to_kind(acc)?
        .f_masked_fill(&softmax_visible.f_logical_not()?, f64::NEG_INFINITY)?
        .f_softmax(-1, None::<Kind>)?
        .f_mul(&any.f_to_kind(acc)?)?)
}

/// Query positions `[S, 1]` and key positions `[1, Sk]` as int64 on `device`.
fn positions(s: i64, sk: i64, device: tch::Device) -> Result<(Tensor, Tensor), AttnError> {
    Ok((
        Tensor::f_arange(s, (Kind::Int64, device))?.f_unsqueeze(1)?,
        Tensor::f_arange(sk, (Kind::Int64, device))?.f_unsqueeze(0)?,
    ))
}

/// Compressed branch: query `t` reads compressed token `i` iff `i·d + l − 1 ≤ t` (Eq. 7, the
/// mask of [`nsa_select::visible_compressed`]).
///
/// `cmp_k` `[B, Nc, G, dk]`, `cmp_v` `[B, Nc, G, dv]`. Returns `o_cmp` `[B, S, H, dv]` and
/// `p_cmp` `[B, S, H, Nc]` (Eq. 8: the probabilities selection scores are made from).
pub fn compressed(
    q: &Tensor,
    cmp_k: &Tensor,
    cmp_v: &Tensor,
    cfg: &NsaConfig,
) -> Result<(Tensor, Tensor), AttnError> {
    let (s, nc) = (q.size()[1], cmp_k.size()[1]);
    let visible = nsa_select::visible_compressed(0, s, nc, &cfg.select_config(), q.device())?;
    masked_attention(q, cmp_k, cmp_v, &visible.f_view([1, s, 1, nc])?)
}

/// Selected branch over token ranges (Eq. 12): query `t` of group `g` reads key `s` iff
/// `start ≤ s < end` for one of its ranges. `ranges` int64 `[B, S, G, n, 2]`
/// (`[start, end)`, empty ranges as padding; already clamped to `end ≤ t + 1`).
pub fn selected(q: &Tensor, k: &Tensor, v: &Tensor, ranges: &Tensor) -> Result<Tensor, AttnError> {
    let sk = k.size()[1];
    let key_pos = Tensor::f_arange(sk, (Kind::Int64, q.device()))?.f_view([1, 1, 1, 1, sk])?;
    let start = ranges.f_select(4, 0)?.f_unsqueeze(-1)?;
    let end = ranges.f_select(4, 1)?.f_unsqueeze(-1)?;
    // [B, S, G, n, Sk] -> any over the n ranges -> [B, S, G, Sk]
    let visible = key_pos
        .f_ge_tensor(&start)?
        .f_logical_and(&key_pos.f_lt_tensor(&end)?)?;
    let visible = visible.f_any_dims(&[3i64][..], false)?;
    // The ranges already respect causality; keep the rule explicit anyway (t sees keys ≤ t).
    let (t, s) = positions(q.size()[1], sk, q.device())?;
    let causal = s.f_le_tensor(&t)?.f_unsqueeze(0)?.f_unsqueeze(2)?;
    let visible = visible.f_logical_and(&causal)?;
    Ok(masked_attention(q, k, v, &visible)?.0)
}

/// Sliding-window branch: query `t` reads keys `t − w + 1 ..= t`.
pub fn window(q: &Tensor, k: &Tensor, v: &Tensor, w: i64) -> Result<Tensor, AttnError> {
    let (sq, sk) = (q.size()[1], k.size()[1]);
    let (t, s) = positions(sq, sk, q.device())?;
    let visible = s
        .f_le_tensor(&t)?
        .f_logical_and(&s.f_gt_tensor(&t.f_sub_scalar(w)?)?)?;
    Ok(masked_attention(q, k, v, &visible.f_view([1, sq, 1, sk])?)?.0)
}
