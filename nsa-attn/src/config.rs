//! [`NsaConfig`] (one NSA layer: its shape plus [`NsaParams`], which nests nsa-select's
//! [`SelectConfig`]), the one place their rules are checked, and [`AttnError`].
use std::fmt;

use nsa_select::{SelectConfig, SelectError};
use serde::{Deserialize, Serialize};
use tch::TchError;

/// The compression function φ that maps a block of `l` keys (or values), each plus a learned
/// intra-block position embedding, to one compressed key (value) (Eq. 7). Written in a config
/// file as `"mean"`, `"linear"`, `"mlp"` or `"mean_mlp"`; the MLP's hidden width is
/// [`NsaParams::phi_hidden`].
///
/// Only the MLP variants let a key-side position embedding change anything: mean and linear φ
/// would turn it into the same shift of every compressed key, which cancels in the softmax.
/// So `cmp.pos_k` exists with the MLP variants only ([`Phi::has_mlp`]); `cmp.pos_v` always
/// (with mean or linear φ it acts as a bias of the compressed values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phi {
    /// Average over the block.
    Mean,
    /// One linear map from the flattened block `[l · d]` to `[d]`, shared by the key heads (with
    /// a bias for values; none for keys, where it would cancel in the softmax).
    Linear,
    /// Two linear maps with a GELU between them: `[l · d] → [phi_hidden] → [d]` (the paper's
    /// choice).
    Mlp,
    /// The mean plus the MLP: `mean(block) + MLP(block)`. nsa-model initialises the MLP's
    /// second map to zero, so φ starts as the mean (which learned long-range recall where the
    /// MLP alone did not: RESULTS.md) and learns a correction.
    #[serde(rename = "mean_mlp")]
    MeanMlp,
}

impl Phi {
    /// Whether φ has the MLP (`mlp`, `mean_mlp`): its weights, `phi_hidden` and `cmp.pos_k`.
    pub fn has_mlp(self) -> bool {
        matches!(self, Phi::Mlp | Phi::MeanMlp)
    }
}

impl fmt::Display for Phi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phi::Mean => "mean",
            Phi::Linear => "linear",
            Phi::Mlp => "mlp",
            Phi::MeanMlp => "mean_mlp",
        })
    }
}

/// Where the compressed branch's keys get their rotary position embedding (RoPE). Written in a
/// config file as `"raw"` or `"compressed"`.
///
/// The paper does not say. With `Raw` φ mixes keys that are already rotated, each at its own
/// position, so a compressed key depends on where its block sits, not only on what it holds:
/// `q_t · k̃_i` is a function of both positions (a mean φ keeps it one of their distance only:
/// the mean of rotated keys is a sum of rotations). With `Compressed` φ reads the keys
/// unrotated and compressed key `i` is rotated as one key at position `i·d + l − 1`, the last
/// token of its block (the first position that sees it), so `q_t · k̃_i` depends on
/// `t − (i·d + l − 1)` and on the block's content only, as in dense attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CmpRope {
    /// RoPE on the raw keys before φ (each token at its own position).
    #[default]
    Raw,
    /// φ on the unrotated raw keys, then RoPE on compressed key `i` at position `i·d + l − 1`.
    Compressed,
}

impl fmt::Display for CmpRope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CmpRope::Raw => "raw",
            CmpRope::Compressed => "compressed",
        })
    }
}

/// NSA's own hyperparameters: the selection lengths (nsa-select's [`SelectConfig`], nested),
/// the window, φ and the gate. The one NSA configuration of the workspace: `nsa-model` keeps it
/// as `ModelConfig::nsa`, the trainer reads it from the `[model.nsa]` table of its config file.
///
/// Serialises with serde as one flat table (`block_len`, `stride`, `select_len`, `top_n`,
/// `n_local`, `window`, `phi`, `phi_hidden`, `cmp_rope`, `shared_kv`, `gate_hidden`); unknown
/// keys are rejected with their name, and a table without `cmp_rope` (run folders written
/// before it existed) reads as `"raw"`. Rules are checked by [`NsaParams::problems`] (through
/// [`NsaConfig::validate`] for a layer).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NsaParams {
    /// l, d, l', n and n_local: what block selection depends on.
    #[serde(flatten)]
    pub select: SelectConfig,
    /// w: sliding-window length (keys `t − w + 1 ..= t`).
    pub window: i64,
    /// φ, the compression function.
    pub phi: Phi,
    /// Hidden width of the MLP φ (read only when `phi` has one: [`Phi::has_mlp`]).
    pub phi_hidden: i64,
    /// Where the compressed keys get RoPE: before φ on the raw keys, or after φ on each
    /// compressed key ([`CmpRope`]).
    #[serde(default)]
    pub cmp_rope: CmpRope,
    /// One K/V projection pair for all three branches (`kv.wk`, `kv.wv`) instead of one pair
    /// per branch (`cmp.*`, `slc.*`, `win.*`, the paper's default).
    pub shared_kv: bool,
    /// Hidden width of the gate MLP `dim → gate_hidden → 3·H`.
    pub gate_hidden: i64,
}

impl NsaParams {
    /// The paper's lengths (l = 32, d = 16, l' = 64, n = 16, 2 local blocks, w = 512) with the
    /// MLP φ of 64 hidden units over rotated keys ([`CmpRope::Raw`]), separate K/V per branch
    /// and a gate MLP of 64 hidden units: what the `small` and `125m` model presets and a
    /// config file without an `nsa` section use.
    pub fn paper() -> Self {
        Self {
            select: SelectConfig::paper(),
            window: 512,
            phi: Phi::Mlp,
            phi_hidden: 64,
            cmp_rope: CmpRope::Raw,
            shared_kv: false,
            gate_hidden: 64,
        }
    }

    /// Every broken rule, each field named as in a config file with an `nsa.` prefix
    /// (`nsa.stride`, …): nsa-select's rules for the lengths ([`SelectConfig::problems`]), then
    /// `window`, `gate_hidden` and, for the MLP φ, `phi_hidden` positive.
    pub fn problems(&self) -> Vec<ConfigProblem> {
        let mut found: Vec<ConfigProblem> = self
            .select
            .problems()
            .into_iter()
            .map(|e| ConfigProblem {
                field: format!("nsa.{}", e.field().unwrap_or("select")),
                reason: e.to_string(),
            })
            .collect();
        let mut positive = |field: &str, value: i64, when: &str| {
            if value <= 0 {
                found.push(ConfigProblem {
                    field: format!("nsa.{field}"),
                    reason: format!("must be positive{when}, got {value}"),
                });
            }
        };
        positive("window", self.window, "");
        positive("gate_hidden", self.gate_hidden, "");
        if self.phi.has_mlp() {
            positive(
                "phi_hidden",
                self.phi_hidden,
                &format!(" with phi = \"{}\"", self.phi),
            );
        }
        found
    }
}

impl Default for NsaParams {
    /// [`NsaParams::paper`].
    fn default() -> Self {
        Self::paper()
    }
}

/// Configuration of one [`crate::NsaAttention`] layer: its shape and [`NsaParams`].
///
/// Letters are the paper's: `H` query heads in `Hkv` key/value groups, key dim `dk`, value dim
/// `dv` (may differ); `nsa` holds the compression block `l` with stride `d`, selection block
/// `l'`, `n` selected blocks of which `n_local` are local, window `w`, φ and the gate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NsaConfig {
    /// Model width: input and output feature size.
    pub dim: i64,
    /// H: query heads.
    pub heads: i64,
    /// Hkv (also written G): key/value heads; each serves `H / Hkv` query heads.
    pub kv_heads: i64,
    /// dk: query/key head size (even: RoPE rotates pairs).
    pub head_dim_k: i64,
    /// dv: value head size.
    pub head_dim_v: i64,
    /// RoPE base θ.
    pub rope_base: f64,
    /// NSA's lengths, window, φ and gate.
    pub nsa: NsaParams,
}

impl NsaConfig {
    /// The paper's attention shape (H = 64, Hkv = 4, dk = 192, dv = 128) for a model of width
    /// `dim`, with [`NsaParams::paper`].
    pub fn paper(dim: i64) -> Self {
        Self {
            dim,
            heads: 64,
            kv_heads: 4,
            head_dim_k: 192,
            head_dim_v: 128,
            rope_base: 10_000.0,
            nsa: NsaParams::paper(),
        }
    }

    /// h: query heads per key/value group.
    pub fn heads_per_group(&self) -> i64 {
        self.heads / self.kv_heads
    }

    /// The lengths selection depends on, as `nsa-select` takes them.
    pub fn select_config(&self) -> SelectConfig {
        self.nsa.select
    }

    /// Checks every rule the layer relies on; the error names the first offending field
    /// ([`NsaConfig::problems`] lists all of them).
    pub fn validate(&self) -> Result<(), AttnError> {
        match self.problems().into_iter().next() {
            Some(ConfigProblem { field, reason }) => Err(AttnError::Config { field, reason }),
            None => Ok(()),
        }
    }

    /// Every broken rule: the shape's (`dim`, `heads`, `kv_heads`, `head_dim_k`, `head_dim_v`
    /// positive; `kv_heads` divides `heads`; `head_dim_k` even; `rope_base` finite and > 1),
    /// then [`NsaParams::problems`]. Empty when the layer can be built.
    pub fn problems(&self) -> Vec<ConfigProblem> {
        let mut found = Vec::new();
        let mut bad = |field: &str, reason: String| {
            found.push(ConfigProblem {
                field: field.to_string(),
                reason,
            })
        };
        for (field, value) in [
            ("dim", self.dim),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("head_dim_k", self.head_dim_k),
            ("head_dim_v", self.head_dim_v),
        ] {
            if value <= 0 {
                bad(field, format!("must be positive, got {value}"));
            }
        }
        if self.heads > 0 && self.kv_heads > 0 && self.heads % self.kv_heads != 0 {
            bad(
                "kv_heads",
                format!("must divide heads = {}, got {}", self.heads, self.kv_heads),
            );
        }
        if self.head_dim_k > 0 && self.head_dim_k % 2 != 0 {
            bad(
                "head_dim_k",
                format!("must be even (RoPE rotates pairs), got {}", self.head_dim_k),
            );
        }
        if !(self.rope_base.is_finite() && self.rope_base > 1.0) {
            bad(
                "rope_base",
                format!("must be a finite number > 1, got {}", self.rope_base),
            );
        }
        found.extend(self.nsa.problems());
        found
    }
}

/// One broken configuration rule: which field and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The field: an [`NsaConfig`] shape field (`heads`, …) or `nsa.<key>` for [`NsaParams`]
    /// (`nsa.stride`, …), as a config file names it.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// Errors of `nsa-attn`.
#[derive(Debug, thiserror::Error)]
pub enum AttnError {
    /// A configuration value breaks a rule; `field` is the [`NsaConfig`] field as
    /// [`ConfigProblem::field`] names it (the first of [`NsaConfig::problems`]).
    #[error("invalid NSA config: {field}: {reason}")]
    Config { field: String, reason: String },
    /// An input tensor has the wrong shape.
    #[error("{what}: expected {expected}, got shape {got:?}")]
    Shape {
        what: &'static str,
        expected: String,
        got: Vec<i64>,
    },
    /// An option value is out of range (e.g. a chunk size of 0).
    #[error("invalid option {option}: {reason}")]
    Option {
        option: &'static str,
        reason: String,
    },
    /// Block selection failed.
    #[error("selection: {0}")]
    Select(#[from] SelectError),
    /// The lean path's custom autograd glue failed.
    #[error("lean attention: {0}")]
    Glue(#[from] nsa_sys::autograd::GlueError),
    /// The fused CUDA functions refused an input or failed (`nsa_sys::fused`).
    #[error("fused attention: {0}")]
    Fused(#[from] nsa_sys::fused::FusedError),
    /// libtorch refused an operation.
    #[error("libtorch: {0}")]
    Torch(#[from] TchError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_config_is_valid_and_nests_the_select_lengths() {
        let cfg = NsaConfig::paper(512);
        cfg.validate().unwrap();
        assert_eq!(cfg.heads_per_group(), 16);
        assert_eq!(cfg.select_config(), SelectConfig::paper());
        assert_eq!((cfg.nsa.phi, cfg.nsa.phi_hidden), (Phi::Mlp, 64));
    }

    #[test]
    fn params_serialise_as_one_flat_table() {
        let json = serde_json::to_value(NsaParams::paper()).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        for key in [
            "block_len",
            "stride",
            "select_len",
            "top_n",
            "n_local",
            "window",
            "phi",
            "phi_hidden",
            "cmp_rope",
            "shared_kv",
            "gate_hidden",
        ] {
            assert!(keys.contains(&key), "{key} missing from {keys:?}");
        }
        assert_eq!(keys.len(), 11, "{keys:?}");
        assert_eq!(json["cmp_rope"], "raw");
        let back: NsaParams = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, NsaParams::paper());
        // A table written before cmp_rope existed reads as "raw"; a misspelt value is an error.
        let mut old = json.clone();
        old.as_object_mut().unwrap().remove("cmp_rope");
        assert_eq!(
            serde_json::from_value::<NsaParams>(old).unwrap(),
            NsaParams::paper()
        );
        let mut after = json.clone();
        after["cmp_rope"] = serde_json::json!("compressed");
        let after: NsaParams = serde_json::from_value(after).unwrap();
        assert_eq!(after.cmp_rope, CmpRope::Compressed);
        let mut bad = json.clone();
        bad["cmp_rope"] = serde_json::json!("after");
        let e = serde_json::from_value::<NsaParams>(bad).unwrap_err();
        assert!(e.to_string().contains("compressed"), "{e}");
        let mut extra = json;
        extra["strid"] = serde_json::json!(3);
        let e = serde_json::from_value::<NsaParams>(extra).unwrap_err();
        assert!(e.to_string().contains("strid"), "{e}");
    }

    #[test]
    fn each_broken_rule_names_its_field() {
        let base = NsaConfig::paper(512);
        type Spoil = fn(&mut NsaConfig);
        let cases: [(&str, Spoil); 12] = [
            ("dim", |c| c.dim = 0),
            ("kv_heads", |c| c.kv_heads = -1),
            ("kv_heads", |c| c.kv_heads = 5),
            ("head_dim_v", |c| c.head_dim_v = 0),
            ("head_dim_k", |c| c.head_dim_k = 191),
            ("nsa.stride", |c| c.nsa.select.stride = 5),
            ("nsa.stride", |c| c.nsa.select.select_len = 72 + 4),
            ("nsa.window", |c| c.nsa.window = 0),
            ("nsa.top_n", |c| c.nsa.select.top_n = 2),
            ("nsa.gate_hidden", |c| c.nsa.gate_hidden = 0),
            ("rope_base", |c| c.rope_base = f64::NAN),
            ("nsa.phi_hidden", |c| c.nsa.phi_hidden = 0),
        ];
        for (field, spoil) in cases {
            let mut cfg = base;
            spoil(&mut cfg);
            match cfg.validate() {
                Err(AttnError::Config { field: f, reason }) => {
                    assert_eq!(f, field, "{reason}");
                    assert!(!reason.is_empty());
                }
                other => panic!("{cfg:?}: expected an error on {field}, got {other:?}"),
            }
        }
        // phi_hidden is read only by the MLP variants.
        let mean = NsaParams {
            phi: Phi::Mean,
            phi_hidden: 0,
            ..NsaParams::paper()
        };
        assert_eq!(mean.problems(), []);
        let mean_mlp = NsaParams {
            phi: Phi::MeanMlp,
            ..mean
        };
        let problems = mean_mlp.problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].field, "nsa.phi_hidden");
        assert!(
            problems[0].reason.contains("with phi = \"mean_mlp\""),
            "{}",
            problems[0].reason
        );
    }

    /// φ's names in a config file, and in `Display`, are the same words.
    #[test]
    fn phi_reads_and_prints_its_config_names() {
        for (phi, name) in [
            (Phi::Mean, "mean"),
            (Phi::Linear, "linear"),
            (Phi::Mlp, "mlp"),
            (Phi::MeanMlp, "mean_mlp"),
        ] {
            assert_eq!(phi.to_string(), name);
            assert_eq!(serde_json::to_value(phi).unwrap(), name);
            let back: Phi = serde_json::from_value(serde_json::json!(name)).unwrap();
            assert_eq!(back, phi);
            assert_eq!(phi.has_mlp(), name.contains("mlp"));
        }
    }

    #[test]
    fn every_broken_rule_is_listed() {
        let mut cfg = NsaConfig::paper(512);
        cfg.heads = 6; // kv_heads = 4 does not divide it
        cfg.nsa.select.stride = 12; // divides neither l = 32 nor l' = 64
        cfg.nsa.window = -1;
        let fields: Vec<String> = cfg.problems().into_iter().map(|p| p.field).collect();
        assert_eq!(
            fields,
            ["kv_heads", "nsa.stride", "nsa.stride", "nsa.window"],
            "{fields:?}"
        );
    }
}
