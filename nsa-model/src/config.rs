//! [`ModelConfig`], its presets, validation and closed-form parameter count; [`ModelError`].
use std::fmt;

use nsa_attn::SelectConfig;
use nsa_attn::{AttnError, CmpRope, ConfigProblem, NsaConfig, NsaParams, Phi};
use serde::{Deserialize, Serialize};
use tch::TchError;

/// Which attention every block uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionKind {
    /// Native Sparse Attention (`nsa_attn::NsaAttention`), shaped by [`ModelConfig::nsa`].
    Nsa,
    /// Dense causal attention through `scaled_dot_product_attention`, with the same q/k/v
    /// projection sizes, RoPE and GQA grouping (the baseline NSA is measured against).
    Dense,
}

impl fmt::Display for AttentionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttentionKind::Nsa => "nsa",
            AttentionKind::Dense => "dense",
        })
    }
}

/// Shape and initialisation of a decoder (see the crate docs for the architecture).
///
/// Serialises with serde (JSON, TOML, …); unknown keys are rejected with their name. The `nsa`
/// section may be left out and then defaults to [`NsaParams::paper`]; every other field is
/// required.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// V: vocabulary size (rows of the embedding, columns of the logits).
    pub vocab_size: i64,
    /// D: model width.
    pub dim: i64,
    /// L: decoder blocks.
    pub n_layers: i64,
    /// H: query heads.
    pub n_heads: i64,
    /// Hkv: key/value heads (GQA groups); divides `n_heads`.
    pub n_kv_heads: i64,
    /// dk: query/key head size (even, for RoPE).
    pub head_dim_k: i64,
    /// dv: value head size (may differ from dk).
    pub head_dim_v: i64,
    /// F: SwiGLU hidden width.
    pub mlp_hidden: i64,
    /// ε of every RMSNorm.
    pub norm_eps: f64,
    /// RoPE base θ (both attention kinds).
    pub rope_base: f64,
    /// NSA or dense attention in every block.
    pub attention: AttentionKind,
    /// NSA lengths and options, nsa-attn's one NSA configuration (validated for both attention
    /// kinds, so that flipping `attention` never turns a valid config invalid).
    #[serde(default)]
    pub nsa: NsaParams,
    /// σ of the normal init of matrices and the embedding.
    pub init_std: f64,
}

/// The preset names [`ModelConfig::preset`] accepts.
pub const PRESETS: [&str; 4] = ["tiny", "small", "125m", "125m-g16"];

impl ModelConfig {
    /// A named preset with NSA attention (set `attention` to [`AttentionKind::Dense`] for the
    /// baseline of the same shape):
    ///
    /// - `"tiny"`: CPU smoke tests. D = 64, 2 layers, 4 heads / 2 KV heads, dk = dv = 16,
    ///   F = 176, byte vocabulary (256); NSA lengths scaled down (l = 8, d = 4, l' = 16, n = 4,
    ///   w = 32) so that all three branches and a real top-n choice happen at S ≥ 96.
    /// - `"small"`: D = 384, 6 layers, 6 heads / 2 KV heads, dk = dv = 64, F = 1024,
    ///   vocab 50304, paper NSA lengths.
    /// - `"125m"`: D = 768, 12 layers, 12 heads / 4 KV heads, dk = dv = 64, F = 2048,
    ///   vocab 50304, paper NSA lengths.
    /// - `"125m-g16"`: `125m` with the paper's group size: 16 heads / 1 KV head (G = 16, as
    ///   the paper's 64 / 4), dk = dv = 64, so attention is 1024 wide.
    ///
    /// Exact parameter counts are in the crate docs. An unknown name is an error that lists
    /// the valid ones.
    pub fn preset(name: &str) -> Result<Self, ModelError> {
        let base = |vocab_size, dim, n_layers, n_heads, n_kv_heads, head_dim, mlp_hidden| Self {
            vocab_size,
            dim,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim_k: head_dim,
            head_dim_v: head_dim,
            mlp_hidden,
            norm_eps: 1e-5,
            rope_base: 10_000.0,
            attention: AttentionKind::Nsa,
            nsa: NsaParams::paper(),
            init_std: 0.02,
        };
        match name {
            "tiny" => Ok(Self {
                nsa: NsaParams {
                    select: SelectConfig {
                        block_len: 8,
                        stride: 4,
                        select_len: 16,
                        top_n: 4,
                        n_local: 2,
                    },
                    window: 32,
                    phi: Phi::Mlp,
                    phi_hidden: 32,
                    cmp_rope: CmpRope::Raw,
                    shared_kv: false,
                    gate_hidden: 16,
                },
                ..base(256, 64, 2, 4, 2, 16, 176)
            }),
            "small" => Ok(base(50_304, 384, 6, 6, 2, 64, 1024)),
            "125m" => Ok(base(50_304, 768, 12, 12, 4, 64, 2048)),
            "125m-g16" => Ok(base(50_304, 768, 12, 16, 1, 64, 2048)),
            other => Err(ModelError::UnknownPreset {
                name: other.to_string(),
                valid: PRESETS.join(", "),
            }),
        }
    }

    /// The same config with another attention kind (builder-style convenience).
    pub fn with_attention(mut self, attention: AttentionKind) -> Self {
        self.attention = attention;
        self
    }

    /// The CUDA kernel families a model of this config runs (what `nsa_sys::fused::prebuild`
    /// should build): every family for NSA; for dense attention only the pointwise kernels
    /// (norms, SwiGLU, the fused loss), its attention being libtorch's.
    pub fn kernel_sources(&self) -> &'static [nsa_sys::nvrtc::KernelSource] {
        match self.attention {
            AttentionKind::Nsa => &nsa_sys::nvrtc::ALL_SOURCES,
            AttentionKind::Dense => std::slice::from_ref(&nsa_sys::nvrtc::POINTWISE),
        }
    }

    /// The configuration of one NSA attention layer of this model.
    pub fn nsa_config(&self) -> NsaConfig {
        NsaConfig {
            dim: self.dim,
            heads: self.n_heads,
            kv_heads: self.n_kv_heads,
            head_dim_k: self.head_dim_k,
            head_dim_v: self.head_dim_v,
            rope_base: self.rope_base,
            nsa: self.nsa,
        }
    }

    /// Checks every field; the error lists every offending field (not only the first), each
    /// named as in the config file (`nsa.stride`, …). The model's own fields are checked here;
    /// the attention shape and the `nsa` section by nsa-attn's [`NsaConfig::problems`] (which
    /// hands the selection lengths to nsa-select), so each rule is written once.
    pub fn validate(&self) -> Result<(), ModelError> {
        let mut bad = Vec::new();
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("n_layers", self.n_layers),
            ("mlp_hidden", self.mlp_hidden),
        ] {
            if value <= 0 {
                bad.push(FieldError {
                    field: field.to_string(),
                    reason: format!("must be positive, got {value}"),
                });
            }
        }
        for (field, value) in [("norm_eps", self.norm_eps), ("init_std", self.init_std)] {
            if !(value.is_finite() && value > 0.0) {
                bad.push(FieldError {
                    field: field.to_string(),
                    reason: format!("must be a finite number > 0, got {value}"),
                });
            }
        }
        bad.extend(
            self.nsa_config()
                .problems()
                .into_iter()
                .map(|p| FieldError {
                    field: nsa_field_name(&p.field),
                    reason: p.reason,
                }),
        );
        if bad.is_empty() {
            Ok(())
        } else {
            Err(ModelError::Config(bad))
        }
    }

    /// Parameters of the model this config builds, in closed form (equal to the sum of the
    /// element counts of the built model's variables; tested for every preset and both
    /// attention kinds):
    ///
    /// `V·D + L·(2·D + A + 3·D·F) + D`, with the attention's `A` from
    /// [`ModelConfig::attention_params`].
    ///
    /// Computed in f64 (exact below 2^53 parameters) and saturated to `i64::MAX`, so an absurd
    /// config gives a huge count to reject, never an overflow.
    pub fn num_params(&self) -> i64 {
        let (v, d, l, f) = (
            self.vocab_size as f64,
            self.dim as f64,
            self.n_layers as f64,
            self.mlp_hidden as f64,
        );
        (v * d + l * (2.0 * d + self.attention_params() as f64 + 3.0 * d * f) + d) as i64
    }

    /// Parameters of one attention layer.
    ///
    /// Dense: `D·H·dk + D·G·(dk + dv) + H·dv·D` (`wq`, `wk`, `wv`, `wo`; G = Hkv).
    ///
    /// NSA (as `nsa_attn::NsaAttention` builds it): `wq` `D·H·dk`; K/V projections
    /// `p·D·G·(dk + dv)` with `p = 3` (one pair per branch) or 1 (`shared_kv`); intra-block
    /// position embeddings `l·G·dv` (values) plus `l·G·dk` (keys, MLP φ only); φ for keys and
    /// values (mean: 0; linear: `l·dk·dk` and `l·dv·dv + dv`; MLP with hidden width `m`:
    /// `l·dk·m + m + m·dk` and `l·dv·m + m + m·dv + dv`); gate MLP `D·g + g + g·3H + 3H`
    /// (`g = gate_hidden`); `wo` `H·dv·D`.
    pub fn attention_params(&self) -> i64 {
        // f64 for the same reason as `num_params` (the `as i64` below saturates).
        let (d, h, g, dk, dv) = (
            self.dim as f64,
            self.n_heads as f64,
            self.n_kv_heads as f64,
            self.head_dim_k as f64,
            self.head_dim_v as f64,
        );
        let q_o = d * h * dk + h * dv * d;
        let params = match self.attention {
            AttentionKind::Dense => q_o + d * g * (dk + dv),
            AttentionKind::Nsa => {
                let n = &self.nsa;
                let l = n.select.block_len as f64;
                let pairs = if n.shared_kv { 1.0 } else { 3.0 };
                let kv = pairs * d * g * (dk + dv);
                let (pos, phi) = match n.phi {
                    Phi::Mean => (l * g * dv, 0.0),
                    Phi::Linear => (l * g * dv, l * dk * dk + l * dv * dv + dv),
                    Phi::Mlp | Phi::MeanMlp => {
                        let m = n.phi_hidden as f64;
                        (
                            l * g * (dk + dv),
                            (l * dk * m + m + m * dk) + (l * dv * m + m + m * dv + dv),
                        )
                    }
                };
                let gh = n.gate_hidden as f64;
                let gate = d * gh + gh + gh * 3.0 * h + 3.0 * h;
                q_o + kv + pos + phi + gate
            }
        };
        params as i64
    }
}

/// Model-level name of an `nsa_attn::NsaConfig` field (`nsa.*` and the others keep theirs).
fn nsa_field_name(field: &str) -> String {
    match field {
        "heads" => "n_heads".to_string(),
        "kv_heads" => "n_kv_heads".to_string(),
        other => other.to_string(),
    }
}

/// `12,345,678`.
pub(crate) fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let groups: Vec<&str> = digits
        .as_bytes()
        .rchunks(3)
        .rev()
        .map(|g| std::str::from_utf8(g).unwrap_or_default())
        .collect();
    let sign = if n < 0 { "-" } else { "" };
    format!("{sign}{}", groups.join(","))
}

impl fmt::Display for ModelConfig {
    /// One line, e.g. `nsa decoder: 12 layers, dim 768, heads 12/4 kv, dk 64, dv 64, mlp 2048,
    /// vocab 50304, nsa(l 32, d 16, l' 64, n 16, local 2, w 512, phi mlp 64), 127,648,944
    /// parameters (127.6M)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} decoder: {} layers, dim {}, heads {}/{} kv, dk {}, dv {}, mlp {}, vocab {}",
            self.attention,
            self.n_layers,
            self.dim,
            self.n_heads,
            self.n_kv_heads,
            self.head_dim_k,
            self.head_dim_v,
            self.mlp_hidden,
            self.vocab_size
        )?;
        if self.attention == AttentionKind::Nsa {
            let (n, sel) = (&self.nsa, &self.nsa.select);
            write!(
                f,
                ", nsa(l {}, d {}, l' {}, n {}, local {}, w {}, phi {}",
                sel.block_len, sel.stride, sel.select_len, sel.top_n, sel.n_local, n.window, n.phi
            )?;
            if n.phi.has_mlp() {
                write!(f, " {}", n.phi_hidden)?;
            }
            if n.cmp_rope == CmpRope::Compressed {
                f.write_str(", RoPE after phi")?;
            }
            if n.shared_kv {
                f.write_str(", shared kv")?;
            }
            f.write_str(")")?;
        }
        let p = self.num_params();
        write!(f, ", {} parameters ({:.1}M)", thousands(p), p as f64 / 1e6)
    }
}

/// One invalid config field and why: nsa-attn's [`ConfigProblem`], with the field named as in
/// a model config file (`n_kv_heads`, `nsa.stride`, …).
pub type FieldError = ConfigProblem;

/// Errors of `nsa-model`.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// One or more config fields are invalid; all of them are listed.
    #[error("invalid model config: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Config(Vec<FieldError>),
    /// [`ModelConfig::preset`] got a name it does not know.
    #[error("unknown model preset {name:?}; valid presets: {valid}")]
    UnknownPreset {
        /// The name asked for.
        name: String,
        /// The valid names, comma separated.
        valid: String,
    },
    /// The token batch is not what [`crate::Model::forward`] takes.
    #[error("tokens: {0}")]
    Tokens(String),
    /// Attention inputs with inconsistent shapes (from the public [`crate::dense`] functions).
    #[error("shape: {0}")]
    Shape(String),
    /// A variable the model expected under its path is missing (init bookkeeping).
    #[error("variable {0} not found in the var store")]
    MissingVar(String),
    /// The NSA layer failed.
    #[error("nsa attention: {0}")]
    Attn(#[from] AttnError),
    /// A fused CUDA kernel of the model (the norm's) refused an input or failed.
    #[error("fused kernel: {0}")]
    Fused(#[from] nsa_sys::fused::FusedError),
    /// A call into nsa-sys's C++ glue failed (the backward of recomputed activations, a CUDA
    /// graph of a decode step).
    #[error("{0}")]
    Glue(#[from] nsa_sys::autograd::GlueError),
    /// libtorch refused an operation.
    #[error("libtorch: {0}")]
    Torch(#[from] TchError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_unknown_names_list_the_valid_ones() {
        for name in PRESETS {
            let cfg = ModelConfig::preset(name).unwrap();
            cfg.validate().unwrap();
            cfg.with_attention(AttentionKind::Dense).validate().unwrap();
        }
        let err = ModelConfig::preset("huge").unwrap_err().to_string();
        assert!(err.contains("\"huge\""), "{err}");
        for name in PRESETS {
            assert!(err.contains(name), "{err}");
        }
    }

    /// A dense model builds the pointwise kernels alone (its short runs then have no NSA
    /// family still compiling at exit); an NSA model every family.
    #[test]
    fn kernel_sources_follow_the_attention() {
        let nsa = ModelConfig::preset("tiny").unwrap();
        let names = |c: &ModelConfig| {
            c.kernel_sources()
                .iter()
                .map(|s| s.name)
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&nsa).len(), nsa_sys::nvrtc::ALL_SOURCES.len());
        let dense = nsa.with_attention(AttentionKind::Dense);
        assert_eq!(names(&dense), ["pointwise.cu"]);
    }

    #[test]
    fn every_bad_field_is_named() {
        let mut cfg = ModelConfig::preset("tiny").unwrap();
        cfg.vocab_size = 0;
        cfg.n_kv_heads = 3; // does not divide 4
        cfg.head_dim_k = 15; // odd
        cfg.norm_eps = f64::NAN;
        cfg.rope_base = 1.0;
        cfg.init_std = -0.1;
        cfg.mlp_hidden = -1;
        cfg.nsa.select.stride = 3; // divides neither l = 8 nor l' = 16
        cfg.nsa.select.top_n = 2; // < n_local + 1
        cfg.nsa.phi_hidden = 0;
        let Err(ModelError::Config(fields)) = cfg.validate() else {
            panic!("expected a config error");
        };
        let names: Vec<&str> = fields.iter().map(|f| f.field.as_str()).collect();
        for want in [
            "vocab_size",
            "n_kv_heads",
            "head_dim_k",
            "norm_eps",
            "rope_base",
            "init_std",
            "mlp_hidden",
            "nsa.stride",
            "nsa.top_n",
            "nsa.phi_hidden",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        // stride breaks two rules, reported separately.
        assert_eq!(names.iter().filter(|n| **n == "nsa.stride").count(), 2);
        let msg = cfg.validate().unwrap_err().to_string();
        assert!(msg.starts_with("invalid model config: "), "{msg}");
        assert!(msg.contains("nsa.top_n: n = 2"), "{msg}");
    }

    #[test]
    fn single_bad_fields_are_caught_one_at_a_time() {
        let good = ModelConfig::preset("small").unwrap();
        type Spoil = fn(&mut ModelConfig);
        let cases: [(&str, Spoil); 10] = [
            ("dim", |c| c.dim = 0),
            ("n_layers", |c| c.n_layers = 0),
            ("n_heads", |c| c.n_heads = -2),
            ("head_dim_v", |c| c.head_dim_v = 0),
            ("nsa.block_len", |c| c.nsa.select.block_len = 0),
            ("nsa.select_len", |c| c.nsa.select.select_len = 0),
            ("nsa.window", |c| c.nsa.window = 0),
            ("nsa.n_local", |c| c.nsa.select.n_local = 0),
            ("nsa.gate_hidden", |c| c.nsa.gate_hidden = 0),
            ("init_std", |c| c.init_std = f64::INFINITY),
        ];
        for (field, spoil) in cases {
            let mut cfg = good;
            spoil(&mut cfg);
            let Err(ModelError::Config(fields)) = cfg.validate() else {
                panic!("{field}: expected a config error");
            };
            assert!(
                fields.iter().any(|f| f.field == field),
                "{field}: got {fields:?}"
            );
        }
        // phi_hidden is read only by the MLP φ.
        let mut cfg = good;
        cfg.nsa.phi = Phi::Mean;
        cfg.nsa.phi_hidden = 0;
        cfg.validate().unwrap();
    }

    #[test]
    fn nsa_config_mirrors_the_model_fields() {
        let cfg = ModelConfig::preset("125m").unwrap();
        let n = cfg.nsa_config();
        assert_eq!(
            (n.dim, n.heads, n.kv_heads, n.head_dim_k, n.head_dim_v),
            (768, 12, 4, 64, 64)
        );
        assert_eq!(n.nsa.select, SelectConfig::paper());
        assert_eq!(n.nsa.window, 512);
        assert_eq!((n.nsa.phi, n.nsa.phi_hidden), (Phi::Mlp, 64));
        assert_eq!(n.rope_base, cfg.rope_base);
        n.validate().unwrap();
    }

    #[test]
    fn display_is_one_line_with_the_count() {
        let cfg = ModelConfig::preset("tiny").unwrap();
        let line = cfg.to_string();
        assert!(!line.contains('\n'));
        assert!(line.contains(&thousands(cfg.num_params())), "{line}");
        assert!(line.starts_with("nsa decoder: 2 layers, dim 64"), "{line}");
        let dense = cfg.with_attention(AttentionKind::Dense).to_string();
        assert!(dense.starts_with("dense decoder") && !dense.contains("nsa("));
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(-1000), "-1,000");
    }

    #[test]
    fn preset_counts_match_the_crate_docs() {
        let want = [
            ("tiny", 147_352, 108_864),
            ("small", 31_765_740, 28_758_912),
            ("125m", 127_648_944, 114_150_144),
            ("125m-g16", 121_612_608, 115_329_792),
        ];
        for (name, nsa, dense) in want {
            let cfg = ModelConfig::preset(name).unwrap();
            assert_eq!(cfg.num_params(), nsa, "{name} nsa");
            let dense_cfg = cfg.with_attention(AttentionKind::Dense);
            assert_eq!(dense_cfg.num_params(), dense, "{name} dense");
        }
        let line = ModelConfig::preset("125m").unwrap().to_string();
        assert_eq!(
            line,
            "nsa decoder: 12 layers, dim 768, heads 12/4 kv, dk 64, dv 64, mlp 2048, vocab 50304, \
             nsa(l 32, d 16, l' 64, n 16, local 2, w 512, phi mlp 64), 127,648,944 parameters (127.6M)"
        );
    }

    #[test]
    fn dense_attention_count_is_four_projections() {
        let cfg = ModelConfig::preset("125m")
            .unwrap()
            .with_attention(AttentionKind::Dense);
        // wq 768x768, wk/wv 768x256, wo 768x768
        assert_eq!(cfg.attention_params(), 2 * 768 * 768 + 2 * 768 * 256);
    }
}
