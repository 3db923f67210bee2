//! # nsa-select: which key blocks each query reads in Native Sparse Attention
//!
//! NSA's selected-attention branch lets query `t` attend only `n` blocks of `l'` keys. Which
//! blocks is decided from the compressed branch's attention probabilities. This crate does that
//! decision, from probabilities to token ranges, twice: once as plain Rust loops
//! ([`reference`](mod@reference)) and once as libtorch tensor ops that run where the data lives
//! ([`vectorized`], CPU or CUDA). The two give identical results on every input; the tests
//! check it on random inputs, and [`SelectImpl`] picks one at run time.
//!
//! ## The steps
//!
//! 1. [`compressed_probs`]: `p_cmp = softmax(q·k̃ / √dk)` (Eq. 8) over the compressed keys a
//!    query may see (compressed token `i` covers tokens `[i·d, i·d + l)` and is visible to query
//!    `t` iff `i·d + l − 1 ≤ t`, Eq. 7: [`SelectConfig::num_visible_compressed`],
//!    [`visible_compressed`]). The attention layer computes the same probabilities for its
//!    compressed branch and may pass its own instead.
//! 2. [`block_scores`]: the probabilities of the `h` heads of each GQA group are added
//!    (Eq. 10), then mapped onto selection blocks (block `j` covers `[j·l', (j+1)·l')`) with the
//!    overlap form of Eq. 9: `score[j] = Σ_i p[i] · |[i·d, i·d + l) ∩ [j·l', (j+1)·l')| / d`.
//!    For the paper's (l, d, l') = (32, 16, 64) these weights are `[1, 2, 2, 2, 1]` on
//!    compressed tokens `4j − 1 … 4j + 3` ([`SelectConfig::overlap_taps`]).
//! 3. [`select_blocks`] (Eq. 11): per (batch, query, group) the candidates are the blocks that
//!    have started, `j·l' ≤ t`. Block 0 and the `n_local` newest candidates (the current block
//!    `⌊t/l'⌋` and the `n_local − 1` before it) are always taken and count toward `n`; the rest
//!    of the `n` are the highest scores. Scores are compared after −0.0 → +0.0 in
//!    `f32::total_cmp` order; equal scores go to the lower block index. With at most `n`
//!    candidates all are taken. Output: the chosen ids sorted ascending, padded with −1.
//! 4. [`ranges_from_blocks`]: chosen blocks → merged half-open token ranges. Ids are sorted and
//!    deduplicated (padding and blocks that start after `t` are dropped), adjacent blocks are
//!    merged, each range `[start, end)` is clamped to `end ≤ t + 1`, and unused slots hold the
//!    empty range `(0, 0)`; a count of valid ranges comes with each row.
//!
//! [`select_ranges`] runs 2–4 on one chunk of query rows; [`select_chunked`] and
//! [`select_for_sequence`] run them over a whole sequence, chunk by chunk
//! ([`select_blocks_chunked`]: steps 2–3 only). Selection is
//! discrete: nothing here is differentiable, and no gradient flows through it.
//!
//! ## Exactness
//!
//! The [`reference`](mod@reference) and [`vectorized`] paths agree bit for bit, on any
//! device, not only up to rounding:
//! - block scores are a fixed sequence of elementwise f32 operations in the same order in both
//!   (heads added one after the other, then the overlap taps in ascending compressed-token
//!   order, each an exact integer weight times a group sum), never a reduction kernel whose
//!   summation order is unspecified;
//! - the top-n choice compares unique integer keys built from the scores' bits (the order of
//!   `f32::total_cmp` with −0.0 = +0.0, then the block index), so no sorting kernel can break
//!   a tie its own way;
//! - ranges are integer arithmetic.
//!
//! The one exception is NaN *probabilities*: CUDA arithmetic returns a canonical NaN where the
//! CPU keeps the payload and sign, so a NaN block score may rank differently on the two
//! devices (NaN *scores* given to [`select_blocks`] are ranked identically everywhere).
//!
//! ## Layouts
//!
//! Every function works on a *chunk* of query rows: row `r` of a `T`-row chunk is the query at
//! absolute position `t = t0 + r`, so the attention layer can call the functions chunk by chunk.
//! `B` batch, `T` query rows, `H` query heads, `Hkv` key/value heads, `h = H / Hkv` heads per
//! group, `G = H / h` groups, `dk` key dim, `Nc` compressed tokens, `Nb` selection blocks, `n`
//! selected blocks, `m` block ids per row. Heads are grouped contiguously: head `hh` belongs to
//! group `hh / h`.
//!
//! | tensor | shape | dtype |
//! | --- | --- | --- |
//! | `q` | `[B, T, H, dk]` | floating |
//! | `k_cmp` | `[B, Nc, Hkv, dk]` | floating |
//! | `p_cmp` | `[B, T, H, Nc]` | floating (computed in f32) |
//! | block scores | `[B, T, G, Nb]` | f32 |
//! | block ids | `[B, T, G, n]` (or `m`) | i64, sorted, −1 padding |
//! | ranges | `[B, T, G, n, 2]` (or `m`) | i64 `[start, end)`, `(0, 0)` padding |
//! | counts | `[B, T, G]` | i64 |
//!
//! Counts for a sequence of `S` tokens: `Nc = 0` if `S < l` else `(S − l)/d + 1`
//! ([`SelectConfig::num_compressed`]); `Nb = ceil(S / l')` ([`SelectConfig::num_select_blocks`]).
//! A chunk needs only the compressed tokens and blocks its last row can see:
//! `Nc' = num_compressed(t0 + T)` and `Nb' = num_select_blocks(t0 + T)`; [`block_scores`] treats
//! compressed tokens past the width of `p_cmp` as zero, and [`select_blocks`] needs `Nb ≥ Nb'`.
//!
//! ## Memory
//!
//! Nothing of size `[S, S]` or `[S, H, Nc]` is allocated for a whole sequence. The drivers
//! ([`select_chunked`], [`select_for_sequence`]) score and select `chunk` query rows at a time
//! ([`DEFAULT_CHUNK`] by default), and a chunk ending at `t1` only touches the
//! `Nc' = num_compressed(t1)` compressed tokens and `Nb' = num_select_blocks(t1)` blocks its
//! rows can see. With `R = B·chunk·G` (batch, query, group) rows per chunk, the vectorized
//! path's peak extra memory, besides the caller's `p_cmp` chunk, is about
//!
//! ```text
//! during the chunk loop:  max(4·Nc' + 8·Nb', 16·Nb')·R + 64·n·R + 8·n·B·S·G   bytes
//! at the end (ranges):    110·n·B·S·G                                       bytes
//! ```
//!
//! - `4·Nc'·R`: the group sums (only when `h > 1`; with `h = 1` they are a view of `p_cmp`);
//! - `8·Nb'·R`: block scores and one tap term of the overlap mapping;
//! - `16·Nb'·R`: block scores, their order-preserving `i32` keys and the `i64` ordering keys
//!   while selecting; `64·n·R`: top-n indices, their sort and masks;
//! - `8·n·B·S·G`: the whole-sequence block ids the chunks are copied into;
//! - `110·n·B·S·G`: [`ranges_from_blocks`] runs once over the whole sequence (one call instead
//!   of ~40 small kernel launches per chunk); its sorts, flags, slots and buffers plus the
//!   final outputs `B·S·G·(24·n + 8)` bytes (ids, ranges, counts).
//!
//! `p_cmp` chunks that are not f32 are converted (a copy). [`select_for_sequence`] also holds
//! two `[B, chunk, H, Nc']` f32 tensors while [`compressed_probs`] computes a chunk (logits and
//! probabilities, 8.6 GB at H = 64, Nc' = 4095 and chunk = 4096): with many heads, give it a
//! smaller chunk.
//! [`pipeline_peak_bytes`] evaluates the formula. Example, the paper's shape at S = 64k
//! (B = 1, G = 4, H = 64, n = 16, Nc = 4095, Nb = 1024) with the default chunk of 4096 rows:
//! about 0.45 GB for the pipeline, plus the caller's all-head `p_cmp` chunk of 4.3 GB
//! (0.27 GB if it hands over group sums, `h = 1`); all-head `p_cmp` for the whole sequence
//! would be 68 GB. The reference path copies each chunk to the host and allocates the same
//! outputs there.
//!
//! ## Quick start
//!
//! Add `nsa-select` and `tch` to your crate. The crate itself never touches CUDA; if your
//! tensors live on a GPU, call `nsa_sys::cuda::load_backend()` before any other libtorch call
//! (a CUDA query made earlier makes ATen remember "no CUDA" for the whole process).
//! `examples/select_blocks.rs` runs the whole pipeline on random queries and prints what each
//! query reads (`cargo run -p nsa-select --example select_blocks`).
//!
//! (`no_run` because doctest binaries are linked outside `target/` and cannot find libtorch
//! through the workspace's rpath; the same code runs as the `crate_docs_example` test.)
//!
//! ```no_run
//! use nsa_select::{select_ranges, SelectConfig, SelectImpl};
//! use tch::{Device, Kind, Tensor};
//!
//! # fn main() -> Result<(), nsa_select::SelectError> {
//! // l = 4, d = 2, l' = 4, n = 3, n_local = 1: block 0, the current block and one free choice.
//! let cfg = SelectConfig::new(4, 2, 4, 3, 1)?;
//! let (t0, rows, heads, heads_per_group) = (16, 4, 2, 2); // one group of two heads
//! let nc = cfg.num_compressed(t0 + rows);
//! let nb = cfg.num_select_blocks(t0 + rows);
//! let p_cmp = Tensor::f_rand([1, rows, heads, nc], (Kind::Float, Device::Cpu))?;
//! let sel = select_ranges(&p_cmp, t0, heads_per_group, nb, &cfg, SelectImpl::Vectorized)?;
//! assert_eq!(sel.blocks.size(), [1, rows, 1, 3]);
//! assert_eq!(sel.ranges.size(), [1, rows, 1, 3, 2]);
//! // Block 0 and the current block 4 (t = 16..19) are always there.
//! let first_row = Vec::<i64>::try_from(sel.blocks.f_flatten(0, -1)?.f_narrow(0, 0, 3)?)?;
//! assert_eq!((first_row[0], first_row[2]), (0, 4));
//! let same = select_ranges(&p_cmp, t0, heads_per_group, nb, &cfg, SelectImpl::Reference)?;
//! assert!(same.blocks.equal(&sel.blocks) && same.ranges.equal(&sel.ranges));
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![deny(rustdoc::broken_intra_doc_links)]

mod check;
mod config;
mod error;
pub mod reference;
pub mod vectorized;

use tch::{Kind, Tensor};

pub use config::{OverlapTaps, SelectConfig};
pub use error::SelectError;

/// Query rows per chunk for [`select_chunked`] when the caller has no better value.
///
/// At long sequences a chunk of 4096 rows carries millions of (row, block) elements, which
/// amortises the ~50 kernel launches the vectorized path issues per chunk on a GPU, while at
/// the paper's shape and S = 64k the pipeline's own working set stays near 0.45 GB (see the
/// crate docs). `nsa-train bench select` times 1024, 4096 and 16384 on the GPU.
pub const DEFAULT_CHUNK: i64 = 4096;

/// Which implementation of the selection steps to run. Serialises as `"reference"` or
/// `"vectorized"`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum SelectImpl {
    /// [`reference`](mod@reference): host loops, obviously correct, slow.
    Reference,
    /// [`vectorized`]: tensor ops on the input's device.
    #[default]
    Vectorized,
}

/// Merged token ranges of the selected blocks.
#[derive(Debug)]
pub struct Ranges {
    /// `[B, T, G, m, 2]` i64: `[start, end)` per range, sorted, disjoint and non-adjacent, with
    /// `end ≤ t + 1`; slots `counts..m` hold `(0, 0)`.
    pub ranges: Tensor,
    /// `[B, T, G]` i64: the number of valid ranges in each row.
    pub counts: Tensor,
}

/// The result of the whole selection pipeline for some query rows.
#[derive(Debug)]
pub struct Selection {
    /// `[B, T, G, n]` i64: selected block ids, ascending, padded with −1.
    pub blocks: Tensor,
    /// `[B, T, G, n, 2]` i64: the blocks as merged `[start, end)` token ranges, `(0, 0)` padded.
    pub ranges: Tensor,
    /// `[B, T, G]` i64: valid ranges per row.
    pub counts: Tensor,
}

/// How many compressed tokens each query of a chunk sees (Eq. 7): int64 `[T]` on `device`,
/// entry `r` = [`SelectConfig::num_visible_compressed`]`(t0 + r)`, i.e. the query at `t` sees
/// compressed tokens `0 .. count` (those with `i·d + l − 1 ≤ t`). Built on the host from that
/// one scalar rule, then copied to `device`.
pub fn visible_compressed_counts(
    t0: i64,
    rows: i64,
    cfg: &SelectConfig,
    device: tch::Device,
) -> Result<Tensor, SelectError> {
    if t0 < 0 {
        return Err(SelectError::NegativeStart { t0 });
    }
    let counts: Vec<i64> = (t0..t0 + rows.max(0))
        .map(|t| cfg.num_visible_compressed(t))
        .collect();
    Ok(Tensor::f_from_slice(&counts)?.f_to_device(device)?)
}

/// Which compressed tokens each query of a chunk sees (Eq. 7), as a bool mask `[T, Nc]` on
/// `device`: `mask[r, i]` iff `i < `[`SelectConfig::num_visible_compressed`]`(t0 + r)`, i.e.
/// `i·d + l − 1 ≤ t`. The compressed branch of every `nsa-attn` path and [`compressed_probs`]
/// use this mask.
pub fn visible_compressed(
    t0: i64,
    rows: i64,
    num_cmp: i64,
    cfg: &SelectConfig,
    device: tch::Device,
) -> Result<Tensor, SelectError> {
    let counts = visible_compressed_counts(t0, rows, cfg, device)?.f_view([rows.max(0), 1])?;
    Ok(Tensor::f_arange(num_cmp, (Kind::Int64, device))?
        .f_view([1, num_cmp])?
        .f_lt_tensor(&counts)?)
}

/// Compressed-attention probabilities of a chunk of queries, `p_cmp` (Eq. 8).
///
/// - `q`: `[B, T, H, dk]`, the queries at positions `t0 .. t0 + T`;
/// - `k_cmp`: `[B, Nc, Hkv, dk]`, compressed keys (token `i` covers `[i·d, i·d + l)`);
/// - returns `[B, T, H, Nc]` f32: `softmax_i(q·k̃_i / √dk)` over the visible `i`
///   (`i·d + l − 1 ≤ t`), 0 elsewhere; rows with no visible key are all zeros. Query head `hh`
///   uses key head `hh / (H / Hkv)`.
///
/// Computed in f32 with libtorch ops on the inputs' device. Extra memory: two
/// `[B, T, H, Nc]` f32 tensors at a time (logits and probabilities).
pub fn compressed_probs(
    q: &Tensor,
    k_cmp: &Tensor,
    t0: i64,
    cfg: &SelectConfig,
) -> Result<Tensor, SelectError> {
    let ([batch, rows, heads, dk], [_, num_cmp, kv_heads, _]) =
        check::attention_inputs(q, k_cmp, t0, cfg)?;
    let device = q.device();
    let heads_per_group = heads / kv_heads;
    // [B, Hkv, T·h, dk] @ [B, Hkv, dk, Nc]: one matmul per key head, no repeated keys.
    let queries = q
        .f_to_kind(Kind::Float)?
        .f_reshape([batch, rows, kv_heads, heads_per_group, dk])?
        .f_permute([0, 2, 1, 3, 4])?
        .f_reshape([batch, kv_heads, rows * heads_per_group, dk])?;
    let keys = k_cmp.f_to_kind(Kind::Float)?.f_permute([0, 2, 3, 1])?;
    let mut logits = queries
        .f_matmul(&keys)?
        .f_div_scalar((dk as f64).sqrt())?
        .f_reshape([batch, kv_heads, rows, heads_per_group, num_cmp])?
        .f_permute([0, 2, 1, 3, 4])?
        .f_reshape([batch, rows, heads, num_cmp])?;
    // hidden[t, i]: compressed token i is not visible to query t (Eq. 7), as [1, T, 1, Nc].
    let hidden = visible_compressed(t0, rows, num_cmp, cfg, device)?
        .f_logical_not()?
        .f_view([1, rows, 1, num_cmp])?;
    let _ = logits.f_masked_fill_(&hidden, f64::NEG_INFINITY)?;
    let mut probs = logits.f_softmax(-1, Kind::Float)?;
    drop(logits);
    // A row without visible keys is softmax of all −inf (NaN); it must read as zeros.
    let _ = probs.f_masked_fill_(&hidden, 0.0)?;
    Ok(probs)
}

/// Block scores of a chunk: group sum over heads (Eq. 10), then the overlap mapping (Eq. 9).
///
/// - `p_cmp`: `[B, T, H, Nc]` compressed-attention probabilities (any floating dtype, computed
///   in f32); compressed tokens `i ≥ Nc` count as zero, so a chunk may pass only the tokens
///   its rows can see;
/// - `heads_per_group`: `h`, dividing `H`; group `g` is heads `g·h .. (g+1)·h` (pass `h = 1`
///   for probabilities that are already summed per group);
/// - `num_blocks`: `Nb ≥ 1`, the selection blocks to score;
/// - returns `[B, T, G, Nb]` f32 with `G = H / h`, on `p_cmp`'s device.
///
/// This is [`vectorized::block_scores`]; [`reference::block_scores`] is its loop twin and
/// gives the same bits.
pub fn block_scores(
    p_cmp: &Tensor,
    heads_per_group: i64,
    num_blocks: i64,
    cfg: &SelectConfig,
) -> Result<Tensor, SelectError> {
    vectorized::block_scores(p_cmp, heads_per_group, num_blocks, cfg)
}

/// Causal top-n block choice for a chunk of queries (Eq. 11).
///
/// - `scores`: `[B, T, G, Nb]` f32 block scores of the queries at `t0 .. t0 + T`; `Nb` must
///   reach the current block of the last row (`Nb ≥ ⌊(t0 + T − 1)/l'⌋ + 1`); blocks past a
///   row's current block are ignored for that row;
/// - returns `[B, T, G, n]` i64: per row the chosen block ids ascending, padded with −1.
///
/// Candidates of query `t`: `j ≤ ⌊t/l'⌋`. Forced: block 0, `⌊t/l'⌋` and the `n_local − 1`
/// blocks before it. The remaining slots take the highest scores (−0.0 equals +0.0; otherwise
/// `f32::total_cmp` order, so NaN with the sign bit clear ranks above +∞), ties to the lower
/// block index. Rows with at most `n` candidates take them all.
pub fn select_blocks(
    scores: &Tensor,
    t0: i64,
    cfg: &SelectConfig,
    imp: SelectImpl,
) -> Result<Tensor, SelectError> {
    match imp {
        SelectImpl::Reference => reference::select_blocks(scores, t0, cfg),
        SelectImpl::Vectorized => vectorized::select_blocks(scores, t0, cfg),
    }
}

/// Block ids → merged token ranges for a chunk of queries: the keys the selected branch reads
/// (Eq. 12).
///
/// - `blocks`: `[B, T, G, m]` i64 block ids of the queries at `t0 .. t0 + T`, in any order,
///   duplicates allowed; negative ids are padding and ids of blocks that start after `t`
///   (`j·l' > t`) are dropped;
/// - returns [`Ranges`]: `ranges` `[B, T, G, m, 2]` i64 with the merged `[start, end)` ranges
///   ascending (`start = first·l'`, `end = min((last + 1)·l', t + 1)` for each run of
///   consecutive ids), `(0, 0)` in unused slots, and `counts` `[B, T, G]` i64.
pub fn ranges_from_blocks(
    blocks: &Tensor,
    t0: i64,
    cfg: &SelectConfig,
    imp: SelectImpl,
) -> Result<Ranges, SelectError> {
    match imp {
        SelectImpl::Reference => reference::ranges_from_blocks(blocks, t0, cfg),
        SelectImpl::Vectorized => vectorized::ranges_from_blocks(blocks, t0, cfg),
    }
}

/// The whole pipeline for a chunk of queries: [`block_scores`] → [`select_blocks`] →
/// [`ranges_from_blocks`].
///
/// - `p_cmp`: `[B, T, H, Nc]` probabilities of the queries at `t0 .. t0 + T`;
/// - `heads_per_group`: `h` (see [`block_scores`]); `num_blocks`: `Nb`, at least
///   `⌊(t0 + T − 1)/l'⌋ + 1` (more is allowed and changes nothing);
/// - returns [`Selection`] with `blocks` `[B, T, G, n]`, `ranges` `[B, T, G, n, 2]`,
///   `counts` `[B, T, G]`, on `p_cmp`'s device.
pub fn select_ranges(
    p_cmp: &Tensor,
    t0: i64,
    heads_per_group: i64,
    num_blocks: i64,
    cfg: &SelectConfig,
    imp: SelectImpl,
) -> Result<Selection, SelectError> {
    match imp {
        SelectImpl::Reference => {
            reference::select_ranges(p_cmp, t0, heads_per_group, num_blocks, cfg)
        }
        SelectImpl::Vectorized => {
            vectorized::select_ranges(p_cmp, t0, heads_per_group, num_blocks, cfg)
        }
    }
}

/// The whole pipeline over a sequence of `seq_len` queries, `chunk` rows at a time.
///
/// `p_cmp_rows(t0, t1)` returns the probabilities of query rows `t0 .. t1` as
/// `[B, t1 − t0, H, Nc']` with at least the `Nc' = num_compressed(t1)` compressed tokens those
/// rows can see (more columns are allowed; fewer, or a `B` or `H` that changes between chunks,
/// is a [`SelectError::Shape`]). Each chunk is scored on the `Nb' = num_select_blocks(t1)`
/// blocks it can reach and its top-n blocks are copied into `[B, S, G, n]` ids; the ranges are
/// then built in one call for the whole sequence. Returns [`Selection`] with `blocks`
/// `[B, S, G, n]`, `ranges` `[B, S, G, n, 2]`, `counts` `[B, S, G]`, on the device of the first
/// chunk, equal to [`select_ranges`] over the whole sequence at once. Only one chunk's
/// temporaries are alive at a time (see the crate docs for the bound).
pub fn select_chunked<E, F>(
    seq_len: i64,
    chunk: i64,
    heads_per_group: i64,
    cfg: &SelectConfig,
    imp: SelectImpl,
    p_cmp_rows: F,
) -> Result<Selection, E>
where
    E: From<SelectError>,
    F: FnMut(i64, i64) -> Result<Tensor, E>,
{
    let blocks = select_blocks_chunked(seq_len, chunk, heads_per_group, cfg, imp, p_cmp_rows)?;
    // Ranges in one call for the whole sequence: their working set is O(B·S·G·n) like the
    // outputs, and one call instead of one per chunk saves ~40 kernel launches per chunk.
    let Ranges { ranges, counts } = ranges_from_blocks(&blocks, 0, cfg, imp)?;
    Ok(Selection {
        blocks,
        ranges,
        counts,
    })
}

/// The block choice of [`select_chunked`] without the ranges: block ids `[B, S, G, n]` (sorted,
/// −1 padded) for a sequence of `seq_len` queries, `chunk` rows at a time, from the same
/// `p_cmp_rows(t0, t1)` callback. For callers that read the blocks themselves (`nsa-attn`'s
/// lean path), so no range tensors are built.
pub fn select_blocks_chunked<E, F>(
    seq_len: i64,
    chunk: i64,
    heads_per_group: i64,
    cfg: &SelectConfig,
    imp: SelectImpl,
    mut p_cmp_rows: F,
) -> Result<Tensor, E>
where
    E: From<SelectError>,
    F: FnMut(i64, i64) -> Result<Tensor, E>,
{
    cfg.validate()?;
    if seq_len <= 0 {
        return Err(SelectError::NonPositive {
            name: "seq_len",
            value: seq_len,
        }
        .into());
    }
    if chunk <= 0 {
        return Err(SelectError::NonPositive {
            name: "chunk",
            value: chunk,
        }
        .into());
    }
    // (batch, heads) of the first chunk, which every later chunk must repeat.
    let mut first_dims: Option<(i64, i64)> = None;
    let mut chunk_blocks = |t0: i64| -> Result<Tensor, E> {
        let t1 = (t0 + chunk).min(seq_len);
        let p_cmp = p_cmp_rows(t0, t1)?;
        let [batch, rows, heads, num_cmp] = check::dims4(&p_cmp, "p_cmp chunk", "[B, T, H, Nc]")?;
        let needed_cmp = cfg.num_compressed(t1);
        let (expected_batch, expected_heads) = *first_dims.get_or_insert((batch, heads));
        if rows != t1 - t0
            || num_cmp < needed_cmp
            || (batch, heads) != (expected_batch, expected_heads)
        {
            return Err(SelectError::Shape {
                what: "p_cmp chunk",
                expected: format!(
                    "[B = {expected_batch}, T = {}, H = {expected_heads}, Nc >= {needed_cmp}]",
                    t1 - t0
                ),
                got: p_cmp.size(),
            }
            .into());
        }
        let num_blocks = cfg.num_select_blocks(t1);
        let scores = match imp {
            SelectImpl::Reference => {
                reference::block_scores(&p_cmp, heads_per_group, num_blocks, cfg)
            }
            SelectImpl::Vectorized => {
                vectorized::block_scores(&p_cmp, heads_per_group, num_blocks, cfg)
            }
        }?;
        drop(p_cmp);
        Ok(select_blocks(&scores, t0, cfg, imp)?)
    };
    let first = chunk_blocks(0)?;
    let [batch, first_rows, groups, _] = check::dims4(&first, "block ids", "[B, T, G, n]")?;
    let options = (Kind::Int64, first.device());
    let mut blocks = Tensor::f_full([batch, seq_len, groups, cfg.top_n], -1, options)
        .map_err(SelectError::from)?;
    copy_rows(&mut blocks, &first, 0, first_rows)?;
    drop(first);
    let mut t0 = chunk;
    while t0 < seq_len {
        let part = chunk_blocks(t0)?;
        copy_rows(&mut blocks, &part, t0, (t0 + chunk).min(seq_len) - t0)?;
        t0 += chunk;
    }
    Ok(blocks)
}

fn copy_rows(whole: &mut Tensor, part: &Tensor, t0: i64, rows: i64) -> Result<(), SelectError> {
    Ok(whole.f_narrow(1, t0, rows)?.f_copy_(part)?)
}

/// The whole pipeline from queries and compressed keys: [`compressed_probs`] per chunk of
/// `chunk` query rows (each chunk sees only its visible compressed keys), then
/// [`select_chunked`].
///
/// - `q`: `[B, S, H, dk]`, all queries of the sequence; `k_cmp`: `[B, Nc, Hkv, dk]`;
/// - returns [`Selection`] for all `S` rows with `G = Hkv` groups.
pub fn select_for_sequence(
    q: &Tensor,
    k_cmp: &Tensor,
    chunk: i64,
    cfg: &SelectConfig,
    imp: SelectImpl,
) -> Result<Selection, SelectError> {
    let ([_, seq_len, heads, _], [_, num_cmp, kv_heads, _]) =
        check::attention_inputs(q, k_cmp, 0, cfg)?;
    let needed_cmp = cfg.num_compressed(seq_len);
    if num_cmp < needed_cmp {
        return Err(SelectError::Shape {
            what: "k_cmp",
            expected: format!("[B, Nc >= {needed_cmp}, Hkv, dk] for S = {seq_len} queries"),
            got: k_cmp.size(),
        });
    }
    select_chunked(seq_len, chunk, heads / kv_heads, cfg, imp, |t0, t1| {
        let q_rows = q.f_narrow(1, t0, t1 - t0)?;
        let visible_keys = k_cmp.f_narrow(1, 0, cfg.num_compressed(t1))?;
        compressed_probs(&q_rows, &visible_keys, t0, cfg)
    })
}

/// The crate docs' bound on the vectorized [`select_chunked`]'s peak memory for a sequence of
/// `seq_len` queries in chunks of `chunk` rows, in bytes: its working set and outputs, not its
/// `p_cmp` input nor the logits of [`compressed_probs`].
pub fn pipeline_peak_bytes(
    batch: i64,
    seq_len: i64,
    chunk: i64,
    groups: i64,
    cfg: &SelectConfig,
) -> i64 {
    let n = cfg.top_n;
    let rows = batch * chunk.clamp(1, seq_len.max(1)) * groups;
    let (num_cmp, num_blocks) = (cfg.num_compressed(seq_len), cfg.num_select_blocks(seq_len));
    let sequence_rows = batch * seq_len * groups;
    let chunk_loop = (4 * num_cmp + 8 * num_blocks).max(16 * num_blocks) * rows
        + 64 * n * rows
        + 8 * n * sequence_rows;
    let ranges = 110 * n * sequence_rows;
    chunk_loop.max(ranges)
}
