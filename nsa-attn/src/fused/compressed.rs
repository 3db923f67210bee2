//! The compressed branch and block selection on CUDA: the compressed attention and its
//! log-sum-exp on cuDNN's fused attention over folded queries (nsa-sys's
//! [`sys::CompressedBackend::Cudnn`]; its own kernels of `nsa-sys/kernels/compressed.cu` under
//! deterministic algorithms: forward, dQ query-outer, dK/dV key-outer over tiles of compressed
//! tokens, deterministic), then a kernel that recomputes the probabilities from that
//! log-sum-exp, folds them into selection-block scores (Eqs. 8–10) and takes the top n
//! (Eq. 11) without an `[S, Nc]` or `[S, Nb]` tensor. Where these do not apply (CPU, fp32
//! compute, head sizes without an instantiation, more than 64 heads per group) the lean path
//! runs instead.
use nsa_select::SelectImpl;
use tch::{Device, Kind, Tensor};

use super::{compare, compare_rows, fused_err, out_and_grads, scale, CheckRow};
use crate::config::{AttnError, NsaConfig};
use crate::{lean, reference, selection};
use nsa_sys::fused as sys;

/// Whether the compressed-branch kernels take these inputs: CUDA, computed in bf16, dk and dv
/// with a tensor-core instantiation, at most 64 query heads per key head.
pub fn compressed_supported(q: &Tensor, cmp_k: &Tensor, cmp_v: &Tensor) -> bool {
    let group = q.size()[2] / cmp_k.size()[2].max(1);
    matches!(q.device(), Device::Cuda(_))
        && cmp_k.device() == q.device()
        && cmp_v.device() == q.device()
        && sys::compute_kind(q, cmp_k, cmp_v) == Some(Kind::BFloat16)
        && sys::tensor_core_shape(q.size()[3], cmp_v.size()[3], group)
}

/// Whether the selection kernel serves `cfg` on these tensors: the compressed kernels' shapes
/// ([`compressed_supported`]) and at most [`sys::SELECT_MAX_TOP_N`] blocks per token.
fn select_supported(q: &Tensor, cmp_k: &Tensor, cmp_v: &Tensor, cfg: &NsaConfig) -> bool {
    compressed_supported(q, cmp_k, cmp_v) && cfg.nsa.select.top_n <= sys::SELECT_MAX_TOP_N
}

/// The selection parameters of `cfg` for the kernels (Eq. 9's taps from nsa-select).
pub fn select_params(cfg: &NsaConfig) -> sys::SelectParams {
    let sel = cfg.select_config();
    let taps = sel.overlap_taps();
    sys::SelectParams {
        block_len: sel.block_len,
        stride: sel.stride,
        select_len: sel.select_len,
        top_n: sel.top_n,
        n_local: sel.n_local,
        tap_first: taps.first_offset,
        tap_step: taps.step,
        tap_weights: taps.weights,
    }
}

fn bf16(t: &Tensor) -> Result<Tensor, AttnError> {
    Ok(t.f_to_kind(Kind::BFloat16)?.f_contiguous()?)
}

/// Compressed branch (Eq. 7 attention over the compressed tokens) on nsa-sys's default
/// [`sys::CompressedBackend`] (forward and backward), or [`lean::compressed`] (with `chunk`)
/// where [`compressed_supported`] is false.
pub fn compressed(
    q: &Tensor,
    cmp_k: &Tensor,
    cmp_v: &Tensor,
    cfg: &NsaConfig,
    chunk: i64,
) -> Result<Tensor, AttnError> {
    if !compressed_supported(q, cmp_k, cmp_v) {
        return lean::compressed(q, cmp_k, cmp_v, cfg, chunk);
    }
    Ok(attention_and_lse(q, cmp_k, cmp_v, cfg)?.0)
}

fn attention_and_lse(
    q: &Tensor,
    cmp_k: &Tensor,
    cmp_v: &Tensor,
    cfg: &NsaConfig,
) -> Result<(Tensor, Tensor), AttnError> {
    let sel = cfg.select_config();
    sys::compressed_attention(
        &bf16(q)?,
        &bf16(cmp_k)?,
        &bf16(cmp_v)?,
        sel.block_len,
        sel.stride,
        scale(q),
        sys::CompressedBackend::default(),
    )
    .map_err(fused_err)
}

/// The compressed branch's output (differentiable, as [`compressed`]) and the selected blocks
/// computed from that same forward's log-sum-exp (as [`select_blocks`]), so one pass over the
/// compressed tokens serves both; `None` where [`compressed_supported`] is false or `cfg` asks
/// for more than [`sys::SELECT_MAX_TOP_N`] blocks per token.
pub fn compressed_and_select(
    q: &Tensor,
    cmp_k: &Tensor,
    cmp_v: &Tensor,
    cfg: &NsaConfig,
) -> Result<Option<(Tensor, Tensor)>, AttnError> {
    if !select_supported(q, cmp_k, cmp_v, cfg) {
        return Ok(None);
    }
    let (out, lse) = attention_and_lse(q, cmp_k, cmp_v, cfg)?;
    let _g = tch::no_grad_guard();
    let blocks = sys::select_blocks(
        &bf16(&q.f_detach()?)?,
        &bf16(&cmp_k.f_detach()?)?,
        &lse,
        &select_params(cfg),
        scale(q),
    )
    .map_err(fused_err)?;
    Ok(Some((out, blocks)))
}

/// Selected blocks `[B, S, Hkv, n]` (ascending, `−1` padded) for the whole sequence: the
/// compressed kernel's log-sum-exp, then the selection kernel. Falls back to
/// [`selection::blocks_chunked`] (with `chunk` and `imp`) where [`compressed_supported`] is
/// false or `cfg` asks for more than [`sys::SELECT_MAX_TOP_N`] blocks per token.
pub fn select_blocks(
    q: &Tensor,
    cmp_k: &Tensor,
    cmp_v: &Tensor,
    cfg: &NsaConfig,
    chunk: i64,
    imp: SelectImpl,
) -> Result<Tensor, AttnError> {
    if !select_supported(q, cmp_k, cmp_v, cfg) {
        return selection::blocks_chunked(q, cmp_k, cfg, chunk, imp);
    }
    let _g = tch::no_grad_guard();
    let (_, lse) = attention_and_lse(q, cmp_k, cmp_v, cfg)?;
    sys::select_blocks(
        &bf16(q)?,
        &bf16(cmp_k)?,
        &lse,
        &select_params(cfg),
        scale(q),
    )
    .map_err(fused_err)
}

/// Row-wise log-sum-exp of the scaled compressed scores (`−inf` where nothing is visible), in
/// the inputs' dtype, for the checks.
fn reference_lse(q: &Tensor, cmp_k: &Tensor, cfg: &NsaConfig) -> Result<Tensor, AttnError> {
    let (s, nc) = (q.size()[1], cmp_k.size()[1]);
    let hpg = q.size()[2] / cmp_k.size()[2];
    let visible = nsa_select::visible_compressed(0, s, nc, &cfg.select_config(), q.device())?;
    let k_h = cmp_k.f_repeat_interleave_self_int(hpg, 2, None)?;
    let scores = Tensor::f_einsum("bshd,bkhd->bshk", &[q, &k_h], None::<i64>)?
        .f_mul_scalar(scale(q))?
        .f_masked_fill(
            &visible.f_view([1, s, 1, nc])?.f_logical_not()?,
            f64::NEG_INFINITY,
        )?;
    Ok(scores.f_logsumexp(&[-1][..], false)?)
}

/// Ids of `a` and `b` (`[B, S, G, n]`) compared row by row: (rows, rows that differ).
fn differing_rows(a: &Tensor, b: &Tensor) -> Result<(i64, i64), AttnError> {
    let n = a.size()[3];
    let rows = a.numel() as i64 / n.max(1);
    let differ = a
        .f_ne_tensor(b)?
        .f_any_dim(3, false)?
        .f_sum(Kind::Int64)?
        .f_int64_value(&[])?;
    Ok((rows, differ))
}

/// Relative gap below which two block scores count as tied in float32 (the sums of Eqs. 8-10
/// over thousands of compressed tokens round at about 1e-7 relative).
const NEAR_TIE: f64 = 1e-5;

/// Rows where `ids` and `want` (`[B, S, G, n]`) differ, checked against block scores recomputed
/// in float64 for that token: a row is a near-tie when the blocks one side picked and the other
/// did not all score within [`NEAR_TIE`] of each other (relative). Returns (rows that are not
/// near-ties, the largest relative gap among the near-ties). At most 64 rows are examined; the
/// rest count as unexplained.
fn near_ties(
    q: &Tensor,
    ck: &Tensor,
    cfg: &NsaConfig,
    ids: &Tensor,
    want: &Tensor,
) -> Result<(i64, f64), AttnError> {
    let sel = cfg.select_config();
    let s = q.size()[1];
    let num_blocks = sel.num_select_blocks(s);
    let rows = ids.f_ne_tensor(want)?.f_any_dim(3, false)?.f_nonzero()?; // [R, 3]: b, t, g
    let r = rows.size()[0];
    let (mut unexplained, mut worst) = ((r - r.min(64)), 0.0f64);
    for i in 0..r.min(64) {
        let at = |j: i64| rows.f_int64_value(&[i, j]);
        let (b, t, g) = (at(0)?, at(1)?, at(2)?);
        let qt = q
            .f_narrow(0, b, 1)?
            .f_narrow(1, t, 1)?
            .f_to_kind(Kind::Double)?;
        let kb = ck.f_narrow(0, b, 1)?.f_to_kind(Kind::Double)?;
        let p = selection::compressed_probs(&qt, &kb, t, cfg)?;
        let scores = nsa_select::block_scores(&p, cfg.heads_per_group(), num_blocks, &sel)?
            .f_get(0)?
            .f_get(0)?
            .f_get(g)?
            .f_to_kind(Kind::Double)?;
        let picks = |x: &Tensor| -> Result<Vec<i64>, AttnError> {
            let v = Vec::<i64>::try_from(x.f_get(b)?.f_get(t)?.f_get(g)?)?;
            Ok(v.into_iter().filter(|&j| j >= 0).collect())
        };
        let (mine, theirs) = (picks(ids)?, picks(want)?);
        let exchanged: Vec<f64> = mine
            .iter()
            .filter(|j| !theirs.contains(j))
            .chain(theirs.iter().filter(|j| !mine.contains(j)))
            .map(|&j| scores.f_double_value(&[j]))
            .collect::<Result<_, _>>()?;
        let hi = exchanged.iter().cloned().fold(f64::MIN, f64::max);
        let lo = exchanged.iter().cloned().fold(f64::MAX, f64::min);
        let gap = if exchanged.is_empty() {
            f64::INFINITY
        } else {
            (hi - lo) / hi.abs().max(1e-30)
        };
        if gap <= NEAR_TIE {
            worst = worst.max(gap);
        } else {
            unexplained += 1;
        }
    }
    Ok((unexplained, worst))
}

/// GPU check rows of the compressed kernels: the forward against the reference branch
/// (bf16, tolerance 1e-2), and selection against nsa-select on the same inputs — fp32 (the
/// ids must be equal) and bf16 (the fraction of differing rows is reported; near-equal block
/// scores may order differently after bf16 rounding of the recomputed probabilities).
pub fn check_rows(device: Device) -> Vec<CheckRow> {
    let mut rows = Vec::new();
    // (B, S, Hkv, hpg, dk, dv, l, d, l', n, n_local)
    // The last two stream several tiles of 64 compressed tokens (161 and 4,999); the last one
    // has 2,500 selection blocks (l' = 16, a tap step of 2: 64 blocks final per tile).
    let cases: [[i64; 11]; 6] = [
        [2, 333, 2, 16, 192, 128, 32, 16, 64, 6, 2],
        [1, 517, 2, 3, 64, 64, 16, 8, 32, 5, 1],
        [2, 150, 1, 5, 128, 192, 32, 32, 32, 4, 2],
        [1, 20, 2, 4, 64, 128, 32, 16, 64, 3, 2],
        [1, 2600, 2, 16, 192, 128, 32, 16, 64, 16, 2],
        [1, 40000, 1, 3, 64, 64, 16, 8, 16, 8, 1],
    ];
    for [b, s, hkv, hpg, dk, dv, l, d, lp, n, n_local] in cases {
        let name = format!(
            "compressed+select B={b} S={s} H={} Hkv={hkv} dk={dk} dv={dv} l={l} d={d} l'={lp} n={n}",
            hkv * hpg
        );
        let mut cfg = super::check_layer_config(64, (hkv * hpg, hkv), (dk, dv), (l, d, lp, n));
        cfg.nsa.select.n_local = n_local;
        let nc = cfg.select_config().num_compressed(s);
        match check_case(&cfg, b, s, nc.max(1), device) {
            Ok(mut r) => rows.append(&mut r),
            Err(e) => rows.push(CheckRow::failed(name, 0.0, e)),
        }
    }
    let name = "select n = 40 > 32: kernel refuses, layer path falls back".to_string();
    rows.push(too_many_blocks_row(device).unwrap_or_else(|e| CheckRow::failed(name, 0.0, e)));
    rows
}

/// More blocks per token than the selection kernel takes ([`sys::SELECT_MAX_TOP_N`]): the
/// kernel returns a typed input error, and [`select_blocks`] (the layer's path) gives
/// nsa-select's chunked ids instead.
fn too_many_blocks_row(device: Device) -> Result<CheckRow, AttnError> {
    let cfg = super::check_layer_config(64, (6, 2), (64, 64), (16, 8, 16, 40));
    let (b, s) = (1, 900);
    let nc = cfg.select_config().num_compressed(s);
    let _g = tch::no_grad_guard();
    let bf = (Kind::BFloat16, device);
    let q = Tensor::f_randn([b, s, 6, 64], bf)?;
    let ck = Tensor::f_randn([b, nc, 2, 64], bf)?;
    let cv = Tensor::f_randn([b, nc, 2, 64], bf)?;
    let (_, lse) = attention_and_lse(&q, &ck, &cv, &cfg)?;
    let refused = matches!(
        sys::select_blocks(&q, &ck, &lse, &select_params(&cfg), scale(&q)),
        Err(sys::FusedError::Input { what: "params", .. })
    );
    let ids = select_blocks(&q, &ck, &cv, &cfg, 97, SelectImpl::Vectorized)?;
    let want = selection::blocks_chunked(&q, &ck, &cfg, 97, SelectImpl::Vectorized)?;
    let (n_rows, differ) = differing_rows(&ids, &want)?;
    Ok(CheckRow {
        name: format!("select n = 40 > 32: kernel refuses, layer path falls back (S={s})"),
        max_rel_err: differ as f64 / n_rows as f64,
        tolerance: 0.0,
        passed: refused && differ == 0,
        detail: format!(
            "kernel {}; {differ} of {n_rows} rows differ from nsa-select",
            if refused {
                "refused with an input error"
            } else {
                "did not refuse"
            }
        ),
    })
}

fn check_case(
    cfg: &NsaConfig,
    b: i64,
    s: i64,
    nc: i64,
    device: Device,
) -> Result<Vec<CheckRow>, AttnError> {
    let (h, hkv, dk, dv) = (cfg.heads, cfg.kv_heads, cfg.head_dim_k, cfg.head_dim_v);
    let shape = format!(
        "B={b} S={s} H={h} Hkv={hkv} dk={dk} dv={dv} l={} d={} l'={} n={}",
        cfg.nsa.select.block_len,
        cfg.nsa.select.stride,
        cfg.nsa.select.select_len,
        cfg.nsa.select.top_n
    );
    let _g = tch::no_grad_guard();
    let f32o = (Kind::Float, device);
    let q = Tensor::f_randn([b, s, h, dk], f32o)?;
    let ck = Tensor::f_randn([b, nc, hkv, dk], f32o)?;
    let cv = Tensor::f_randn([b, nc, hkv, dv], f32o)?;
    let mut rows = Vec::new();

    // Forward (bf16) against the reference branch in double on the same rounded inputs, and
    // forward + backward with autograd twice, on each backend (the kernels' dK/dV bitwise
    // equal over the two runs).
    let (qb, kb, vb) = (bf16(&q)?, bf16(&ck)?, bf16(&cv)?);
    let dbl = |t: &Tensor| t.f_to_kind(Kind::Double);
    let (ref_out, _) = reference::compressed(&dbl(&qb)?, &dbl(&kb)?, &dbl(&vb)?, cfg)?;
    let ref_lse = reference_lse(&dbl(&qb)?, &dbl(&kb)?, cfg)?;
    let dout = Tensor::f_randn([b, s, h, dv], (Kind::BFloat16, device))?;
    let reference = tch::with_grad(|| {
        out_and_grads(&dbl(&qb)?, &dbl(&kb)?, &dbl(&vb)?, &dout, |q, k, v| {
            Ok(reference::compressed(q, k, v, cfg)?.0)
        })
    })?;
    // Rows that see nothing: output 0 on both paths; lse +inf (fused) vs −inf (reference).
    let seen = ref_lse.f_isfinite()?;
    let lse_r = ref_lse.f_where_self(&seen, &ref_lse.f_zeros_like()?)?;
    let sel = cfg.select_config();
    // The cuDNN backward again split into one call per KV head (where there are several).
    for (backend, label, split) in [
        (sys::CompressedBackend::Kernels, "kernels", false),
        (sys::CompressedBackend::Cudnn, "cudnn", false),
        (
            sys::CompressedBackend::Cudnn,
            "cudnn split by KV head",
            true,
        ),
    ] {
        if split && hkv == 1 {
            continue;
        }
        // The forward does not split: its row runs once per backend.
        if !split {
            super::poison(device);
            let (out, lse) = sys::compressed_forward(
                &qb,
                &kb,
                &vb,
                sel.block_len,
                sel.stride,
                scale(&q),
                backend,
            )
            .map_err(fused_err)?;
            let lse_k = lse
                .f_to_kind(Kind::Double)?
                .f_where_self(&seen, &ref_lse.f_zeros_like()?)?;
            rows.push(compare_rows(
                format!("compressed fwd bf16 {label} {shape}"),
                1e-2,
                &[
                    (out, ref_out.shallow_clone()),
                    (lse_k, lse_r.shallow_clone()),
                ],
            )?);
        }
        let run = || {
            tch::with_grad(|| {
                out_and_grads(&qb, &kb, &vb, &dout, |q, k, v| {
                    let (l, d) = (sel.block_len, sel.stride);
                    Ok(sys::compressed_attention(q, k, v, l, d, scale(q), backend)
                        .map_err(fused_err)?
                        .0)
                })
            })
        };
        let fused = if split {
            super::with_split_heads(|| -> Result<_, AttnError> { Ok([run()?, run()?]) })?
        } else {
            [run()?, run()?]
        };
        rows.push(compare(
            format!("compressed fwd+bwd bf16 {label} {shape}"),
            1e-2,
            fused,
            &reference,
            backend == sys::CompressedBackend::Kernels,
        )?);
    }

    // Selection, fp32: kernel ids vs nsa-select's (lean chunked selection) on the same inputs.
    let lse32 = reference_lse(&q, &ck, cfg)?;
    let params = select_params(cfg);
    let ids = sys::select_blocks(&q, &ck, &lse32, &params, scale(&q)).map_err(fused_err)?;
    let want = selection::blocks_chunked(&q, &ck, cfg, 97, SelectImpl::Vectorized)?;
    let (n_rows, differ) = differing_rows(&ids, &want)?;
    // The kernel and nsa-select sum Eqs. 8-10 in different orders, so two blocks whose
    // scores agree to float32 rounding may rank either way; such a row is a near-tie, any
    // other difference a failure.
    let (unexplained, worst_gap) = if differ > 0 {
        near_ties(&q, &ck, cfg, &ids, &want)?
    } else {
        (0, 0.0)
    };
    rows.push(CheckRow {
        name: format!("select fp32 {shape}"),
        max_rel_err: differ as f64 / n_rows as f64,
        tolerance: 0.0,
        passed: unexplained == 0,
        detail: if differ == 0 {
            format!("0 of {n_rows} rows differ from nsa-select")
        } else {
            format!(
                "{differ} of {n_rows} rows differ from nsa-select, {} of them at near-ties \
                 (exchanged blocks' float64 scores within {worst_gap:.1e} relative)",
                differ - unexplained
            )
        },
    });

    // Selection, bf16: the layer's own path (forward lse, then the kernel) vs nsa-select on
    // the bf16-rounded inputs in fp32.
    let ids_b = select_blocks(&qb, &kb, &vb, cfg, 97, SelectImpl::Vectorized)?;
    let want_b = selection::blocks_chunked(
        &qb.f_to_kind(Kind::Float)?,
        &kb.f_to_kind(Kind::Float)?,
        cfg,
        97,
        SelectImpl::Vectorized,
    )?;
    let (n_rows, differ) = differing_rows(&ids_b, &want_b)?;
    let frac = differ as f64 / n_rows as f64;
    rows.push(CheckRow {
        name: format!("select bf16 {shape}"),
        max_rel_err: frac,
        tolerance: 0.05,
        passed: frac <= 0.05,
        detail: format!(
            "{differ} of {n_rows} rows differ from nsa-select on fp32 (bf16 probabilities reorder near-equal block scores)"
        ),
    });

    // Selection, bf16, each CTA size forced: the same ids bit for bit, poisoned first.
    let (_, lse_b) = attention_and_lse(&qb, &kb, &vb, cfg)?;
    let mut by_cta = Vec::new();
    for cta in [sys::SelectCta::Warps4, sys::SelectCta::Warps8] {
        super::poison(device);
        by_cta.push(
            sys::select_blocks_with(&qb, &kb, &lse_b, &params, scale(&q), cta)
                .map_err(fused_err)?,
        );
    }
    let (n_rows, differ) = differing_rows(&by_cta[1], &by_cta[0])?;
    rows.push(CheckRow {
        name: format!("select bf16 8-warp vs 4-warp CTAs {shape}"),
        max_rel_err: differ as f64 / n_rows as f64,
        tolerance: 0.0,
        passed: differ == 0,
        detail: format!("{differ} of {n_rows} rows differ"),
    });
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `near_ties` on the CPU: a token whose query is zero sees uniform probabilities, so its
    /// interior blocks tie exactly and exchanging two of them is a near-tie; exchanging a block
    /// for one of a different score is not.
    #[test]
    fn near_ties_accept_exchanged_ties_only() {
        let (s, hkv, hpg, dk) = (600, 1, 2, 16);
        let mut cfg =
            crate::fused::check_layer_config(32, (hkv * hpg, hkv), (dk, dk), (16, 8, 16, 4));
        cfg.nsa.select.n_local = 1;
        let nc = cfg.select_config().num_compressed(s);
        let f = (Kind::Float, Device::Cpu);
        let q = Tensor::randn([1, s, hkv * hpg, dk], f);
        let ck = Tensor::randn([1, nc, hkv, dk], f);
        let t = 500;
        let _ = q.narrow(1, t, 1).fill_(0.0);
        let want = selection::blocks_chunked(&q, &ck, &cfg, 97, SelectImpl::Vectorized).unwrap();
        assert_eq!(near_ties(&q, &ck, &cfg, &want, &want).unwrap(), (0, 0.0));
        // Token `tok`'s second pick exchanged for the first block in 1..30 it did not pick.
        let exchange = |tok: i64| {
            let mut row = Vec::<i64>::try_from(want.get(0).get(tok).get(0)).unwrap();
            row[1] = (1..30).find(|j| !row.contains(j)).unwrap();
            row.sort();
            let ids = want.copy();
            ids.get(0).get(tok).get(0).copy_(&Tensor::from_slice(&row));
            near_ties(&q, &ck, &cfg, &ids, &want).unwrap()
        };
        // Token t (zero query): picks block 0, two tied interior blocks, the local one.
        let (unexplained, gap) = exchange(t);
        assert_eq!(unexplained, 0);
        assert!(gap <= NEAR_TIE);
        // A random token: the block it did not choose scores differently.
        assert_eq!(exchange(450).0, 1);
    }
}
