//! A decode step's prologue in one launch (`nsa_dec_append_{bf16, f32}`, decode.cu): from the
//! stacked projection output of the new tokens, the rotated queries, the new keys and values
//! written into the caches (rotated where the branch reads rotated keys), and the branch gates.
//! The libtorch step took one RoPE launch, one scatter per cache tensor (six with a window ring
//! and a pending ring) and six launches of the gate MLP for the same work.
use std::ffi::c_void;

use tch::{Kind, Tensor};

use super::args::{AppendArgs, AppendWriteArgs, APPEND_MAX_WRITES};
use super::{current_stream, decode_kernels, i32_of, same_place};
use crate::driver::{self, check, LaunchConfig};
use crate::fused::{cuda_ordinal, input, FusedError};

/// Threads per CTA (`NSA_APPEND_THREADS`).
const THREADS: u32 = 256;
/// Most CTAs per sequence: enough for the paper shape's 15k units (a gate counts as a warp's
/// 32) in one pass.
const MAX_CTAS_PER_SEQUENCE: i64 = 64;

/// One cache write: the `Hkv` rows of `width` columns of each sequence's stacked row from
/// column `col` on, into slot `slots[b]` of `dst`.
#[derive(Debug, Clone, Copy)]
pub struct AppendWrite<'a> {
    /// The cache `[B, Hkv, slots, width]`: contiguous, the stacked output's kind and device.
    pub dst: &'a Tensor,
    /// int64 `[B]` on the same device: sequence `b`'s slot. A slot outside `0 .. slots` writes
    /// nothing (the plan never makes one; the kernel cannot report it).
    pub slots: &'a Tensor,
    /// The first of the row's `Hkv · width` columns.
    pub col: i64,
    /// Rotated as the queries are (then `width` is the query head size).
    pub rotate: bool,
}

/// The gate MLP's second half, `sigmoid(W_2 silu(h + b_1) + b_2)`, over the stacked row's
/// `hidden` columns from `col` on (`h = W_1 x`, without `b_1`: `W_1` stacked under the
/// projections). Parameters in the stacked output's kind, contiguous, on its device.
#[derive(Debug, Clone, Copy)]
pub struct AppendGates<'a> {
    pub col: i64,
    /// `[hidden]`, or none.
    pub b1: Option<&'a Tensor>,
    /// `[3·H, hidden]`: output `3·h + branch`.
    pub w2: &'a Tensor,
    /// `[3·H]`, or none.
    pub b2: Option<&'a Tensor>,
}

/// What [`decode_append`] returns: the rotated queries `[B, H, dk]` and, when asked for, the
/// gates `[B, H, 3]` (cmp, slc, win), in the stacked output's kind.
#[derive(Debug)]
pub struct StepPrologue {
    pub q: Tensor,
    pub gates: Option<Tensor>,
}

/// The prologue of a decode step on libtorch's current stream (module docs): `stacked`
/// `[B, W]` (bf16 or fp32, contiguous, CUDA) holds each new token's `heads` query heads in
/// columns `0 .. heads·dk`, which come back rotated by the tables `cos`, `sin` (fp32 `[B, dk/2]`,
/// row `b` = sequence `b`'s position, as `Rope::at_positions` makes them for a step), then
/// whatever `writes` and `gates` read. At most six writes; their rows must lie inside the row.
pub fn decode_append(
    stacked: &Tensor,
    heads: i64,
    cos: &Tensor,
    sin: &Tensor,
    writes: &[AppendWrite<'_>],
    gates: Option<AppendGates<'_>>,
) -> Result<StepPrologue, FusedError> {
    let kind = stacked.kind();
    let function = match kind {
        Kind::BFloat16 => 0,
        Kind::Float => 1,
        k => return Err(input("stacked", format!("bf16 or fp32, got {k:?}"))),
    };
    let &[b, width] = stacked.size().as_slice() else {
        return Err(input(
            "stacked",
            format!("must be [B, W], got {:?}", stacked.size()),
        ));
    };
    if !stacked.is_contiguous() || b < 1 {
        return Err(input("stacked", "must be contiguous with B ≥ 1"));
    }
    let half = cos.size().get(1).copied().unwrap_or(0);
    if half < 1 {
        return Err(input(
            "cos",
            format!("must be [B, dk/2], got {:?}", cos.size()),
        ));
    }
    same_place("cos", cos, stacked, Kind::Float, Some(&[b, half]))?;
    same_place("sin", sin, stacked, Kind::Float, Some(&[b, half]))?;
    let dk = 2 * half;
    if heads < 1 || heads * dk > width {
        return Err(input(
            "heads",
            format!("{heads} heads of {dk} columns must fit the row of {width}"),
        ));
    }
    if writes.len() > APPEND_MAX_WRITES {
        return Err(input(
            "writes",
            format!("at most {APPEND_MAX_WRITES}, got {}", writes.len()),
        ));
    }
    let mut args = AppendArgs {
        b: i32_of("B", b)?,
        w: i32_of("W", width)?,
        h: i32_of("heads", heads)?,
        half: i32_of("dk", half)?,
        writes: writes.len() as i32,
        ..AppendArgs::default()
    };
    let mut hkv = None;
    // The kernel's units (decode.cu): a pair per rotated column pair, an element per copied
    // one, a warp's 32 per gate.
    let mut units = heads * half;
    for (slot, w) in args.write.iter_mut().zip(writes) {
        let &[db, dg, cap, d] = w.dst.size().as_slice() else {
            return Err(input(
                "dst",
                format!("must be [B, Hkv, slots, d], got {:?}", w.dst.size()),
            ));
        };
        if *hkv.get_or_insert(dg) != dg || db != b || cap < 1 || dg < 1 {
            return Err(input(
                "dst",
                format!(
                    "must be [{b}, Hkv, slots ≥ 1, d] with one Hkv for all writes, got {:?}",
                    w.dst.size()
                ),
            ));
        }
        same_place("dst", w.dst, stacked, kind, Some(&[b, dg, cap, d]))?;
        same_place("slots", w.slots, stacked, Kind::Int64, Some(&[b]))?;
        if w.col < 0 || w.col + dg * d > width || (w.rotate && d != dk) {
            return Err(input(
                "writes",
                format!(
                    "columns {} .. {} of a row of {width}{} do not fit",
                    w.col,
                    w.col + dg * d,
                    if w.rotate {
                        format!(", rotated as heads of {dk}")
                    } else {
                        String::new()
                    }
                ),
            ));
        }
        units += dg * if w.rotate { half } else { d };
        *slot = AppendWriteArgs {
            dst: w.dst.data_ptr() as u64,
            slots: w.slots.data_ptr() as u64,
            cap,
            col: i32_of("col", w.col)?,
            width: i32_of("width", d)?,
            rotate: i32::from(w.rotate),
            pad: 0,
        };
    }
    args.hkv = i32_of("Hkv", hkv.unwrap_or(1))?;
    let mut hidden = 0;
    if let Some(g) = gates {
        hidden = g.w2.size().get(1).copied().unwrap_or(0);
        same_place("w2", g.w2, stacked, kind, Some(&[3 * heads, hidden]))?;
        if hidden < 1 || g.col < 0 || g.col + hidden > width {
            return Err(input(
                "gates",
                format!(
                    "{hidden} hidden columns from {} must fit the row of {width}",
                    g.col
                ),
            ));
        }
        let address = |what, t: Option<&Tensor>, n| -> Result<u64, FusedError> {
            match t {
                Some(t) => {
                    same_place(what, t, stacked, kind, Some(&[n]))?;
                    Ok(t.data_ptr() as u64)
                }
                None => Ok(0),
            }
        };
        args.b1 = address("b1", g.b1, hidden)?;
        args.b2 = address("b2", g.b2, 3 * heads)?;
        args.w2 = g.w2.data_ptr() as u64;
        args.hidden = i32_of("hidden", hidden)?;
        args.gate_col = i32_of("gate column", g.col)?;
        units += 32 * 3 * heads;
    }
    // Checked last, so that every shape rule above is testable on CPU tensors.
    let ordinal = cuda_ordinal("stacked", stacked)?;
    let gates_out = (hidden > 0)
        .then(|| Tensor::f_empty([b, heads, 3], (kind, stacked.device())))
        .transpose()?;
    let q = Tensor::f_empty([b, heads, dk], (kind, stacked.device()))?;
    let grid_x = (units + THREADS as i64 - 1) / THREADS as i64;
    let grid_y = u32::try_from(b)
        .ok()
        .filter(|&y| y <= 65_535)
        .ok_or_else(|| input("stacked", format!("B = {b} exceeds the grid's 65,535")))?;
    let kernels = decode_kernels(ordinal)?;
    let stream = current_stream(ordinal)?;
    let drv = driver::shared()?;
    let ptr = |t: &Tensor| t.data_ptr() as u64;
    let (x, c, s, qp) = (ptr(stacked), ptr(cos), ptr(sin), ptr(&q));
    let gp = gates_out.as_ref().map_or(0, ptr);
    let arg = |x: &u64| x as *const u64 as *mut c_void;
    let mut params = [
        arg(&x),
        arg(&c),
        arg(&s),
        arg(&qp),
        arg(&gp),
        &mut args as *mut AppendArgs as *mut c_void,
    ];
    let config = LaunchConfig {
        grid: [grid_x.clamp(1, MAX_CTAS_PER_SEQUENCE) as u32, grid_y, 1],
        block: [THREADS, 1, 1],
        shared_mem_bytes: 0,
        stream,
        attrs: std::ptr::null_mut(),
        num_attrs: 0,
    };
    // SAFETY: the function's parameters are exactly `params` (device addresses of tensors
    // checked above and alive for the call, the args struct mirrored field for field); the
    // driver copies them; no attributes; the grid is within the device's limits.
    check("cuLaunchKernelEx", unsafe {
        (drv.launch_kernel_ex)(
            &config,
            kernels.table.append[function],
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    })?;
    Ok(StepPrologue {
        q,
        gates: gates_out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn zeros(size: &[i64], kind: Kind) -> Tensor {
        Tensor::zeros(size, (kind, Device::Cpu))
    }

    /// Every shape rule, on CPU tensors (checked before the device): a valid call fails only
    /// for want of CUDA.
    #[test]
    fn bad_inputs_get_typed_errors_before_any_launch() {
        let f = Kind::Float;
        // Two sequences: 2 query heads of dk 8, then a K (2 × 8) and a V (2 × 4) row, 4 hidden.
        let row = zeros(&[2, 16 + 16 + 8 + 4], f);
        let tables = zeros(&[2, 4], f);
        let (k, v) = (zeros(&[2, 2, 5, 8], f), zeros(&[2, 2, 5, 4], f));
        let slots = zeros(&[2], Kind::Int64);
        let w2 = zeros(&[6, 4], f);
        let write = |dst, col, rotate| AppendWrite {
            dst,
            slots: &slots,
            col,
            rotate,
        };
        let gates = |col| {
            Some(AppendGates {
                col,
                b1: None,
                w2: &w2,
                b2: None,
            })
        };
        let err = |r: Result<StepPrologue, FusedError>| r.unwrap_err().to_string();
        let ok = [write(&k, 16, true), write(&v, 32, false)];
        assert!(err(decode_append(&row, 2, &tables, &tables, &ok, gates(40))).contains("CUDA"));
        let ints = zeros(&[2, 44], Kind::Int64);
        assert!(err(decode_append(&ints, 2, &tables, &tables, &[], None)).contains("bf16 or fp32"));
        assert!(err(decode_append(&row, 6, &tables, &tables, &[], None)).contains("fit the row"));
        let short = zeros(&[1, 4], f);
        assert!(err(decode_append(&row, 2, &short, &tables, &[], None)).contains("cos"));
        let past_end = [write(&k, 30, true)];
        assert!(
            err(decode_append(&row, 2, &tables, &tables, &past_end, None)).contains("do not fit")
        );
        let rotated_v = [write(&v, 32, true)];
        assert!(
            err(decode_append(&row, 2, &tables, &tables, &rotated_v, None)).contains("rotated")
        );
        let seven = [write(&k, 16, true); 7];
        assert!(err(decode_append(&row, 2, &tables, &tables, &seven, None)).contains("at most 6"));
        let other_groups = zeros(&[2, 3, 5, 4], f);
        let mixed = [write(&k, 16, true), write(&other_groups, 32, false)];
        assert!(err(decode_append(&row, 2, &tables, &tables, &mixed, None)).contains("one Hkv"));
        let int_slots = zeros(&[2], Kind::Int);
        let bad_slots = [AppendWrite {
            dst: &k,
            slots: &int_slots,
            col: 16,
            rotate: true,
        }];
        assert!(err(decode_append(&row, 2, &tables, &tables, &bad_slots, None)).contains("slots"));
        assert!(err(decode_append(&row, 2, &tables, &tables, &ok, gates(41))).contains("hidden"));
    }
}
