//! Block selection for the selected branch: compressed-attention probabilities → `nsa-select`.
//! Everything here runs without gradient (selection is discrete).
use nsa_select::SelectImpl;
use tch::{Kind, Tensor};

use crate::config::{AttnError, NsaConfig};
use crate::reference::softmax_kind;

/// `p_cmp` for a chunk of queries at absolute positions `t0 .. t0 + T`.
///
/// `q` `[B, T, H, dk]`, `cmp_k` `[B, Nc, G, dk]` → `[B, T, H, Nc]` (float32; float64 for
/// float64 inputs): softmax of `q·k̃ / √dk` over the compressed tokens `i` with
/// `i·d + l − 1 ≤ t`, zero rows where none is visible. The same arithmetic as the reference
/// compressed branch ([`crate::reference::compressed`]).
pub fn compressed_probs(
    q: &Tensor,
    cmp_k: &Tensor,
    t0: i64,
    cfg: &NsaConfig,
) -> Result<Tensor, AttnError> {
    let (t_len, heads, dk) = (q.size()[1], q.size()[2], q.size()[3]);
    let nc = cmp_k.size()[1];
    let k_h = cmp_k.f_repeat_interleave_self_int(heads / cmp_k.size()[2], 2, None)?;
    let scores =
        Tensor::f_einsum("bshd,bkhd->bshk", &[q, &k_h], None::<i64>)? * (1.0 / (dk as f64).sqrt());
    let t = Tensor::arange_start(t0, t0 + t_len, (Kind::Int64, q.device())).unsqueeze(1);
    let i = Tensor::arange(nc, (Kind::Int64, q.device())).unsqueeze(0);
    let visible = (i * cfg.stride + cfg.block_len - 1)
        .le_tensor(&t)
        .view([1, t_len, 1, nc]);
    let any = visible.any_dims(&[-1i64][..], true);
    let acc = softmax_kind(q.kind());
    Ok(scores
        .to_kind(acc)
        .masked_fill(
            &visible.logical_or(&any.logical_not()).logical_not(),
            f64::NEG_INFINITY,
        )
        .softmax(-1, None::<Kind>)
        * any.to_kind(acc))
}

/// Selected blocks `[B, T, G, n]` (sorted, `−1` padded) for queries `t0 .. t0 + T` of a sequence
/// of `seq_len` tokens from their `p_cmp` `[B, T, H, Nc]`.
pub fn blocks_from_probs(
    p_cmp: &Tensor,
    t0: i64,
    seq_len: i64,
    cfg: &NsaConfig,
    imp: SelectImpl,
) -> Result<Tensor, AttnError> {
    let sel = cfg.select_config();
    let num_blocks = sel.num_select_blocks(seq_len);
    let scores = nsa_select::block_scores(p_cmp, cfg.heads_per_group(), num_blocks, &sel)?;
    Ok(nsa_select::select_blocks(&scores, t0, &sel, imp)?)
}

/// Selected blocks `[B, S, G, n]` for the whole sequence, `chunk` queries at a time, so that no
/// `[S, Nc]` probability matrix is ever held: O(chunk · H · Nc) temporary memory.
pub fn blocks_chunked(
    q: &Tensor,
    cmp_k: &Tensor,
    cfg: &NsaConfig,
    chunk: i64,
    imp: SelectImpl,
) -> Result<Tensor, AttnError> {
    let s = q.size()[1];
    let mut parts = Vec::with_capacity(((s + chunk - 1) / chunk) as usize);
    let mut t0 = 0;
    while t0 < s {
        let t_len = chunk.min(s - t0);
        let p_cmp = compressed_probs(&q.narrow(1, t0, t_len), cmp_k, t0, cfg)?;
        parts.push(blocks_from_probs(&p_cmp, t0, s, cfg, imp)?);
        t0 += t_len;
    }
    Ok(Tensor::f_cat(&parts, 1)?)
}

/// Merged token ranges `[B, T, G, n, 2]` (`[start, end)`, clamped to `end ≤ t + 1`, empty
/// padding) of `blocks` `[B, T, G, n]` for queries starting at `t0`.
pub fn ranges(
    blocks: &Tensor,
    t0: i64,
    cfg: &NsaConfig,
    imp: SelectImpl,
) -> Result<Tensor, AttnError> {
    Ok(nsa_select::ranges_from_blocks(blocks, t0, &cfg.select_config(), imp)?.ranges)
}
