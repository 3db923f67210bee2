//! Prefill + decode against the full-sequence forward: [`decode_sequence`] (a layer run as a
//! decoder runs it), [`decode_parity`] (the comparison the tests and the GPU check make) and
//! [`decode_check`] (the rows of `nsa-train check --gpu`).
use tch::{nn, Device, Kind, Tensor};

use super::StepReads;
use crate::config::{AttnError, CmpRope, NsaConfig, NsaParams, Phi};
use crate::fused::CheckRow;
use crate::layer::{AttnPath, ForwardOpts, LeanOpts, NsaAttention};
use nsa_select::SelectConfig;

/// A layer's outputs for whole sequences computed by prefill and step-by-step decode.
#[derive(Debug)]
pub struct DecodedSequence {
    /// `[B, S, dim]`: row `t` of sequence `b` from the prefill (`t < prompt_b`) or from the
    /// decode step that added token `t`.
    pub output: Tensor,
    /// `[B, S, Hkv, n]`: the blocks each row's query read (the prefill's selection, then each
    /// step's).
    pub blocks: Tensor,
    /// Each step's positions (one per sequence; those `≥ S` fed padding) and reads.
    pub steps: Vec<(Vec<i64>, StepReads)>,
}

/// Runs `layer` over `x` `[B, S, dim]` as a decoder does: prefill of the first `prompts[b]`
/// tokens of sequence `b` (`1 ≤ prompts[b] ≤ S`), then one token per sequence per step until
/// every sequence has had all `S` (a sequence already done is fed zeros, whose outputs are
/// dropped). The prefill runs on `opts`' path.
pub fn decode_sequence(
    layer: &NsaAttention,
    x: &Tensor,
    prompts: &[i64],
    opts: &ForwardOpts,
) -> Result<DecodedSequence, AttnError> {
    let _no_grad = tch::no_grad_guard();
    let sz = x.size();
    let (b, s, dim) = match sz.as_slice() {
        &[b, s, dim] if b == prompts.len() as i64 => (b, s, dim),
        _ => {
            return Err(AttnError::Shape {
                what: "x",
                expected: format!("[B = {}, S, dim]", prompts.len()),
                got: sz,
            })
        }
    };
    let longest = prompts.iter().copied().max().unwrap_or(0);
    let shortest = prompts.iter().copied().min().unwrap_or(0);
    if shortest < 1 || longest > s {
        return Err(AttnError::Option {
            option: "prompts",
            reason: format!("need lengths in 1..={s}, got {prompts:?}"),
        });
    }
    let capacity = s + (longest - shortest) + 1;
    let (pre, mut cache) = layer.prefill(&x.f_narrow(1, 0, longest)?, prompts, capacity, opts)?;
    let cfg = layer.config();
    let output = Tensor::f_zeros([b, s, dim], (x.kind(), x.device()))?;
    let blocks = Tensor::f_full(
        [b, s, cfg.kv_heads, cfg.nsa.select.top_n],
        -1,
        (Kind::Int64, x.device()),
    )?;
    for (row, &len) in (0..b).zip(prompts) {
        let rows = |t: &Tensor| t.f_select(0, row)?.f_narrow(0, 0, len);
        rows(&output)?.f_copy_(&rows(&pre.output)?)?;
        rows(&blocks)?.f_copy_(&rows(&pre.blocks)?)?;
    }
    let mut steps = Vec::new();
    for k in 0..s - shortest {
        let positions: Vec<i64> = prompts.iter().map(|p| p + k).collect();
        let input = Tensor::f_zeros([b, 1, dim], (x.kind(), x.device()))?;
        for (row, &t) in (0..b).zip(&positions) {
            if t < s {
                input
                    .f_select(0, row)?
                    .f_copy_(&x.f_select(0, row)?.f_narrow(0, t, 1)?)?;
            }
        }
        let step = layer.decode_step(&input, &mut cache, opts)?;
        for (row, &t) in (0..b).zip(&positions) {
            if t < s {
                let at = |whole: &Tensor| whole.f_select(0, row)?.f_select(0, t);
                at(&output)?.f_copy_(&step.output.f_select(0, row)?.f_select(0, 0)?)?;
                at(&blocks)?.f_copy_(&step.reads.blocks.f_select(0, row)?)?;
            }
        }
        steps.push((positions, step.reads));
    }
    Ok(DecodedSequence {
        output,
        blocks,
        steps,
    })
}

/// Which selection the full-sequence forward uses in [`decode_parity`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParitySelection {
    /// The forward selects its own blocks: equal outputs then also mean equal selections. In
    /// float32 a near-tie of two block scores may be broken differently by the two
    /// computations' rounding, so use this in float64.
    Own,
    /// The forward reads the blocks the decode selected
    /// ([`NsaAttention::forward_branches_with_blocks`]): compares everything but the top-n
    /// choice, immune to near-ties; for float32 and bf16.
    Decoded,
}

/// How far prefill + decode is from the full-sequence forward.
#[derive(Debug, Clone, Copy)]
pub struct Parity {
    /// `max |decode − forward|` over every output (infinite if any is NaN).
    pub max_abs_err: f64,
    /// `max |forward|`.
    pub forward_max: f64,
    /// Whether every row selected the same blocks.
    pub same_blocks: bool,
}

impl Parity {
    /// `max_abs_err / max |forward|`.
    pub fn rel_err(&self) -> f64 {
        self.max_abs_err / self.forward_max.max(1e-30)
    }

    /// `max_abs_err / max(1, max |forward|)`: absolute for outputs of order one, relative for
    /// larger ones.
    pub fn scaled_err(&self) -> f64 {
        self.max_abs_err / self.forward_max.max(1.0)
    }
}

/// Compares [`decode_sequence`] of `x` with `layer.forward` over all of `x` (`opts` for both).
pub fn decode_parity(
    layer: &NsaAttention,
    x: &Tensor,
    prompts: &[i64],
    opts: &ForwardOpts,
    selection: ParitySelection,
) -> Result<Parity, AttnError> {
    let decoded = decode_sequence(layer, x, prompts, opts)?;
    let _no_grad = tch::no_grad_guard();
    let full = match selection {
        ParitySelection::Own => layer.forward_branches(x, opts)?,
        ParitySelection::Decoded => layer.forward_branches_with_blocks(x, &decoded.blocks, opts)?,
    };
    compare_outputs(
        &decoded.output,
        &full.output,
        decoded.blocks.f_equal(&full.blocks)?,
    )
}

/// The [`Parity`] of outputs `got` against `want` (in float64; a NaN gap counts as infinite).
fn compare_outputs(got: &Tensor, want: &Tensor, same_blocks: bool) -> Result<Parity, AttnError> {
    let want = want.f_to_kind(Kind::Double)?;
    let max_abs_err = got
        .f_to_kind(Kind::Double)?
        .f_sub(&want)?
        .f_abs()?
        .f_max()?
        .f_double_value(&[])?;
    Ok(Parity {
        max_abs_err: if max_abs_err.is_nan() {
            f64::INFINITY
        } else {
            max_abs_err
        },
        forward_max: want.f_abs()?.f_max()?.f_double_value(&[])?,
        same_blocks,
    })
}

/// A layer of `cfg` with fresh random weights in `kind` (its variables, kept alive by the
/// caller) and a random input `[batch, seq, dim]`.
fn random_layer(
    cfg: &NsaConfig,
    kind: Kind,
    batch: i64,
    seq: i64,
    device: Device,
) -> Result<(nn::VarStore, NsaAttention, Tensor), AttnError> {
    let mut vs = nn::VarStore::new(device);
    let layer = NsaAttention::new(&(vs.root() / "attn"), *cfg)?;
    vs.set_kind(kind);
    let x = Tensor::f_randn([batch, seq, cfg.dim], (kind, device))?;
    Ok((vs, layer, x))
}

/// One layer configuration of the checks.
fn check_config(
    (shared_kv, phi, cmp_rope): (bool, Phi, CmpRope),
    (l, d, l_sel, n, w): (i64, i64, i64, i64, i64),
) -> NsaConfig {
    NsaConfig {
        dim: 96,
        heads: 8,
        kv_heads: 2,
        head_dim_k: 64,
        head_dim_v: 32,
        rope_base: 10_000.0,
        nsa: NsaParams {
            select: SelectConfig {
                block_len: l,
                stride: d,
                select_len: l_sel,
                top_n: n,
                n_local: 2,
            },
            window: w,
            phi,
            phi_hidden: 16,
            cmp_rope,
            shared_kv,
            gate_hidden: 16,
        },
    }
}

/// The decode rows of `nsa-train check --gpu`: prefill + decode on CUDA against the
/// full-sequence forward, on fresh random inputs, for independent and shared K/V with the MLP
/// and the linear φ, each also with the compressed keys rotated after φ, a batch of three sequences with different prompt lengths (1, one shorter
/// than l, one crossing several blocks): float32 and bf16 against the forward given the
/// decode's blocks (tolerance 1e-5 and 2e-2, relative to the largest output), float64 against
/// the forward's own selection (1e-10, and every block equal).
pub fn decode_check() -> Result<Vec<CheckRow>, AttnError> {
    let device = crate::fused::check_device("decode_check")?;
    let mut rows = rows_on(device);
    rows.extend(decode_kernel_rows(device));
    nsa_sys::fused::finish_prebuilds();
    Ok(rows)
}

/// [`decode_check`]'s rows on `device` (a unit test runs them on the CPU).
fn rows_on(device: Device) -> Vec<CheckRow> {
    let lengths = [(8, 4, 16, 4, 24), (16, 8, 32, 3, 40)];
    let mut rows = Vec::new();
    for (shared_kv, phi, cmp_rope, lens) in [
        (false, Phi::Mlp, CmpRope::Raw, lengths[0]),
        (true, Phi::Linear, CmpRope::Raw, lengths[1]),
        (false, Phi::Mlp, CmpRope::Compressed, lengths[1]),
        (true, Phi::Mlp, CmpRope::Compressed, lengths[0]),
        (false, Phi::MeanMlp, CmpRope::Raw, lengths[1]),
    ] {
        for (kind, selection, tolerance) in [
            (Kind::Float, ParitySelection::Decoded, 1e-5),
            (Kind::BFloat16, ParitySelection::Decoded, 2e-2),
            (Kind::Double, ParitySelection::Own, 1e-10),
        ] {
            let cfg = check_config((shared_kv, phi, cmp_rope), lens);
            let name =
                format!(
                "decode {kind:?} {} phi={phi}{} l={} d={} l'={} n={} w={} B=3 S=150 prompts 1/{}/90",
                if shared_kv { "shared_kv" } else { "per-branch K/V" },
                match cmp_rope {
                    CmpRope::Raw => "",
                    CmpRope::Compressed => " cmp_rope=compressed",
                },
                lens.0,
                lens.1,
                lens.2,
                lens.3,
                lens.4,
                lens.0 - 1,
            );
            let path = if kind == Kind::Double {
                AttnPath::Reference
            } else {
                AttnPath::Lean(LeanOpts::default())
            };
            let row = check_case(
                &cfg,
                kind,
                path,
                selection,
                150,
                &[1, lens.0 - 1, 90],
                device,
            )
            .map(|p| {
                let exact = selection == ParitySelection::Decoded || p.same_blocks;
                CheckRow {
                    name: name.clone(),
                    max_rel_err: p.rel_err(),
                    tolerance,
                    passed: p.rel_err() <= tolerance && exact,
                    detail: if exact {
                        "output".into()
                    } else {
                        "selected blocks differ from the forward's".into()
                    },
                }
            });
            rows.push(row.unwrap_or_else(|e| CheckRow::failed(name, tolerance, e)));
        }
    }
    rows
}

fn check_case(
    cfg: &NsaConfig,
    kind: Kind,
    path: AttnPath,
    selection: ParitySelection,
    seq: i64,
    prompts: &[i64],
    device: Device,
) -> Result<Parity, AttnError> {
    let (_vs, layer, x) = random_layer(cfg, kind, prompts.len() as i64, seq, device)?;
    let opts = ForwardOpts {
        path,
        ..Default::default()
    };
    decode_parity(&layer, &x, prompts, &opts, selection)
}

/// The decode kernels' rows of `nsa-train check --gpu` (the step on
/// `nsa_sys::fused::DecodeStep`, taken on the fused path): prefill + decode against the
/// full-sequence forward given the decoded blocks (float32: within 1e-4; bf16: both against
/// the float64 forward, [`Bf16Errors::row`]'s rule), and, in float32,
/// the kernels' selection against nsa-select's (the libtorch step's) on every decoded row.
/// Sequences long enough for several compressed and selection-score tiles (S = 1200), short
/// ones with shared K/V (the window read from the raw buffer, prompts shorter than l) and with
/// `cmp_rope = "compressed"` (φ's keys unrotated in the pending ring or the raw buffer), a
/// paper-like group (16 heads, dk 192, dv 128, l 32, d 16, l' 64, n 16, w 512) and a small one
/// (3 heads, dk = dv = 64); the last two take the warp-level tile kernels in bf16. Then the
/// tile kernels with several tiles per CTA against one tile per CTA.
pub fn decode_kernel_rows(device: Device) -> Vec<CheckRow> {
    let fused = AttnPath::Fused(LeanOpts::default());
    let paper = NsaConfig {
        dim: 256,
        heads: 32,
        kv_heads: 2,
        head_dim_k: 192,
        head_dim_v: 128,
        ..check_config((false, Phi::Mlp, CmpRope::Raw), (32, 16, 64, 16, 512))
    };
    let cases = [
        (
            "per-branch K/V l=8 d=4 l'=16 n=4 w=24",
            check_config((false, Phi::Mlp, CmpRope::Raw), (8, 4, 16, 4, 24)),
            1200,
            vec![1000, 1100, 1150],
        ),
        (
            "shared_kv l=16 d=8 l'=32 n=3 w=40",
            check_config((true, Phi::Linear, CmpRope::Raw), (16, 8, 32, 3, 40)),
            150,
            vec![1, 15, 90],
        ),
        (
            // The pending ring's keys unrotated beside rotated raw and window keys.
            "per-branch K/V cmp_rope=compressed l=16 d=8 l'=32 n=3 w=40",
            check_config((false, Phi::Mlp, CmpRope::Compressed), (16, 8, 32, 3, 40)),
            150,
            vec![1, 15, 90],
        ),
        (
            "shared_kv cmp_rope=compressed l=16 d=8 l'=32 n=3 w=40",
            check_config((true, Phi::Mlp, CmpRope::Compressed), (16, 8, 32, 3, 40)),
            150,
            vec![1, 15, 90],
        ),
        (
            "paper-like G=16 dk=192 dv=128",
            paper,
            1200,
            vec![700, 1100, 1150],
        ),
        (
            // 326 selection blocks at l' = 8 (an eighth of a tile) and 16 picks.
            "per-branch K/V l=8 d=4 l'=8 n=16 w=24",
            check_config((false, Phi::Mlp, CmpRope::Raw), (8, 4, 8, 16, 24)),
            2600,
            vec![2200, 2400, 2550],
        ),
        (
            "G=3 dk=dv=64 l=16 d=8 l'=32 n=3 w=40",
            NsaConfig {
                heads: 6,
                head_dim_v: 64,
                ..check_config((false, Phi::Mlp, CmpRope::Raw), (16, 8, 32, 3, 40))
            },
            700,
            vec![300, 450, 690],
        ),
    ];
    let mut rows = Vec::new();
    for (what, cfg, seq, prompts) in &cases {
        let name = format!("decode kernels Float {what} B=3 S={seq} prompts {prompts:?}");
        let row = check_case(
            cfg,
            Kind::Float,
            fused,
            ParitySelection::Decoded,
            *seq,
            prompts,
            device,
        )
        .map(|p| CheckRow {
            name: name.clone(),
            max_rel_err: p.rel_err(),
            tolerance: 1e-4,
            passed: p.rel_err() <= 1e-4,
            detail: "output vs the forward given the decoded blocks".into(),
        });
        rows.push(row.unwrap_or_else(|e| CheckRow::failed(name, 1e-4, e)));
        let name = format!("decode kernels BFloat16 {what} B=3 S={seq} prompts {prompts:?}");
        let row = bf16_against_f64(cfg, *seq, prompts, fused, device).map(|e| e.row(&name));
        rows.push(row.unwrap_or_else(|e| CheckRow::failed(name, BF16_FLOOR, e)));
        let name = format!("decode kernels selection Float {what} B=3 S={seq} prompts {prompts:?}");
        let mut row = selection_case(cfg, *seq, prompts, device)
            .unwrap_or_else(|e| CheckRow::failed(String::new(), 1e-4, e));
        row.name = name;
        rows.push(row);
    }
    use nsa_sys::fused::DecodeLaunch;
    let tiled = |ctas: i64, slices: i64| {
        let launch = DecodeLaunch {
            tile_ctas: Some(ctas),
            select_slices: Some(slices),
            ..DecodeLaunch::default()
        };
        let what = format!("{ctas} tile CTAs and {slices} selection CTAs per group");
        (what, launch)
    };
    let launches = [
        tiled(1, 1),
        tiled(20, 3),
        // The same shapes as the pick, each kernel waiting for the one before it to end.
        (
            "serial launches (no programmatic dependents)".to_string(),
            DecodeLaunch {
                programmatic: Some(false),
                ..DecodeLaunch::default()
            },
        ),
    ];
    for kind in [Kind::Float, Kind::BFloat16] {
        for (what, launch) in &launches {
            let tolerance = if kind == Kind::Float { 1e-5 } else { 2e-2 };
            let name =
                format!("decode kernels {kind:?} {TILING_WHAT}, {what} vs the device's pick");
            let row = tiling_case(&paper, kind, *launch, device)
                .unwrap_or_else(|e| CheckRow::failed(String::new(), tolerance, e));
            rows.push(CheckRow { name, ..row });
        }
    }
    rows
}

/// The bound on a bf16 decode's error against float64 that holds whatever the bf16 forward's
/// own error (see [`Bf16Errors`]).
const BF16_FLOOR: f64 = 2e-2;

/// A bf16 decode and the bf16 full-sequence forward given the same blocks, each against the
/// float64 forward (relative to its largest output).
#[derive(Debug, Clone, Copy)]
struct Bf16Errors {
    decode: f64,
    forward: f64,
}

impl Bf16Errors {
    /// Passes when the decode is within `max(2e-2, 2 × the forward's error)` of float64: as
    /// exact as the whole layer in bf16 can be on this draw. Comparing the two bf16 results with
    /// each other (as earlier rounds did) adds both errors, and a layer in bf16 (projections,
    /// φ, three softmaxes over logits rounded to bf16, gates) is ill-conditioned on some random
    /// draws: the same row measured 1.0e-2 to 3.2e-2 that way.
    fn row(self, name: &str) -> CheckRow {
        let tolerance = BF16_FLOOR.max(2.0 * self.forward);
        CheckRow {
            name: format!("{name} vs float64 (the bf16 forward: {:.2e})", self.forward),
            max_rel_err: self.decode,
            tolerance,
            passed: self.decode <= tolerance,
            detail: format!(
                "decoded output vs the float64 forward given the decoded blocks (the bf16 \
                 forward's error: {:.2e})",
                self.forward
            ),
        }
    }
}

/// Prefill + decode of a random bf16 layer of `cfg` on `path`, and its full-sequence forward
/// given the decoded blocks on the same path, each against the float64 forward on the
/// reference path given those blocks, with the same (bf16-valued) weights and input widened.
fn bf16_against_f64(
    cfg: &NsaConfig,
    seq: i64,
    prompts: &[i64],
    path: AttnPath,
    device: Device,
) -> Result<Bf16Errors, AttnError> {
    let (vs, layer, x) = random_layer(cfg, Kind::BFloat16, prompts.len() as i64, seq, device)?;
    let opts = ForwardOpts {
        path,
        ..Default::default()
    };
    let decoded = decode_sequence(&layer, &x, prompts, &opts)?;
    let _no_grad = tch::no_grad_guard();
    let forward = layer.forward_branches_with_blocks(&x, &decoded.blocks, &opts)?;
    let mut vs64 = nn::VarStore::new(device);
    let layer64 = NsaAttention::new(&(vs64.root() / "attn"), *cfg)?;
    vs64.set_kind(Kind::Double);
    vs64.copy(&vs)?;
    let reference = ForwardOpts {
        path: AttnPath::Reference,
        ..Default::default()
    };
    let truth = layer64.forward_branches_with_blocks(
        &x.f_to_kind(Kind::Double)?,
        &decoded.blocks,
        &reference,
    )?;
    Ok(Bf16Errors {
        decode: compare_outputs(&decoded.output, &truth.output, true)?.rel_err(),
        forward: compare_outputs(&forward.output, &truth.output, true)?.rel_err(),
    })
}

const TILING_WHAT: &str = "paper-like G=16 lengths 10000/6100/700";

/// The decode kernels at `launch`'s shapes against the device's pick (here one tile per CTA and
/// one selection CTA per (b, g): the blocks fit one pass of its threads), on one random cache
/// of `cfg` (TILING_WHAT: 157 selection blocks in the longest sequence) and fresh queries and
/// gates: outputs within the kind's tolerance of the larger one, and the same blocks, each
/// launch after its buffers were poisoned (`DecodeStep::poison_scratch`). A budget
/// of 1 tile CTA per launch gives each CTA all of a (b, g)'s tiles of a branch
/// (double-buffered loads, each head's softmax state kept across tiles, the fewest partials),
/// 20 uneven splits; 3 selection CTAs take 64, 64 and 29 blocks and hand their lists to the
/// last (the slices' hand-off, which the pick takes from 257 blocks on).
fn tiling_case(
    cfg: &NsaConfig,
    kind: Kind,
    launch: nsa_sys::fused::DecodeLaunch,
    device: Device,
) -> Result<CheckRow, AttnError> {
    let _no_grad = tch::no_grad_guard();
    let lengths = [10_000i64, 6_100, 700];
    let b = lengths.len() as i64;
    let cache = super::NsaCache::filled_random(cfg, &lengths, lengths[0], kind, device)?;
    let h = cfg.heads_per_group();
    let q = Tensor::f_randn([b, cfg.kv_heads, h, cfg.head_dim_k], (kind, device))?;
    let gates = Tensor::f_rand([b, cfg.heads, 3], (kind, device))?;
    let last: Vec<i64> = lengths.iter().map(|l| l - 1).collect();
    let positions = Tensor::f_from_slice(&last)?.f_to_device(device)?;
    let run = |launch| -> Result<(Tensor, Tensor), AttnError> {
        let step = super::fused::kernel_step(&cache, &q, &positions, last[0], &gates, launch)?;
        // The step's buffers start uninitialised: poisoned, an element read before it was
        // written shows as NaN or as the poison's pick −2.
        step.poison_scratch()?;
        step.launch()?;
        Ok((step.output().shallow_clone(), step.blocks().shallow_clone()))
    };
    let (one, one_ids) = run(nsa_sys::fused::DecodeLaunch::default())?;
    let (many, many_ids) = run(launch)?;
    let unwritten = |ids: &Tensor| -> Result<bool, AttnError> {
        Ok(ids.f_eq(-2)?.f_any()?.f_int64_value(&[])? != 0)
    };
    let holes = unwritten(&one_ids)? || unwritten(&many_ids)?;
    let same = one_ids.f_equal(&many_ids)? && !holes;
    let rel = compare_outputs(&many, &one, same)?.rel_err();
    let tolerance = if kind == Kind::Float { 1e-5 } else { 2e-2 };
    Ok(CheckRow {
        name: String::new(),
        max_rel_err: rel,
        tolerance,
        passed: same && rel <= tolerance,
        detail: format!(
            "output and blocks vs the device's pick ({})",
            match (same, holes) {
                (true, _) => "same blocks",
                (false, true) => "picks left unwritten",
                (false, false) => "blocks differ",
            }
        ),
    })
}

/// The same float32 decode on the kernels and on the libtorch step: every decoded row's blocks
/// equal, outputs within 1e-4 of the larger one.
fn selection_case(
    cfg: &NsaConfig,
    seq: i64,
    prompts: &[i64],
    device: Device,
) -> Result<CheckRow, AttnError> {
    let (_vs, layer, x) = random_layer(cfg, Kind::Float, prompts.len() as i64, seq, device)?;
    let run = |path| {
        let opts = ForwardOpts {
            path,
            ..Default::default()
        };
        decode_sequence(&layer, &x, prompts, &opts)
    };
    let kernels = run(AttnPath::Fused(LeanOpts::default()))?;
    let ops = run(AttnPath::Lean(LeanOpts::default()))?;
    let _no_grad = tch::no_grad_guard();
    // Decoded rows only: t >= prompt_b.
    let t = Tensor::f_arange(seq, (Kind::Int64, device))?.f_view([1, seq])?;
    let lens = Tensor::f_from_slice(prompts)?
        .f_to_device(device)?
        .f_view([-1, 1])?;
    let decoded = t.f_ge_tensor(&lens)?;
    let differ = kernels
        .blocks
        .f_ne_tensor(&ops.blocks)?
        .f_any_dim(-1, false)?
        .f_any_dim(-1, false)?
        .f_logical_and(&decoded)?;
    let (n_differ, n_rows) = (
        differ.f_sum(Kind::Int64)?.f_int64_value(&[])?,
        decoded.f_sum(Kind::Int64)?.f_int64_value(&[])?,
    );
    let rel = compare_outputs(&kernels.output, &ops.output, n_differ == 0)?.rel_err();
    Ok(CheckRow {
        name: String::new(),
        max_rel_err: rel,
        tolerance: 1e-4,
        passed: n_differ == 0 && rel <= 1e-4,
        detail: format!("{n_differ} of {n_rows} decoded rows select other blocks than nsa-select"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The GPU check's rows pass on the CPU too (same code, other device).
    #[test]
    fn the_check_rows_pass_on_the_cpu() {
        tch::manual_seed(1);
        let rows = rows_on(Device::Cpu);
        assert_eq!(rows.len(), 15);
        for r in &rows {
            assert!(r.passed, "{r:?}");
        }
    }

    /// The bf16 rows' yardstick on the CPU: both bf16 results near float64, the float64 copy
    /// of the layer really the bf16 layer widened (a layer with other weights would be O(1)
    /// away), and the pass rule.
    #[test]
    fn bf16_decode_is_judged_against_float64() {
        tch::manual_seed(2);
        let cfg = check_config((false, Phi::Mlp, CmpRope::Raw), (8, 4, 16, 4, 24));
        let lean = AttnPath::Lean(LeanOpts::default());
        let e = bf16_against_f64(&cfg, 150, &[1, 7, 90], lean, Device::Cpu).unwrap();
        assert!(e.decode > 0.0 && e.decode < 2e-2, "{e:?}");
        assert!(e.forward > 0.0 && e.forward < 2e-2, "{e:?}");
        assert!(e.row("x").passed);
        let worse = Bf16Errors {
            decode: 0.05,
            forward: 0.02,
        };
        assert!(!worse.row("x").passed);
        let ill = Bf16Errors {
            decode: 0.03,
            forward: 0.02,
        };
        assert!(ill.row("x").passed);
        assert_eq!(ill.row("x").tolerance, 0.04);
    }
}
