//! Prefill + decode against the full-sequence forward on random configurations (proptest over
//! the lengths, the window, groups, φ, where the compressed keys get RoPE, `shared_kv`, prompt
//! lengths and batch mixes), the
//! per-step read counter against its formula, cache growth, bad input, and the prologue kernel's
//! plan (which stacked columns go to which cache, rotated or not) against the operator step.
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use tch::{nn, Device, Kind, Tensor};

use super::*;
use crate::config::{CmpRope, NsaParams, Phi};
use crate::layer::{AttnPath, LeanOpts};
use nsa_select::SelectConfig;

/// One random case: a layer configuration, prompt lengths of a batch and a sequence length.
#[derive(Debug, Clone)]
struct Case {
    /// (l, d, l').
    lengths: (i64, i64, i64),
    top_n: i64,
    n_local: i64,
    window: i64,
    kv_heads: i64,
    heads_per_group: i64,
    phi: Phi,
    cmp_rope: CmpRope,
    shared_kv: bool,
    seq_len: i64,
    prompts: Vec<i64>,
    lean: bool,
    seed: i64,
}

impl Case {
    /// l = 4, d = 2, l' = 4, n = 3, one local block, w = 3, mean φ, one sequence of 9 tokens.
    fn small() -> Self {
        Case {
            lengths: (4, 2, 4),
            top_n: 3,
            n_local: 1,
            window: 3,
            kv_heads: 1,
            heads_per_group: 2,
            phi: Phi::Mean,
            cmp_rope: CmpRope::Raw,
            shared_kv: false,
            seq_len: 9,
            prompts: vec![2],
            lean: false,
            seed: 0,
        }
    }

    fn config(&self) -> NsaConfig {
        let (l, d, l_sel) = self.lengths;
        NsaConfig {
            dim: 12,
            heads: self.kv_heads * self.heads_per_group,
            kv_heads: self.kv_heads,
            head_dim_k: 6,
            head_dim_v: 4,
            rope_base: 10_000.0,
            nsa: NsaParams {
                select: SelectConfig {
                    block_len: l,
                    stride: d,
                    select_len: l_sel,
                    top_n: self.top_n,
                    n_local: self.n_local,
                },
                window: self.window,
                phi: self.phi,
                phi_hidden: 5,
                cmp_rope: self.cmp_rope,
                shared_kv: self.shared_kv,
                gate_hidden: 5,
            },
        }
    }

    fn opts(&self) -> ForwardOpts {
        ForwardOpts {
            path: if self.lean {
                AttnPath::Lean(LeanOpts {
                    query_chunk: 5,
                    window_chunk: 7,
                    select_chunk: 6,
                })
            } else {
                AttnPath::Reference
            },
            ..Default::default()
        }
    }
}

fn case() -> impl Strategy<Value = Case> {
    // (l, d, l') with d | l and d | l', including l' < l, l' = l and d = l.
    let lengths = prop::sample::select(vec![
        (2, 1, 2),
        (4, 2, 4),
        (4, 2, 8),
        (4, 4, 4),
        (6, 2, 4),
        (8, 4, 16),
        (8, 2, 4),
    ]);
    (
        lengths,
        (3i64..=5, 1i64..=2),
        prop::sample::select(vec![1i64, 3, 8, 20]),
        (1i64..=2, 1i64..=3),
        (
            prop::sample::select(vec![Phi::Mean, Phi::Linear, Phi::Mlp, Phi::MeanMlp]),
            prop::sample::select(vec![CmpRope::Raw, CmpRope::Compressed]),
        ),
        any::<bool>(),
        1i64..=40,
        prop::collection::vec(0.0f64..1.0, 1..=3),
        any::<bool>(),
        0i64..1_000_000,
    )
        .prop_map(
            |(
                lengths,
                (top_n, n_local),
                window,
                (kv_heads, hpg),
                (phi, cmp_rope),
                shared_kv,
                s,
                fr,
                lean,
                seed,
            )| {
                // Prompt lengths 1 ..= S, with 1 and S themselves likely.
                let prompts = fr
                    .iter()
                    .map(|f| ((f * (s + 1) as f64) as i64).clamp(1, s))
                    .collect();
                Case {
                    lengths,
                    top_n,
                    n_local,
                    window,
                    kv_heads,
                    heads_per_group: hpg,
                    phi,
                    cmp_rope,
                    shared_kv,
                    seq_len: s,
                    prompts,
                    lean,
                    seed,
                }
            },
        )
}

fn new_layer(cfg: NsaConfig) -> (nn::VarStore, NsaAttention) {
    let vs = nn::VarStore::new(Device::Cpu);
    let layer = NsaAttention::new(&(vs.root() / "attn"), cfg).expect("a valid config");
    (vs, layer)
}

/// float32 against the forward given the decode's blocks (< 1e-5), then the same weights and
/// input in float64 against the forward's own selection (< 1e-10, identical blocks). Errors are
/// `max |decode − forward| / max(1, max |forward|)`: absolute for outputs of order one.
fn decode_matches_forward_on(c: &Case) -> Result<(), TestCaseError> {
    tch::manual_seed(c.seed);
    let cfg = c.config();
    let (mut vs, layer) = new_layer(cfg);
    let x = Tensor::randn(
        [c.prompts.len() as i64, c.seq_len, cfg.dim],
        (Kind::Float, Device::Cpu),
    );
    let p = decode_parity(&layer, &x, &c.prompts, &c.opts(), ParitySelection::Decoded)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert!(p.scaled_err() < 1e-5, "float32: {p:?}");
    vs.set_kind(Kind::Double);
    let p = decode_parity(
        &layer,
        &x.to_kind(Kind::Double),
        &c.prompts,
        &c.opts(),
        ParitySelection::Own,
    )
    .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert!(p.same_blocks, "float64 selection differs: {p:?}");
    prop_assert!(p.scaled_err() < 1e-10, "float64: {p:?}");
    Ok(())
}

/// Each step's counter against the formula, for every sequence and group.
fn reads_match_formula_on(c: &Case) -> Result<(), TestCaseError> {
    tch::manual_seed(c.seed);
    let cfg = c.config();
    let (_vs, layer) = new_layer(cfg);
    let x = Tensor::randn(
        [c.prompts.len() as i64, c.seq_len, cfg.dim],
        (Kind::Float, Device::Cpu),
    );
    let decoded = decode_sequence(&layer, &x, &c.prompts, &c.opts())
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let (g, n) = (cfg.kv_heads as usize, cfg.nsa.select.top_n as usize);
    for (positions, reads) in &decoded.steps {
        let blocks = Vec::<i64>::try_from(reads.blocks.flatten(0, -1)).unwrap();
        let selected = Vec::<i64>::try_from(reads.selected().unwrap().flatten(0, -1)).unwrap();
        let total = Vec::<i64>::try_from(reads.total().unwrap().flatten(0, -1)).unwrap();
        for (b, &t) in positions.iter().enumerate() {
            for grp in 0..g {
                let ids = &blocks[(b * g + grp) * n..][..n];
                let (want_c, want_s, want_w) = expected_reads(&cfg, t, ids);
                prop_assert_eq!(reads.compressed[b], want_c, "t={} b={}", t, b);
                prop_assert_eq!(selected[b * g + grp], want_s, "t={} b={} g={}", t, b, grp);
                prop_assert_eq!(reads.window[b], want_w, "t={} b={}", t, b);
                prop_assert_eq!(total[b * g + grp], want_c + want_s + want_w);
                // The forced blocks are read: block 0 and the current one.
                let current = t / cfg.nsa.select.select_len;
                prop_assert!(ids.contains(&0) && ids.contains(&current), "{:?}", ids);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/decode.txt",
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn prefill_and_decode_equal_the_full_forward(c in case()) {
        decode_matches_forward_on(&c)?;
    }

    #[test]
    fn read_counter_matches_the_formula(c in case()) {
        reads_match_formula_on(&c)?;
    }
}

/// The boundary cases by name: prompts of one token, S < l, every position across block and
/// stride boundaries, a batch whose sequences are at different positions, growth of the
/// buffers past their capacity.
#[test]
fn named_boundary_cases() {
    let base = Case {
        lengths: (8, 4, 16),
        top_n: 3,
        n_local: 2,
        window: 5,
        kv_heads: 2,
        heads_per_group: 2,
        phi: Phi::Mlp,
        cmp_rope: CmpRope::Raw,
        shared_kv: false,
        seq_len: 53,
        prompts: vec![1],
        lean: false,
        seed: 7,
    };
    let cases = [
        Case {
            prompts: vec![1, 1],
            ..base.clone()
        },
        Case {
            seq_len: 7,
            prompts: vec![1, 3, 7],
            ..base.clone()
        },
        Case {
            prompts: vec![1, 8, 9, 16],
            ..base.clone()
        },
        Case {
            prompts: vec![53, 17],
            shared_kv: true,
            phi: Phi::Linear,
            ..base.clone()
        },
        Case {
            prompts: vec![2, 30],
            lean: true,
            ..base.clone()
        },
        // Compressed keys rotated after φ: per-branch K/V, and shared K/V (the pending ring
        // holds the unrotated keys), across several emissions.
        Case {
            prompts: vec![1, 9, 20],
            cmp_rope: CmpRope::Compressed,
            ..base.clone()
        },
        Case {
            prompts: vec![3, 12],
            cmp_rope: CmpRope::Compressed,
            shared_kv: true,
            ..base
        },
    ];
    for c in &cases {
        decode_matches_forward_on(c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
        reads_match_formula_on(c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
    }
}

#[test]
fn buffers_grow_and_keep_their_contents() {
    tch::manual_seed(3);
    let cfg = Case {
        phi: Phi::Linear,
        ..Case::small()
    }
    .config();
    let (_vs, layer) = new_layer(cfg);
    let x = Tensor::randn([1, 30, cfg.dim], (Kind::Float, Device::Cpu));
    let opts = ForwardOpts::default();
    // Capacity 2 (the prompt): every few steps the buffers double.
    let (_, mut cache) = layer.prefill(&x.narrow(1, 0, 2), &[2], 2, &opts).unwrap();
    assert_eq!(cache.capacity(), 2);
    let want = layer
        .forward_branches(&x, &opts)
        .unwrap()
        .output
        .narrow(1, 2, 28);
    let mut got = Vec::new();
    for t in 2..30 {
        got.push(
            layer
                .decode_step(&x.narrow(1, t, 1), &mut cache, &opts)
                .unwrap()
                .output,
        );
    }
    assert!(
        cache.capacity() >= 30 && cache.capacity() < 64,
        "{}",
        cache.capacity()
    );
    assert_eq!(cache.lengths(), [30]);
    let err = (Tensor::cat(&got, 1) - want).abs().max().double_value(&[]);
    assert!(err < 1e-5, "{err}");
}

#[test]
fn bad_input_is_an_error_and_leaves_the_cache_usable() {
    let cfg = Case {
        kv_heads: 2,
        heads_per_group: 1,
        ..Case::small()
    }
    .config();
    let (_vs, layer) = new_layer(cfg);
    let opts = ForwardOpts::default();
    let x = Tensor::randn([2, 5, cfg.dim], (Kind::Float, Device::Cpu));
    for lengths in [&[3][..], &[0, 5], &[3, 6], &[]] {
        let e = layer.prefill(&x, lengths, 8, &opts).unwrap_err();
        assert!(e.to_string().contains("lengths"), "{lengths:?}: {e}");
    }
    let (_, mut cache) = layer.prefill(&x, &[3, 5], 8, &opts).unwrap();
    let one = Tensor::randn([2, 1, cfg.dim], (Kind::Float, Device::Cpu));
    for bad in [
        Tensor::randn([3, 1, cfg.dim], (Kind::Float, Device::Cpu)),
        Tensor::randn([2, 2, cfg.dim], (Kind::Float, Device::Cpu)),
        one.to_kind(Kind::Double),
    ] {
        assert!(
            layer.decode_step(&bad, &mut cache, &opts).is_err(),
            "{:?}",
            bad.size()
        );
    }
    let stale = DecodePlan::new(&cfg, &[2, 5], Kind::Float, Device::Cpu, None).unwrap();
    let e = layer
        .decode_step_planned(&one, &mut cache, &stale, &opts)
        .unwrap_err();
    assert!(e.to_string().contains("positions"), "{e}");
    // Nothing was written: the cache still decodes.
    assert_eq!(cache.lengths(), [3, 5]);
    layer.decode_step(&one, &mut cache, &opts).unwrap();
    assert_eq!(cache.lengths(), [4, 6]);
    // A cache of another layer configuration is refused.
    let other = NsaConfig {
        head_dim_v: 6,
        ..cfg
    };
    let (_vs2, layer2) = new_layer(other);
    assert!(layer2.decode_step(&one, &mut cache, &opts).is_err());
}

#[test]
fn random_caches_have_the_requested_shape() {
    let cfg = NsaConfig::paper(64);
    let cache = NsaCache::filled_random(&cfg, &[100, 37], 128, Kind::Float, Device::Cpu).unwrap();
    assert_eq!(cache.capacity(), 128);
    assert_eq!(cache.selected_kv().0.size(), [2, 4, 128, 192]);
    // raw 128 + window 512 + pending 32 + compressed 7 slots, keys 192 and values 128 wide.
    assert_eq!(
        cache.bytes(),
        2 * 4 * (128 + 512 + 32 + 7) * (192 + 128) * 4
    );
    assert!(NsaCache::filled_random(&cfg, &[0], 8, Kind::Float, Device::Cpu).is_err());
}

/// Rotate-half RoPE of rows `[B, R, dk]` by one table row per sequence (`[B, dk/2]`).
fn rotate_rows(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[2] / 2;
    let (x1, x2) = (x.narrow(2, 0, half), x.narrow(2, half, half));
    let (c, s) = (cos.unsqueeze(1), sin.unsqueeze(1));
    Tensor::cat(&[&x1 * &c - &x2 * &s, &x2 * &c + &x1 * &s], 2)
}

/// What the prologue kernel (`nsa_dec_append`, decode.cu) does with `writes` and `gates`,
/// replayed with libtorch's operators: the rotated queries `[B, H, dk]` and the gates
/// `[B, H, 3]`; the writes land in their caches.
fn prologue_reference(
    stacked: &Tensor,
    (heads, dk): (i64, i64),
    (cos, sin): (&Tensor, &Tensor),
    writes: &[nsa_sys::fused::AppendWrite<'_>],
    gates: &nsa_sys::fused::AppendGates<'_>,
) -> (Tensor, Tensor) {
    let b = stacked.size()[0];
    let q = rotate_rows(
        &stacked.narrow(1, 0, heads * dk).view([b, heads, dk]),
        cos,
        sin,
    );
    for w in writes {
        let [_, g, _, d] = w.dst.size()[..] else {
            unreachable!("caches are [B, Hkv, slots, d]")
        };
        let rows = stacked.narrow(1, w.col, g * d).view([b, g, d]);
        let rows = if w.rotate {
            rotate_rows(&rows, cos, sin)
        } else {
            rows
        };
        for i in 0..b {
            let slot = w.slots.int64_value(&[i]);
            w.dst.get(i).select(1, slot).copy_(&rows.get(i));
        }
    }
    let hidden = gates.w2.size()[1];
    let h = stacked.narrow(1, gates.col, hidden) + gates.b1.expect("the gates' W_1 has a bias");
    let g = h
        .silu()
        .linear(gates.w2, gates.b2)
        .sigmoid()
        .view([b, heads, 3]);
    (q, g)
}

/// The prologue kernel's plan (`NsaAttention::prologue_writes` and `prologue_gates`: which
/// columns of the stacked row go where, rotated or not) replayed with libtorch's operators in
/// float64 equals the operator step (`project_raw`, `append_with_operators`, the gate MLP):
/// queries, every cache buffer and the gates, for per-branch and shared K/V with the compressed
/// keys' RoPE at either place. The GPU check runs the kernel itself; this holds its plan in CI.
#[test]
fn the_prologue_plan_reads_and_writes_what_the_operator_step_does() {
    // The cache tensors each layout has: raw, window ring and pending ring (per-branch K/V);
    // raw, and the pending ring for φ's unrotated keys (shared K/V).
    for (shared_kv, cmp_rope, tensors) in [
        (false, CmpRope::Raw, 6),
        (false, CmpRope::Compressed, 6),
        (true, CmpRope::Raw, 2),
        (true, CmpRope::Compressed, 4),
    ] {
        let c = Case {
            kv_heads: 2,
            phi: Phi::Mlp,
            cmp_rope,
            shared_kv,
            prompts: vec![5, 9],
            ..Case::small()
        };
        let cfg = c.config();
        tch::manual_seed(11);
        let (mut vs, layer) = new_layer(cfg);
        vs.set_kind(Kind::Double);
        let opts = (Kind::Double, Device::Cpu);
        let x = Tensor::randn([2, c.seq_len, cfg.dim], opts);
        let step_x = Tensor::randn([2, 1, cfg.dim], opts);
        let prefill = || layer.prefill(&x, &c.prompts, 16, &c.opts()).unwrap().1;
        let (mut by_ops, by_plan) = (prefill(), prefill());
        let plan =
            DecodePlan::new(&cfg, by_ops.lengths(), Kind::Double, Device::Cpu, None).unwrap();

        let raw = layer.project_raw(&step_x, &plan.rope, None).unwrap();
        layer
            .append_with_operators(&raw, &mut by_ops, &plan.dev)
            .unwrap();
        let gates = layer.gates(&step_x, GateOverride::Learned).unwrap();

        let stacked = step_x.linear::<&Tensor>(&layer.stacked_weights(true).unwrap(), None);
        let (cos, sin) = plan.rope.tables();
        let half = cfg.head_dim_k / 2;
        let (q, g) = prologue_reference(
            &stacked.view([2, -1]),
            (cfg.heads, cfg.head_dim_k),
            (&cos.reshape([2, half]), &sin.reshape([2, half])),
            &layer.prologue_writes(&by_plan, &plan.dev),
            &layer.prologue_gates(),
        );

        let what = format!("shared_kv {shared_kv}, cmp_rope {cmp_rope:?}");
        let close = |a: &Tensor, b: &Tensor, name: &str| {
            let err = (a - b).abs().max().double_value(&[]);
            assert!(err < 1e-12, "{what}: {name} differs by {err}");
        };
        close(&q, &raw.q.view([2, cfg.heads, cfg.head_dim_k]), "q");
        close(&g, &gates.view([2, cfg.heads, 3]), "gates");
        let buffers = |cache: &NsaCache| -> Vec<Tensor> {
            [
                Some(&cache.raw),
                cache.window.as_ref(),
                cache.pending.as_ref(),
            ]
            .into_iter()
            .flatten()
            .flat_map(|buf| [buf.k.shallow_clone(), buf.v.shallow_clone()])
            .collect()
        };
        let (want, got) = (buffers(&by_ops), buffers(&by_plan));
        assert_eq!((want.len(), got.len()), (tensors, tensors), "{what}");
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            close(a, b, &format!("cache tensor {i}"));
        }
    }
}

/// A refilled fixed-layout plan's RoPE tables, gathered from tables of every position it can
/// describe, against a new plan's tables computed at the same positions: the same bits.
fn refilled_tables_match_new_ones(
    (first, later): (Vec<i64>, Vec<Vec<i64>>),
    slack: i64,
    (head_dim_k, rope_base): (i64, f64),
    kind: Kind,
) -> Result<(), TestCaseError> {
    let cfg = NsaConfig {
        head_dim_k,
        rope_base,
        ..Case::small().config()
    };
    let bound = first.iter().copied().max().unwrap_or(0) + slack;
    let mut plan = DecodePlan::fixed(&cfg, &first, kind, Device::Cpu, None, bound).unwrap();
    let low = first.iter().copied().min().unwrap_or(0);
    for offsets in later {
        // Each sequence moves to a position in low ..= bound.
        let lengths: Vec<i64> = offsets
            .iter()
            .map(|o| low + o % (bound - low + 1))
            .collect();
        plan.refill(&lengths, None).unwrap();
        let fresh = DecodePlan::new(&cfg, &lengths, kind, Device::Cpu, None).unwrap();
        let ((cos, sin), (want_cos, want_sin)) = (plan.rope().tables(), fresh.rope().tables());
        prop_assert_eq!(cos.size(), want_cos.size());
        prop_assert!(cos.equal(want_cos) && sin.equal(want_sin), "{lengths:?}");
    }
    if low > 0 {
        let below = vec![low - 1; first.len()];
        let err = plan.refill(&below, None).unwrap_err().to_string();
        prop_assert!(err.contains("before the plan's first position"), "{err}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/decode.txt",
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn refilled_rope_tables_equal_new_ones(
        steps in (1usize..=4).prop_flat_map(|b| (
            proptest::collection::vec(0i64..5000, b),
            proptest::collection::vec(proptest::collection::vec(0i64..10_000, b), 1..6),
        )),
        slack in 0i64..300,
        rope in (prop_oneof![Just(4i64), Just(6), Just(64), Just(192)],
                 prop_oneof![Just(10_000.0), Just(500_000.0)]),
        kind in prop_oneof![Just(Kind::Float), Just(Kind::BFloat16), Just(Kind::Double)],
    ) {
        refilled_tables_match_new_ones(steps, slack, rope, kind)?;
    }
}
