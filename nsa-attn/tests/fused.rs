//! The block-id rule on every path (CPU), the fused path's CPU fallback, and the GPU parity
//! checks of the fused kernels (ignored without a GPU: `cargo test -p nsa-attn --test fused --
//! --ignored`).
use nsa_attn::{
    fused, lean, AttnPath, CmpRope, ForwardOpts, GateOverride, LeanOpts, NsaAttention, NsaConfig,
    NsaParams, Phi,
};
use nsa_select::SelectConfig;
use proptest::prelude::*;
use tch::{nn, Device, Kind, Tensor};

fn backend() {
    // Before any libtorch call (see ARCHITECTURE.md, "Invariants").
    nsa_sys::cuda::load_backend().expect("loading libtorch's CUDA backend");
}

fn cfg_with(select_len: i64) -> NsaConfig {
    NsaConfig {
        dim: 12,
        heads: 2,
        kv_heads: 1,
        head_dim_k: 4,
        head_dim_v: 3,
        rope_base: 10_000.0,
        nsa: NsaParams {
            select: SelectConfig {
                block_len: 4,
                stride: 2,
                select_len,
                top_n: 3,
                n_local: 2,
            },
            window: 4,
            phi: Phi::Mean,
            phi_hidden: 0,
            cmp_rope: CmpRope::Raw,
            shared_kv: false,
            gate_hidden: 5,
        },
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    if a.numel() == 0 {
        return 0.0;
    }
    (a - b).abs().max().double_value(&[])
}

/// Lean block attention and the mask-based reference on the same inputs: outputs and the
/// gradients of q, k, v (float64, so any difference is a semantic one).
fn lean_vs_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    blocks: &Tensor,
    select_len: i64,
    chunk: i64,
) -> f64 {
    let cfg = cfg_with(select_len);
    let leaves = || {
        (
            q.detach().set_requires_grad(true),
            k.detach().set_requires_grad(true),
            v.detach().set_requires_grad(true),
        )
    };
    let w = Tensor::randn(
        [q.size()[0], q.size()[1], q.size()[2], v.size()[3]],
        (Kind::Double, Device::Cpu),
    );
    let (lq, lk, lv) = leaves();
    let lo = lean::selected(&lq, &lk, &lv, blocks, &cfg, chunk).unwrap();
    (&lo * &w).sum(Kind::Double).backward();
    let (rq, rk, rv) = leaves();
    let ro = fused::reference_selected(&rq, &rk, &rv, blocks, select_len).unwrap();
    (&ro * &w).sum(Kind::Double).backward();
    [
        max_abs_diff(&lo, &ro),
        max_abs_diff(&lq.grad(), &rq.grad()),
        max_abs_diff(&lk.grad(), &rk.grad()),
        max_abs_diff(&lv.grad(), &rv.grad()),
    ]
    .into_iter()
    .fold(0.0, f64::max)
}

fn inputs(b: i64, s: i64, hkv: i64, hpg: i64) -> (Tensor, Tensor, Tensor) {
    let o = (Kind::Double, Device::Cpu);
    (
        Tensor::randn([b, s, hkv * hpg, 4], o),
        Tensor::randn([b, s, hkv, 4], o),
        Tensor::randn([b, s, hkv, 3], o),
    )
}

/// The example: l' = 4, token 5 selects [1, 1, 0]. Block 1 must count once and block 0
/// must not be dropped (the lean path used to read only the first ⌊5/4⌋ + 1 = 2 slots).
#[test]
fn duplicate_ids_count_once_on_the_lean_path() {
    backend();
    tch::manual_seed(7);
    let (q, k, v) = inputs(1, 6, 1, 2);
    let mut ids = vec![0i64; 6 * 3];
    for t in 0..6 {
        let row: [i64; 3] = if t == 5 { [1, 1, 0] } else { [0, -1, -1] };
        ids[t * 3..t * 3 + 3].copy_from_slice(&row);
    }
    let blocks = Tensor::from_slice(&ids).view([1, 6, 1, 3]);
    for chunk in [1, 2, 6] {
        let d = lean_vs_reference(&q, &k, &v, &blocks, 4, chunk);
        assert!(
            d < 1e-12,
            "chunk {chunk}: lean differs from reference by {d}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Any ids (duplicates, -1, negative, past the current block or the sequence) on any
    /// chunking: the lean path equals the reference.
    #[test]
    fn lean_block_attention_matches_reference_on_any_ids(
        s in 1i64..14,
        select_len in 1i64..6,
        n in 1i64..5,
        hkv in 1i64..3,
        hpg in 1i64..3,
        b in 1i64..3,
        chunk in 1i64..7,
        seed in 0i64..1_000_000,
        raw in proptest::collection::vec(-3i64..8, 2 * 13 * 2 * 4),
    ) {
        backend();
        tch::manual_seed(seed);
        let (q, k, v) = inputs(b, s, hkv, hpg);
        let len = (b * s * hkv * n) as usize;
        let blocks = Tensor::from_slice(&raw[..len]).view([b, s, hkv, n]);
        let d = lean_vs_reference(&q, &k, &v, &blocks, select_len, chunk);
        prop_assert!(d < 1e-10, "lean differs from reference by {}", d);
    }
}

/// On the CPU the fused path is the lean path, bit for bit.
#[test]
fn fused_path_falls_back_to_lean_on_the_cpu() {
    backend();
    tch::manual_seed(11);
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg = cfg_with(4);
    let attn = NsaAttention::new(&(vs.root() / "attn"), cfg).unwrap();
    let x = Tensor::randn([2, 19, 12], (Kind::Float, Device::Cpu));
    let lo = LeanOpts {
        query_chunk: 5,
        window_chunk: 6,
        select_chunk: 7,
    };
    let run = |path| {
        let opts = ForwardOpts {
            path,
            gates: GateOverride::Learned,
            ..Default::default()
        };
        attn.forward(&x, &opts).unwrap()
    };
    let (a, b) = (run(AttnPath::Lean(lo)), run(AttnPath::Fused(lo)));
    assert!(a.equal(&b), "fused path on the CPU must be the lean path");
    let audit = attn
        .audit(AttnPath::Fused(lo), Device::Cpu, Kind::Float)
        .unwrap();
    assert_eq!(audit.path, "fused");
    assert_eq!(audit.selected, nsa_attn::BranchKernel::ChunkedBlockGather);
}

/// GPU parity of the fused kernels against the reference (all cases of `gpu_check`).
#[test]
#[ignore = "needs a CUDA device"]
fn fused_kernels_match_reference_on_cuda() {
    backend();
    let rows = fused::gpu_check().expect("a CUDA device");
    let mut failed = Vec::new();
    for r in &rows {
        println!(
            "{:<70} rel err {:.3e} (tol {:.0e}) {} {}",
            r.name,
            r.max_rel_err,
            r.tolerance,
            if r.passed { "ok" } else { "FAILED" },
            r.detail
        );
        if !r.passed {
            failed.push(r.name.clone());
        }
    }
    assert!(rows.len() >= 16);
    assert!(failed.is_empty(), "failed: {failed:?}");
}
