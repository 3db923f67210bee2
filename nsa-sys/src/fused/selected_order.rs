//! How the selected branch walks its work: the forward's loop order ([`SelectedForward`]) and
//! where the backward computes dQ ([`SelectedDq`]), each with the `Auto` rule that picks it from
//! the shapes.

use std::sync::atomic::{AtomicI64, Ordering};

use super::TOKEN_WARP_MAX_GROUP;

/// How the selected branch's tensor-core forward walks the selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SelectedForward {
    /// Chosen from the shapes ([`SelectedForward::resolve`]): token warps for groups of
    /// [`TOKEN_WARP_MIN_GROUP`] to [`TOKEN_WARP_MAX_GROUP`] heads; key-outer for small groups
    /// (G ≤ [`KEY_OUTER_MAX_GROUP`]) on long sequences (at least [`KEY_OUTER_MIN_BLOCKS`]
    /// selection blocks, or [`KEY_OUTER_MIN_BATCHED_BLOCKS`] in a batch holding
    /// [`KEY_OUTER_MIN_BATCH_BLOCKS`] over its sequences) while one sequence's partial outputs
    /// take at most [`KEY_OUTER_MAX_PARTIAL_BYTES`] (a batch whose partials would exceed it runs
    /// in chunks of sequences: [`set_key_outer_chunk_bytes`]); union tiles otherwise.
    #[default]
    Auto,
    /// Query-outer: a CTA serves 64 / G consecutive tokens and streams the union of their
    /// selected blocks; a warp skips the tiles none of its rows selected, so at G = 16 (a warp
    /// = one token) it computes only its own blocks, while at G = 3 a warp spans six tokens.
    UnionTiles,
    /// Key-outer (Flash Sparse Attention's order): a CTA serves one selected block and the
    /// (token, head) rows that chose it; per-block partial outputs are merged afterwards.
    /// Memory: `B·S·H·n·⌈l'/64⌉·(2·dv + 4)` bytes of partials. bf16 at tensor-core head sizes
    /// only; elsewhere the same as [`SelectedForward::UnionTiles`].
    KeyOuter,
    /// Query-outer, one warp per (token, group): the group's heads are the warp's 16 tensor-core
    /// rows and it streams only its own token's selected keys through private copy stages, with
    /// no barrier across tokens; dQ in the backward the same way. bf16 where [`token_warp_shape`](super::token_warp_shape)
    /// holds; elsewhere the same as [`SelectedForward::UnionTiles`].
    TokenWarps,
}

/// Where the selected branch's backward computes dQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SelectedDq {
    /// Chosen from the shapes ([`SelectedDq::resolve`]): key-outer for groups of at most
    /// [`KEY_OUTER_MAX_GROUP`] heads with `l' ≤ 64` while one sequence's partials take at most
    /// [`DQ_KEY_OUTER_MAX_PARTIAL_BYTES`] (a larger batch runs in chunks of sequences, as the
    /// forward does); query-outer otherwise (and always after a
    /// [`SelectedForward::TokenWarps`] forward).
    #[default]
    Auto,
    /// Its own kernel, query-outer: one warp per token after a token-warp forward, union tiles
    /// otherwise (at small groups a union tile computes every block any of its `64 / G` tokens
    /// selected).
    QueryOuter,
    /// Inside the dK/dV kernel, which already has every (token, block) pair's `dS`: each block's
    /// share of a token's dQ is written as a bf16 partial (its fp32 sum rounded once;
    /// `B·S·H·n·dk·2` bytes, freed when the backward returns) and a second kernel sums a
    /// token's partials in slot order in fp32 (deterministic). bf16 at tensor-core head sizes
    /// with `l' ≤ 64` and a forward other than token warps; elsewhere the same as
    /// [`SelectedDq::QueryOuter`].
    KeyOuter,
}

/// Bound on one sequence's key-outer dQ partials for [`SelectedDq::Auto`] (`S·H·n·dk·2`
/// bytes): 2 GiB.
pub const DQ_KEY_OUTER_MAX_PARTIAL_BYTES: i64 = 2 << 30;

/// One sequence's key-outer forward partials: `S·H·n·⌈l'/64⌉·(2·dv + 4)` bytes (a bf16 output
/// and an fp32 log-sum-exp per (token, head, block chunk)).
pub(crate) fn forward_partial_bytes(s: i64, h: i64, dv: i64, n: i64, block_len: i64) -> i64 {
    s.saturating_mul(h)
        .saturating_mul(n)
        .saturating_mul((block_len + 63) / 64)
        .saturating_mul(2 * dv + 4)
}

/// One sequence's key-outer dQ partials: `S·H·n·dk·2` bytes (bf16 per (token, head, slot)).
pub(crate) fn dq_partial_bytes(s: i64, h: i64, dk: i64, n: i64) -> i64 {
    s.saturating_mul(h)
        .saturating_mul(n)
        .saturating_mul(dk)
        .saturating_mul(2)
}

/// Bound on one key-outer launch's partials (forward or dQ); see [`set_key_outer_chunk_bytes`].
static KEY_OUTER_CHUNK_BYTES: AtomicI64 = AtomicI64::new(KEY_OUTER_MAX_PARTIAL_BYTES);

/// Sets the bound, in bytes, on the partials of one launch of the key-outer forward and of the
/// key-outer dQ ([`KEY_OUTER_MAX_PARTIAL_BYTES`] unless set) and returns the previous one.
///
/// Both hold partials that grow with `B·S` (0.83 GB and 0.81 GB for the `125m` shape at
/// `B·S = 32k`). Where a batch's would exceed the bound, the glue runs the key-outer kernels
/// over chunks of sequences (the most that fit, at least one), each with its own inverse index
/// and partials; the sequences are independent, so the results are those of one launch up to
/// the dK/dV work split, which depends on the chunk's shape (deterministic either way). Values
/// below 1 count as 1 (one sequence per launch): the GPU check uses that to run the chunked
/// path on small shapes.
pub fn set_key_outer_chunk_bytes(bytes: i64) -> i64 {
    KEY_OUTER_CHUNK_BYTES.swap(bytes.max(1), Ordering::Relaxed)
}

/// Sequences per key-outer launch in a batch of `b` whose partials take `per_sequence` bytes a
/// sequence: the most that fit the bound of [`set_key_outer_chunk_bytes`], at least 1.
pub(crate) fn key_outer_batch_chunk(b: i64, per_sequence: i64) -> i64 {
    let bound = KEY_OUTER_CHUNK_BYTES.load(Ordering::Relaxed);
    (bound / per_sequence.max(1)).clamp(1, b.max(1))
}

impl SelectedDq {
    /// The dQ a call with these shapes runs: `Auto` resolved, the others as given. `forward` is
    /// the resolved forward; `q_shape` is `[B, S, H, dk]`, `hkv` key heads, `n` blocks per token,
    /// `block_len` = l'.
    pub fn resolve(
        self,
        forward: SelectedForward,
        q_shape: [i64; 4],
        hkv: i64,
        n: i64,
        block_len: i64,
    ) -> Self {
        match self {
            SelectedDq::Auto => {
                let [_, s, h, dk] = q_shape;
                let partial = dq_partial_bytes(s, h, dk, n);
                let group = if hkv > 0 { h / hkv } else { 0 };
                if forward != SelectedForward::TokenWarps
                    && (1..=KEY_OUTER_MAX_GROUP).contains(&group)
                    && block_len <= 64
                    && partial <= DQ_KEY_OUTER_MAX_PARTIAL_BYTES
                {
                    SelectedDq::KeyOuter
                } else {
                    SelectedDq::QueryOuter
                }
            }
            other => other,
        }
    }
}

/// Largest group (query heads per KV head) that [`SelectedForward::Auto`] runs key-outer: a
/// union tile holds 64 / G tokens, and with small groups a warp's rows span several tokens
/// whose blocks differ, so the union's padding is computed; key-outer reads each block once.
pub const KEY_OUTER_MAX_GROUP: i64 = 8;

/// Fewest selection blocks (`⌈S / l'⌉`) at which [`SelectedForward::Auto`] runs key-outer:
/// with few blocks the tokens of a union tile pick mostly the same ones, and the union's single
/// pass beats key-outer's index, partials and merge (measured in BENCHMARKS.md, "Fused kernels,
/// round 4": at the `125m` shape union tiles win at 8k, key-outer from 16k).
pub const KEY_OUTER_MIN_BLOCKS: i64 = 256;

/// Fewest selection blocks per sequence at which [`SelectedForward::Auto`] runs key-outer when
/// the batch holds at least [`KEY_OUTER_MIN_BATCH_BLOCKS`] blocks over its sequences: key-outer
/// serves one block per CTA, so a short batch leaves the device half empty, while a union
/// tile's cost per token does not fall with the batch. Measured at the `125m` shape (BENCHMARKS.md,
/// round 11): fwd+bwd at 8k, union tiles / key-outer 2.47 / 3.35 ms at batch 1, 3.66 / 3.67 at
/// batch 2, 6.37 / 5.76 at batch 4 (the training shape); at 4k union tiles win up to batch 8.
pub const KEY_OUTER_MIN_BATCHED_BLOCKS: i64 = 128;

/// Fewest selection blocks over the batch (`B·⌈S / l'⌉`) at which sequences of
/// [`KEY_OUTER_MIN_BATCHED_BLOCKS`] blocks run key-outer.
pub const KEY_OUTER_MIN_BATCH_BLOCKS: i64 = 512;

/// Smallest group [`SelectedForward::Auto`] runs as token warps: a warp's 16 tensor-core rows
/// are one token's heads, so smaller groups leave rows empty. Measured at G = 16, where token
/// warps beat union tiles from 8k to 64k tokens (BENCHMARKS.md, round 8).
pub const TOKEN_WARP_MIN_GROUP: i64 = 16;

/// Bound on one sequence's key-outer forward partials for [`SelectedForward::Auto`]
/// (`S·H·n·⌈l'/64⌉·(2·dv + 4)` bytes, freed when the forward returns): 2 GiB.
pub const KEY_OUTER_MAX_PARTIAL_BYTES: i64 = 2 << 30;

impl SelectedForward {
    /// The loop order a call with these shapes runs: `Auto` resolved, the others as given.
    /// `q_shape` is `[B, S, H, dk]`; `hkv` key heads, `dv` value width, `n` blocks per token,
    /// `block_len` = l'.
    pub fn resolve(self, q_shape: [i64; 4], hkv: i64, dv: i64, n: i64, block_len: i64) -> Self {
        match self {
            SelectedForward::Auto => {
                let [b, s, h, _] = q_shape;
                let partial = forward_partial_bytes(s, h, dv, n, block_len);
                let blocks = if block_len > 0 {
                    (s + block_len - 1) / block_len
                } else {
                    0
                };
                let group = if hkv > 0 { h / hkv } else { 0 };
                if (TOKEN_WARP_MIN_GROUP..=TOKEN_WARP_MAX_GROUP).contains(&group) {
                    SelectedForward::TokenWarps
                } else if (1..=KEY_OUTER_MAX_GROUP).contains(&group)
                    && (blocks >= KEY_OUTER_MIN_BLOCKS
                        || (blocks >= KEY_OUTER_MIN_BATCHED_BLOCKS
                            && b.saturating_mul(blocks) >= KEY_OUTER_MIN_BATCH_BLOCKS))
                    && partial <= KEY_OUTER_MAX_PARTIAL_BYTES
                {
                    SelectedForward::KeyOuter
                } else {
                    SelectedForward::UnionTiles
                }
            }
            other => other,
        }
    }
}
