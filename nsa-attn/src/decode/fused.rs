//! The decode step on the decode kernels (`nsa_sys::fused::DecodeStep`): the three branches,
//! selection and the gated mix of one new token per sequence in four kernel launches, on the
//! fused path on CUDA (bf16 or float32). Same semantics as the step's libtorch ops
//! (`super::NsaAttention::step`); `nsa-train check --gpu` compares the two.
use nsa_sys::fused as sys;
use tch::{Device, Kind, Tensor};

use super::cache::NsaCache;
use super::plan::DecodePlan;
use crate::config::{AttnError, NsaConfig};
use crate::fused::select_params;
use crate::layer::{AttnPath, ForwardOpts};

/// Whether a step of `cfg` with `opts` on a cache of `kind` on `device` runs on the decode
/// kernels.
pub(crate) fn supported(cfg: &NsaConfig, opts: &ForwardOpts, kind: Kind, device: Device) -> bool {
    let tensor_core_dims = sys::MMA_HEAD_DIMS.contains(&cfg.head_dim_k) && cfg.head_dim_v % 16 == 0;
    matches!(opts.path, AttnPath::Fused(_))
        && device.is_cuda()
        && (kind == Kind::Float || (kind == Kind::BFloat16 && tensor_core_dims))
        && (1..=sys::DECODE_MAX_GROUP).contains(&cfg.heads_per_group())
        && cfg.nsa.select.top_n <= sys::DECODE_MAX_TOP_N
        && cfg.head_dim_v % 4 == 0
        && cfg.head_dim_v <= sys::DECODE_MAX_DV
}

/// A [`sys::DecodeStep`] over `cache`'s buffers for queries `q` `[B, Hkv, h, dk]` at
/// `positions` (int64 `[B]` on the cache's device, each `≤ max_position`) with `gates`
/// `[B, H, 3]` (`q`'s kind): launch it, or capture it as a CUDA graph and replay it after
/// overwriting `q`, `positions` and `gates` in place. `launch`: the launches' shapes (the
/// default: the device's own pick; see [`sys::DecodeLaunch`]).
pub fn kernel_step(
    cache: &NsaCache,
    q: &Tensor,
    positions: &Tensor,
    max_position: i64,
    gates: &Tensor,
    launch: sys::DecodeLaunch,
) -> Result<sys::DecodeStep, AttnError> {
    let cfg = &cache.cfg;
    let select = select_params(cfg);
    let window = cache.window.as_ref().map(|ring| (&ring.k, &ring.v));
    Ok(sys::DecodeStep::new(
        sys::DecodeInputs {
            q,
            cmp_k: &cache.compressed.k,
            cmp_v: &cache.compressed.v,
            raw_k: &cache.raw.k,
            raw_v: &cache.raw.v,
            window,
            positions,
            gates,
            tickets: Some(&cache.tickets),
        },
        sys::DecodeParams {
            select: &select,
            window: cfg.nsa.window,
            scale: 1.0 / (cfg.head_dim_k as f64).sqrt(),
            max_position,
            launch,
        },
    )?)
}

/// The kernels' step: `q` `[B, Hkv, h, dk]` against `cache` (the new token already written,
/// compressed tokens emitted) with `gates` `[B, 1, H, 3]`. Returns the mixed branch outputs
/// `[B, 1, H, dv]` and the selected blocks int64 `[B, Hkv, n]`.
pub(crate) fn attend(
    cfg: &NsaConfig,
    q: &Tensor,
    cache: &NsaCache,
    plan: &DecodePlan,
    gates: &Tensor,
) -> Result<(Tensor, Tensor), AttnError> {
    let b = cache.batch();
    let q = q.f_contiguous()?;
    let gates = gates
        .f_reshape([b, cfg.heads, 3])?
        .f_to_kind(q.kind())?
        .f_contiguous()?;
    let step = kernel_step(
        cache,
        &q,
        &plan.dev.positions,
        plan.position_bound,
        &gates,
        sys::DecodeLaunch::default(),
    )?;
    step.launch()?;
    Ok((
        step.output().f_view([b, 1, cfg.heads, cfg.head_dim_v])?,
        step.blocks().shallow_clone(),
    ))
}
