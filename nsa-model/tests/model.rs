//! End-to-end tests of the decoder on CPU: parameter counts, shapes, causality, gradients,
//! weight-decay groups, bf16, config serde, and NSA-vs-dense agreement.
use std::collections::BTreeSet;
use std::time::Instant;

use nsa_attn::{AttnPath, Branch, ForwardOpts, GateOverride, LeanOpts};
use nsa_model::{decay_groups, AttentionKind, Model, ModelConfig, ModelError, PRESETS};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

const KINDS: [AttentionKind; 2] = [AttentionKind::Nsa, AttentionKind::Dense];

fn tiny(kind: AttentionKind) -> ModelConfig {
    ModelConfig::preset("tiny").unwrap().with_attention(kind)
}

fn build(cfg: &ModelConfig) -> (VarStore, Model) {
    let vs = VarStore::new(Device::Cpu);
    let model = Model::new(&vs.root(), cfg).unwrap();
    (vs, model)
}

fn tokens(cfg: &ModelConfig, b: i64, s: i64) -> Tensor {
    Tensor::randint(cfg.vocab_size, [b, s], (Kind::Int64, Device::Cpu))
}

fn built_count(vs: &VarStore) -> i64 {
    vs.variables().values().map(|t| t.numel() as i64).sum()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn num_params_matches_the_built_model_for_every_preset() {
    for name in PRESETS {
        for kind in KINDS {
            let cfg = ModelConfig::preset(name).unwrap().with_attention(kind);
            let start = Instant::now();
            let (vs, _model) = build(&cfg);
            assert_eq!(built_count(&vs), cfg.num_params(), "{name} {kind}");
            eprintln!(
                "{name} {kind}: {} params, built in {:?}",
                cfg.num_params(),
                start.elapsed()
            );
        }
    }
}

#[test]
fn num_params_matches_for_every_nsa_variant() {
    use nsa_model::Phi;
    for phi in [Phi::Mean, Phi::Linear, Phi::Mlp, Phi::MeanMlp] {
        for shared_kv in [false, true] {
            let mut cfg = tiny(AttentionKind::Nsa);
            cfg.nsa.phi = phi;
            cfg.nsa.shared_kv = shared_kv;
            cfg.head_dim_v = 8; // dk != dv
            let (vs, _model) = build(&cfg);
            assert_eq!(
                built_count(&vs),
                cfg.num_params(),
                "{phi} shared_kv={shared_kv}"
            );
        }
    }
}

#[test]
fn variables_have_the_documented_names() {
    for kind in KINDS {
        let (vs, _model) = build(&tiny(kind));
        let names: BTreeSet<String> = vs.variables().into_keys().collect();
        let mut want = vec!["embed.weight".to_string(), "final_norm.weight".to_string()];
        for i in 0..2 {
            for n in [
                "attn_norm.weight",
                "mlp_norm.weight",
                "mlp.w_gate.weight",
                "mlp.w_up.weight",
                "mlp.w_down.weight",
                "attn.wq.weight",
                "attn.wo.weight",
            ] {
                want.push(format!("blocks.{i}.{n}"));
            }
            let kv: &[&str] = match kind {
                AttentionKind::Dense => &["attn.wk.weight", "attn.wv.weight"],
                AttentionKind::Nsa => &[
                    "attn.cmp.wk.weight",
                    "attn.slc.wv.weight",
                    "attn.win.wk.weight",
                    "attn.gate.w1.weight",
                ],
            };
            want.extend(kv.iter().map(|n| format!("blocks.{i}.{n}")));
        }
        for w in &want {
            assert!(names.contains(w), "{kind}: {w} missing from {names:?}");
        }
        if kind == AttentionKind::Dense {
            assert_eq!(names.len(), want.len(), "{names:?}");
        }
        assert!(
            names.iter().all(|n| !n.contains("__")),
            "duplicate names: {names:?}"
        );
    }
}

#[test]
fn logits_have_shape_b_s_vocab() {
    for kind in KINDS {
        let cfg = tiny(kind);
        let (_vs, model) = build(&cfg);
        let logits = model
            .forward(&tokens(&cfg, 2, 96), &ForwardOpts::default())
            .unwrap();
        assert_eq!(logits.size(), [2, 96, 256]);
        assert_eq!(logits.kind(), Kind::Float);
        assert!(bool::try_from(logits.isfinite().all()).unwrap());
        // An input shorter than the first NSA compression block works too.
        let short = model
            .forward(&tokens(&cfg, 1, 3), &ForwardOpts::default())
            .unwrap();
        assert_eq!(short.size(), [1, 3, 256]);
    }
}

#[test]
fn changing_future_tokens_leaves_earlier_logits_unchanged() {
    let s = 96;
    for kind in KINDS {
        let cfg = tiny(kind);
        let (_vs, model) = build(&cfg);
        let opts = ForwardOpts::default();
        let a = tokens(&cfg, 2, s);
        let base = model.forward(&a, &opts).unwrap();
        for t in [0, 40, 80, s - 2] {
            // Every token after t changes: a' = (a + 1 + r) mod V with r in 0..V−1.
            let b = a.copy();
            let n = s - t - 1;
            let r = Tensor::randint(cfg.vocab_size - 1, [2, n], (Kind::Int64, Device::Cpu));
            let mut tail = b.narrow(1, t + 1, n);
            let changed = (a.narrow(1, t + 1, n) + 1 + r).remainder(cfg.vocab_size);
            tail.copy_(&changed);
            let other = model.forward(&b, &opts).unwrap();
            let past = max_diff(&base.narrow(1, 0, t + 1), &other.narrow(1, 0, t + 1));
            assert!(past < 1e-5, "{kind} t={t}: logits ≤ t moved by {past}");
            let future = max_diff(&base.narrow(1, t + 1, 1), &other.narrow(1, t + 1, 1));
            assert!(future > 1e-4, "{kind} t={t}: logits at t+1 did not change");
        }
    }
}

#[test]
fn gradients_reach_every_parameter() {
    for kind in KINDS {
        let cfg = tiny(kind);
        let (vs, model) = build(&cfg);
        let x = tokens(&cfg, 2, 96);
        let logits = model.forward(&x, &ForwardOpts::default()).unwrap();
        let loss = logits
            .view([-1, cfg.vocab_size])
            .cross_entropy_for_logits(&tokens(&cfg, 2, 96).view([-1]));
        loss.backward();
        let vars = vs.variables();
        assert_eq!(vars.len(), vs.trainable_variables().len());
        for (name, t) in &vars {
            let g = t.grad();
            assert!(g.defined(), "{kind}: {name} has no gradient");
            let size = g.abs().sum(Kind::Double).double_value(&[]);
            assert!(size > 0.0, "{kind}: {name} has an all-zero gradient");
        }
    }
}

#[test]
fn decay_groups_partition_the_trainable_variables() {
    for kind in KINDS {
        let (vs, _model) = build(&tiny(kind));
        let (decay, no_decay) = decay_groups(&vs);
        let d: BTreeSet<&str> = decay.iter().map(|(n, _)| n.as_str()).collect();
        let nd: BTreeSet<&str> = no_decay.iter().map(|(n, _)| n.as_str()).collect();
        assert!(d.is_disjoint(&nd));
        assert_eq!(d.len() + nd.len(), vs.trainable_variables().len());
        let all: BTreeSet<String> = vs.variables().into_keys().collect();
        assert_eq!(
            d.iter()
                .chain(nd.iter())
                .map(|s| s.to_string())
                .collect::<BTreeSet<_>>(),
            all
        );
        assert!(nd.contains("embed.weight") && nd.contains("final_norm.weight"));
        for n in &nd {
            assert!(
                n.contains("norm")
                    || n.ends_with(".bias")
                    || *n == "embed.weight"
                    || n.contains("pos_"),
                "{kind}: {n} should decay"
            );
        }
        for (n, t) in &decay {
            assert_eq!(t.dim(), 2, "{n}");
            assert!(!n.contains("norm") && n.ends_with(".weight"), "{n}");
        }
        assert!(d.contains("blocks.1.mlp.w_down.weight") && d.contains("blocks.0.attn.wq.weight"));
        // Sorted by name, so optimizer state lines up across ranks and runs.
        let names: Vec<&String> = decay.iter().map(|(n, _)| n).collect();
        assert!(names.windows(2).all(|w| w[0] < w[1]));
        // The returned tensors are the variables themselves (same storage).
        let (name, t) = &decay[0];
        assert_eq!(t.data_ptr(), vs.variables()[name].data_ptr());
    }
}

#[test]
fn bf16_forward_runs_and_stays_close_to_fp32() {
    for kind in KINDS {
        let cfg = tiny(kind);
        let (mut vs, model) = build(&cfg);
        let x = tokens(&cfg, 1, 64);
        let opts = ForwardOpts::default();
        let full = model.forward(&x, &opts).unwrap();
        vs.bfloat16();
        let half = model.forward(&x, &opts).unwrap();
        assert_eq!(half.kind(), Kind::BFloat16);
        assert_eq!(half.size(), [1, 64, 256]);
        let err = max_diff(&half.to_kind(Kind::Float), &full);
        let scale = full.abs().max().double_value(&[]);
        assert!(
            err < 0.1 * scale + 0.02,
            "{kind}: bf16 off by {err} (scale {scale})"
        );
    }
}

#[test]
fn lean_path_matches_reference_path() {
    let cfg = tiny(AttentionKind::Nsa);
    let (_vs, model) = build(&cfg);
    let x = tokens(&cfg, 2, 96);
    let reference = model.forward(&x, &ForwardOpts::default()).unwrap();
    let lean = ForwardOpts {
        path: AttnPath::Lean(LeanOpts {
            query_chunk: 32,
            window_chunk: 24,
            select_chunk: 40,
        }),
        ..Default::default()
    };
    let got = model.forward(&x, &lean).unwrap();
    let err = max_diff(&reference, &got);
    assert!(err < 1e-4, "lean vs reference: {err}");
}

#[test]
fn nsa_with_full_selection_equals_the_dense_model() {
    // n·l' = 4·16 = 64 ≥ S: the selected branch sees every earlier token; with the gate forced
    // to it and the selected K/V equal to the dense ones, the models must agree.
    let s = 64;
    let nsa_cfg = tiny(AttentionKind::Nsa);
    let dense_cfg = tiny(AttentionKind::Dense);
    let (nsa_vs, nsa) = build(&nsa_cfg);
    let (dense_vs, dense) = build(&dense_cfg);
    let nsa_vars = nsa_vs.variables();
    tch::no_grad(|| {
        for (name, t) in dense_vs.variables() {
            let target = name
                .replace("attn.wk.", "attn.slc.wk.")
                .replace("attn.wv.", "attn.slc.wv.");
            let mut dst = nsa_vars[&target].shallow_clone();
            dst.copy_(&t);
        }
    });
    let x = tokens(&nsa_cfg, 2, s);
    let want = dense.forward(&x, &ForwardOpts::default()).unwrap();
    let opts = ForwardOpts {
        gates: GateOverride::Only(Branch::Selected),
        ..Default::default()
    };
    let got = nsa.forward(&x, &opts).unwrap();
    let err = max_diff(&want, &got);
    assert!(
        err < 1e-4,
        "NSA (selected only, full coverage) vs dense: {err}"
    );
    // And with the learned gates they differ (the test can tell models apart).
    let learned = nsa.forward(&x, &ForwardOpts::default()).unwrap();
    assert!(max_diff(&want, &learned) > 1e-3);
}

#[test]
fn dense_model_accepts_dk_ne_dv() {
    let mut cfg = tiny(AttentionKind::Dense);
    cfg.head_dim_v = 8;
    let (vs, model) = build(&cfg);
    assert_eq!(built_count(&vs), cfg.num_params());
    let logits = model
        .forward(&tokens(&cfg, 2, 20), &ForwardOpts::default())
        .unwrap();
    assert_eq!(logits.size(), [2, 20, 256]);
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let cfg = tiny(AttentionKind::Dense);
    let (_vs, model) = build(&cfg);
    let opts = ForwardOpts::default();
    let cases = [
        (Tensor::zeros([2, 4], (Kind::Float, Device::Cpu)), "int64"),
        (Tensor::zeros([8], (Kind::Int64, Device::Cpu)), "[B, S]"),
        (
            Tensor::zeros([2, 0], (Kind::Int64, Device::Cpu)),
            "non-empty",
        ),
        (Tensor::from_slice(&[0i64, 5, 256]).view([1, 3]), "0..256"),
        (Tensor::from_slice(&[-1i64, 5]).view([1, 2]), "from -1 to 5"),
    ];
    for (x, needle) in cases {
        let err = model.forward(&x, &opts).unwrap_err();
        assert!(matches!(err, ModelError::Tokens(_)), "{err}");
        assert!(err.to_string().contains(needle), "{err}");
    }
    let mut bad = cfg;
    bad.n_kv_heads = 3;
    let vs = VarStore::new(Device::Cpu);
    let err = Model::new(&vs.root(), &bad).unwrap_err();
    assert!(err.to_string().contains("n_kv_heads"), "{err}");
    assert!(
        vs.variables().is_empty(),
        "nothing is created for an invalid config"
    );
}

#[test]
fn config_serde_round_trips_and_rejects_unknown_keys() {
    for name in PRESETS {
        for kind in KINDS {
            let cfg = ModelConfig::preset(name).unwrap().with_attention(kind);
            let json = serde_json::to_string_pretty(&cfg).unwrap();
            let back: ModelConfig = serde_json::from_str(&json).unwrap();
            assert_eq!(back, cfg);
        }
    }
    let cfg = ModelConfig::preset("tiny").unwrap();
    let mut v = serde_json::to_value(cfg).unwrap();
    assert_eq!(v["attention"], "nsa");
    assert_eq!(v["nsa"]["phi"], "mlp");

    let mut extra = v.clone();
    extra["n_expertz"] = 4.into();
    let err = serde_json::from_value::<ModelConfig>(extra)
        .unwrap_err()
        .to_string();
    assert!(err.contains("n_expertz"), "{err}");

    let mut extra_nsa = v.clone();
    extra_nsa["nsa"]["blok_len"] = 4.into();
    let err = serde_json::from_value::<ModelConfig>(extra_nsa)
        .unwrap_err()
        .to_string();
    assert!(err.contains("blok_len"), "{err}");

    let mut bad_kind = v.clone();
    bad_kind["attention"] = "sparse".into();
    let err = serde_json::from_value::<ModelConfig>(bad_kind)
        .unwrap_err()
        .to_string();
    assert!(err.contains("sparse"), "{err}");

    let mut missing = v.clone();
    missing.as_object_mut().unwrap().remove("dim");
    let err = serde_json::from_value::<ModelConfig>(missing)
        .unwrap_err()
        .to_string();
    assert!(err.contains("dim"), "{err}");

    // Without an `nsa` section the paper's lengths apply.
    v.as_object_mut().unwrap().remove("nsa");
    v["attention"] = "dense".into();
    let back: ModelConfig = serde_json::from_value(v).unwrap();
    assert_eq!(back.nsa, nsa_model::NsaParams::paper());
    assert_eq!(back.attention, AttentionKind::Dense);
}
