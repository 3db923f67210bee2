//! Typed errors of the pointwise entry points (no GPU needed) and the glue's table layout.
use super::*;
use tch::Device;

fn reason(e: FusedError) -> String {
    match e {
        FusedError::Input { what, reason } => format!("{what}: {reason}"),
        other => panic!("expected an input error, got {other}"),
    }
}

#[test]
fn the_glue_reads_the_table_rust_fills() {
    // SAFETY: a pure function of the C++ struct's layout.
    let glue = unsafe { nsa_pointwise_table_size() };
    assert_eq!(glue, std::mem::size_of::<PointwiseTable>());
    let err = same_layout("T", 8, 16).unwrap_err().to_string();
    assert!(
        err.contains("T is 8 bytes in the glue and 16 in Rust"),
        "{err}"
    );
}

#[test]
fn bad_inputs_are_typed_errors_before_any_device_work() {
    let f = (Kind::Float, Device::Cpu);
    let (cos, sin) = (Tensor::zeros([8, 4], f), Tensor::zeros([8, 4], f));
    let x = Tensor::zeros([1, 8, 2, 8], f);
    let cases = [
        (
            rope(&Tensor::zeros([8, 2, 8], f), &cos, &sin),
            "x: must be [B, S, X, dk]",
        ),
        (
            rope(&Tensor::zeros([1, 8, 2, 7], f), &cos, &sin),
            "dk must be even",
        ),
        (rope(&x.transpose(2, 3), &cos, &sin), "last axis contiguous"),
        (rope(&x.to_kind(Kind::Half), &cos, &sin), "bf16 or fp32"),
        (
            rope(&x, &Tensor::zeros([7, 4], f), &sin),
            "cos: contiguous fp32 [≥ 8, 4]",
        ),
        (
            rope(&x, &cos, &sin.to_kind(Kind::Double)),
            "sin: contiguous fp32",
        ),
        (rope(&x, &cos, &sin), "x: on Cpu: CUDA tensors only"),
    ];
    for (got, want) in cases {
        let msg = reason(got.expect_err(want));
        assert!(msg.contains(want), "{msg:?} lacks {want:?}");
    }
    let o = Tensor::zeros([1, 8, 2, 4], f);
    let g = Tensor::zeros([1, 8, 2, 3], f);
    let cases = [
        (
            gate_mix(&o, &o, &o.narrow(3, 0, 2), &g),
            "ow: Float [1, 8, 2, 4] on Cpu, got Float [1, 8, 2, 2]",
        ),
        (
            gate_mix(&o, &o, &o, &Tensor::zeros([1, 8, 2, 2], f)),
            "g: contiguous Float [1, 8, 2, 3]",
        ),
        (
            gate_mix(&o, &o, &o, &Tensor::zeros([1, 8, 3, 2], f).transpose(2, 3)),
            "g: contiguous Float [1, 8, 2, 3]",
        ),
        (
            gate_mix(&o, &o.to_kind(Kind::BFloat16), &o, &g),
            "os: Float [1, 8, 2, 4]",
        ),
        (
            gate_mix(&o.to_kind(Kind::Int), &o, &o, &g),
            "oc: bf16 or fp32",
        ),
        (gate_mix(&o, &o, &o, &g), "oc: on Cpu: CUDA tensors only"),
        (
            gate_mix_project(&o, &o, &o, &g, &Tensor::zeros([6, 7], f)),
            "w: must be [dim, H · dv] = [dim, 8], got [6, 7]",
        ),
        (
            gate_mix_project(&o, &o, &o, &g, &Tensor::zeros([8, 6], f).transpose(0, 1)),
            "w: contiguous Float [6, 8]",
        ),
        (
            gate_mix_project(
                &o,
                &o,
                &o,
                &g,
                &Tensor::zeros([6, 8], (Kind::Double, Device::Cpu)),
            ),
            "w: contiguous Float [6, 8]",
        ),
        (
            gate_mix_project(&o, &o, &o, &g, &Tensor::zeros([6, 8], f)),
            "oc: on Cpu: CUDA tensors only",
        ),
    ];
    for (got, want) in cases {
        let msg = reason(got.expect_err(want));
        assert!(msg.contains(want), "{msg:?} lacks {want:?}");
    }
    let x = Tensor::zeros([2, 3, 8], f);
    let w = Tensor::ones([8], f);
    let cases = [
        (
            rms_norm(&Tensor::from(1.0f32), &w, 1e-6),
            "x: must be [..., D]",
        ),
        (
            rms_norm(&x.to_kind(Kind::Half), &w, 1e-6),
            "x: bf16 or fp32",
        ),
        (rms_norm(&x, &w.to_kind(Kind::Int), 1e-6), "w: bf16 or fp32"),
        (
            rms_norm(&Tensor::zeros([2, 0], f), &Tensor::ones([0], f), 1e-6),
            "D must lie in 1..=12288",
        ),
        (
            rms_norm(
                &Tensor::zeros([1, 12289], f),
                &Tensor::ones([12289], f),
                1e-6,
            ),
            "D must lie in 1..=12288",
        ),
        (
            rms_norm(&x, &Tensor::ones([7], f), 1e-6),
            "w: [8] on Cpu, got [7]",
        ),
        (rms_norm(&x, &w, -1.0), "eps: a finite value >= 0"),
        (rms_norm(&x, &w, f64::NAN), "eps: a finite value >= 0"),
        (rms_norm(&x, &w, 1e-6), "x: on Cpu: CUDA tensors only"),
        (
            add_rms_norm(&x, &x.narrow(2, 0, 4), &w, 1e-6).map(|r| r.1),
            "a: [2, 3, 8] on Cpu, got [2, 3, 4]",
        ),
        (
            add_rms_norm(&x, &x.to_kind(Kind::Half), &w, 1e-6).map(|r| r.1),
            "a: bf16 or fp32",
        ),
        (
            add_rms_norm(&x, &x, &w, 1e-6).map(|r| r.1),
            "x: on Cpu: CUDA tensors only",
        ),
        (swiglu(&Tensor::zeros([4, 7], f)), "ab: must be [..., 2H]"),
        (swiglu(&Tensor::zeros([4, 0], f)), "ab: must be [..., 2H]"),
        (swiglu(&Tensor::from(1.0f32)), "ab: must be [..., 2H]"),
        (swiglu(&x.to_kind(Kind::Int64)), "ab: bf16 or fp32"),
        (swiglu(&x), "ab: on Cpu: CUDA tensors only"),
    ];
    for (got, want) in cases {
        let msg = reason(got.expect_err(want));
        assert!(msg.contains(want), "{msg:?} lacks {want:?}");
    }
    let raw = Tensor::zeros([2, 40, 3, 8], f);
    let pos = Tensor::zeros([32, 3, 8], f);
    let cases = [
        (
            cmp_blocks(&raw.view([80, 3, 8]), Some(&pos), 32, 16),
            "x: must be [B, S, G, D]",
        ),
        (
            cmp_blocks(&raw.to_kind(Kind::Half), None, 32, 16),
            "x: bf16 or fp32",
        ),
        (
            cmp_blocks(&raw.transpose(2, 3), None, 32, 16),
            "the last axis must be contiguous",
        ),
        (
            cmp_blocks(&raw, None, 41, 16),
            "need 1 <= L <= S = 40 and stride >= 1, got L = 41",
        ),
        (cmp_blocks(&raw, None, 32, 0), "stride >= 1"),
        (cmp_blocks(&raw, None, 0, 16), "need 1 <= L"),
        (
            cmp_blocks(&raw, Some(&pos.narrow(0, 0, 16)), 32, 16),
            "pos: Float [32, 3, 8] on Cpu, got Float [16, 3, 8]",
        ),
        (
            cmp_blocks(&raw, Some(&pos.to_kind(Kind::BFloat16)), 32, 16),
            "pos: Float [32, 3, 8] on Cpu, got BFloat16",
        ),
        (
            cmp_blocks(&raw, Some(&pos), 32, 16),
            "x: on Cpu: CUDA tensors only",
        ),
        (
            cmp_blocks_linear(&raw, None, 41, 16, &Tensor::zeros([5, 256], f), None),
            "need 1 <= L <= S = 40",
        ),
        (
            cmp_blocks_linear(&raw, None, 32, 16, &Tensor::zeros([5, 255], f), None),
            "w1: contiguous Float [5, 256] on Cpu, got Float [5, 255]",
        ),
        (
            cmp_blocks_linear(&raw, None, 32, 16, &Tensor::zeros([256, 5], f).tr(), None),
            "w1: contiguous Float [5, 256]",
        ),
        (
            cmp_blocks_linear(
                &raw,
                None,
                32,
                16,
                &Tensor::zeros([5, 256], f),
                Some(&Tensor::zeros([4], f)),
            ),
            "b1: Float [5] on Cpu, got Float [4]",
        ),
        (
            cmp_blocks_linear(&raw, Some(&pos), 32, 16, &Tensor::zeros([5, 256], f), None),
            "x: on Cpu: CUDA tensors only",
        ),
    ];
    for (got, want) in cases {
        let msg = reason(got.expect_err(want));
        assert!(msg.contains(want), "{msg:?} lacks {want:?}");
    }
}
