//! GPU check rows of the pointwise kernels (`nsa_sys::fused::{rope, gate_mix,
//! gate_mix_project, cmp_blocks, cmp_blocks_linear, rms_norm, swiglu}`, RoPE
//! on the tables of [`Rope::with_kernel`], and the output head's loss
//! `nsa_sys::loss::linear_cross_entropy`, whose chunks run `nsa_ce_rows` on CUDA) against libtorch's operators in float64, output and
//! every gradient, on fresh random inputs, memory NaN-poisoned before each launch, run twice
//! (the second must equal the first bit for bit).
use tch::{Device, Kind, Tensor};

use super::{kind_name, outputs_and_grads as run, worst_error, CheckRow};
use crate::config::AttnError;
use crate::rope::Rope;
use nsa_sys::fused as sys;

/// The rows: RoPE on slices of a stacked projection (strided rows) and on a contiguous tensor,
/// and with one position per sequence as a decode step rotates,
/// the gated sum (alone and with W_o after it), φ's input blocks (alone and with φ's first
/// linear map after them; 16-byte and element access, with and without the position
/// embedding, tokens no block covers, a stride that does not divide the block), the linear cross-entropy (vector and element loads, several chunks, ignored
/// rows), RMSNorm (row lengths below, off and at the warp multiple, and the largest) and SwiGLU
/// (16-byte and element access), each in fp32 and bf16, RMSNorm also from fp32 under bf16
/// autocast (the trainer's case), and the residual sum with its norm in one kernel.
pub(super) fn check_rows(device: Device) -> Vec<CheckRow> {
    let mut rows = Vec::new();
    for kind in [Kind::Float, Kind::BFloat16] {
        // (B, S, heads X, dk, columns before the slice, columns after it)
        // dk / 2 = 10: the kernel's one-pair-a-thread path (the others take 8 pairs).
        for (b, s, x, dk, before, after) in [
            (2, 37, 5, 64, 96, 64),
            (1, 130, 3, 192, 0, 0),
            (2, 9, 3, 20, 4, 0),
        ] {
            let name = format!(
                "rope {} B={b} S={s} X={x} dk={dk} {}",
                kind_name(kind),
                if before + after > 0 {
                    "strided"
                } else {
                    "contiguous"
                }
            );
            let shape = RopeCase {
                b,
                s,
                x,
                dk,
                before,
                after,
            };
            rows.push(
                rope_case(shape, kind, device)
                    .map(|(e, det)| row(name.clone(), kind, e, det))
                    .unwrap_or_else(|e| CheckRow::failed(name, tolerance(kind), e)),
            );
        }
        // A decode step's rotation: one position per sequence (tables of `at_positions`),
        // queries and keys of `125m` (12 + 3·4 heads) in one launch on a slice of the
        // projection, and the paper's dk = 192.
        for (b, x, dk, after) in [(3, 24, 64, 768), (2, 76, 192, 0)] {
            let name = format!(
                "rope one position per sequence {} B={b} X={x} dk={dk}",
                kind_name(kind)
            );
            rows.push(
                rope_per_sequence_case((b, x, dk, after), kind, device)
                    .map(|(e, det)| row(name.clone(), kind, e, det))
                    .unwrap_or_else(|e| CheckRow::failed(name, tolerance(kind), e)),
            );
        }
        // dv = 6: the element kernels (the others read 16 bytes a thread).
        for (b, s, h, dv, strided) in [
            (2, 33, 6, 64, false),
            (1, 70, 4, 128, true),
            (2, 11, 3, 6, false),
        ] {
            let name = format!(
                "gate mix {} B={b} S={s} H={h} dv={dv} {}",
                kind_name(kind),
                if strided { "strided" } else { "contiguous" }
            );
            rows.push(
                mix_case([b, s, h, dv], strided, kind, device, None)
                    .map(|(e, det)| row(name.clone(), kind, e, det))
                    .unwrap_or_else(|e| CheckRow::failed(name, tolerance(kind), e)),
            );
        }
        // The gated sum with W_o after it, as the layer runs it (W_o fp32, cast inside).
        for (b, s, h, dv, strided, dim) in [(2, 33, 6, 64, false, 40), (1, 70, 4, 128, true, 96)] {
            let name = format!(
                "gate mix + W_o {} B={b} S={s} H={h} dv={dv} dim={dim} {}",
                kind_name(kind),
                if strided { "strided" } else { "contiguous" }
            );
            rows.push(
                mix_case([b, s, h, dv], strided, kind, device, Some(dim))
                    .map(|(e, det)| row(name.clone(), kind, e, det))
                    .unwrap_or_else(|e| CheckRow::failed(name, tolerance(kind), e)),
            );
        }
        for c in BLOCK_CASES {
            let name = blocks_name("cmp blocks", c, kind, "");
            rows.push(
                blocks_case(c, kind, device, None)
                    .map(|(e, det)| row(name.clone(), kind, e, det))
                    .unwrap_or_else(|e| CheckRow::failed(name, tolerance(kind), e)),
            );
        }
        // The blocks and φ's first linear map in one function (with and without a position
        // embedding, a strided view, a stride that does not divide L).
        for (c, features) in [
            (BLOCK_CASES[0], 64),
            (BLOCK_CASES[1], 24),
            (BLOCK_CASES[2], 8),
        ] {
            let name = blocks_name("cmp blocks + W1", c, kind, &format!(" F={features}"));
            rows.push(
                blocks_case(c, kind, device, Some(features))
                    .map(|(e, det)| row(name.clone(), kind, e, det))
                    .unwrap_or_else(|e| CheckRow::failed(name, tolerance(kind), e)),
            );
        }
        // (rows N, width D, vocabulary V, rows per chunk): V a multiple of the kernel's vector
        // (16-byte loads) or not (element loads); the 125m head's V.
        for (n, d, v, chunk) in [
            (300, 64, 1000, 128),
            (97, 32, 1003, 40),
            (512, 128, 50304, 200),
        ] {
            let name = format!(
                "linear cross-entropy {} N={n} D={d} V={v} chunk={chunk}",
                kind_name(kind)
            );
            rows.push(
                loss_case([n, d, v, chunk], kind, device)
                    .map(|(e, det)| row(name.clone(), kind, e, det))
                    .unwrap_or_else(|e| CheckRow::failed(name, tolerance(kind), e)),
            );
        }
    }
    for kind in [Kind::Float, Kind::BFloat16] {
        for shape in [&[2, 37, 4096][..], &[130, 2002], &[3, 16]] {
            let name = format!("swiglu {} {shape:?}", kind_name(kind));
            rows.push(
                swiglu_case(shape, kind, device)
                    .map(|(e, det)| row(name.clone(), kind, e, det))
                    .unwrap_or_else(|e| CheckRow::failed(name, tolerance(kind), e)),
            );
        }
    }
    for (kind, autocast) in [
        (Kind::Float, false),
        (Kind::BFloat16, false),
        (Kind::Float, true),
    ] {
        for shape in [&[2, 37, 768][..], &[130, 1000], &[3, 64], &[5, 12288]] {
            let name = format!(
                "rms norm {}{} {shape:?}",
                kind_name(kind),
                if autocast { " under bf16 autocast" } else { "" }
            );
            let judged = if autocast { Kind::BFloat16 } else { kind };
            rows.push(
                norm_case(shape, kind, autocast, device)
                    .map(|(e, det)| row(name.clone(), judged, e, det))
                    .unwrap_or_else(|e| CheckRow::failed(name, tolerance(judged), e)),
            );
        }
    }
    // The residual sum and its norm: fp32 stream plus a bf16 branch output under bf16
    // autocast (the trainer's case), all fp32, all bf16.
    for (kind, a_kind, autocast) in [
        (Kind::Float, Kind::BFloat16, true),
        (Kind::Float, Kind::Float, false),
        (Kind::BFloat16, Kind::BFloat16, false),
    ] {
        for shape in [&[2, 37, 768][..], &[130, 1000]] {
            let name = format!(
                "residual + rms norm {} + {}{} {shape:?}",
                kind_name(kind),
                kind_name(a_kind),
                if autocast { " under bf16 autocast" } else { "" }
            );
            let judged = if autocast || a_kind == Kind::BFloat16 {
                Kind::BFloat16
            } else {
                kind
            };
            rows.push(
                add_norm_case(shape, [kind, a_kind], autocast, device)
                    .map(|(e, det)| row(name.clone(), judged, e, det))
                    .unwrap_or_else(|e| CheckRow::failed(name, tolerance(judged), e)),
            );
        }
    }
    rows
}

/// `add_rms_norm(h, a)` (`h` in `kinds[0]`, `a` in `kinds[1]`, the weight in `kinds[0]`)
/// against `h + a` and its norm by operators in float64; both outputs (the sum and y, side by
/// side) carry a gradient, so the backward's residual term is checked too. Outputs: sum | y,
/// dh, da, dw.
fn add_norm_case(
    shape: &[i64],
    [kind, a_kind]: [Kind; 2],
    autocast: bool,
    device: Device,
) -> Result<((f64, String), bool), AttnError> {
    const EPS: f64 = 1e-6;
    let d = shape[shape.len() - 1];
    let randn = |k: Kind| -> Result<Tensor, AttnError> {
        Ok(Tensor::f_randn(shape, (Kind::Float, device))?
            .f_mul_scalar(2.0)?
            .f_to_kind(k)?)
    };
    let (h, a) = (randn(kind)?, randn(a_kind)?);
    let w =
        (Tensor::f_randn([d], (Kind::Float, device))?.f_mul_scalar(0.1)? + 1.0).f_to_kind(kind)?;
    let mut both = shape.to_vec();
    *both.last_mut().unwrap_or(&mut 0) = 2 * d;
    let dout = Tensor::f_randn(both.as_slice(), (Kind::Float, device))?;
    let fused = |t: &[Tensor]| -> Result<Tensor, AttnError> {
        let (sum, y) = if autocast {
            nsa_sys::train::with_bf16_autocast(|| sys::add_rms_norm(&t[0], &t[1], &t[2], EPS))?
        } else {
            sys::add_rms_norm(&t[0], &t[1], &t[2], EPS)?
        };
        if sum.kind() != kind {
            return Err(AttnError::Option {
                option: "gpu_check",
                reason: format!("the sum came back {:?}, want {kind:?}", sum.kind()),
            });
        }
        Ok(Tensor::f_cat(
            &[sum.f_to_kind(Kind::Float)?, y.f_to_kind(Kind::Float)?],
            -1,
        )?)
    };
    let reference = |t: &[Tensor]| -> Result<Tensor, AttnError> {
        let sum = t[0].f_add(&t[1])?;
        let ms = sum
            .f_square()?
            .f_mean_dim(-1, true, Kind::Double)?
            .f_add_scalar(EPS)?;
        let y = sum.f_mul(&ms.f_rsqrt()?)?.f_mul(&t[2])?;
        Ok(Tensor::f_cat(&[sum, y], -1)?)
    };
    twice_against_f64(
        &[h, a, w],
        &dout,
        fused,
        reference,
        &["sum | y", "dh", "da", "dw"],
    )
}

/// RMSNorm of `x` (`shape`, in `kind`) by a weight near 1 (in `kind`), against the operators in
/// float64; outputs: y, dx, dw. Under `autocast` (fp32 inputs, the trainer's bf16 autocast) the
/// result must come back in bf16.
fn norm_case(
    shape: &[i64],
    kind: Kind,
    autocast: bool,
    device: Device,
) -> Result<((f64, String), bool), AttnError> {
    const EPS: f64 = 1e-6;
    let d = shape[shape.len() - 1];
    let x = Tensor::f_randn(shape, (Kind::Float, device))?
        .f_mul_scalar(3.0)?
        .f_to_kind(kind)?;
    let w =
        (Tensor::f_randn([d], (Kind::Float, device))?.f_mul_scalar(0.1)? + 1.0).f_to_kind(kind)?;
    let dout = Tensor::f_randn(shape, (Kind::Float, device))?;
    let want_kind = if autocast { Kind::BFloat16 } else { kind };
    let fused = |t: &[Tensor]| -> Result<Tensor, AttnError> {
        let y = if autocast {
            nsa_sys::train::with_bf16_autocast(|| sys::rms_norm(&t[0], &t[1], EPS))?
        } else {
            sys::rms_norm(&t[0], &t[1], EPS)?
        };
        if y.kind() != want_kind {
            return Err(AttnError::Option {
                option: "gpu_check",
                reason: format!("rms_norm returned {:?}, want {want_kind:?}", y.kind()),
            });
        }
        Ok(y)
    };
    let reference = |t: &[Tensor]| -> Result<Tensor, AttnError> {
        let ms = t[0]
            .f_square()?
            .f_mean_dim(-1, true, Kind::Double)?
            .f_add_scalar(EPS)?;
        Ok(t[0].f_mul(&ms.f_rsqrt()?)?.f_mul(&t[1])?)
    };
    twice_against_f64(&[x, w], &dout, fused, reference, &["y", "dx", "dw"])
}

/// SwiGLU of a stacked projection `ab` (`shape`, last axis 2H, in `kind`) against the
/// operators in float64; outputs: o, dab.
fn swiglu_case(
    shape: &[i64],
    kind: Kind,
    device: Device,
) -> Result<((f64, String), bool), AttnError> {
    let ab = Tensor::f_randn(shape, (Kind::Float, device))?
        .f_mul_scalar(2.0)?
        .f_to_kind(kind)?;
    let mut out_shape = shape.to_vec();
    let h = shape[shape.len() - 1] / 2;
    *out_shape.last_mut().unwrap_or(&mut 0) = h;
    let dout = Tensor::f_randn(out_shape.as_slice(), (Kind::Float, device))?;
    let fused = |t: &[Tensor]| -> Result<Tensor, AttnError> { Ok(sys::swiglu(&t[0])?) };
    let reference = |t: &[Tensor]| -> Result<Tensor, AttnError> {
        let a = t[0].f_narrow(-1, 0, h)?;
        let b = t[0].f_narrow(-1, h, h)?;
        Ok(a.f_silu()?.f_mul(&b)?)
    };
    twice_against_f64(&[ab], &dout, fused, reference, &["o", "dab"])
}

/// The loss of `h · Wᵀ` against random targets, one in five ignored (-100), in `kind` (bf16:
/// the matmuls in bf16, as under the trainer's autocast, from fp32 `h` and `W` as the trainer
/// hands them), against libtorch's cross-entropy on float64 logits; outputs: the loss, dh, dW.
fn loss_case(
    [n, d, v, chunk]: [i64; 4],
    kind: Kind,
    device: Device,
) -> Result<((f64, String), bool), AttnError> {
    const IGNORE: i64 = -100;
    let h = Tensor::f_randn([n, d], (Kind::Float, device))?;
    // Logits of about unit size, as a trained head gives (bf16 rounds each to 2^-9 of itself).
    let w = Tensor::f_randn([v, d], (Kind::Float, device))?.f_div_scalar((d as f64).sqrt())?;
    let target = Tensor::f_randint(v, [n], (Kind::Int64, device))?;
    let ignored = Tensor::f_rand([n], (Kind::Float, device))?.f_lt(0.2)?;
    let target = target.f_masked_fill(&ignored, IGNORE)?;
    let dout = Tensor::f_randn([], (Kind::Float, device))?;
    let bf16 = kind == Kind::BFloat16;
    let fused = |t: &[Tensor]| -> Result<Tensor, AttnError> {
        nsa_sys::loss::linear_cross_entropy(&t[0], &t[1], &target, IGNORE, chunk, bf16).map_err(
            |e| AttnError::Option {
                option: "gpu_check",
                reason: e.to_string(),
            },
        )
    };
    let reference = |t: &[Tensor]| -> Result<Tensor, AttnError> {
        Ok(t[0]
            .f_matmul(&t[1].f_tr()?)?
            .f_cross_entropy_loss::<Tensor>(&target, None, tch::Reduction::Mean, IGNORE, 0.0)?)
    };
    twice_against_f64(&[h, w], &dout, fused, reference, &["loss", "dh", "dW"])
}

fn tolerance(kind: Kind) -> f64 {
    if kind == Kind::BFloat16 {
        1e-2
    } else {
        1e-4
    }
}

fn row(name: String, kind: Kind, (err, which): (f64, String), deterministic: bool) -> CheckRow {
    let tol = tolerance(kind);
    CheckRow {
        name,
        max_rel_err: err,
        tolerance: tol,
        passed: err.is_finite() && err <= tol && deterministic,
        detail: if deterministic {
            format!("worst: {which}")
        } else {
            format!("worst: {which}; two runs differ")
        },
    }
}

#[derive(Debug, Clone, Copy)]
struct RopeCase {
    b: i64,
    s: i64,
    x: i64,
    dk: i64,
    before: i64,
    after: i64,
}

/// The worst relative error of `got` against `want` (named by `names`), and whether `again`
/// equals `got` bit for bit.
fn judge(
    got: &[Tensor],
    again: &[Tensor],
    want: &[Tensor],
    names: &[&'static str],
) -> Result<((f64, String), bool), AttnError> {
    let (err, name) = worst_error(got, want, names)?;
    let same = got
        .iter()
        .zip(again)
        .all(|(a, b)| a.size() == b.size() && a.kind() == b.kind() && a.equal(b));
    Ok(((err, name.to_string()), same))
}

/// `f` on `inputs` twice and `reference` once on their float64 copies, each with its
/// gradients for `dout`, judged as [`judge`] does.
fn twice_against_f64(
    inputs: &[Tensor],
    dout: &Tensor,
    f: impl Fn(&[Tensor]) -> Result<Tensor, AttnError>,
    reference: impl Fn(&[Tensor]) -> Result<Tensor, AttnError>,
    names: &[&'static str],
) -> Result<((f64, String), bool), AttnError> {
    let got = run(inputs, dout, &f)?;
    let again = run(inputs, dout, &f)?;
    let doubles = inputs
        .iter()
        .map(|t| t.f_to_kind(Kind::Double))
        .collect::<Result<Vec<_>, _>>()?;
    let want = run(&doubles, dout, reference)?;
    judge(&got, &again, &want, names)
}

fn rope_case(c: RopeCase, kind: Kind, device: Device) -> Result<((f64, String), bool), AttnError> {
    let width = c.x * c.dk;
    // The projection the slice comes from: [B, S, before + X·dk + after].
    let stacked = Tensor::f_randn(
        [c.b, c.s, c.before + width + c.after],
        (Kind::Float, device),
    )?
    .f_to_kind(kind)?;
    let dout = Tensor::f_randn([c.b, c.s, c.x, c.dk], (Kind::Float, device))?;
    let slice = |t: &Tensor| -> Result<Tensor, AttnError> {
        Ok(t.f_narrow(2, c.before, width)?
            .f_view([c.b, c.s, c.x, c.dk])?)
    };
    let fused_rope = Rope::new(10_000.0, c.dk, c.s, Kind::Float, device)?.with_kernel(true)?;
    // The kernel itself on the tables `Rope::apply` hands it (a silent fallback to the
    // operators would otherwise pass this check).
    let Some((cos, sin)) = fused_rope.kernel_tables() else {
        return Err(AttnError::Option {
            option: "gpu_check",
            reason: "Rope::with_kernel(true) on CUDA built no kernel tables".into(),
        });
    };
    let fused =
        |t: &[Tensor]| -> Result<Tensor, AttnError> { Ok(sys::rope(&slice(&t[0])?, cos, sin)?) };
    let got = run(std::slice::from_ref(&stacked), &dout, fused)?;
    let again = run(std::slice::from_ref(&stacked), &dout, fused)?;
    let reference_rope = Rope::new(10_000.0, c.dk, c.s, Kind::Double, device)?;
    let want = run(&[stacked.f_to_kind(Kind::Double)?], &dout, |t| {
        reference_rope.apply(&slice(&t[0])?)
    })?;
    judge(&got, &again, &want, &["out", "dx"])
}

/// RoPE of `[B, 1, X, dk]` (a slice of `[B, 1, X·dk + after]`) with sequence `b` at a random
/// position of its own below 2^17, through [`Rope::apply`] on the tables of
/// [`Rope::at_positions`] in `kind` (a decode plan's), against the same rotation in float64.
fn rope_per_sequence_case(
    (b, x, dk, after): (i64, i64, i64, i64),
    kind: Kind,
    device: Device,
) -> Result<((f64, String), bool), AttnError> {
    let stacked =
        Tensor::f_randn([b, 1, x * dk + after], (Kind::Float, device))?.f_to_kind(kind)?;
    let dout = Tensor::f_randn([b, 1, x, dk], (Kind::Float, device))?;
    let positions = Tensor::f_randint(1 << 17, [b, 1], (Kind::Int64, device))?;
    let slice = |t: &Tensor| -> Result<Tensor, AttnError> {
        Ok(t.f_narrow(2, 0, x * dk)?.f_view([b, 1, x, dk])?)
    };
    let fused_rope = Rope::at_positions(10_000.0, dk, &positions, kind)?.with_kernel(true)?;
    if !fused_rope.uses_kernel() {
        return Err(AttnError::Option {
            option: "gpu_check",
            reason: "Rope::with_kernel(true) on CUDA built no kernel tables".into(),
        });
    }
    let fused = |t: &[Tensor]| fused_rope.apply(&slice(&t[0])?);
    let got = run(std::slice::from_ref(&stacked), &dout, fused)?;
    let again = run(std::slice::from_ref(&stacked), &dout, fused)?;
    let reference_rope = Rope::at_positions(10_000.0, dk, &positions, Kind::Double)?;
    let want = run(&[stacked.f_to_kind(Kind::Double)?], &dout, |t| {
        reference_rope.apply(&slice(&t[0])?)
    })?;
    judge(&got, &again, &want, &["out", "dx"])
}

/// One case of φ's input blocks: raw `[b, s, g, d]` read as a slice of `[b, s, before + g·d]`
/// (the stacked projection) when `before > 0`, blocks of `l` tokens every `stride`.
#[derive(Debug, Clone, Copy)]
struct BlocksCase {
    b: i64,
    s: i64,
    g: i64,
    d: i64,
    l: i64,
    stride: i64,
    pos: bool,
    before: i64,
}

/// The `125m` shape's blocks (l = 32, d = 16) on a slice of the projection, its last 4 tokens
/// in no block (S = 100); D = 12 (element access in bf16, 16-byte in fp32) without a position
/// embedding; a stride that does not divide L; a stride longer than L (tokens between
/// blocks); the paper's dk = 192 at S = L.
const BLOCK_CASES: [BlocksCase; 5] = [
    BlocksCase {
        b: 2,
        s: 100,
        g: 4,
        d: 64,
        l: 32,
        stride: 16,
        pos: true,
        before: 96,
    },
    BlocksCase {
        b: 1,
        s: 45,
        g: 2,
        d: 12,
        l: 8,
        stride: 4,
        pos: false,
        before: 0,
    },
    BlocksCase {
        b: 2,
        s: 37,
        g: 3,
        d: 16,
        l: 5,
        stride: 3,
        pos: true,
        before: 8,
    },
    BlocksCase {
        b: 1,
        s: 50,
        g: 1,
        d: 8,
        l: 4,
        stride: 6,
        pos: true,
        before: 0,
    },
    BlocksCase {
        b: 1,
        s: 32,
        g: 4,
        d: 192,
        l: 32,
        stride: 16,
        pos: true,
        before: 0,
    },
];

/// A blocks row's name: `what`, the dtype and the case's sizes, `extra`, its options.
fn blocks_name(what: &str, c: BlocksCase, kind: Kind, extra: &str) -> String {
    format!(
        "{what} {} B={} S={} G={} D={} L={} stride={}{extra}{}{}",
        kind_name(kind),
        c.b,
        c.s,
        c.g,
        c.d,
        c.l,
        c.stride,
        if c.pos { " pos" } else { "" },
        if c.before > 0 { " strided" } else { "" },
    )
}

/// `cmp_blocks` against unfold, add and reshape (phi.rs's operator path) in float64; outputs:
/// the blocks, dx, and dpos when there is a position embedding. With `linear = Some(F)`,
/// `cmp_blocks_linear` with a `[F, L·D]` weight and a bias against the same blocks and
/// `linear`, with the weight's and the bias's gradients.
fn blocks_case(
    c: BlocksCase,
    kind: Kind,
    device: Device,
    linear: Option<i64>,
) -> Result<((f64, String), bool), AttnError> {
    let width = c.g * c.d;
    let randn = |shape: &[i64], scale: f64| -> Result<Tensor, AttnError> {
        Ok(Tensor::f_randn(shape, (Kind::Float, device))?
            .f_mul_scalar(scale)?
            .f_to_kind(kind)?)
    };
    let mut inputs = vec![randn(&[c.b, c.s, c.before + width], 1.0)?];
    if c.pos {
        inputs.push(randn(&[c.l, c.g, c.d], 1.0)?);
    }
    // Index of the weight, then the bias, in `inputs`.
    let wi = inputs.len();
    if let Some(f) = linear {
        inputs.push(randn(&[f, c.l * c.d], 1.0 / ((c.l * c.d) as f64).sqrt())?);
        inputs.push(randn(&[f], 1.0)?);
    }
    let nc = (c.s - c.l) / c.stride + 1;
    let dout = Tensor::f_randn(
        [c.b, nc, c.g, linear.unwrap_or(c.l * c.d)],
        (Kind::Float, device),
    )?;
    let raw = |t: &Tensor| -> Result<Tensor, AttnError> {
        Ok(t.f_narrow(2, c.before, width)?
            .f_view([c.b, c.s, c.g, c.d])?)
    };
    let pos = |t: &[Tensor]| {
        if c.pos {
            Some(t[1].shallow_clone())
        } else {
            None
        }
    };
    let fused = |t: &[Tensor]| -> Result<Tensor, AttnError> {
        let (x, p) = (raw(&t[0])?, pos(t));
        Ok(match linear {
            Some(_) => {
                sys::cmp_blocks_linear(&x, p.as_ref(), c.l, c.stride, &t[wi], Some(&t[wi + 1]))?
            }
            None => sys::cmp_blocks(&x, p.as_ref(), c.l, c.stride)?,
        })
    };
    let reference = |t: &[Tensor]| -> Result<Tensor, AttnError> {
        let blocks = raw(&t[0])?
            .f_unfold(1, c.l, c.stride)?
            .f_permute([0, 1, 4, 2, 3])?;
        let blocks = match pos(t) {
            Some(p) => blocks.f_add(&p)?,
            None => blocks,
        };
        let flat = blocks
            .f_permute([0, 1, 3, 2, 4])?
            .f_reshape([c.b, nc, c.g, c.l * c.d])?;
        Ok(match linear {
            Some(_) => flat.f_linear(&t[wi], Some(&t[wi + 1]))?,
            None => flat,
        })
    };
    let mut names = vec![if linear.is_some() { "y" } else { "blocks" }, "dx"];
    if c.pos {
        names.push("dpos");
    }
    if linear.is_some() {
        names.extend(["dw1", "db1"]);
    }
    twice_against_f64(&inputs, &dout, fused, reference, &names)
}

/// The gated sum on contiguous branch outputs, or (`strided`) on the layouts the layer hands
/// it: the window output a narrowed view of a wider one (read in place at its row stride) and
/// the compressed output transposed in its last two axes (no even row stride: copied first).
/// With `project = Some(dim)`, the sum and an fp32 `W_o` `[dim, H · dv]` after it, through the
/// layer's `gate_mix_project` (the kernel and a matmul in one autograd function), against the
/// operators' sum and `linear`.
fn mix_case(
    [b, s, h, dv]: [i64; 4],
    strided: bool,
    kind: Kind,
    device: Device,
    project: Option<i64>,
) -> Result<((f64, String), bool), AttnError> {
    let randn = |shape: [i64; 4]| -> Result<Tensor, AttnError> {
        Ok(Tensor::f_randn(shape, (Kind::Float, device))?.f_to_kind(kind)?)
    };
    let pad = if strided { 24 } else { 0 };
    let mut inputs = vec![
        randn(if strided {
            [b, s, dv, h]
        } else {
            [b, s, h, dv]
        })?,
        randn([b, s, h, dv])?,
        randn([b, s, h, dv + pad])?,
        Tensor::f_rand([b, s, h, 3], (Kind::Float, device))?.f_to_kind(kind)?,
    ];
    if let Some(dim) = project {
        let scale = 1.0 / ((h * dv) as f64).sqrt();
        inputs.push(Tensor::f_randn([dim, h * dv], (Kind::Float, device))?.f_mul_scalar(scale)?);
    }
    let dout = match project {
        Some(dim) => Tensor::f_randn([b, s, dim], (Kind::Float, device))?,
        None => Tensor::f_randn([b, s, h, dv], (Kind::Float, device))?,
    };
    let branches = |t: &[Tensor]| -> Result<[Tensor; 3], AttnError> {
        let oc = if strided {
            t[0].f_transpose(2, 3)?
        } else {
            t[0].shallow_clone()
        };
        Ok([oc, t[1].shallow_clone(), t[2].f_narrow(3, 0, dv)?])
    };
    let fused = |t: &[Tensor]| -> Result<Tensor, AttnError> {
        let [oc, os, ow] = branches(t)?;
        match t.get(4) {
            Some(w) => super::gate_mix_project(&t[3], &oc, &os, &ow, w),
            None => Ok(sys::gate_mix(&oc, &os, &ow, &t[3])?),
        }
    };
    let reference = |t: &[Tensor]| -> Result<Tensor, AttnError> {
        let [oc, os, ow] = branches(t)?;
        let mixed = crate::gates::mix(&t[3], &oc, &os, &ow)?;
        match t.get(4) {
            Some(w) => Ok(mixed
                .f_reshape([b, s, h * dv])?
                .f_linear::<&Tensor>(w, None)?),
            None => Ok(mixed),
        }
    };
    let names: &[&'static str] = if project.is_some() {
        &["out", "d o_cmp", "d o_slc", "d o_win", "d gates", "d W_o"]
    } else {
        &["out", "d o_cmp", "d o_slc", "d o_win", "d gates"]
    };
    twice_against_f64(&inputs, &dout, fused, reference, names)
}
