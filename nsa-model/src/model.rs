//! [`Model`]: embedding, decoder blocks, final norm, tied head; parameter init; [`decay_groups`].
use nsa_attn::{f_linear, AttnPath, ForwardOpts, NsaAttention, Phi};
use tch::nn;
use tch::{Device, Kind, TchError, Tensor};

use crate::config::{AttentionKind, ModelConfig, ModelError};
use crate::dense::{DenseAttention, Rope};

mod decode;
mod inspect;
mod recompute;
pub use decode::{decode_graph_check, DecodeStep, DenseCache, KvCache, Prefilled};
pub use inspect::LayerInspection;
pub use recompute::Recompute;

/// RMSNorm: `y = x / sqrt(mean(x²) + ε) · weight`, statistics in float32, result in `x`'s kind.
/// One variable, `weight` `[D]`, initialised to 1. With `kernel` (see [`use_kernels`]) one CUDA
/// kernel each way (`nsa_sys::fused::rms_norm`), whose result is already in autocast's dtype
/// where libtorch's chain of a dozen elementwise operators gives float32 for the next matmul to
/// cast.
#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(vs: &nn::Path<'_>, dim: i64, eps: f64) -> Result<Self, ModelError> {
        Ok(Self {
            weight: vs.f_var("weight", &[dim], nn::Init::Const(1.0))?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor, kernel: bool) -> Result<Tensor, ModelError> {
        if kernel {
            return Ok(nsa_sys::fused::rms_norm(x, &self.weight, self.eps)?);
        }
        let xf = x.f_to_kind(Kind::Float)?;
        let ms = xf.f_square()?.f_mean_dim(-1, true, Kind::Float)?;
        let normed = xf
            .f_mul(&ms.f_add_scalar(self.eps)?.f_rsqrt()?)?
            .f_to_kind(x.kind())?;
        Ok(normed.f_mul(&self.weight)?)
    }

    /// The residual stream `h` plus `delta` (when given), and this norm of it: `(sum, y)`. With
    /// `kernel` one kernel each way for both (`nsa_sys::fused::add_rms_norm`; the same sum,
    /// rounded once in `h`'s kind, as `h + delta`).
    fn forward_add(
        &self,
        h: &Tensor,
        delta: Option<&Tensor>,
        kernel: bool,
    ) -> Result<(Tensor, Tensor), ModelError> {
        match delta {
            Some(d) if kernel => Ok(nsa_sys::fused::add_rms_norm(h, d, &self.weight, self.eps)?),
            Some(d) => {
                let sum = h.f_add(d)?;
                let y = self.forward(&sum, kernel)?;
                Ok((sum, y))
            }
            None => Ok((h.shallow_clone(), self.forward(h, kernel)?)),
        }
    }
}

/// Whether a forward with `opts` over activations like `x` runs the blocks' norms and MLP
/// activations on their CUDA kernels: on the fused path, on CUDA, for the float kinds and
/// widths the kernels take (as RoPE's kernel is chosen).
pub(crate) fn use_kernels(opts: &ForwardOpts, x: &Tensor) -> bool {
    matches!(opts.path, AttnPath::Fused(_))
        && x.device().is_cuda()
        && matches!(x.kind(), Kind::Float | Kind::BFloat16)
        && x.size()
            .last()
            .is_some_and(|&d| d <= nsa_sys::fused::RMS_NORM_MAX_DIM)
}

/// SwiGLU MLP: `w_down(SiLU(w_gate x) ⊙ w_up x)`, no biases.
#[derive(Debug)]
struct Mlp {
    w_gate: nn::Linear,
    w_up: nn::Linear,
    w_down: nn::Linear,
}

impl Mlp {
    fn new(
        vs: &nn::Path<'_>,
        dim: i64,
        hidden: i64,
        std: f64,
        out_std: f64,
    ) -> Result<Self, TchError> {
        Ok(Self {
            w_gate: normal_linear(&(vs / "w_gate"), dim, hidden, std)?,
            w_up: normal_linear(&(vs / "w_up"), dim, hidden, std)?,
            w_down: normal_linear(&(vs / "w_down"), hidden, dim, out_std)?,
        })
    }

    /// `kernel` (see [`use_kernels`]): the gate and up projections as one matmul over their
    /// stacked weights (one backward matmul for the input's gradient instead of two and an
    /// add) and the SwiGLU on its CUDA kernel (`nsa_sys::fused::swiglu`).
    fn forward(&self, x: &Tensor, kernel: bool) -> Result<Tensor, ModelError> {
        let gated = if kernel {
            let stacked = Tensor::f_cat(&[&self.w_gate.ws, &self.w_up.ws], 0)?;
            nsa_sys::fused::swiglu(&x.f_linear::<Tensor>(&stacked, None)?)?
        } else {
            linear(&self.w_gate, x)?
                .f_silu()?
                .f_mul(&linear(&self.w_up, x)?)?
        };
        Ok(linear(&self.w_down, &gated)?)
    }
}

/// A bias-free linear map whose weight is drawn from `normal(0, stdev)` (the model's init for
/// every matrix), created through nsa-attn's fallible [`nsa_attn::f_linear`].
pub(crate) fn normal_linear(
    vs: &nn::Path<'_>,
    in_dim: i64,
    out_dim: i64,
    stdev: f64,
) -> Result<nn::Linear, TchError> {
    let config = nn::LinearConfig {
        ws_init: nn::Init::Randn { mean: 0.0, stdev },
        bias: false,
        ..Default::default()
    };
    f_linear(vs, in_dim, out_dim, config)
}

/// `l.forward(x)` through tch's fallible `f_linear`: a libtorch error is returned, not a panic.
pub(crate) fn linear(l: &nn::Linear, x: &Tensor) -> Result<Tensor, TchError> {
    x.f_linear(&l.ws, l.bs.as_ref())
}

/// The attention of one block.
#[derive(Debug)]
enum Attention {
    Nsa(Box<NsaAttention>),
    Dense(DenseAttention),
}

/// What a block's NSA attention does with its block selection (dense attention has none).
pub(crate) enum Selection<'a> {
    /// Select from the compressed scores, as every forward does.
    Select,
    /// Select, and put the block ids (int32 `[B, S, Hkv, n]`) into the slot: activation
    /// recomputation's first forward, whose selection its second one reuses.
    Keep(&'a mut Option<Tensor>),
    /// Take these block ids instead of selecting (the same ids give the same forward).
    Reuse(&'a Tensor),
}

/// `h + attn(attn_norm(h))`, then `h + mlp(mlp_norm(h))`.
#[derive(Debug)]
struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    mlp_norm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    /// The block on the residual stream `h` plus `pending` (the previous block's MLP output,
    /// not yet added: each residual add runs inside the norm after it): returns the stream
    /// after the attention's residual and this block's MLP output, for the next norm to add.
    /// The NSA attention selects, keeps or reuses its block selection as `selection` says.
    fn forward(
        &self,
        h: &Tensor,
        pending: Option<&Tensor>,
        opts: &ForwardOpts,
        rope: Option<&Rope>,
        selection: Selection<'_>,
    ) -> Result<(Tensor, Tensor), ModelError> {
        let kernel = use_kernels(opts, h);
        let (h, x) = self.attn_norm.forward_add(h, pending, kernel)?;
        let a = match (&self.attn, rope) {
            (Attention::Nsa(attn), _) => match selection {
                Selection::Select => attn.forward(&x, opts)?,
                Selection::Keep(slot) => {
                    let out = attn.forward_branches(&x, opts)?;
                    *slot = Some(out.blocks.f_to_kind(Kind::Int)?);
                    out.output
                }
                Selection::Reuse(ids) => attn.forward_branches_with_blocks(&x, ids, opts)?.output,
            },
            (Attention::Dense(attn), Some(rope)) => attn.forward(&x, rope)?,
            (Attention::Dense(_), None) => {
                return Err(ModelError::Shape(
                    "dense attention needs the RoPE tables Model::forward builds".into(),
                ))
            }
        };
        let (h, x) = self.mlp_norm.forward_add(&h, Some(&a), kernel)?;
        Ok((h, self.mlp.forward(&x, kernel)?))
    }

    /// The block after its attention: `h + a` (inside the MLP's norm, as `forward` adds it),
    /// then the MLP's residual. The decode paths use it; training and prefill's `forward`
    /// hands the MLP output to the next block's norm instead of adding it here.
    fn finish(&self, h: &Tensor, a: &Tensor, kernel: bool) -> Result<Tensor, ModelError> {
        let (h, x) = self.mlp_norm.forward_add(h, Some(a), kernel)?;
        Ok(h.f_add(&self.mlp.forward(&x, kernel)?)?)
    }
}

/// A LLaMA-style decoder with NSA or dense attention and a tied output head.
///
/// See the crate docs for the architecture, variable names and init.
#[derive(Debug)]
pub struct Model {
    cfg: ModelConfig,
    /// `embed.weight` `[V, D]`, also the output head.
    embed: Tensor,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
}

impl Model {
    /// Creates and initialises all variables under `vs` (usually `var_store.root()`), on the
    /// var store's device and in its kind (convert with `VarStore::bfloat16()` etc. after
    /// building). Validates `cfg` first.
    pub fn new(vs: &nn::Path<'_>, cfg: &ModelConfig) -> Result<Self, ModelError> {
        cfg.validate()?;
        let std = cfg.init_std;
        let out_std = std / (2.0 * cfg.n_layers as f64).sqrt();
        let embed = vs.sub("embed").f_var(
            "weight",
            &[cfg.vocab_size, cfg.dim],
            nn::Init::Randn {
                mean: 0.0,
                stdev: std,
            },
        )?;
        let nsa_vars = match cfg.attention {
            AttentionKind::Nsa => nsa_variable_names(cfg)?,
            AttentionKind::Dense => Vec::new(),
        };
        let mut blocks = Vec::with_capacity(cfg.n_layers as usize);
        for i in 0..cfg.n_layers {
            let b = vs / "blocks" / i;
            let attn = match cfg.attention {
                AttentionKind::Nsa => {
                    let path = &b / "attn";
                    let attn = NsaAttention::new(&path, cfg.nsa_config())?;
                    init_nsa(&path, &nsa_vars, cfg.nsa.phi, std, out_std)?;
                    Attention::Nsa(Box::new(attn))
                }
                AttentionKind::Dense => {
                    Attention::Dense(DenseAttention::new(&(&b / "attn"), cfg, std, out_std)?)
                }
            };
            blocks.push(Block {
                attn_norm: RmsNorm::new(&(&b / "attn_norm"), cfg.dim, cfg.norm_eps)?,
                attn,
                mlp_norm: RmsNorm::new(&(&b / "mlp_norm"), cfg.dim, cfg.norm_eps)?,
                mlp: Mlp::new(&(&b / "mlp"), cfg.dim, cfg.mlp_hidden, std, out_std)?,
            });
        }
        Ok(Self {
            cfg: *cfg,
            embed,
            blocks,
            final_norm: RmsNorm::new(&(vs / "final_norm"), cfg.dim, cfg.norm_eps)?,
        })
    }

    /// `tokens` int64 `[B, S]` (values in `0..vocab_size`, on the model's device) → logits
    /// `[B, S, V]` in the activations' kind (the var store's float kind).
    ///
    /// `opts` chooses the NSA path (reference / lean / fused) and gate override; dense attention
    /// reads only whether the path is fused (then RoPE runs on its CUDA kernel). Position `t`'s
    /// logits depend on tokens `0..=t` only.
    pub fn forward(&self, tokens: &Tensor, opts: &ForwardOpts) -> Result<Tensor, ModelError> {
        self.tied_head(&self.forward_hidden(tokens, opts)?)
    }

    /// [`Model::forward`] up to the head: the final norm's output `[B, S, D]`, which a loss
    /// that applies the head itself (`nsa_sys::loss`) takes with [`Model::head_weight`].
    pub fn forward_hidden(
        &self,
        tokens: &Tensor,
        opts: &ForwardOpts,
    ) -> Result<Tensor, ModelError> {
        let (mut h, rope) = self.embed_and_rope(tokens, opts)?;
        let mut pending = None;
        for block in &self.blocks {
            let (after_attn, mlp_out) =
                block.forward(&h, pending.as_ref(), opts, rope.as_ref(), Selection::Select)?;
            h = after_attn;
            pending = Some(mlp_out);
        }
        let kernel = use_kernels(opts, &h);
        Ok(self.final_norm.forward_add(&h, pending.as_ref(), kernel)?.1)
    }

    /// The embedded `tokens` `[B, S, D]` and, for dense attention, the RoPE tables of their
    /// positions (on the fused path with the RoPE kernel, as the NSA layer rotates on it).
    pub(crate) fn embed_and_rope(
        &self,
        tokens: &Tensor,
        opts: &ForwardOpts,
    ) -> Result<(Tensor, Option<Rope>), ModelError> {
        let s = self.check_tokens(tokens)?;
        let h = Tensor::f_embedding(&self.embed, tokens, -1, false, false)?;
        let rope = match self.cfg.attention {
            AttentionKind::Dense => Some(
                Rope::new(
                    self.cfg.rope_base,
                    self.cfg.head_dim_k,
                    s,
                    h.kind(),
                    h.device(),
                )?
                .with_kernel(matches!(opts.path, AttnPath::Fused(_)))?,
            ),
            AttentionKind::Nsa => None,
        };
        Ok((h, rope))
    }

    /// The tied output head's weight, `[V, D]` (the embedding): `logits = forward_hidden · Wᵀ`.
    pub fn head_weight(&self) -> &Tensor {
        &self.embed
    }

    /// Final norm (`kernel`: on its CUDA kernel) and the tied head: hidden states `[B, S, D]` →
    /// logits `[B, S, V]`.
    fn head(&self, h: &Tensor, kernel: bool) -> Result<Tensor, ModelError> {
        self.tied_head(&self.final_norm.forward(h, kernel)?)
    }

    /// The tied head on hidden states `[B, S, D]` from [`Model::forward_hidden`] (or its
    /// recomputing twin): logits `[B, S, V]`.
    pub fn head_logits(&self, hidden: &Tensor) -> Result<Tensor, ModelError> {
        self.tied_head(hidden)
    }

    /// The tied head alone: normed hidden states → logits, `h · embedᵀ`.
    fn tied_head(&self, normed: &Tensor) -> Result<Tensor, ModelError> {
        Ok(normed.f_matmul(&self.embed.f_tr()?)?)
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The device of the model's variables.
    pub fn device(&self) -> Device {
        self.embed.device()
    }

    /// Checks shape, kind and range of a token batch; returns S. The range check costs one
    /// device→host sync (an out-of-range id would otherwise be a device-side assert on CUDA).
    fn check_tokens(&self, tokens: &Tensor) -> Result<i64, ModelError> {
        let size = tokens.size();
        let (b, s) = match size.as_slice() {
            &[b, s] => (b, s),
            _ => {
                return Err(ModelError::Tokens(format!(
                    "expected shape [B, S], got {size:?}"
                )))
            }
        };
        if b == 0 || s == 0 {
            return Err(ModelError::Tokens(format!(
                "expected a non-empty [B, S], got {size:?}"
            )));
        }
        if tokens.kind() != Kind::Int64 {
            return Err(ModelError::Tokens(format!(
                "expected int64, got {:?}",
                tokens.kind()
            )));
        }
        let v = self.cfg.vocab_size;
        let bad = tokens.f_lt(0)?.f_logical_or(&tokens.f_ge(v)?)?.f_any()?;
        if bool::try_from(&bad)? {
            let (lo, hi) = (
                tokens.f_min()?.f_int64_value(&[])?,
                tokens.f_max()?.f_int64_value(&[])?,
            );
            return Err(ModelError::Tokens(format!(
                "ids must lie in 0..{v}, got values from {lo} to {hi}"
            )));
        }
        Ok(s)
    }
}

/// Names (relative to the layer's path) and ranks of the variables `NsaAttention::new` creates
/// for `cfg`, learned from a throw-away CPU var store: the init below then does not depend on
/// nsa-attn's internal naming beyond the output projection being `wo.weight`.
fn nsa_variable_names(cfg: &ModelConfig) -> Result<Vec<(String, usize)>, ModelError> {
    let scratch = nn::VarStore::new(Device::Cpu);
    let _layer = NsaAttention::new(&scratch.root(), cfg.nsa_config())?;
    let mut names: Vec<(String, usize)> = scratch
        .variables()
        .into_iter()
        .map(|(name, t)| (name, t.dim()))
        .collect();
    names.sort();
    if !names.iter().any(|(n, _)| n == NSA_OUTPUT) {
        return Err(ModelError::MissingVar(format!(
            "{NSA_OUTPUT} (nsa-attn's output projection)"
        )));
    }
    Ok(names)
}

/// nsa-attn's output projection, relative to the layer path.
const NSA_OUTPUT: &str = "wo.weight";

/// With φ = `mean_mlp`, the MLP's second maps, relative to the layer path: zero at init.
const PHI_CORRECTION: [&str; 2] = ["cmp.phi_k.w2.weight", "cmp.phi_v.w2.weight"];

/// Re-initialises one NSA layer's variables the model's way: 2-D `*.weight` matrices
/// `normal(0, std)` (`wo.weight`: `out_std`; with φ = `mean_mlp` its MLP's second maps 0, so
/// that φ starts as the mean), biases 0, other variables (the intra-block position
/// embeddings) as nsa-attn made them.
fn init_nsa(
    path: &nn::Path<'_>,
    names: &[(String, usize)],
    phi: Phi,
    std: f64,
    out_std: f64,
) -> Result<(), ModelError> {
    let _guard = tch::no_grad_guard();
    for (name, rank) in names {
        // `Path::get` takes a single component: walk to the variable's parent first.
        let (parent, leaf) = match name.rsplit_once('.') {
            Some((dir, leaf)) => (dir.split('.').fold(path.clone(), |p, c| p.sub(c)), leaf),
            None => (path.clone(), name.as_str()),
        };
        let mut var = parent
            .get(leaf)
            .ok_or_else(|| ModelError::MissingVar(parent.path(leaf)))?;
        if name == NSA_OUTPUT {
            let _ = var.f_normal_(0.0, out_std)?;
        } else if phi == Phi::MeanMlp && PHI_CORRECTION.contains(&name.as_str()) {
            let _ = var.f_zero_()?;
        } else if *rank == 2 && name.ends_with(".weight") {
            let _ = var.f_normal_(0.0, std)?;
        } else if name.ends_with(".bias") {
            let _ = var.f_zero_()?;
        }
    }
    Ok(())
}

/// Variables with their var-store names.
pub type NamedVars = Vec<(String, Tensor)>;

/// Splits `vs`'s trainable variables (those that require grad) into `(decay, no_decay)`,
/// each sorted by name.
///
/// Decay: matrices of linear layers, i.e. 2-D variables named `*.weight` except the embedding
/// `embed.weight` (which is also the tied head). No decay: the embedding, every norm weight,
/// every bias, and NSA's intra-block position embeddings (`cmp.pos_k`, `cmp.pos_v`, 3-D).
pub fn decay_groups(vs: &nn::VarStore) -> (NamedVars, NamedVars) {
    let mut vars: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars.into_iter().partition(|(name, t)| is_decayed(name, t))
}

fn is_decayed(name: &str, t: &Tensor) -> bool {
    t.dim() == 2 && name.ends_with(".weight") && name != "embed.weight" && !name.contains("norm")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    fn std_of(t: &Tensor) -> f64 {
        t.to_kind(Kind::Double).std(true).double_value(&[])
    }

    #[test]
    fn rms_norm_normalises_rows_and_keeps_the_kind() {
        let vs = nn::VarStore::new(Device::Cpu);
        let norm = RmsNorm::new(&vs.root(), 8, 1e-6).unwrap();
        let x = Tensor::randn([3, 5, 8], (Kind::Float, Device::Cpu)) * 7.0;
        let y = norm.forward(&x, false).unwrap();
        let rms = y.square().mean_dim(-1, false, Kind::Float).sqrt();
        let err = (rms - 1.0).abs().max().double_value(&[]);
        assert!(err < 1e-4, "{err}");
        let mut vs = nn::VarStore::new(Device::Cpu);
        let norm = RmsNorm::new(&vs.root(), 8, 1e-6).unwrap();
        vs.bfloat16();
        let yb = norm.forward(&x.to_kind(Kind::BFloat16), false).unwrap();
        assert_eq!(yb.kind(), Kind::BFloat16);
        let err = (yb.to_kind(Kind::Float) - y).abs().max().double_value(&[]);
        assert!(err < 0.05, "{err}");
    }

    #[test]
    fn init_follows_the_documented_scheme() {
        for kind in [AttentionKind::Nsa, AttentionKind::Dense] {
            let mut cfg = ModelConfig::preset("small").unwrap().with_attention(kind);
            cfg.n_layers = 2;
            cfg.vocab_size = 512;
            let vs = nn::VarStore::new(Device::Cpu);
            let _m = Model::new(&vs.root(), &cfg).unwrap();
            let vars = vs.variables();
            let out_std = cfg.init_std / (2.0 * cfg.n_layers as f64).sqrt();
            for (name, t) in &vars {
                if name.contains("norm") {
                    assert_eq!(
                        t.ones_like().eq_tensor(t).all().int64_value(&[]),
                        1,
                        "{name}"
                    );
                } else if name.ends_with(".bias") {
                    assert_eq!(t.abs().max().double_value(&[]), 0.0, "{name}");
                } else if t.dim() == 2 && t.numel() >= 10_000 {
                    let want =
                        if name.ends_with("attn.wo.weight") || name.ends_with("w_down.weight") {
                            out_std
                        } else {
                            cfg.init_std
                        };
                    let got = std_of(t);
                    assert!(
                        (got / want - 1.0).abs() < 0.05,
                        "{kind:?} {name}: std {got}, want {want}"
                    );
                    assert!(
                        t.mean(Kind::Double).double_value(&[]).abs() < 0.1 * want,
                        "{name}"
                    );
                }
            }
            assert!(vars.contains_key("blocks.1.attn.wo.weight"));
        }
    }

    /// φ = mean + MLP starts as the mean: its correction maps are zero, and with the other
    /// weights copied over, a mean-φ model gives the same logits.
    #[test]
    fn mean_mlp_starts_as_the_mean() {
        let cfg = |phi| {
            let mut c = ModelConfig::preset("tiny").unwrap();
            c.nsa.phi = phi;
            c
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let mean_mlp = Model::new(&vs.root(), &cfg(Phi::MeanMlp)).unwrap();
        let vars = vs.variables();
        for i in 0..2 {
            for w in PHI_CORRECTION {
                let t = &vars[&format!("blocks.{i}.attn.{w}")];
                assert_eq!(t.abs().max().double_value(&[]), 0.0, "{w}");
            }
            let w1 = &vars[&format!("blocks.{i}.attn.cmp.phi_k.w1.weight")];
            assert!(w1.abs().max().double_value(&[]) > 0.0);
        }
        let mut vs_mean = nn::VarStore::new(Device::Cpu);
        let mean = Model::new(&vs_mean.root(), &cfg(Phi::Mean)).unwrap();
        vs_mean.copy(&vs).unwrap();
        let tokens = Tensor::randint(256, [2, 70], (Kind::Int64, Device::Cpu));
        let opts = ForwardOpts::default();
        let a = mean_mlp.forward(&tokens, &opts).unwrap();
        let b = mean.forward(&tokens, &opts).unwrap();
        let err = (a - b).abs().max().double_value(&[]);
        assert!(err < 1e-5, "{err}");
    }

    #[test]
    fn decayed_means_linear_matrix() {
        let z = |d: &[i64]| Tensor::zeros(d, (Kind::Float, Device::Cpu));
        assert!(is_decayed("blocks.0.mlp.w_up.weight", &z(&[4, 4])));
        assert!(is_decayed("blocks.0.attn.gate.w1.weight", &z(&[4, 4])));
        assert!(!is_decayed("embed.weight", &z(&[4, 4])));
        assert!(!is_decayed("blocks.0.attn_norm.weight", &z(&[4])));
        assert!(!is_decayed("blocks.0.attn.gate.w1.bias", &z(&[4])));
        assert!(!is_decayed("blocks.0.attn.cmp.pos_v", &z(&[2, 2, 2])));
    }
}
