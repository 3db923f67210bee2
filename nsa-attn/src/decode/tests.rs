//! Prefill + decode against the full-sequence forward on random configurations (proptest over
//! the lengths, the window, groups, φ, where the compressed keys get RoPE, `shared_kv`, prompt
//! lengths and batch mixes), the
//! per-step read counter against its formula, cache growth and bad input.
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
