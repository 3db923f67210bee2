//! `nsa-train check --gpu`'s kernel table: [`gpu_check`] runs every family of rows
//! ([`CheckPart`]), [`gpu_check_parts`] some of them. The cases and comparisons live beside the
//! functions they check (`super`, `compressed`, `pointwise_check`, `layer_check`,
//! `sync_check`); this file only puts the table together.
use tch::{Device, Kind, Tensor};

use super::{
    cases, compressed, fused_err, kind_name, layer_check, pointwise_check, run_selected_case,
    run_window_case, sync_check, CheckRow,
};
use crate::config::AttnError;
use nsa_sys::fused as sys;

/// The selected kernels' id cleaning on the device (`nsa_clean_ids`) against libtorch's
/// operators (the CPU path of the same function) on random ids with duplicates, negative ids,
/// ids past the token's block and huge ones; int64 and int32; keys covering all tokens, fewer
/// of them, and none. The row passes when every result is equal.
fn clean_ids_row(device: Device) -> CheckRow {
    let (b, s, g, n, l) = (2, 300, 3, 16, 16);
    let name = format!("clean block ids B={b} S={s} Hkv={g} n={n} l'={l}, int64 and int32");
    let run = || -> Result<(usize, usize), AttnError> {
        let opts = (Kind::Int64, device);
        // Random ids (past the token's block for most rows), one huge id and a duplicate of
        // the first in every row.
        let base = Tensor::f_randint_low(-3, s / l + 4, [b, s, g, n - 2], opts)?;
        let huge = Tensor::f_full([b, s, g, 1], 1i64 << 40, opts)?;
        let ids = Tensor::f_cat(&[&base, &huge, &base.f_narrow(3, 0, 1)?], 3)?;
        let (mut cases, mut differ) = (0, 0);
        for kind in [Kind::Int64, Kind::Int] {
            let ids = if kind == Kind::Int {
                ids.f_clamp_max(i64::from(i32::MAX))?.f_to_kind(kind)?
            } else {
                ids.shallow_clone()
            };
            for num_keys in [s, s - 37, 0] {
                let got = sys::clean_block_ids(&ids, l, num_keys).map_err(fused_err)?;
                let want = sys::clean_block_ids(&ids.f_to(Device::Cpu)?, l, num_keys)
                    .map_err(fused_err)?;
                cases += 1;
                if !got.f_to(Device::Cpu)?.equal(&want) {
                    differ += 1;
                }
            }
        }
        Ok((cases, differ))
    };
    match run() {
        Ok((cases, differ)) => CheckRow {
            name,
            max_rel_err: differ as f64,
            tolerance: 0.0,
            passed: differ == 0,
            detail: format!("{differ} of {cases} cases differ from libtorch's operators"),
        },
        Err(e) => CheckRow::failed(name, 0.0, e),
    }
}

/// Runs the fused functions against the reference path on CUDA device 0 with fresh random
/// inputs (ids include duplicates and out-of-range values) and returns one row per case:
/// the selected branch in fp32 (tolerance 1e-4) and bf16 (1e-2) for 1, 2, 3, 4, 8 and 16 heads
/// per group, head sizes 64 / 128 / 192 with `dk ≠ dv`, `S` not a multiple of `l'`, `S < l'`,
/// batch 2, including that dK/dV are bitwise equal over two runs; the sliding window in bf16
/// with `S` not a multiple of `w`, its forward on the wgmma kernel (where the device has it)
/// and on flash's; the compressed branch and selection; the pointwise
/// kernels (RoPE on a strided slice and on a contiguous tensor, the gated sum; outputs and
/// gradients, fp32 and bf16, bitwise equal over two runs); the whole fused layer against the
/// reference layer given its selection (output and the gradients of the input and every
/// parameter, G = 3 and G = 16, fp32 and bf16); and a whole fused
/// layer's forward and backward under libtorch's sync debug mode set to error (no host
/// synchronisation); and the window branch run from a thread with no CUDA context bound,
/// bitwise equal to this thread's. A case that errors is a failed row naming the error.
/// Without a CUDA device: [`AttnError::Option`] (`gpu_check`).
pub fn gpu_check() -> Result<Vec<CheckRow>, AttnError> {
    gpu_check_parts(&CheckPart::ALL)
}

/// A family of [`gpu_check`]'s rows, to run alone (`nsa-train check --gpu --part NAME`), e.g.
/// under compute-sanitizer, whose tools slow every launch down too much for the whole table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckPart {
    /// The selected branch on every forward, fp32 and bf16, and the block-id cleaning kernel.
    Selected,
    /// The sliding window with either forward (wgmma, flash), its backward whole and split by
    /// KV heads.
    Window,
    /// The compressed branch on both backends and the selection kernel.
    Compressed,
    /// RoPE and the gated sum.
    Pointwise,
    /// The whole fused layer against the reference layer.
    Layer,
    /// A fused layer's forward and backward without host synchronisation; the window branch
    /// from a thread with no CUDA context.
    Sync,
}

impl CheckPart {
    /// Every part, in the table's order.
    pub const ALL: [CheckPart; 6] = [
        CheckPart::Selected,
        CheckPart::Window,
        CheckPart::Compressed,
        CheckPart::Pointwise,
        CheckPart::Layer,
        CheckPart::Sync,
    ];

    /// The part's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            CheckPart::Selected => "selected",
            CheckPart::Window => "window",
            CheckPart::Compressed => "compressed",
            CheckPart::Pointwise => "pointwise",
            CheckPart::Layer => "layer",
            CheckPart::Sync => "sync",
        }
    }
}

/// The rows of [`gpu_check`] that belong to `parts`, in the table's order.
pub fn gpu_check_parts(parts: &[CheckPart]) -> Result<Vec<CheckRow>, AttnError> {
    let device = check_device("gpu_check")?;
    let mut rows = Vec::new();
    if parts.contains(&CheckPart::Selected) {
        rows.extend(selected_rows(device));
    }
    if parts.contains(&CheckPart::Window) {
        rows.extend(window_rows(device));
    }
    if parts.contains(&CheckPart::Compressed) {
        rows.extend(compressed::check_rows(device));
    }
    if parts.contains(&CheckPart::Pointwise) {
        rows.extend(pointwise_check::check_rows(device));
    }
    if parts.contains(&CheckPart::Layer) {
        rows.extend(layer_check::check_rows(device));
    }
    if parts.contains(&CheckPart::Sync) {
        rows.extend(sync_check::check_rows(device));
    }
    // The families these parts did not load may still be compiling (check_device started them).
    nsa_sys::fused::finish_prebuilds();
    Ok(rows)
}

/// The device the GPU checks run on (CUDA device 0), after loading libtorch's CUDA backend;
/// without one, [`AttnError::Option`] named `option` with the reason.
pub fn check_device(option: &'static str) -> Result<Device, AttnError> {
    let backend = nsa_sys::cuda::load_backend().map_err(|e| AttnError::Option {
        option,
        reason: e.to_string(),
    })?;
    if !backend.has_gpu() {
        return Err(AttnError::Option {
            option,
            reason: format!("needs a CUDA device: {backend}"),
        });
    }
    // Every kernel family compiles in the background while the first rows set up; each check
    // joins the builds before it returns (nsa_sys::fused::finish_prebuilds), so a test binary
    // that ends after one check never exits under a running compile.
    let _ = nsa_sys::fused::prebuild(0, &nsa_sys::nvrtc::ALL_SOURCES);
    Ok(Device::Cuda(0))
}

/// [`CheckPart::Selected`]: every case on each forward that applies (batches also key-outer in
/// chunks of one sequence), then the id cleaning.
fn selected_rows(device: Device) -> Vec<CheckRow> {
    let failed = |name: String, e: AttnError| CheckRow::failed(name, 0.0, e);
    let mut rows = Vec::new();
    for c in cases() {
        // bf16 at tensor-core head sizes has two more forwards: key-outer, and one warp per
        // token where its shape rule holds; and dQ inside the dK/dV kernel where l' <= 64.
        use sys::{SelectedDq as Dq, SelectedForward as Fwd};
        let mut ways = vec![(Fwd::UnionTiles, Dq::QueryOuter)];
        if c.kind == Kind::BFloat16 && sys::tensor_core_shape(c.dk, c.dv, c.hpg) {
            ways.push((Fwd::KeyOuter, Dq::QueryOuter));
            if sys::token_warp_shape(c.dk, c.dv, c.hpg, c.n) {
                ways.push((Fwd::TokenWarps, Dq::QueryOuter));
            }
            if c.block_len <= 64 {
                ways.push((Fwd::UnionTiles, Dq::KeyOuter));
            }
        }
        for way in ways {
            let row = run_selected_case(&c, way, device).unwrap_or_else(|e| {
                failed(
                    format!(
                        "selected {} {way:?} hpg={} dk={} dv={}",
                        kind_name(c.kind),
                        c.hpg,
                        c.dk,
                        c.dv
                    ),
                    e,
                )
            });
            rows.push(row);
        }
        // Batches: key-outer forward and dQ with one sequence per launch (the chunks a batch
        // whose partials exceed the bound runs in), against the same reference.
        if c.b > 1
            && c.kind == Kind::BFloat16
            && sys::tensor_core_shape(c.dk, c.dv, c.hpg)
            && c.block_len <= 64
        {
            let way = (Fwd::KeyOuter, Dq::KeyOuter);
            let before = sys::set_key_outer_chunk_bytes(1);
            let row = run_selected_case(&c, way, device);
            sys::set_key_outer_chunk_bytes(before);
            let mut row = row.unwrap_or_else(|e| {
                failed(
                    format!("selected {way:?} hpg={} dk={} dv={}", c.hpg, c.dk, c.dv),
                    e,
                )
            });
            row.name.push_str(", one sequence per key-outer launch");
            rows.push(row);
        }
    }
    rows.push(clean_ids_row(device));
    rows
}

/// [`CheckPart::Window`].
fn window_rows(device: Device) -> Vec<CheckRow> {
    let failed = |name: String, e: AttnError| CheckRow::failed(name, 0.0, e);
    let mut rows = Vec::new();
    // Equal head sizes, and dk ≠ dv (zero-padded to one head size for flash); two of them
    // again with the backward split into one call per KV head; sequences over several of the
    // wgmma forward's blocks of 128 or 256 tokens (two or four warpgroups; 18 blocks of four at
    // the paper's head sizes and window over 4,500 tokens), a window of two
    // keys and one longer than the sequence, and dk = dv = 192 (the wgmma forward with flash's
    // backward: no wgmma backward there). Each with the wgmma forward and backward (where the
    // device has them) and again with flash's.
    let cases = [
        ((64, 64, 32, 101), false),
        ((128, 128, 48, 77), false),
        ((192, 128, 40, 90), false),
        ((64, 128, 32, 70), false),
        ((64, 64, 32, 101), true),
        ((192, 128, 40, 90), true),
        ((192, 128, 512, 1000), false),
        ((128, 128, 200, 700), false),
        ((192, 128, 512, 4500), false),
        ((64, 64, 512, 2100), false),
        ((128, 64, 2, 300), false),
        ((64, 64, 600, 130), false),
        ((192, 192, 40, 90), false),
    ];
    for wgmma in [true, false] {
        sys::with_window_kernels(Some(wgmma), Some(wgmma), || {
            for (shape, split) in cases {
                let (dk, dv, w, s) = shape;
                let row = run_window_case(shape, split, device).unwrap_or_else(|e| {
                    failed(
                        format!("window dk={dk} dv={dv} w={w} S={s} split={split} wgmma={wgmma}"),
                        e,
                    )
                });
                rows.push(row);
            }
        });
    }
    rows
}
