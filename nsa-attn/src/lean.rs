//! The lean path: the three branches through the chunked, recompute-in-backward attention
//! functions of `nsa_sys::autograd`. Same semantics as [`crate::reference`], no O(S²) tensor.
use tch::{Kind, Tensor};

use crate::config::{AttnError, NsaConfig};
use nsa_sys::autograd;

fn scale(q: &Tensor) -> f64 {
    1.0 / (q.size()[3] as f64).sqrt()
}

/// Compressed branch: span attention with `lo = 0`, `hi = #visible compressed tokens` (Eq. 7).
pub fn compressed(
    q: &Tensor,
    cmp_k: &Tensor,
    cmp_v: &Tensor,
    cfg: &NsaConfig,
    chunk: i64,
) -> Result<Tensor, AttnError> {
    let (lo, hi) = compressed_key_limits(q.size()[1], cmp_k.size()[1], cfg)?;
    Ok(autograd::span_attention(
        q,
        cmp_k,
        cmp_v,
        &lo,
        &hi,
        scale(q),
        chunk,
    )?)
}

/// Selected branch (Eq. 12): block attention over `blocks` `[B, S, G, n]` (blocks of l' tokens,
/// keys ≤ t). A repeated id counts once and ids outside `[0, ⌊t/l'⌋]` are ignored, as on every
/// path.
pub fn selected(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    blocks: &Tensor,
    cfg: &NsaConfig,
    chunk: i64,
) -> Result<Tensor, AttnError> {
    Ok(autograd::block_attention(
        q,
        k,
        v,
        blocks,
        cfg.nsa.select.select_len,
        scale(q),
        chunk,
    )?)
}

/// Sliding window: span attention with `lo = t − w + 1`, `hi = t + 1`.
pub fn window(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cfg: &NsaConfig,
    chunk: i64,
) -> Result<Tensor, AttnError> {
    let (lo, hi) = window_key_limits(q.size()[1], cfg.nsa.window)?;
    Ok(autograd::span_attention(
        q,
        k,
        v,
        &lo,
        &hi,
        scale(q),
        chunk,
    )?)
}

/// Key limits `[lo, hi)` per query of the compressed branch, int64 `[S]` on the CPU: `lo = 0`,
/// `hi = #{i < Nc : i·d + l − 1 ≤ t}` (Eq. 7, nsa-select's
/// [`nsa_select::visible_compressed_counts`]).
pub fn compressed_key_limits(
    s: i64,
    nc: i64,
    cfg: &NsaConfig,
) -> Result<(Tensor, Tensor), AttnError> {
    let cpu = tch::Device::Cpu;
    let hi =
        nsa_select::visible_compressed_counts(0, s, &cfg.select_config(), cpu)?.f_clamp_max(nc)?;
    Ok((Tensor::f_zeros([s], (Kind::Int64, cpu))?, hi))
}

/// Key limits `[lo, hi)` per query of the sliding window, int64 `[S]` on the CPU:
/// `lo = max(0, t − w + 1)`, `hi = t + 1`.
pub fn window_key_limits(s: i64, window: i64) -> Result<(Tensor, Tensor), AttnError> {
    let t = Tensor::f_arange(s, (Kind::Int64, tch::Device::Cpu))?;
    Ok((
        t.f_sub_scalar(window - 1)?.f_clamp_min(0)?,
        t.f_add_scalar(1)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Phi;
    use nsa_select::SelectConfig;

    fn host(t: &Tensor) -> Vec<i64> {
        let n = t.numel();
        let mut v = vec![0i64; n];
        t.copy_data(&mut v, n);
        v
    }

    #[test]
    fn compressed_limits_count_the_complete_visible_blocks() {
        for (l, d) in [(32, 16), (4, 2), (3, 1), (8, 8)] {
            let mut cfg = NsaConfig::paper(8);
            cfg.nsa.select = SelectConfig {
                block_len: l,
                stride: d,
                select_len: l,
                ..cfg.nsa.select
            };
            cfg.nsa.phi = Phi::Mean;
            let s = 100;
            let nc = cfg.select_config().num_compressed(s);
            let (lo, hi) = compressed_key_limits(s, nc, &cfg).unwrap();
            assert!(host(&lo).iter().all(|&x| x == 0));
            for (t, &h) in host(&hi).iter().enumerate() {
                let want = (0..nc).filter(|i| i * d + l - 1 <= t as i64).count() as i64;
                assert_eq!(h, want, "l={l} d={d} t={t}");
            }
        }
    }

    #[test]
    fn window_limits_cover_the_last_w_keys() {
        let (lo, hi) = window_key_limits(10, 3).unwrap();
        assert_eq!(host(&lo), [0, 0, 0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(host(&hi), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    }
}
