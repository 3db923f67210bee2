//! Block selection for the selected branch: compressed-attention probabilities → `nsa-select`.
//! Everything here runs without gradient (selection is discrete).
use nsa_select::SelectImpl;
use tch::Tensor;

use crate::config::{AttnError, NsaConfig};
use crate::reference::masked_probs;

/// `p_cmp` (Eq. 8) for a chunk of queries at absolute positions `t0 .. t0 + T`.
///
/// `q` `[B, T, H, dk]`, `cmp_k` `[B, Nc, G, dk]` → `[B, T, H, Nc]` (float32; float64 for
/// float64 inputs): softmax of `q·k̃ / √dk` over the compressed tokens `i` with
/// `i·d + l − 1 ≤ t` (Eq. 7, [`nsa_select::visible_compressed`]), zero rows where none is
/// visible. The very arithmetic of the reference compressed branch
/// ([`crate::reference::compressed`]): both call [`masked_probs`].
pub fn compressed_probs(
    q: &Tensor,
    cmp_k: &Tensor,
    t0: i64,
    cfg: &NsaConfig,
) -> Result<Tensor, AttnError> {
    let (t_len, nc) = (q.size()[1], cmp_k.size()[1]);
    let visible = nsa_select::visible_compressed(t0, t_len, nc, &cfg.select_config(), q.device())?;
    masked_probs(q, cmp_k, &visible.f_view([1, t_len, 1, nc])?)
}

/// Selected blocks `[B, T, G, n]` (sorted, `−1` padded) for queries `t0 .. t0 + T` of a sequence
/// of `seq_len` tokens from their `p_cmp` `[B, T, H, Nc]`: block scores (Eqs. 9 and 10), then
/// the top n (Eq. 11).
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

/// Selected blocks `[B, S, G, n]` for the whole sequence, `chunk` queries at a time
/// ([`nsa_select::select_blocks_chunked`] fed with [`compressed_probs`]), so that no `[S, Nc]`
/// probability matrix is ever held: O(chunk · H · Nc) temporary memory.
pub fn blocks_chunked(
    q: &Tensor,
    cmp_k: &Tensor,
    cfg: &NsaConfig,
    chunk: i64,
    imp: SelectImpl,
) -> Result<Tensor, AttnError> {
    let s = q.size()[1];
    nsa_select::select_blocks_chunked(
        s,
        chunk,
        cfg.heads_per_group(),
        &cfg.select_config(),
        imp,
        |t0, t1| compressed_probs(&q.f_narrow(1, t0, t1 - t0)?, cmp_k, t0, cfg),
    )
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
