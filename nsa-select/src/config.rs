//! [`SelectConfig`]: the NSA lengths that selection depends on, the one place their rules are
//! checked, and the arithmetic derived from them (how many compressed tokens and selection blocks
//! a sequence has, which compressed tokens a query sees (Eq. 7), and the overlap weights of
//! Eq. 9).
use serde::{Deserialize, Serialize};

use crate::SelectError;

/// Block lengths and counts of NSA's compressed and selected branches.
///
/// - `block_len` (l): a compressed token summarises `l` consecutive tokens;
/// - `stride` (d): compressed token `i` covers tokens `[i·d, i·d + l)`;
/// - `select_len` (l'): selection block `j` covers tokens `[j·l', (j+1)·l')`;
/// - `top_n` (n): blocks selected per (batch, query, group), forced ones included;
/// - `n_local`: the current block and the `n_local − 1` blocks before it are always selected
///   (together with block 0).
///
/// The fields are public so that callers can read them; every function of this crate checks
/// them again with [`SelectConfig::validate`], so a hand-built invalid value is reported as a
/// [`SelectError`], never acted upon.
///
/// Serialises with serde under the field names (`block_len`, `stride`, `select_len`, `top_n`,
/// `n_local`); `nsa-attn`'s `NsaParams` flattens it into its own section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SelectConfig {
    /// l: tokens per compressed token.
    pub block_len: i64,
    /// d: distance between the starts of consecutive compressed tokens.
    pub stride: i64,
    /// l': tokens per selection block.
    pub select_len: i64,
    /// n: selected blocks per (batch, query, group), forced blocks included.
    pub top_n: i64,
    /// Local blocks that are always selected: the current one and the `n_local − 1` before it.
    pub n_local: i64,
}

impl Default for SelectConfig {
    /// The paper's configuration, [`SelectConfig::paper`].
    fn default() -> Self {
        Self::paper()
    }
}

impl SelectConfig {
    /// Checks and builds a configuration; see [`SelectConfig::validate`] for the rules.
    pub fn new(
        block_len: i64,
        stride: i64,
        select_len: i64,
        top_n: i64,
        n_local: i64,
    ) -> Result<Self, SelectError> {
        let cfg = Self {
            block_len,
            stride,
            select_len,
            top_n,
            n_local,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The NSA paper's values: l = 32, d = 16, l' = 64, n = 16, n_local = 2.
    pub const fn paper() -> Self {
        Self {
            block_len: 32,
            stride: 16,
            select_len: 64,
            top_n: 16,
            n_local: 2,
        }
    }

    /// Checks the rules every function relies on: all values positive, `d | l` (hence
    /// `l ≥ d`), `d | l'` (the overlap form of Eq. 9 needs both), `n_local ≥ 1` and
    /// `top_n ≥ n_local + 1` (block 0 and the `n_local` local blocks must fit into `n`).
    /// Returns the first broken rule; [`SelectConfig::problems`] lists all of them.
    pub fn validate(&self) -> Result<(), SelectError> {
        match self.problems().into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Every broken rule of [`SelectConfig::validate`], in the order it checks them (empty when
    /// the configuration is valid). A rule that compares two values is checked only when both
    /// are positive, so one bad value is reported once. [`SelectError::field`] names the field
    /// each error is about. The single place these rules are written: `nsa-attn` and
    /// `nsa-model` report them through this list.
    pub fn problems(&self) -> Vec<SelectError> {
        let mut found = Vec::new();
        for (name, value) in [
            ("block_len (l)", self.block_len),
            ("stride (d)", self.stride),
            ("select_len (l')", self.select_len),
            ("top_n (n)", self.top_n),
            ("n_local", self.n_local),
        ] {
            if value <= 0 {
                found.push(SelectError::NonPositive { name, value });
            }
        }
        if self.stride > 0 {
            for (name, value) in [
                ("block_len (l)", self.block_len),
                ("select_len (l')", self.select_len),
            ] {
                if value > 0 && value % self.stride != 0 {
                    found.push(SelectError::StrideDoesNotDivide {
                        stride: self.stride,
                        name,
                        value,
                    });
                }
            }
        }
        if self.top_n > 0 && self.n_local > 0 && self.top_n < self.n_local + 1 {
            found.push(SelectError::ForcedBlocksDoNotFit {
                top_n: self.top_n,
                n_local: self.n_local,
            });
        }
        found
    }

    /// Nc: compressed tokens of a sequence of `seq_len` tokens, `0` if `seq_len < l`, else
    /// `(seq_len − l)/d + 1` (only complete blocks are compressed; Eq. 7's
    /// `0 ≤ i ≤ ⌊(t − l)/d⌋`).
    pub fn num_compressed(&self, seq_len: i64) -> i64 {
        if seq_len < self.block_len {
            0
        } else {
            (seq_len - self.block_len) / self.stride + 1
        }
    }

    /// Nb: selection blocks of a sequence of `seq_len` tokens, `ceil(seq_len / l')` (the last
    /// one may be partial).
    pub fn num_select_blocks(&self, seq_len: i64) -> i64 {
        (seq_len.max(0) + self.select_len - 1) / self.select_len
    }

    /// Compressed tokens visible to query `t` (Eq. 7): those with `i·d + l − 1 ≤ t`, i.e.
    /// `num_compressed(t + 1)`; they are tokens `0 .. num_visible_compressed(t)`. This is the
    /// causal rule of the compressed branch; [`crate::visible_compressed_counts`] is the same
    /// rule for a range of queries as a tensor, and every path of `nsa-attn` reads one of them.
    pub fn num_visible_compressed(&self, t: i64) -> i64 {
        self.num_compressed(t + 1)
    }

    /// The current selection block of query `t`, `⌊t / l'⌋`; candidates are blocks `0..=`it.
    pub fn current_block(&self, t: i64) -> i64 {
        t / self.select_len
    }

    /// The overlap mapping (Eq. 9) as taps: selection block `j` receives compressed tokens
    /// `i = j·a − b + 1 + k` for `k` in `0..weights.len()` (with `a = l'/d`, `b = l/d`), with
    /// weight `weights[k] = |[i·d, i·d + l) ∩ [j·l', (j+1)·l')| / d`, an integer that depends on
    /// `k` only. For (l, d, l') = (32, 16, 64) the weights are `[1, 2, 2, 2, 1]` on
    /// `i = 4j − 1 … 4j + 3`; for `l = d = l'` the mapping is the identity (`[1]` on `i = j`).
    pub fn overlap_taps(&self) -> OverlapTaps {
        let a = self.select_len / self.stride;
        let b = self.block_len / self.stride;
        // In units of d and relative to the block start j·l', compressed token
        // i = j·a − b + 1 + k covers [k − b + 1, k + 1) and the block covers [0, a); the
        // length of their intersection is the weight. Taps outside 0..a+b−1 never overlap.
        let weights = (0..a + b - 1)
            .map(|k| (k + 1).min(a) - (k - b + 1).max(0))
            .collect();
        OverlapTaps {
            first_offset: 1 - b,
            step: a,
            weights,
        }
    }
}

/// The overlap mapping (Eq. 9) written as a strided window over compressed tokens; see
/// [`SelectConfig::overlap_taps`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlapTaps {
    /// `1 − l/d`: offset of the first compressed token of block 0 (negative when `l > d`).
    pub first_offset: i64,
    /// `l'/d`: how far the window moves from one selection block to the next.
    pub step: i64,
    /// Integer weights, one per tap, all ≥ 1.
    pub weights: Vec<i64>,
}

impl OverlapTaps {
    /// Compressed token feeding tap `k` of selection block `j` (may be out of `0..Nc`).
    pub fn compressed_index(&self, block: i64, tap: i64) -> i64 {
        block * self.step + self.first_offset + tap
    }
}

/// Overlap of the token intervals `[a0, a1)` and `[b0, b1)`, the literal form of Eq. 9's
/// numerator; the reference path uses it instead of [`OverlapTaps`] so the two are checked
/// against each other.
pub(crate) fn interval_overlap(a0: i64, a1: i64, b0: i64, b1: i64) -> i64 {
    (a1.min(b1) - a0.max(b0)).max(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_taps_are_1_2_2_2_1() {
        let taps = SelectConfig::paper().overlap_taps();
        assert_eq!(taps.weights, vec![1, 2, 2, 2, 1]);
        assert_eq!(taps.step, 4);
        assert_eq!(taps.compressed_index(5, 0), 19); // 4j − 1
        assert_eq!(taps.compressed_index(5, 4), 23); // 4j + 3
    }

    #[test]
    fn identity_when_l_equals_d_equals_l_prime() {
        for len in [1, 4, 64] {
            let cfg = SelectConfig::new(len, len, len, 3, 1).unwrap();
            let taps = cfg.overlap_taps();
            assert_eq!(taps.weights, vec![1]);
            assert_eq!(taps.compressed_index(7, 0), 7);
        }
    }

    #[test]
    fn taps_match_literal_overlap_for_many_configs() {
        for d in 1..=4 {
            for b in 1..=5 {
                for a in 1..=5 {
                    let cfg = SelectConfig::new(b * d, d, a * d, 3, 1).unwrap();
                    let taps = cfg.overlap_taps();
                    let j = 3;
                    let (lo, hi) = (j * cfg.select_len, (j + 1) * cfg.select_len);
                    // Every compressed token with a non-zero overlap is a tap, with its weight.
                    for i in -10..40 {
                        let overlap = interval_overlap(i * d, i * d + cfg.block_len, lo, hi);
                        let k = i - taps.compressed_index(j, 0);
                        let tap_weight = usize::try_from(k)
                            .ok()
                            .and_then(|k| taps.weights.get(k))
                            .copied()
                            .unwrap_or(0);
                        assert_eq!(overlap, tap_weight * d, "cfg {cfg:?} i {i}");
                    }
                }
            }
        }
    }

    #[test]
    fn invalid_configs_are_typed_errors() {
        assert!(matches!(
            SelectConfig::new(32, 16, 64, 16, 0),
            Err(SelectError::NonPositive {
                name: "n_local",
                value: 0
            })
        ));
        assert!(matches!(
            SelectConfig::new(32, 12, 48, 16, 2),
            Err(SelectError::StrideDoesNotDivide {
                stride: 12,
                value: 32,
                ..
            })
        ));
        assert!(matches!(
            SelectConfig::new(32, 16, 40, 16, 2),
            Err(SelectError::StrideDoesNotDivide {
                stride: 16,
                value: 40,
                ..
            })
        ));
        assert!(matches!(
            SelectConfig::new(8, 16, 64, 16, 2),
            Err(SelectError::StrideDoesNotDivide {
                stride: 16,
                value: 8,
                ..
            })
        ));
        assert!(matches!(
            SelectConfig::new(32, 16, 64, 2, 2),
            Err(SelectError::ForcedBlocksDoNotFit {
                top_n: 2,
                n_local: 2
            })
        ));
        let msg = SelectConfig::new(32, 12, 48, 16, 2)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("12") && msg.contains("32"), "{msg}");
    }

    #[test]
    fn counts() {
        let cfg = SelectConfig::paper();
        assert_eq!(cfg.num_compressed(31), 0);
        assert_eq!(cfg.num_compressed(32), 1);
        assert_eq!(cfg.num_compressed(47), 1);
        assert_eq!(cfg.num_compressed(48), 2);
        assert_eq!(cfg.num_compressed(65536), 4095);
        assert_eq!(cfg.num_select_blocks(65536), 1024);
        assert_eq!(cfg.num_select_blocks(65), 2);
        assert_eq!(cfg.num_visible_compressed(31), 1);
        assert_eq!(cfg.num_visible_compressed(30), 0);
    }
}
