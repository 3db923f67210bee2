//! GPU check rows of the whole fused layer against the reference layer: the same weights, the
//! fused layer's forward exactly as training runs it (window first, the compressed kernel's
//! log-sum-exp feeding the selection kernel, the selected branch's forward chosen by shape),
//! and the reference layer (explicit masks, float64) given the fused layer's selection. Compared:
//! the layer output and the gradients of the input and of every parameter (projections, φ,
//! gates, W_o) for a random output gradient.
//!
//! The selection is handed over rather than recomputed because on bf16 inputs near-equal block
//! scores may rank differently (the `select` rows check the selection kernel itself, on exact
//! fp32 inputs); everything downstream of the discrete choice must agree.
use tch::{nn, Device, Kind, Tensor};

use super::{kind_name, rel_err, CheckRow};
use crate::config::{AttnError, CmpRope, NsaConfig, Phi};
use crate::gates::GateOverride;
use crate::layer::{AttnPath, ForwardOpts, LeanOpts, NsaAttention};
use crate::BranchKernel;
use nsa_select::SelectImpl;

/// The layer shapes of the rows: (B, S, dim, H, Hkv, dk, dv, l, d, l', n, w).
const SHAPES: [[i64; 12]; 2] = [
    // Three heads per group (the `small` / `125m` presets' G), dk ≠ dv, S not a multiple of
    // l' or w. n = 5: block 0 and two local blocks forced, two chosen by score.
    [2, 131, 96, 6, 2, 64, 128, 8, 4, 16, 5, 24],
    // Sixteen heads per group at the paper's head sizes (the token-warp forward and dQ).
    [1, 141, 128, 32, 2, 192, 128, 16, 8, 16, 5, 40],
];

/// Tolerance of the bf16 rows, relative to the largest element of each compared tensor. Each
/// kernel row holds 1e-2, but a layer chains about a dozen bf16 roundings (projections, RoPE,
/// φ, three branches, gates, their sum, W_o, and the same again backward), and a weight's
/// gradient sums a token's rounding errors over every token without shrinking them relative to
/// its largest element: the lean path, checked the same way on the CPU, is 1.4e-2 to 2.3e-2
/// off float64 over 15 runs (`tests::layer_rows_pass_on_cpu`), worst mostly in φ's gradients.
/// A wrong gradient is off by far more. fp32 rows hold 1e-4.
const BF16_LAYER_TOLERANCE: f64 = 5e-2;

/// Rows: each shape, and the first with `cmp_rope = "compressed"` and with `phi = "mean_mlp"`,
/// in fp32 (tolerance 1e-4) and
/// bf16 ([`BF16_LAYER_TOLERANCE`]), relative to
/// the largest element of each compared tensor. On CUDA in bf16 a row also fails unless every
/// branch ran on its fused kernel. `device` may be the CPU (where the fused path is the lean
/// path), for a unit test of the rows themselves.
pub(super) fn check_rows(device: Device) -> Vec<CheckRow> {
    let mut rows = Vec::new();
    // The first shape again with the compressed keys rotated after φ (the fused RoPE kernel
    // on the compressed keys, and its gradient into φ).
    // And with φ the mean plus the MLP (the mean of the blocks beside the blocks kernel).
    let cases = [
        (SHAPES[0], CmpRope::Raw, Phi::Mlp),
        (SHAPES[1], CmpRope::Raw, Phi::Mlp),
        (SHAPES[0], CmpRope::Compressed, Phi::Mlp),
        (SHAPES[0], CmpRope::Raw, Phi::MeanMlp),
    ];
    for (shape, cmp_rope, phi) in cases {
        let [b, s, dim, h, hkv, dk, dv, l, d, lp, n, w] = shape;
        let mut cfg = super::check_layer_config(dim, (h, hkv), (dk, dv), (l, d, lp, n));
        cfg.nsa.window = w;
        cfg.nsa.cmp_rope = cmp_rope;
        cfg.nsa.phi = phi;
        for kind in [Kind::Float, Kind::BFloat16] {
            let tolerance = if kind == Kind::BFloat16 {
                BF16_LAYER_TOLERANCE
            } else {
                1e-4
            };
            let name = format!(
                "layer fused vs reference {} B={b} S={s} H={h} Hkv={hkv} dk={dk} dv={dv} l={l} d={d} l'={lp} n={n} w={w}{}",
                kind_name(kind),
                match (cmp_rope, phi) {
                    (CmpRope::Compressed, _) => " cmp_rope=compressed".to_string(),
                    (CmpRope::Raw, Phi::Mlp) => String::new(),
                    (CmpRope::Raw, phi) => format!(" phi={phi}"),
                }
            );
            rows.push(match layer_case(&cfg, b, s, kind, device) {
                Ok((err, detail)) => CheckRow {
                    name,
                    max_rel_err: err,
                    tolerance,
                    passed: err.is_finite() && err <= tolerance,
                    detail,
                },
                Err(e) => CheckRow::failed(name, tolerance, e),
            });
        }
    }
    rows
}

/// The largest relative error over the output and every gradient, and a detail naming the
/// worst tensor and the branch kernels that ran.
fn layer_case(
    cfg: &NsaConfig,
    b: i64,
    s: i64,
    kind: Kind,
    device: Device,
) -> Result<(f64, String), AttnError> {
    let mut vs = nn::VarStore::new(device);
    let layer = NsaAttention::new(&(vs.root() / "attn"), *cfg)?;
    vs.set_kind(kind);
    // The reference gets the same (already rounded) weights in float64.
    let mut vs_ref = nn::VarStore::new(device);
    let reference = NsaAttention::new(&(vs_ref.root() / "attn"), *cfg)?;
    vs_ref.copy(&vs)?;
    vs_ref.set_kind(Kind::Double);

    let fused_path = AttnPath::Fused(LeanOpts::default());
    let audit = layer.audit(fused_path, device, kind)?;
    let kernels = format!(
        "cmp {} / slc {} / win {}",
        audit.compressed, audit.selected, audit.window
    );
    let all_fused = audit.compressed == BranchKernel::FusedCompressed
        && audit.selected == BranchKernel::FusedSelected
        && audit.window.is_fused_window();
    if device.is_cuda() && kind == Kind::BFloat16 && !all_fused {
        return Err(AttnError::Option {
            option: "gpu_check",
            reason: format!("not every branch is fused at this shape: {kernels}"),
        });
    }

    let x = Tensor::f_randn([b, s, cfg.dim], (kind, device))?;
    let dout = Tensor::f_randn([b, s, cfg.dim], (Kind::Double, device))?;
    let opts = |path| ForwardOpts {
        path,
        gates: GateOverride::Learned,
        select: SelectImpl::Vectorized,
        nvtx: false,
    };

    let (fused, blocks) = {
        let x = x.f_detach()?.f_set_requires_grad(true)?;
        let branches = layer.forward_branches(&x, &opts(fused_path))?;
        let grads = output_and_grads(&vs, &x, &branches.output, &dout)?;
        (grads, branches.blocks)
    };
    let want = {
        let x = x.f_to_kind(Kind::Double)?.f_set_requires_grad(true)?;
        let branches =
            reference.forward_branches_with_blocks(&x, &blocks, &opts(AttnPath::Reference))?;
        output_and_grads(&vs_ref, &x, &branches.output, &dout)?
    };

    let mut worst = (0.0f64, String::from("output"));
    for ((name, got), (_, want)) in fused.iter().zip(&want) {
        let e = rel_err(got, want)?;
        if e.is_nan() || e > worst.0 {
            worst = (e, name.clone());
        }
    }
    let tensors = fused.len();
    Ok((
        worst.0,
        format!(
            "worst of {tensors} tensors (output, dx, every parameter gradient): {}; {kernels}",
            worst.1
        ),
    ))
}

/// `[("output", out), ("dx", ∂/∂x), (name, ∂/∂parameter) in name order]` for the loss
/// `Σ out · dout` (in float64).
fn output_and_grads(
    vs: &nn::VarStore,
    x: &Tensor,
    out: &Tensor,
    dout: &Tensor,
) -> Result<Vec<(String, Tensor)>, AttnError> {
    let mut params: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    let mut inputs = vec![x.shallow_clone()];
    inputs.extend(params.iter().map(|(_, t)| t.shallow_clone()));
    let loss = out
        .f_to_kind(Kind::Double)?
        .f_mul(dout)?
        .f_sum(Kind::Double)?;
    let mut grads = Tensor::f_run_backward(&[&loss], &inputs, false, false)?.into_iter();
    let dx = grads.next().ok_or_else(|| AttnError::Option {
        option: "gpu_check",
        reason: "no gradient for the input".into(),
    })?;
    let mut named = vec![
        ("output".to_string(), out.f_detach()?),
        ("dx".to_string(), dx),
    ];
    named.extend(params.into_iter().map(|(name, _)| name).zip(grads));
    Ok(named)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rows run on the CPU (fused = lean there) and pass: the weights, input and selection
    /// reach the reference intact, and every gradient is compared.
    #[test]
    fn layer_rows_pass_on_cpu() {
        let rows = check_rows(Device::Cpu);
        assert_eq!(rows.len(), 8);
        for r in &rows {
            eprintln!("{} {:.2e} {}", r.name, r.max_rel_err, r.detail);
        }
        for r in &rows {
            assert!(r.passed, "{}: {:.3e} ({})", r.name, r.max_rel_err, r.detail);
            assert!(r.detail.contains("tensors"), "{}", r.detail);
        }
    }
}
