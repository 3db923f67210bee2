//! Prefill + decode of whole models against their full-sequence forward (NSA and dense, random
//! configurations, batches of sequences at different positions), and bad input.
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use tch::{nn, Device, Kind, Tensor};

use super::*;
use crate::config::ModelConfig;
use crate::{CmpRope, NsaParams, Phi};
use nsa_attn::{AttnPath, LeanOpts, SelectConfig};

/// A small model: `(l, d, l')`, n, w, (H, Hkv), φ, `shared_kv`, attention kind.
#[derive(Debug, Clone)]
struct Case {
    lengths: (i64, i64, i64),
    top_n: i64,
    window: i64,
    heads: (i64, i64),
    phi: Phi,
    shared_kv: bool,
    attention: AttentionKind,
    seq_len: i64,
    prompts: Vec<i64>,
    lean: bool,
    seed: i64,
}

impl Case {
    fn config(&self) -> ModelConfig {
        let (l, d, l_sel) = self.lengths;
        ModelConfig {
            vocab_size: 40,
            dim: 16,
            n_layers: 2,
            n_heads: self.heads.0,
            n_kv_heads: self.heads.1,
            head_dim_k: 8,
            head_dim_v: 6,
            mlp_hidden: 24,
            attention: self.attention,
            nsa: NsaParams {
                select: SelectConfig {
                    block_len: l,
                    stride: d,
                    select_len: l_sel,
                    top_n: self.top_n,
                    n_local: 2,
                },
                window: self.window,
                phi: self.phi,
                phi_hidden: 7,
                cmp_rope: CmpRope::Raw,
                shared_kv: self.shared_kv,
                gate_hidden: 6,
            },
            // Weights large enough that attention is far from uniform.
            init_std: 0.3,
            ..ModelConfig::preset("tiny").unwrap()
        }
    }

    fn opts(&self) -> ForwardOpts {
        ForwardOpts {
            path: if self.lean {
                AttnPath::Lean(LeanOpts {
                    query_chunk: 4,
                    window_chunk: 5,
                    select_chunk: 3,
                })
            } else {
                AttnPath::Reference
            },
            ..Default::default()
        }
    }
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::sample::select(vec![(4i64, 2i64, 4i64), (4, 2, 8), (8, 4, 8), (2, 2, 4)]),
        (3i64..=4, prop::sample::select(vec![2i64, 5, 16])),
        prop::sample::select(vec![(2i64, 1i64), (4, 2), (2, 2), (6, 2)]),
        prop::sample::select(vec![Phi::Mean, Phi::Linear, Phi::Mlp, Phi::MeanMlp]),
        any::<bool>(),
        prop::sample::select(vec![
            AttentionKind::Nsa,
            AttentionKind::Nsa,
            AttentionKind::Dense,
        ]),
        1i64..=30,
        prop::collection::vec(0.0f64..1.0, 1..=3),
        (any::<bool>(), 0i64..1_000_000),
    )
        .prop_map(
            |(lengths, (top_n, window), heads, phi, shared_kv, attention, s, fr, (lean, seed))| {
                Case {
                    lengths,
                    top_n,
                    window,
                    heads,
                    phi,
                    shared_kv,
                    attention,
                    seq_len: s,
                    prompts: fr
                        .iter()
                        .map(|f| ((f * (s + 1) as f64) as i64).clamp(1, s))
                        .collect(),
                    lean,
                    seed,
                }
            },
        )
}

/// Logits `[B, S, V]` of every position by prefill of `prompts[b]` tokens then one token per
/// step (sequences already done are fed id 0), with each NSA block's blocks `[B, S, Hkv, n]`.
fn decode_all(
    model: &Model,
    tokens: &Tensor,
    prompts: &[i64],
    opts: &ForwardOpts,
) -> (Tensor, Vec<Tensor>) {
    let (b, s) = (tokens.size()[0], tokens.size()[1]);
    let longest = *prompts.iter().max().unwrap();
    let shortest = *prompts.iter().min().unwrap();
    let pre = model
        .prefill(&tokens.narrow(1, 0, longest), prompts, s + 1, opts)
        .unwrap();
    let v = model.config().vocab_size;
    let logits = Tensor::zeros([b, s, v], (pre.logits.kind(), Device::Cpu));
    let mut blocks: Vec<Tensor> = pre
        .blocks
        .iter()
        .map(|p| {
            let sz = p.size();
            Tensor::full([b, s, sz[2], sz[3]], -1, (Kind::Int64, Device::Cpu))
        })
        .collect();
    for (row, &len) in prompts.iter().enumerate() {
        let row = row as i64;
        logits
            .get(row)
            .narrow(0, 0, len)
            .copy_(&pre.logits.get(row).narrow(0, 0, len));
        for (all, part) in blocks.iter_mut().zip(&pre.blocks) {
            all.get(row)
                .narrow(0, 0, len)
                .copy_(&part.get(row).narrow(0, 0, len));
        }
    }
    let host = Vec::<i64>::try_from(tokens.flatten(0, -1)).unwrap();
    let mut cache = pre.cache;
    for k in 0..s - shortest {
        let positions: Vec<i64> = prompts.iter().map(|p| p + k).collect();
        let next: Vec<i64> = (0..b as usize)
            .map(|row| {
                let t = positions[row];
                if t < s {
                    host[row * s as usize + t as usize]
                } else {
                    0
                }
            })
            .collect();
        let step = model.decode_step(&mut cache, &next, opts).unwrap();
        assert_eq!(step.reads.len(), blocks.len());
        for (row, &t) in positions.iter().enumerate() {
            if t < s {
                let row = row as i64;
                logits.get(row).get(t).copy_(&step.logits.get(row));
                for (all, reads) in blocks.iter_mut().zip(&step.reads) {
                    all.get(row).get(t).copy_(&reads.blocks.get(row));
                }
            }
        }
    }
    assert_eq!(
        cache.lengths(),
        prompts.iter().map(|p| p + s - shortest).collect::<Vec<_>>()
    );
    (logits, blocks)
}

/// `max |a − b| / max(1, max |b|)`.
fn scaled_err(a: &Tensor, b: &Tensor) -> f64 {
    let cpu = |t: &Tensor| t.to_device(Device::Cpu).to_kind(Kind::Double);
    let (a, b) = (cpu(a), cpu(b));
    let scale = b.abs().max().double_value(&[]).max(1.0);
    (a - b).abs().max().double_value(&[]) / scale
}

/// float32: the logits of every position from prefill + decode equal the forward's given the
/// decode's selections (< 1e-5); float64, same weights: equal to the plain forward (< 1e-9),
/// its own selections included.
fn model_decode_matches_forward_on(c: &Case) -> Result<(), TestCaseError> {
    model_decode_matches_forward_on_device(c, Device::Cpu)
}

fn model_decode_matches_forward_on_device(c: &Case, device: Device) -> Result<(), TestCaseError> {
    tch::manual_seed(c.seed);
    let cfg = c.config();
    let mut vs = nn::VarStore::new(device);
    let model = Model::new(&vs.root(), &cfg).unwrap();
    let tokens = Tensor::randint(
        cfg.vocab_size,
        [c.prompts.len() as i64, c.seq_len],
        (Kind::Int64, device),
    );
    let opts = c.opts();
    let (logits, blocks) = decode_all(&model, &tokens, &c.prompts, &opts);
    let want = model.forward_with_blocks(&tokens, &blocks, &opts).unwrap();
    let err = scaled_err(&logits, &want);
    prop_assert!(err < 1e-5, "float32 {:?}: {err}", cfg.attention);
    vs.set_kind(Kind::Double);
    let (logits, _) = decode_all(&model, &tokens, &c.prompts, &opts);
    let want = model.forward(&tokens, &opts).unwrap();
    let err = scaled_err(&logits, &want);
    prop_assert!(err < 1e-9, "float64 {:?}: {err}", cfg.attention);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/decode.txt",
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn prefill_and_decode_equal_the_full_forward(c in case()) {
        model_decode_matches_forward_on(&c)?;
    }
}

/// Eager steps with fixed-layout plans (every sequence in the emission, the dense keys masked
/// up to the plan's bound, one plan refilled from step to step as a graph's is) against
/// ordinary plans: what a captured step computes, checked without a GPU.
fn fixed_plans_match_ordinary(c: &Case, steps: i64) -> Result<(), TestCaseError> {
    use super::graph_check::{decode_logits, Stepping};
    use nsa_attn::fused::rel_err;
    tch::manual_seed(c.seed);
    let cfg = c.config();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Model::new(&vs.root(), &cfg).unwrap();
    let longest = *c.prompts.iter().max().unwrap();
    let tokens = Tensor::randint(
        cfg.vocab_size,
        [c.prompts.len() as i64, longest + steps],
        (Kind::Int64, Device::Cpu),
    );
    let opts = c.opts();
    let run = |s| decode_logits(&model, &tokens, &c.prompts, steps, &opts, s).unwrap();
    let (ordinary, fixed) = (run(Stepping::Ordinary), run(Stepping::Fixed));
    let err = rel_err(&fixed.logits, &ordinary.logits).unwrap();
    prop_assert!(err < 1e-5, "{:?}: {err}", cfg.attention);
    // Graphs asked for on the CPU: eager steps, the reason said, the ordinary logits.
    let graph = run(Stepping::Graph);
    prop_assert!(graph
        .unavailable
        .as_deref()
        .is_some_and(|w| w.contains("CUDA device")));
    prop_assert_eq!(graph.replays, 0);
    prop_assert!(graph.logits.equal(&ordinary.logits));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 16,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/decode-fixed.txt",
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn fixed_layout_plans_decode_as_ordinary_plans(c in case(), steps in 1i64..=24) {
        fixed_plans_match_ordinary(&c, steps)?;
    }
}

#[test]
fn refilling_a_plan_checks_what_it_is_given() {
    let cfg = Case {
        lengths: (4, 2, 8),
        top_n: 3,
        window: 5,
        heads: (4, 2),
        phi: Phi::Mlp,
        shared_kv: false,
        attention: AttentionKind::Nsa,
        seq_len: 10,
        prompts: vec![3],
        lean: false,
        seed: 1,
    }
    .config()
    .nsa_config();
    let (kind, cpu) = (Kind::Float, Device::Cpu);
    let fixed =
        |lengths: &[i64], bound| DecodePlan::fixed(&cfg, lengths, kind, cpu, Some(&[1, 2]), bound);
    let err = fixed(&[3, 9], 8).unwrap_err().to_string();
    assert!(err.contains("below the largest position 9"), "{err}");
    let mut plan = fixed(&[3, 9], 12).unwrap();
    assert!(plan.is_fixed());
    plan.refill(&[4, 10], Some(&[5, 6])).unwrap();
    assert_eq!(plan.positions(), &[4, 10]);
    for (lengths, tokens, want) in [
        (vec![4, 13], Some(vec![1, 2]), "past the plan's bound 12"),
        (
            vec![4],
            Some(vec![1]),
            "made for 2 sequences with token ids",
        ),
        (vec![4, 5], None, "refilled with 2 without"),
        (vec![4, -1], Some(vec![1, 2]), "non-negative length"),
    ] {
        let err = plan
            .refill(&lengths, tokens.as_deref())
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{lengths:?}: {err}");
    }
    let mut ordinary = DecodePlan::new(&cfg, &[3, 9], kind, cpu, None).unwrap();
    assert!(!ordinary.is_fixed());
    let err = ordinary.refill(&[4, 10], None).unwrap_err().to_string();
    assert!(err.contains("only a fixed-layout plan"), "{err}");
}

#[test]
fn both_attention_kinds_at_the_boundaries() {
    let base = Case {
        lengths: (4, 2, 8),
        top_n: 3,
        window: 5,
        heads: (4, 2),
        phi: Phi::Mlp,
        shared_kv: false,
        attention: AttentionKind::Nsa,
        seq_len: 29,
        prompts: vec![1, 3, 16],
        lean: true,
        seed: 11,
    };
    for c in [
        base.clone(),
        Case {
            shared_kv: true,
            phi: Phi::Linear,
            prompts: vec![29, 1],
            ..base.clone()
        },
        Case {
            attention: AttentionKind::Dense,
            ..base.clone()
        },
        Case {
            attention: AttentionKind::Dense,
            prompts: vec![7],
            ..base
        },
    ] {
        model_decode_matches_forward_on(&c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
    }
}

#[test]
fn bad_tokens_are_named_and_leave_the_cache_usable() {
    for attention in [AttentionKind::Nsa, AttentionKind::Dense] {
        let cfg = ModelConfig::preset("tiny")
            .unwrap()
            .with_attention(attention);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Model::new(&vs.root(), &cfg).unwrap();
        let tokens = Tensor::randint(cfg.vocab_size, [2, 5], (Kind::Int64, Device::Cpu));
        let opts = ForwardOpts::default();
        let e = model.prefill(&tokens, &[5, 6], 8, &opts).unwrap_err();
        assert!(e.to_string().contains("prompt lengths"), "{e}");
        let mut cache = model.prefill(&tokens, &[5, 2], 8, &opts).unwrap().cache;
        let e = model.decode_step(&mut cache, &[1, 256], &opts).unwrap_err();
        assert!(
            e.to_string().contains("0..256") && e.to_string().contains("256"),
            "{e}"
        );
        let e = model.decode_step(&mut cache, &[1], &opts).unwrap_err();
        assert!(e.to_string().contains("1 next tokens for 2"), "{e}");
        assert_eq!(cache.lengths(), [5, 2]);
        let step = model.decode_step(&mut cache, &[1, 2], &opts).unwrap();
        assert_eq!(step.logits.size(), [2, cfg.vocab_size]);
        assert_eq!(cache.lengths(), [6, 3]);
        assert!(cache.bytes() > 0);
        assert_eq!(
            model.decodes_faster_from_graphs(),
            attention == AttentionKind::Nsa
        );
        assert_eq!(
            cache.nsa_layers().count(),
            if attention == AttentionKind::Nsa {
                2
            } else {
                0
            }
        );
    }
}

/// The same comparisons on CUDA (`cargo test -p nsa-model -- --ignored` on a GPU machine), and a
/// bf16 model decoding as `nsa-train generate` runs it there.
#[test]
#[ignore = "needs a CUDA device"]
fn prefill_and_decode_equal_the_full_forward_on_cuda() {
    let backend = nsa_sys::cuda::load_backend().expect("libtorch's CUDA backend");
    assert!(backend.has_gpu(), "no GPU visible: {backend}");
    let base = Case {
        lengths: (8, 4, 16),
        top_n: 3,
        window: 12,
        heads: (4, 2),
        phi: Phi::Mlp,
        shared_kv: false,
        attention: AttentionKind::Nsa,
        seq_len: 70,
        prompts: vec![1, 7, 40],
        lean: true,
        seed: 3,
    };
    let cases = [
        base.clone(),
        Case {
            shared_kv: true,
            phi: Phi::Linear,
            ..base.clone()
        },
        Case {
            attention: AttentionKind::Dense,
            ..base.clone()
        },
    ];
    for c in &cases {
        model_decode_matches_forward_on_device(c, Device::Cuda(0))
            .unwrap_or_else(|e| panic!("{c:?}: {e}"));
        let mut vs = nn::VarStore::new(Device::Cuda(0));
        let model = Model::new(&vs.root(), &c.config()).unwrap();
        vs.bfloat16();
        let tokens = Tensor::randint(40, [3, 70], (Kind::Int64, Device::Cuda(0)));
        let (logits, _) = decode_all(&model, &tokens, &c.prompts, &c.opts());
        assert!(bool::try_from(logits.isfinite().all()).unwrap(), "{c:?}");
    }
}

/// The GPU check's graph rows (`cargo test -p nsa-model -- --ignored` on a GPU machine):
/// replayed steps equal eager ones for NSA and dense models, bf16 and float32.
#[test]
#[ignore = "needs a CUDA device"]
fn graph_decoding_equals_eager_decoding_on_cuda() {
    let rows = super::decode_graph_check().expect("a CUDA device");
    for row in &rows {
        assert!(
            row.passed,
            "{}: {} ({})",
            row.name, row.max_rel_err, row.detail
        );
    }
    assert_eq!(rows.len(), 6);
}
