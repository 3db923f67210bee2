//! The fused path: the selected branch on the NVRTC kernels of `nsa-sys` and the sliding window
//! with its forward on nsa-sys's wgmma kernel on Hopper (libtorch's flash kernel elsewhere) and
//! flash's backward, on CUDA; the same
//! signatures and semantics as [`crate::lean`], which they fall back to where they do not apply
//! (CPU tensors, dtypes other than bf16/fp32, and for the window fp32). The
//! compressed branch and block selection run on the kernels of [`compressed`]'s module
//! (selection always, the branch's output at inference; in training it is the lean path's).
//! The gated sum of the branches runs on nsa-sys's pointwise kernel, in one autograd function
//! with the output projection (`gate_mix_project`), as RoPE does through
//! `crate::rope::Rope::with_kernel`.
//!
//! [`gpu_check`] runs the parity checks of the fused functions against the reference path on
//! fresh random inputs and returns one [`CheckRow`] per case (for `nsa-train check --gpu`).
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::config::{AttnError, NsaConfig};
use crate::{lean, reference};
use nsa_sys::fused as sys;

mod check;
mod compressed;
mod layer_check;
mod pointwise_check;
mod sync_check;
pub use check::{check_device, gpu_check, gpu_check_parts, CheckPart};
pub use compressed::{
    compressed, compressed_and_select, compressed_supported, select_blocks, select_params,
};

fn scale(q: &Tensor) -> f64 {
    1.0 / (q.size()[3] as f64).sqrt()
}

fn fused_err(e: sys::FusedError) -> AttnError {
    AttnError::Fused(e)
}

/// Whether [`selected`] runs the fused kernels for these inputs (CUDA, computed in bf16 or
/// fp32) rather than the lean path.
pub fn selected_supported(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    matches!(q.device(), Device::Cuda(_))
        && k.device() == q.device()
        && v.device() == q.device()
        && matches!(
            sys::compute_kind(q, k, v),
            Some(Kind::BFloat16 | Kind::Float)
        )
}

/// The head size the flash window kernel runs at: `max(dk, dv)` rounded up to a multiple of 8
/// (flash needs equal q/k and v head sizes; [`window`] zero-pads the smaller ones).
pub(crate) fn window_head_dim(dk: i64, dv: i64) -> i64 {
    (dk.max(dv) + 7) / 8 * 8
}

/// Whether [`window`] runs the fused window (the wgmma or flash forward, flash's backward) for
/// these inputs (CUDA, computed in bf16, head sizes padded to at most 256) rather than the lean
/// path.
pub fn window_supported(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let (dk, dv) = (q.size()[3], v.size()[3]);
    matches!(q.device(), Device::Cuda(_))
        && k.device() == q.device()
        && v.device() == q.device()
        && window_head_dim(dk, dv) <= 256
        && sys::compute_kind(q, k, v) == Some(Kind::BFloat16)
}

/// The largest group (query heads per K/V head) for which the fused selected branch also runs
/// when gradients are needed and its backward would be the SIMT kernels (fp32, or head sizes
/// without a tensor-core instantiation): at G = 16 the SIMT backward was 4.4× slower than the
/// lean path's (BENCHMARKS.md, "Fused kernels"), while at G = 3 it wins. The tensor-core
/// backward (bf16, [`sys::tensor_core_shape`]) has no such limit; inference
/// takes the fused forward at any G.
const MAX_GROUP_FOR_SIMT_BACKWARD: i64 = 8;

/// Whether a differentiable call is faster on the lean path (under `no_grad` the projections'
/// outputs do not require gradients, so inference stays fused).
fn lean_backward_is_faster(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let wants_grad = q.requires_grad() || k.requires_grad() || v.requires_grad();
    let group = q.size()[2] / k.size()[2].max(1);
    let tensor_cores = sys::compute_kind(q, k, v) == Some(Kind::BFloat16)
        && sys::tensor_core_shape(q.size()[3], v.size()[3], group);
    wants_grad && !tensor_cores && group > MAX_GROUP_FOR_SIMT_BACKWARD
}

/// Selected branch: query `t` of group `g` attends the keys `≤ t` of the blocks
/// `blocks[b, t, g, :]` (int64 or int32 `[B, S, Hkv, n]`; duplicates count once, ids outside
/// `[0, ⌊t/l'⌋]` are ignored). Layouts as [`lean::selected`]; `chunk` is used only on the lean
/// fallback.
pub fn selected(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    blocks: &Tensor,
    cfg: &NsaConfig,
    chunk: i64,
) -> Result<Tensor, AttnError> {
    if !selected_supported(q, k, v) || lean_backward_is_faster(q, k, v) {
        return lean::selected(q, k, v, blocks, cfg, chunk);
    }
    let blocks = blocks.f_to_device(q.device())?.f_contiguous()?;
    sys::selected_attention(
        &q.f_contiguous()?,
        &k.f_contiguous()?,
        &v.f_contiguous()?,
        &blocks,
        cfg.nsa.select.select_len,
        scale(q),
    )
    .map_err(fused_err)
}

/// Sliding window: query `t` attends keys `t − w + 1 ..= t`. Layouts as [`lean::window`];
/// `chunk` is used only on the lean fallback.
pub fn window(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cfg: &NsaConfig,
    chunk: i64,
) -> Result<Tensor, AttnError> {
    if !window_supported(q, k, v) {
        return lean::window(q, k, v, cfg, chunk);
    }
    // The kernels take dv ≤ dk, a multiple of 8: q and k get zero columns up to that (they
    // change no score q·k; autograd carries the gradients back through the pads); the scale
    // stays 1/√dk of the real dk. v keeps its dv columns: the glue pads it where flash runs.
    let (dk, dv) = (q.size()[3], v.size()[3]);
    let d = window_head_dim(dk, dv);
    // The kernels read contiguous rows; the layer's q, k and v are views of its projections.
    let pad = |t: &Tensor| -> Result<Tensor, AttnError> {
        Ok(if dk == d {
            t.f_contiguous()?
        } else {
            t.f_constant_pad_nd([0, d - dk])?.f_contiguous()?
        })
    };
    let v = v.f_contiguous()?;
    sys::window_attention(&pad(q)?, &pad(k)?, &v, cfg.nsa.window, scale(q)).map_err(fused_err)
}

/// The gated sum of the branch outputs (Eq. 5) and the output projection `W_o` (no bias):
/// on CUDA, when all four are bf16 or all fp32 on one device, nsa-sys's pointwise kernel
/// (one pass each way) and a matmul in one autograd function
/// (`nsa_sys::fused::gate_mix_project`) that does not keep the sum for backward; else
/// [`crate::gates`]' `mix` and `linear`. `W_o` is cast to the branch outputs' dtype first, as
/// autocast's `linear` casts it.
pub(crate) fn gate_mix_project(
    gates: &Tensor,
    compressed: &Tensor,
    selected: &Tensor,
    window: &Tensor,
    wo: &Tensor,
) -> Result<Tensor, AttnError> {
    let kind = compressed.kind();
    let fits = matches!(compressed.device(), Device::Cuda(_))
        && matches!(kind, Kind::BFloat16 | Kind::Float)
        && [gates, selected, window]
            .iter()
            .all(|t| t.kind() == kind && t.device() == compressed.device());
    if !fits {
        let mixed = crate::gates::mix(gates, compressed, selected, window)?;
        let size = mixed.size();
        let flat = mixed.f_reshape([size[0], size[1], size[2] * size[3]])?;
        return Ok(flat.f_linear::<&Tensor>(wo, None)?);
    }
    // The branch outputs go as they are: the kernel reads rows at a stride (the window
    // branch's output is a narrowed view of a wider one at dk != dv) and copies any other layout.
    let w = wo.f_to_kind(kind)?.f_contiguous()?;
    sys::gate_mix_project(compressed, selected, window, &gates.f_contiguous()?, &w)
        .map_err(fused_err)
}

/// The selected branch's visibility from block ids, for the reference path: bool
/// `[B, S, G, S]`, true where key `s` lies in one of the blocks `blocks[b, t, g, :]` and
/// `s ≤ t`. Duplicate and out-of-range ids change nothing, by construction.
pub fn block_mask(blocks: &Tensor, block_len: i64) -> Result<Tensor, AttnError> {
    let s = blocks.size()[1];
    let dev = blocks.device();
    let key_block = Tensor::f_arange(s, (Kind::Int64, dev))?
        .f_div_scalar_mode(block_len, "floor")?
        .f_view([1, 1, 1, 1, s])?;
    let hit = blocks
        .f_to_kind(Kind::Int64)?
        .f_unsqueeze(-1)?
        .f_eq_tensor(&key_block)?
        .f_any_dims(&[3i64][..], false)?;
    let t = Tensor::f_arange(s, (Kind::Int64, dev))?.f_view([s, 1])?;
    let key = Tensor::f_arange(s, (Kind::Int64, dev))?.f_view([1, s])?;
    let causal = key.f_le_tensor(&t)?.f_view([1, s, 1, s])?;
    Ok(hit.f_logical_and(&causal)?)
}

/// The reference twin of [`selected`]: explicit-mask softmax over [`block_mask`].
pub fn reference_selected(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    blocks: &Tensor,
    block_len: i64,
) -> Result<Tensor, AttnError> {
    let mask = block_mask(&blocks.f_to_device(q.device())?, block_len)?;
    Ok(reference::masked_attention(q, k, v, &mask)?.0)
}

/// One parity check of [`gpu_check`].
#[derive(Debug, Clone, Serialize)]
pub struct CheckRow {
    /// What was checked, e.g. `selected bf16 B=2 S=77 H=6 Hkv=2 dk=64 dv=128 l'=16 n=4`.
    pub name: String,
    /// Largest relative error over the output and the gradients of q, k, v
    /// (`max |fused − ref| / max |ref|`, reference in float64).
    pub max_rel_err: f64,
    /// The tolerance (1e-2 for bf16, 1e-4 for fp32).
    pub tolerance: f64,
    /// Whether the check passed (finite, within tolerance, deterministic where checked).
    pub passed: bool,
    /// Which tensor was worst, or the error that stopped the case.
    pub detail: String,
}

impl CheckRow {
    /// The row of a case that stopped with `e` (an infinite error: it fails).
    pub fn failed(name: String, tolerance: f64, e: AttnError) -> Self {
        CheckRow {
            name,
            max_rel_err: f64::INFINITY,
            tolerance,
            passed: false,
            detail: e.to_string(),
        }
    }
}

/// The layer config of a GPU check case: the paper's NSA defaults at width `dim`, with these
/// heads, head sizes (dk, dv) and selection lengths (l, d, l', n).
pub(crate) fn check_layer_config(
    dim: i64,
    (heads, kv_heads): (i64, i64),
    (dk, dv): (i64, i64),
    (l, d, l_sel, n): (i64, i64, i64, i64),
) -> NsaConfig {
    let mut cfg = NsaConfig::paper(dim);
    cfg.heads = heads;
    cfg.kv_heads = kv_heads;
    cfg.head_dim_k = dk;
    cfg.head_dim_v = dv;
    cfg.nsa.select.block_len = l;
    cfg.nsa.select.stride = d;
    cfg.nsa.select.select_len = l_sel;
    cfg.nsa.select.top_n = n;
    cfg
}

/// One case of the parity checks.
#[derive(Debug, Clone, Copy)]
struct Case {
    kind: Kind,
    b: i64,
    s: i64,
    hkv: i64,
    hpg: i64,
    dk: i64,
    dv: i64,
    block_len: i64,
    n: i64,
}

/// The cases [`gpu_check`] runs: both dtypes; heads per group 1, 2, 3, 4, 8, 16; head sizes
/// 64 / 128 / 192 with `dk ≠ dv` (and 32 / 48, which take the SIMT forward in bf16 too); `S`
/// not a multiple of `l'` and `S < l'`; batch 2.
fn cases() -> Vec<Case> {
    let dims = [
        (64, 128),
        (128, 64),
        (192, 128),
        (64, 192),
        (128, 128),
        (192, 192),
    ];
    let mut out = Vec::new();
    for kind in [Kind::Float, Kind::BFloat16] {
        for (i, hpg) in [1, 2, 3, 4, 8, 16].into_iter().enumerate() {
            let (dk, dv) = dims[i];
            out.push(Case {
                kind,
                b: 2,
                s: 77 + 64 * (i as i64 % 2),
                hkv: 2,
                hpg,
                dk,
                dv,
                block_len: 16,
                n: 4,
            });
        }
        // Head sizes without a tensor-core instantiation (the SIMT forward in bf16 too).
        out.push(Case {
            kind,
            b: 2,
            s: 45,
            hkv: 2,
            hpg: 2,
            dk: 32,
            dv: 48,
            block_len: 8,
            n: 3,
        });
        // S < l', and a long-ish row count with a larger l' and n.
        out.push(Case {
            kind,
            b: 2,
            s: 11,
            hkv: 1,
            hpg: 3,
            dk: 64,
            dv: 64,
            block_len: 16,
            n: 3,
        });
        out.push(Case {
            kind,
            b: 1,
            s: 300,
            hkv: 2,
            hpg: 4,
            dk: 128,
            dv: 192,
            block_len: 32,
            n: 5,
        });
        // The paper's l' = 64 with many tokens per block (split dK/dV pieces, several row
        // tiles per piece), a group that does not divide the 64-row tiles, and l' = 128 (two
        // key chunks per block in the tensor-core dK/dV kernel).
        out.push(Case {
            kind,
            b: 1,
            s: 1000,
            hkv: 2,
            hpg: 16,
            dk: 192,
            dv: 128,
            block_len: 64,
            n: 6,
        });
        out.push(Case {
            kind,
            b: 2,
            s: 400,
            hkv: 1,
            hpg: 5,
            dk: 64,
            dv: 128,
            block_len: 32,
            n: 4,
        });
        out.push(Case {
            kind,
            b: 1,
            s: 700,
            hkv: 2,
            hpg: 3,
            dk: 128,
            dv: 64,
            block_len: 128,
            n: 3,
        });
    }
    out
}

/// Fills the CUDA caching allocator's free blocks with NaN, so outputs and gradients that a
/// kernel fails to write come out as NaN instead of plausible stale values. (No-op on the CPU.)
fn poison(device: Device) {
    if !matches!(device, Device::Cuda(_)) {
        return;
    }
    for elems in [1i64 << 17, 1 << 24] {
        // Best effort: a failed allocation only means less poisoned memory.
        drop(Tensor::f_full([elems], f64::NAN, (Kind::Float, device)));
    }
}

/// One check row over pairs (kernel result, reference): the worst relative error against
/// `tolerance`.
fn compare_rows(
    name: String,
    tolerance: f64,
    pairs: &[(Tensor, Tensor)],
) -> Result<CheckRow, AttnError> {
    let mut worst = 0.0f64;
    let mut which = 0;
    for (i, (got, want)) in pairs.iter().enumerate() {
        let e = rel_err(got, want)?;
        if e.is_nan() || e > worst {
            worst = e;
            which = i;
        }
    }
    let within = worst.is_finite() && worst <= tolerance;
    Ok(CheckRow {
        name,
        max_rel_err: worst,
        tolerance,
        passed: within,
        detail: format!("worst: output {which}"),
    })
}

/// `max |a − b| / max |b|` in float64 (infinite where the difference is not finite): the
/// GPU check rows' error measure.
pub fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64, AttnError> {
    let a = a.f_to_kind(Kind::Double)?;
    let denom = b.f_abs()?.f_max()?.f_double_value(&[])?.max(1e-30);
    let d = a.f_sub(b)?.f_abs()?.f_max()?.f_double_value(&[])?;
    Ok(if d.is_finite() {
        d / denom
    } else {
        f64::INFINITY
    })
}

/// Random ids in `[-2, ⌊S/l'⌋ + 2)`, with duplicates and out-of-range values on purpose.
fn random_ids(c: &Case, device: Device) -> Result<Tensor, AttnError> {
    let nb = (c.s + c.block_len - 1) / c.block_len;
    Ok(Tensor::f_randint_low(
        -2,
        nb + 2,
        [c.b, c.s, c.hkv, c.n],
        (Kind::Int64, device),
    )?)
}

/// The output of `f` and the gradients of each of `inputs`, for the output gradient `dout`:
/// `f` applied to fresh leaves, backward through `Σ out · dout` in float64 (so the output
/// gradient is exactly `dout`), memory poisoned before the forward and the backward.
fn outputs_and_grads(
    inputs: &[Tensor],
    dout: &Tensor,
    f: impl Fn(&[Tensor]) -> Result<Tensor, AttnError>,
) -> Result<Vec<Tensor>, AttnError> {
    let leaves = inputs
        .iter()
        .map(|t| t.f_detach()?.f_set_requires_grad(true))
        .collect::<Result<Vec<_>, _>>()?;
    poison(dout.device());
    let out = f(&leaves)?;
    poison(dout.device());
    let loss = out
        .f_to_kind(Kind::Double)?
        .f_mul(&dout.f_to_kind(Kind::Double)?)?
        .f_sum(Kind::Double)?;
    let refs: Vec<&Tensor> = leaves.iter().collect();
    let mut all = vec![out.f_detach()?];
    all.extend(Tensor::f_run_backward(&[&loss], &refs, false, false)?);
    Ok(all)
}

/// [`outputs_and_grads`] of an attention function: its output and the gradients of q, k, v.
fn out_and_grads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dout: &Tensor,
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor, AttnError>,
) -> Result<[Tensor; 4], AttnError> {
    let inputs = [q.shallow_clone(), k.shallow_clone(), v.shallow_clone()];
    outputs_and_grads(&inputs, dout, |t| f(&t[0], &t[1], &t[2]))?
        .try_into()
        .map_err(|_| AttnError::Option {
            option: "gpu_check",
            reason: "backward returned the wrong number of gradients".into(),
        })
}

/// The largest relative error of `got` against `want`, and the name (from `names`, in the same
/// order) of the tensor it belongs to; a NaN error counts as the largest.
fn worst_error(
    got: &[Tensor],
    want: &[Tensor],
    names: &[&'static str],
) -> Result<(f64, &'static str), AttnError> {
    let mut worst = (0.0f64, names[0]);
    for ((g, w), &name) in got.iter().zip(want).zip(names) {
        let e = rel_err(g, w)?;
        if e.is_nan() || e > worst.0 {
            worst = (e, name);
        }
    }
    Ok(worst)
}

fn kind_name(kind: Kind) -> &'static str {
    if kind == Kind::BFloat16 {
        "bf16"
    } else {
        "fp32"
    }
}

/// Compares `fused` (run twice, with NaN-poisoned memory) with `reference` (float64 inputs);
/// with `check_determinism`, the two runs' gradients (dq, dk, dv) must also be equal bit for bit.
fn compare(
    name: String,
    tolerance: f64,
    fused: [[Tensor; 4]; 2],
    reference: &[Tensor; 4],
    check_determinism: bool,
) -> Result<CheckRow, AttnError> {
    let worst = worst_error(&fused[0], reference, &["out", "dq", "dk", "dv"])?;
    let mut deterministic = true;
    if check_determinism {
        for (a, b) in fused[0][1..].iter().zip(&fused[1][1..]) {
            deterministic &= a.f_equal(b)?;
        }
    }
    let within = worst.0.is_finite() && worst.0 <= tolerance;
    Ok(CheckRow {
        name,
        max_rel_err: worst.0,
        tolerance,
        passed: within && deterministic,
        detail: if deterministic {
            format!("worst: {}", worst.1)
        } else {
            format!(
                "worst: {}; gradients differ between two identical runs",
                worst.1
            )
        },
    })
}

fn run_selected_case(
    c: &Case,
    (forward, dq): (sys::SelectedForward, sys::SelectedDq),
    device: Device,
) -> Result<CheckRow, AttnError> {
    let h = c.hkv * c.hpg;
    let opts = (c.kind, device);
    let q = Tensor::f_randn([c.b, c.s, h, c.dk], opts)?;
    let k = Tensor::f_randn([c.b, c.s, c.hkv, c.dk], opts)?;
    let v = Tensor::f_randn([c.b, c.s, c.hkv, c.dv], opts)?;
    let ids = random_ids(c, device)?;
    let dout = Tensor::f_randn([c.b, c.s, h, c.dv], opts)?;
    let name = format!(
        "selected {}{}{} B={} S={} H={h} Hkv={} dk={} dv={} l'={} n={}",
        kind_name(c.kind),
        match forward {
            sys::SelectedForward::KeyOuter => " key-outer",
            sys::SelectedForward::TokenWarps => " token-warps",
            sys::SelectedForward::UnionTiles | sys::SelectedForward::Auto => "",
        },
        match dq {
            sys::SelectedDq::KeyOuter => " dq-key-outer",
            sys::SelectedDq::QueryOuter | sys::SelectedDq::Auto => "",
        },
        c.b,
        c.s,
        c.hkv,
        c.dk,
        c.dv,
        c.block_len,
        c.n
    );
    let tolerance = if c.kind == Kind::BFloat16 { 1e-2 } else { 1e-4 };
    let dbl = |t: &Tensor| t.f_to_kind(Kind::Double);
    let reference = out_and_grads(&dbl(&q)?, &dbl(&k)?, &dbl(&v)?, &dout, |q, k, v| {
        reference_selected(q, k, v, &ids, c.block_len)
    })?;
    let run = || {
        out_and_grads(&q, &k, &v, &dout, |q, k, v| {
            sys::selected_attention_with(q, k, v, &ids, c.block_len, scale(q), forward, dq)
                .map_err(fused_err)
        })
    };
    let fused = [run()?, run()?];
    compare(name, tolerance, fused, &reference, true)
}

/// Runs `f` with the GQA backward calls that the glue splits by KV heads split into one KV head
/// each ([`sys::set_head_chunk_bytes`] at its minimum), so the split path runs on check-sized
/// shapes; the bound is restored after.
fn with_split_heads<T>(f: impl FnOnce() -> T) -> T {
    let before = sys::set_head_chunk_bytes(1);
    let out = f();
    sys::set_head_chunk_bytes(before);
    out
}

fn run_window_case(
    (dk, dv, w, s): (i64, i64, i64, i64),
    split: bool,
    device: Device,
) -> Result<CheckRow, AttnError> {
    let (b, hkv, hpg) = (2, 2, 3);
    let opts = (Kind::BFloat16, device);
    let q = Tensor::f_randn([b, s, hkv * hpg, dk], opts)?;
    let k = Tensor::f_randn([b, s, hkv, dk], opts)?;
    let v = Tensor::f_randn([b, s, hkv, dv], opts)?;
    let dout = Tensor::f_randn([b, s, hkv * hpg, dv], opts)?;
    if !window_supported(&q, &k, &v) {
        return Err(AttnError::Option {
            option: "gpu_check",
            reason: format!("the flash window does not take dk {dk}, dv {dv}"),
        });
    }
    let mut cfg = NsaConfig::paper(64);
    cfg.nsa.window = w;
    let dbl = |t: &Tensor| t.f_to_kind(Kind::Double);
    let reference = out_and_grads(&dbl(&q)?, &dbl(&k)?, &dbl(&v)?, &dout, |q, k, v| {
        reference::window(q, k, v, w)
    })?;
    let run = || out_and_grads(&q, &k, &v, &dout, |q, k, v| window(q, k, v, &cfg, 8));
    // The split is flash's backward's (the wgmma backward holds no per-head temporaries): a
    // split case runs that backward after either forward.
    let (fused, backward) = if split {
        let fused = sys::with_window_kernels(None, Some(false), || {
            with_split_heads(|| -> Result<_, AttnError> { Ok([run()?, run()?]) })
        });
        (fused?, "flash")
    } else {
        let backward = sys::window_backward_kernel(device, window_head_dim(dk, dv), dv);
        ([run()?, run()?], backward)
    };
    let forward = sys::window_forward_kernel(device, window_head_dim(dk, dv), dv);
    compare(
        format!(
            "window bf16 B={b} S={s} H={} Hkv={hkv} dk={dk} dv={dv} w={w}, {forward} forward, \
             {backward} backward{}",
            hkv * hpg,
            if split {
                ", backward split by KV head"
            } else {
                ""
            }
        ),
        1e-2,
        fused,
        &reference,
        false,
    )
}
