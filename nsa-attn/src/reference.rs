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
/// probabilities `[B, S, H, Sk]` (float32, or float64 for float64 inputs).
pub fn masked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    visible: &Tensor,
) -> Result<(Tensor, Tensor), AttnError> {
    let (heads, groups) = (q.size()[2], k.size()[2]);
    let per_group = heads / groups;
    let scale = 1.0 / (q.size()[3] as f64).sqrt();
    let k_h = k.f_repeat_interleave_self_int(per_group, 2, None)?;
    let v_h = v.f_repeat_interleave_self_int(per_group, 2, None)?;
    let visible = if visible.size()[2] == 1 {
        visible.shallow_clone()
    } else {
        visible.f_repeat_interleave_self_int(per_group, 2, None)?
    };
    let scores = Tensor::f_einsum("bshd,bkhd->bshk", &[q, &k_h], None::<i64>)? * scale;
    // A row with no visible key would be softmax over nothing (NaN). Let such rows see every
    // key for the softmax and zero them afterwards, so no NaN reaches forward or backward.
    let any = visible.any_dims(&[-1i64][..], true);
    let softmax_visible = visible.logical_or(&any.logical_not());
    let probs = scores
        .to_kind(softmax_kind(q.kind()))
        .masked_fill(&softmax_visible.logical_not(), f64::NEG_INFINITY)
        .softmax(-1, None::<Kind>)
        * any.to_kind(softmax_kind(q.kind()));
    let out = Tensor::f_einsum(
        "bshk,bkhd->bshd",
        &[&probs.to_kind(v.kind()), &v_h],
        None::<i64>,
    )?;
    Ok((out, probs))
}

/// Query positions `[S, 1]` and key positions `[1, Sk]` as int64 on `device`.
fn positions(s: i64, sk: i64, device: tch::Device) -> (Tensor, Tensor) {
    (
        Tensor::arange(s, (Kind::Int64, device)).unsqueeze(1),
        Tensor::arange(sk, (Kind::Int64, device)).unsqueeze(0),
    )
}

/// Compressed branch: query `t` reads compressed token `i` iff `i·d + l − 1 ≤ t`.
///
/// `cmp_k` `[B, Nc, G, dk]`, `cmp_v` `[B, Nc, G, dv]`. Returns `o_cmp` `[B, S, H, dv]` and
/// `p_cmp` `[B, S, H, Nc]` (the probabilities selection scores are made from).
pub fn compressed(
    q: &Tensor,
    cmp_k: &Tensor,
    cmp_v: &Tensor,
    cfg: &NsaConfig,
) -> Result<(Tensor, Tensor), AttnError> {
    let (s, nc) = (q.size()[1], cmp_k.size()[1]);
    let (t, i) = positions(s, nc, q.device());
    let visible = (i * cfg.stride + cfg.block_len - 1).le_tensor(&t);
    masked_attention(q, cmp_k, cmp_v, &visible.view([1, s, 1, nc]))
}

/// Selected branch over token ranges: query `t` of group `g` reads key `s` iff
/// `start ≤ s < end` for one of its ranges. `ranges` int64 `[B, S, G, n, 2]`
/// (`[start, end)`, empty ranges as padding; already clamped to `end ≤ t + 1`).
pub fn selected(q: &Tensor, k: &Tensor, v: &Tensor, ranges: &Tensor) -> Result<Tensor, AttnError> {
    let sk = k.size()[1];
    let key_pos = Tensor::arange(sk, (Kind::Int64, q.device())).view([1, 1, 1, 1, sk]);
    let start = ranges.select(4, 0).unsqueeze(-1);
    let end = ranges.select(4, 1).unsqueeze(-1);
    // [B, S, G, n, Sk] -> any over the n ranges -> [B, S, G, Sk]
    let visible = key_pos
        .ge_tensor(&start)
        .logical_and(&key_pos.lt_tensor(&end));
    let visible = visible.any_dims(&[3i64][..], false);
    // The ranges already respect causality; keep the rule explicit anyway (t sees keys ≤ t).
    let (t, s) = positions(q.size()[1], sk, q.device());
    let visible = visible.logical_and(&s.le_tensor(&t).unsqueeze(0).unsqueeze(2));
    Ok(masked_attention(q, k, v, &visible)?.0)
}

/// Sliding-window branch: query `t` reads keys `t − w + 1 ..= t`.
pub fn window(q: &Tensor, k: &Tensor, v: &Tensor, w: i64) -> Result<Tensor, AttnError> {
    let (sq, sk) = (q.size()[1], k.size()[1]);
    let (t, s) = positions(sq, sk, q.device());
    let visible = s.le_tensor(&t).logical_and(&s.gt_tensor(&(&t - w)));
    Ok(masked_attention(q, k, v, &visible.view([1, sq, 1, sk]))?.0)
}
