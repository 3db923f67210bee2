//! The GPU check's rows for decoding with CUDA graphs ([`KvCache::use_graphs`]): a model's
//! logits over hundreds of steps, replayed from captured graphs, against eager steps with the
//! same fixed-layout plans and against eager steps with ordinary plans; and the comparison's
//! core ([`decode_logits`]), which the CPU tests run for the plans alone.
use nsa_attn::fused::{rel_err, CheckRow};
use nsa_attn::{AttnError, AttnPath, ForwardOpts, SelectConfig};
use tch::{nn, Device, Kind, Tensor};

use super::{KvCache, Model};
use crate::config::{AttentionKind, ModelConfig, ModelError};
use crate::{CmpRope, NsaParams, Phi};

/// How [`decode_logits`] runs its steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stepping {
    /// [`Model::decode_step`] with ordinary plans.
    Ordinary,
    /// Eager steps with fixed-layout plans, made and refilled as a graph's are.
    Fixed,
    /// [`Model::decode_step`] with [`KvCache::use_graphs`].
    Graph,
}

/// What [`decode_logits`] returns.
pub(crate) struct Decoded {
    /// Logits of every step, float32 `[steps, B, V]` on the CPU.
    pub(crate) logits: Tensor,
    /// Steps that replayed a graph.
    pub(crate) replays: u64,
    /// Why graphs were not used, where they were asked for.
    pub(crate) unavailable: Option<String>,
}

/// Prefills `prompts[b]` tokens of row `b` of `tokens` (int64 `[B, S]` on the model's device;
/// `S ≥ max(prompts) + steps`) and decodes `steps` more, feeding row `b` its own next tokens.
pub(crate) fn decode_logits(
    model: &Model,
    tokens: &Tensor,
    prompts: &[i64],
    steps: i64,
    opts: &ForwardOpts,
    stepping: Stepping,
) -> Result<Decoded, ModelError> {
    let longest = prompts.iter().copied().max().unwrap_or(1);
    let host = Vec::<i64>::try_from(tokens.f_to_device(Device::Cpu)?.f_flatten(0, -1)?)?;
    let width = tokens.size()[1];
    let pre = model.prefill(
        &tokens.f_narrow(1, 0, longest)?,
        prompts,
        longest + steps,
        opts,
    )?;
    let mut cache: KvCache = pre.cache;
    cache.use_graphs(stepping == Stepping::Graph);
    let mut plan: Option<nsa_attn::DecodePlan> = None;
    let mut all = Vec::new();
    for _ in 0..steps {
        let next: Vec<i64> = cache
            .lengths()
            .iter()
            .enumerate()
            .map(|(b, &t)| host[b * width as usize + t as usize])
            .collect();
        let logits = match stepping {
            Stepping::Ordinary | Stepping::Graph => {
                model.decode_step(&mut cache, &next, opts)?.logits
            }
            Stepping::Fixed => {
                let last = cache.lengths().iter().copied().max().unwrap_or(0);
                match &mut plan {
                    Some(p) if last <= p.position_bound() => {
                        p.refill(cache.lengths(), Some(&next))?
                    }
                    _ => plan = Some(model.fixed_plan(&mut cache, &next)?),
                }
                let p = plan
                    .as_ref()
                    .ok_or_else(|| ModelError::Shape("no plan".into()))?;
                model.eager_step(&mut cache, p, opts)?.logits
            }
        };
        all.push(logits.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?);
    }
    Ok(Decoded {
        logits: Tensor::f_stack(&all, 0)?,
        replays: cache.graph_replays(),
        unavailable: cache.graph_unavailable().map(str::to_string),
    })
}

/// The check's model: two blocks, 4 query heads over 2 K/V heads, dk = dv = 64 (the decode
/// kernels' tensor-core head dim), l = 8, d = 4, l' = 16, n = 3, w = 24, so that a few hundred
/// steps cross many block, stride and window boundaries.
fn check_config(
    attention: AttentionKind,
    (shared_kv, cmp_rope): (bool, CmpRope),
) -> Result<ModelConfig, ModelError> {
    Ok(ModelConfig {
        vocab_size: 97,
        dim: 64,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim_k: 64,
        head_dim_v: 64,
        mlp_hidden: 96,
        attention,
        nsa: NsaParams {
            select: SelectConfig {
                block_len: 8,
                stride: 4,
                select_len: 16,
                top_n: 3,
                n_local: 2,
            },
            window: 24,
            phi: Phi::Mlp,
            phi_hidden: 16,
            cmp_rope,
            shared_kv,
            gate_hidden: 8,
        },
        init_std: 0.3,
        ..ModelConfig::preset("tiny")?
    })
}

/// Rows of `nsa-train check --gpu --part decode` for graph decoding: NSA (per-branch K/V,
/// `shared_kv`, and `shared_kv` with `cmp_rope = "compressed"`) and dense models in bf16 and float32, 3 sequences from prompts of 5, 17 and 40
/// tokens, 300 steps (two captures: the first step's and one after 256 positions). Each row
/// compares the replayed logits with eager steps under the same fixed-layout plans (the same
/// kernels, so bit-identical is expected and the detail says whether they were) and with
/// ordinary eager steps (other kernel sizes: within the dtype's tolerance), and fails unless
/// all but the two capturing steps replayed.
pub fn decode_graph_check() -> Result<Vec<CheckRow>, ModelError> {
    let device = nsa_attn::fused::check_device("decode_graph_check")?;
    let mut rows = Vec::new();
    for (attention, kv) in [
        (AttentionKind::Nsa, (false, CmpRope::Raw)),
        (AttentionKind::Nsa, (true, CmpRope::Raw)),
        (AttentionKind::Nsa, (true, CmpRope::Compressed)),
        (AttentionKind::Dense, (false, CmpRope::Raw)),
    ] {
        for (kind, tolerance) in [(Kind::BFloat16, 2e-2), (Kind::Float, 1e-5)] {
            let name = format!(
                "decode graph {} {kind:?}: 300 steps of B=3 from prompts 5/17/40, replays vs eager",
                match (attention, kv) {
                    (AttentionKind::Dense, _) => "dense",
                    (_, (true, CmpRope::Compressed)) => "NSA shared_kv cmp_rope=compressed",
                    (_, (true, _)) => "NSA shared_kv",
                    _ => "NSA per-branch K/V",
                }
            );
            let row =
                graph_row(attention, kv, kind, tolerance, device).map(|(err, detail, passed)| {
                    CheckRow {
                        name: name.clone(),
                        max_rel_err: err,
                        tolerance,
                        passed,
                        detail,
                    }
                });
            rows.push(row.unwrap_or_else(|e| {
                CheckRow::failed(
                    name,
                    tolerance,
                    AttnError::Option {
                        option: "decode_graph_check",
                        reason: e.to_string(),
                    },
                )
            }));
        }
    }
    nsa_sys::fused::finish_prebuilds();
    Ok(rows)
}

/// One row: (largest error against either eager decode, detail, passed).
fn graph_row(
    attention: AttentionKind,
    kv: (bool, CmpRope),
    kind: Kind,
    tolerance: f64,
    device: Device,
) -> Result<(f64, String, bool), ModelError> {
    let (steps, prompts) = (300, [5i64, 17, 40]);
    let cfg = check_config(attention, kv)?;
    let mut vs = nn::VarStore::new(device);
    let model = Model::new(&vs.root(), &cfg)?;
    if kind == Kind::BFloat16 {
        vs.bfloat16();
    }
    let tokens = Tensor::f_randint(cfg.vocab_size, [3, 40 + steps], (Kind::Int64, device))?;
    let opts = ForwardOpts {
        path: AttnPath::Fused(Default::default()),
        ..Default::default()
    };
    let run = |s| decode_logits(&model, &tokens, &prompts, steps, &opts, s);
    let graph = run(Stepping::Graph)?;
    if let Some(why) = &graph.unavailable {
        return Ok((f64::INFINITY, format!("graphs unavailable: {why}"), false));
    }
    let fixed = run(Stepping::Fixed)?;
    let ordinary = run(Stepping::Ordinary)?;
    let same = bool::try_from(graph.logits.f_eq_tensor(&fixed.logits)?.f_all()?)?;
    let vs_fixed = rel_err(&graph.logits, &fixed.logits)?;
    let vs_ordinary = rel_err(&graph.logits, &ordinary.logits)?;
    let finite = bool::try_from(graph.logits.f_isfinite()?.f_all()?)?;
    let replays_ok = graph.replays + 2 >= steps as u64;
    let err = vs_fixed.max(vs_ordinary);
    let detail = format!(
        "{} of {steps} steps replayed; vs eager with the same plans {vs_fixed:.1e} ({}), vs ordinary plans {vs_ordinary:.1e}",
        graph.replays,
        if same { "bit-identical" } else { "not bit-identical" },
    );
    Ok((err, detail, finite && replays_ok && err <= tolerance))
}
