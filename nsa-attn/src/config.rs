//! [`NsaConfig`]: the shape of one NSA attention layer, and [`AttnError`].
use nsa_select::{SelectConfig, SelectError};
use tch::TchError;

/// The compression function φ that maps a block of `l` keys (or values), each plus a learned
/// intra-block position embedding, to one compressed key (value).
///
/// Only the MLP variant lets a key-side position embedding change anything: mean and linear φ
/// would turn it into the same shift of every compressed key, which cancels in the softmax.
/// So `cmp.pos_k` exists with the MLP φ only; `cmp.pos_v` always (with mean or linear φ it acts
/// as a bias of the compressed values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phi {
    /// Average over the block.
    Mean,
    /// One linear map from the flattened block `[l · d]` to `[d]`, shared by the key heads (with
    /// a bias for values; none for keys, where it would cancel in the softmax).
    Linear,
    /// Two linear maps with a GELU between them: `[l · d] → [hidden] → [d]`.
    Mlp {
        /// Width of the hidden layer.
        hidden: i64,
    },
}

/// Configuration of one [`crate::NsaAttention`] layer.
///
/// Letters are the paper's: `H` query heads in `Hkv` key/value groups, key dim `dk`, value dim
/// `dv` (may differ), compression block `l` with stride `d`, selection block `l'`, `n` selected
/// blocks of which `n_local` are local, window `w`.
#[derive(Debug, Clone, Copy, PartialEq)]
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
    /// l: tokens per compressed token.
    pub block_len: i64,
    /// d: stride between compressed tokens (`d | l`, `d | l'`).
    pub stride: i64,
    /// l': tokens per selection block.
    pub select_len: i64,
    /// n: selected blocks per query and group (forced blocks included).
    pub top_n: i64,
    /// Local blocks always selected: the current one and the `n_local − 1` before it.
    pub n_local: i64,
    /// w: sliding-window length (keys `t − w + 1 ..= t`).
    pub window: i64,
    /// φ, the compression function.
    pub phi: Phi,
    /// One K/V projection pair for all three branches (`kv.wk`, `kv.wv`) instead of one pair
    /// per branch (`cmp.*`, `slc.*`, `win.*`, the paper's default).
    pub shared_kv: bool,
    /// Hidden width of the gate MLP `dim → gate_hidden → 3·H`.
    pub gate_hidden: i64,
    /// RoPE base θ.
    pub rope_base: f64,
}

impl NsaConfig {
    /// The paper's attention shape (H = 64, Hkv = 4, dk = 192, dv = 128, l = 32, d = 16,
    /// l' = 64, n = 16, w = 512) for a model of width `dim`, with the MLP φ.
    pub fn paper(dim: i64) -> Self {
        Self {
            dim,
            heads: 64,
            kv_heads: 4,
            head_dim_k: 192,
            head_dim_v: 128,
            block_len: 32,
            stride: 16,
            select_len: 64,
            top_n: 16,
            n_local: 2,
            window: 512,
            phi: Phi::Mlp { hidden: 256 },
            shared_kv: false,
            gate_hidden: 64,
            rope_base: 10_000.0,
        }
    }

    /// h: query heads per key/value group.
    pub fn heads_per_group(&self) -> i64 {
        self.heads / self.kv_heads
    }

    /// The lengths selection depends on, as `nsa-select` takes them.
    pub fn select_config(&self) -> SelectConfig {
        SelectConfig {
            block_len: self.block_len,
            stride: self.stride,
            select_len: self.select_len,
            top_n: self.top_n,
            n_local: self.n_local,
        }
    }

    /// Checks every rule the layer relies on; the error names the offending field.
    pub fn validate(&self) -> Result<(), AttnError> {
        let bad = |field: &'static str, reason: String| Err(AttnError::Config { field, reason });
        for (field, value) in [
            ("dim", self.dim),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("head_dim_k", self.head_dim_k),
            ("head_dim_v", self.head_dim_v),
            ("block_len", self.block_len),
            ("stride", self.stride),
            ("select_len", self.select_len),
            ("top_n", self.top_n),
            ("n_local", self.n_local),
            ("window", self.window),
            ("gate_hidden", self.gate_hidden),
        ] {
            if value <= 0 {
                return bad(field, format!("must be positive, got {value}"));
            }
        }
        if self.heads % self.kv_heads != 0 {
            return bad(
                "heads",
                format!(
                    "H = {} is not divisible by kv_heads = {}",
                    self.heads, self.kv_heads
                ),
            );
        }
        if self.head_dim_k % 2 != 0 {
            return bad(
                "head_dim_k",
                format!("must be even for RoPE, got {}", self.head_dim_k),
            );
        }
        if self.block_len % self.stride != 0 {
            return bad(
                "stride",
                format!(
                    "d = {} must divide block_len l = {}",
                    self.stride, self.block_len
                ),
            );
        }
        if self.select_len % self.stride != 0 {
            return bad(
                "stride",
                format!(
                    "d = {} must divide select_len l' = {}",
                    self.stride, self.select_len
                ),
            );
        }
        if self.top_n < self.n_local + 1 {
            return bad(
                "top_n",
                format!(
                    "n = {} must be at least n_local + 1 = {} (block 0 and the local blocks are forced)",
                    self.top_n,
                    self.n_local + 1
                ),
            );
        }
        if !(self.rope_base.is_finite() && self.rope_base > 1.0) {
            return bad(
                "rope_base",
                format!("must be a finite number > 1, got {}", self.rope_base),
            );
        }
        if let Phi::Mlp { hidden } = self.phi {
            if hidden <= 0 {
                return bad(
                    "phi",
                    format!("MLP hidden width must be positive, got {hidden}"),
                );
            }
        }
        // Anything nsa-select checks beyond the rules above is still reported.
        self.select_config()
            .validate()
            .map_err(|e| AttnError::Config {
                field: "select_config",
                reason: e.to_string(),
            })
    }
}

/// Errors of `nsa-attn`.
#[derive(Debug, thiserror::Error)]
pub enum AttnError {
    /// A configuration value breaks a rule; `field` is the [`NsaConfig`] field.
    #[error("invalid NSA config: {field}: {reason}")]
    Config { field: &'static str, reason: String },
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
    fn paper_config_is_valid_and_mirrors_select_lengths() {
        let cfg = NsaConfig::paper(512);
        cfg.validate().unwrap();
        assert_eq!(cfg.heads_per_group(), 16);
        let sel = cfg.select_config();
        assert_eq!(
            (
                sel.block_len,
                sel.stride,
                sel.select_len,
                sel.top_n,
                sel.n_local
            ),
            (32, 16, 64, 16, 2)
        );
    }

    #[test]
    fn each_broken_rule_names_its_field() {
        let base = NsaConfig::paper(512);
        let cases = [
            ("dim", NsaConfig { dim: 0, ..base }),
            (
                "kv_heads",
                NsaConfig {
                    kv_heads: -1,
                    ..base
                },
            ),
            (
                "heads",
                NsaConfig {
                    kv_heads: 5,
                    ..base
                },
            ),
            (
                "head_dim_v",
                NsaConfig {
                    head_dim_v: 0,
                    ..base
                },
            ),
            (
                "head_dim_k",
                NsaConfig {
                    head_dim_k: 191,
                    ..base
                },
            ),
            ("stride", NsaConfig { stride: 5, ..base }),
            (
                "stride",
                NsaConfig {
                    select_len: 72 + 4,
                    ..base
                },
            ),
            ("window", NsaConfig { window: 0, ..base }),
            ("top_n", NsaConfig { top_n: 2, ..base }),
            (
                "gate_hidden",
                NsaConfig {
                    gate_hidden: 0,
                    ..base
                },
            ),
            (
                "rope_base",
                NsaConfig {
                    rope_base: f64::NAN,
                    ..base
                },
            ),
            (
                "phi",
                NsaConfig {
                    phi: Phi::Mlp { hidden: 0 },
                    ..base
                },
            ),
        ];
        for (field, cfg) in cases {
            match cfg.validate() {
                Err(AttnError::Config { field: f, reason }) => {
                    assert_eq!(f, field, "{reason}");
                    assert!(!reason.is_empty());
                }
                other => panic!("{cfg:?}: expected an error on {field}, got {other:?}"),
            }
        }
    }
}
