//! The trainer's alternative paths against the plain one, end to end on the CPU: the fused
//! head and loss, and activation recomputation.
mod common;

use common::{losses, ok, run, scratch, strs, tiny};

/// `fast.fused_loss` (the default: the head and its loss chunked, no logits) trains as the
/// plain path does: the same losses to float32 rounding over the first steps (the plain path
/// reduces the logits in one pass, the fused one in chunks).
#[test]
fn the_fused_loss_trains_like_the_plain_path() {
    let tmp = scratch("nsa-train-cli-fused-loss-");
    let out = tmp.path();
    let mut plain = strs(&["train", "--set", "fast.fused_loss=false"]);
    plain.extend(tiny(out, "plain", 4));
    ok(&run(&plain));
    let mut fused = strs(&["train"]);
    fused.extend(tiny(out, "fused", 4));
    ok(&run(&fused));
    let (a, b) = (losses(&out.join("plain")), losses(&out.join("fused")));
    assert_eq!(a.len(), 4);
    for ((step, x), (_, y)) in a.iter().zip(&b) {
        let (x, y) = (f64::from_bits(*x), f64::from_bits(*y));
        assert!((x - y).abs() <= 1e-5 * x.abs(), "step {step}: {x} vs {y}");
    }
}

/// `fast.recompute` (activation recomputation) trains exactly as without it: the same loss
/// bits at every step, with the fused loss and with logits.
#[test]
fn recomputation_trains_bit_exactly_as_without() {
    let tmp = scratch("nsa-train-cli-recompute-");
    let out = tmp.path();
    for fused in ["true", "false"] {
        let names = [format!("plain-{fused}"), format!("recompute-{fused}")];
        for (name, recompute) in names.iter().zip(["false", "true"]) {
            let mut args = strs(&[
                "train",
                "--set",
                &format!("fast.fused_loss={fused}"),
                "--set",
                &format!("fast.recompute={recompute}"),
            ]);
            args.extend(tiny(out, name, 4));
            ok(&run(&args));
        }
        let (a, b) = (losses(&out.join(&names[0])), losses(&out.join(&names[1])));
        assert_eq!(a.len(), 4);
        assert_eq!(a, b, "fast.fused_loss={fused}");
    }
}
