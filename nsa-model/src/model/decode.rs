//! Decoding a whole model: [`KvCache`], [`Model::prefill`], [`Model::decode_step`], and
//! [`Model::forward_with_blocks`] (the forward with given selections, for comparisons).
//!
//! The cache holds one entry per block: an [`NsaCache`] (nsa-attn's per-branch state) for NSA
//! attention, a [`DenseCache`] (keys and values of every position) for dense attention, and the
//! lengths of the sequences on the host. A step embeds one token per sequence, runs every block
//! on it with its cache, and returns the logits of the next token; one [`DecodePlan`] (the
//! positions and everything derived from them, in one host→device copy that also carries the
//! token ids) serves all blocks.
use nsa_attn::{DecodePlan, ForwardOpts, NsaCache, StepReads};
use tch::{Kind, Tensor};

use super::{use_kernels, Attention, Model};
use crate::config::{AttentionKind, ModelError};
use crate::dense::{decode_attention, Rope};

#[cfg(test)]
mod tests;

/// One dense block's cache: keys `[B, Hkv, capacity, dk]` (with RoPE) and values
/// `[B, Hkv, capacity, dv]`; sequence `b`'s positions `0 .. len_b` are valid.
#[derive(Debug)]
pub struct DenseCache {
    k: Tensor,
    v: Tensor,
}

impl DenseCache {
    fn capacity(&self) -> i64 {
        self.k.size()[2]
    }

    /// Room for `tokens` per sequence (at least doubling), contents kept; unchanged on error.
    fn reserve(&mut self, tokens: i64) -> Result<(), ModelError> {
        if tokens <= self.capacity() {
            return Ok(());
        }
        let capacity = tokens.max(2 * self.capacity());
        let grow = |t: &Tensor| -> Result<Tensor, ModelError> {
            let mut sz = t.size();
            let keep = sz[2];
            sz[2] = capacity;
            let out = Tensor::f_zeros(sz.as_slice(), (t.kind(), t.device()))?;
            out.f_narrow(2, 0, keep)?.f_copy_(t)?;
            Ok(out)
        };
        let (k, v) = (grow(&self.k)?, grow(&self.v)?);
        self.k = k;
        self.v = v;
        Ok(())
    }

    fn bytes(&self) -> i64 {
        [&self.k, &self.v]
            .iter()
            .map(|t| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64)
            .sum()
    }
}

#[derive(Debug)]
enum LayerCache {
    Nsa(Box<NsaCache>),
    Dense(DenseCache),
}

/// The decode state of a whole model for a batch of sequences.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    lengths: Vec<i64>,
    /// A step failed part-way: some blocks hold the token, others do not.
    poisoned: bool,
}

impl KvCache {
    /// Tokens cached per sequence.
    pub fn lengths(&self) -> &[i64] {
        &self.lengths
    }

    /// Sequences in the batch.
    pub fn batch(&self) -> i64 {
        self.lengths.len() as i64
    }

    /// Bytes of every block's buffers.
    pub fn bytes(&self) -> i64 {
        self.layers
            .iter()
            .map(|l| match l {
                LayerCache::Nsa(c) => c.bytes(),
                LayerCache::Dense(c) => c.bytes(),
            })
            .sum()
    }

    /// The NSA blocks' caches, in block order (none for a dense model).
    pub fn nsa_layers(&self) -> impl Iterator<Item = &NsaCache> {
        self.layers.iter().filter_map(|l| match l {
            LayerCache::Nsa(c) => Some(c.as_ref()),
            LayerCache::Dense(_) => None,
        })
    }
}

/// What [`Model::prefill`] returns.
#[derive(Debug)]
pub struct Prefilled {
    /// Logits `[B, S, V]`; rows `t < lengths[b]` are the full-sequence forward's.
    pub logits: Tensor,
    /// The cache of the prompts' tokens.
    pub cache: KvCache,
    /// Each NSA block's selected blocks for the prompts, int64 `[B, S, Hkv, n]` (empty for a
    /// dense model).
    pub blocks: Vec<Tensor>,
}

/// What [`Model::decode_step`] returns.
#[derive(Debug)]
pub struct DecodeStep {
    /// Logits of the token after the new one, `[B, V]`.
    pub logits: Tensor,
    /// What each NSA block's step read, in block order (empty for a dense model).
    pub reads: Vec<StepReads>,
}

impl Model {
    /// Runs the model on prompts `tokens` int64 `[B, S]`, right-padded (sequence `b`'s tokens
    /// are `0 .. lengths[b]`, `1 ≤ lengths[b] ≤ S`; padding ids must be valid ids too), and
    /// returns the logits with a cache of the prompts that has room for `capacity` tokens per
    /// sequence (more is allocated when a sequence grows past it). `opts` chooses the NSA path
    /// of the prefill; selections and gates as in [`Model::forward`].
    pub fn prefill(
        &self,
        tokens: &Tensor,
        lengths: &[i64],
        capacity: i64,
        opts: &ForwardOpts,
    ) -> Result<Prefilled, ModelError> {
        let s = self.check_tokens(tokens)?;
        let b = tokens.size()[0];
        if lengths.len() as i64 != b || lengths.iter().any(|&n| n < 1 || n > s) {
            return Err(ModelError::Tokens(format!(
                "need {b} prompt lengths in 1..={s}, got {lengths:?}"
            )));
        }
        let _no_grad = tch::no_grad_guard();
        let capacity = capacity.max(s);
        let (mut h, rope) = self.embed_with_rope(tokens, s)?;
        let (mut layers, mut blocks) = (Vec::new(), Vec::new());
        let kernel = use_kernels(opts, &h);
        for block in &self.blocks {
            let x = block.attn_norm.forward(&h, kernel)?;
            let a = match &block.attn {
                Attention::Nsa(attn) => {
                    let (out, cache) = attn.prefill(&x, lengths, capacity, opts)?;
                    layers.push(LayerCache::Nsa(Box::new(cache)));
                    blocks.push(out.blocks);
                    out.output
                }
                Attention::Dense(attn) => {
                    let (q, k, v) = attn.project(&x, &rope)?;
                    let o = crate::dense::causal_attention(&q, &k, &v)?;
                    let mut cache = DenseCache { k, v };
                    cache.k = cache.k.f_contiguous()?;
                    cache.v = cache.v.f_contiguous()?;
                    cache.reserve(capacity)?;
                    layers.push(LayerCache::Dense(cache));
                    attn.output(&o)?
                }
            };
            h = block.finish(&h, &a, kernel)?;
        }
        Ok(Prefilled {
            logits: self.head(&h, kernel)?,
            cache: KvCache {
                layers,
                lengths: lengths.to_vec(),
                poisoned: false,
            },
            blocks,
        })
    }

    /// One decode step: `next` holds the next token id of every sequence of `cache` (sequence
    /// `b`'s at position `cache.lengths()[b]`); returns the logits `[B, V]` of the token after
    /// it and appends it to the cache. Ids are checked on the host (no device round trip);
    /// `opts` gives the gates and the nsa-select implementation.
    pub fn decode_step(
        &self,
        cache: &mut KvCache,
        next: &[i64],
        opts: &ForwardOpts,
    ) -> Result<DecodeStep, ModelError> {
        if cache.poisoned {
            return Err(ModelError::Tokens(
                "the cache is unusable after a failed decode step; prefill again".into(),
            ));
        }
        if cache.layers.len() != self.blocks.len() {
            return Err(ModelError::Shape(format!(
                "the cache has {} blocks, the model {}",
                cache.layers.len(),
                self.blocks.len()
            )));
        }
        let v = self.cfg.vocab_size;
        if next.len() != cache.lengths.len() {
            return Err(ModelError::Tokens(format!(
                "{} next tokens for {} cached sequences",
                next.len(),
                cache.lengths.len()
            )));
        }
        if let Some(bad) = next.iter().find(|&&id| id < 0 || id >= v) {
            return Err(ModelError::Tokens(format!(
                "ids must lie in 0..{v}, got {bad}"
            )));
        }
        let _no_grad = tch::no_grad_guard();
        let kind = self.embed.kind();
        let plan = DecodePlan::new(
            &self.cfg.nsa_config(),
            &cache.lengths,
            kind,
            self.device(),
            Some(next),
        )?;
        let result = self.step(cache, &plan, opts);
        match result {
            Ok(step) => {
                for len in &mut cache.lengths {
                    *len += 1;
                }
                Ok(step)
            }
            Err(e) => {
                cache.poisoned = true;
                Err(e)
            }
        }
    }

    fn step(
        &self,
        cache: &mut KvCache,
        plan: &DecodePlan,
        opts: &ForwardOpts,
    ) -> Result<DecodeStep, ModelError> {
        let b = cache.batch();
        let tokens = plan
            .tokens()
            .ok_or_else(|| ModelError::Tokens("the plan carries no token ids".into()))?;
        let mut h = Tensor::f_embedding(&self.embed, &tokens.f_view([b, 1])?, -1, false, false)?;
        let mut reads = Vec::new();
        let kernel = use_kernels(opts, &h);
        for (block, layer) in self.blocks.iter().zip(&mut cache.layers) {
            let x = block.attn_norm.forward(&h, kernel)?;
            let a = match (&block.attn, layer) {
                (Attention::Nsa(attn), LayerCache::Nsa(c)) => {
                    let step = attn.decode_step_planned(&x, c, plan, opts)?;
                    reads.push(step.reads);
                    step.output
                }
                (Attention::Dense(attn), LayerCache::Dense(c)) => dense_step(attn, &x, c, plan)?,
                _ => {
                    return Err(ModelError::Shape(
                        "the cache was made by a model with another attention kind".into(),
                    ))
                }
            };
            h = block.finish(&h, &a, kernel)?;
        }
        Ok(DecodeStep {
            logits: self.head(&h, kernel)?.f_select(1, 0)?,
            reads,
        })
    }

    /// [`Model::forward`] with the selected blocks of every NSA block given (int64
    /// `[B, S, Hkv, n]` each, as [`Prefilled::blocks`] and [`StepReads::blocks`] report them)
    /// instead of chosen from the compressed scores: for comparing a decode with the forward
    /// under identical discrete choices. A dense model takes no blocks.
    pub fn forward_with_blocks(
        &self,
        tokens: &Tensor,
        blocks: &[Tensor],
        opts: &ForwardOpts,
    ) -> Result<Tensor, ModelError> {
        let s = self.check_tokens(tokens)?;
        let nsa_blocks = match self.cfg.attention {
            AttentionKind::Nsa => self.blocks.len(),
            AttentionKind::Dense => 0,
        };
        if blocks.len() != nsa_blocks {
            return Err(ModelError::Shape(format!(
                "{} selections for {nsa_blocks} NSA blocks",
                blocks.len()
            )));
        }
        let (mut h, rope) = self.embed_with_rope(tokens, s)?;
        let mut given = blocks.iter();
        let kernel = use_kernels(opts, &h);
        for block in &self.blocks {
            let x = block.attn_norm.forward(&h, kernel)?;
            let a = match (&block.attn, given.next()) {
                (Attention::Nsa(attn), Some(sel)) => {
                    attn.forward_branches_with_blocks(&x, sel, opts)?.output
                }
                (Attention::Dense(attn), _) => attn.forward(&x, &rope)?,
                (Attention::Nsa(_), None) => {
                    return Err(ModelError::Shape("missing a selection".into()))
                }
            };
            h = block.finish(&h, &a, kernel)?;
        }
        self.head(&h, kernel)
    }
}

impl Model {
    /// The embedded tokens `[B, S, D]` and RoPE tables for their `s` positions.
    fn embed_with_rope(&self, tokens: &Tensor, s: i64) -> Result<(Tensor, Rope), ModelError> {
        let h = Tensor::f_embedding(&self.embed, tokens, -1, false, false)?;
        let c = &self.cfg;
        let rope = Rope::new(c.rope_base, c.head_dim_k, s, h.kind(), h.device())?;
        Ok((h, rope))
    }
}

/// A dense block's step: the new keys and values into the cache, then SDPA of the new query
/// over each sequence's `t_b + 1` keys (without a mask when all sequences are at one position).
fn dense_step(
    attn: &crate::dense::DenseAttention,
    x: &Tensor,
    cache: &mut DenseCache,
    plan: &DecodePlan,
) -> Result<Tensor, ModelError> {
    let positions = plan.positions();
    let last = positions.iter().copied().max().unwrap_or(0);
    cache.reserve(last + 1)?;
    let (q, k, v) = attn.project(x, plan.rope())?;
    let b = positions.len() as i64;
    let g = cache.k.size()[1];
    let at = |d: i64| -> Result<Tensor, ModelError> {
        Ok(plan
            .positions_tensor()
            .f_view([b, 1, 1, 1])?
            .f_expand([b, g, 1, d], false)?)
    };
    let _ = cache.k.f_scatter_(2, &at(k.size()[3])?, &k)?;
    let _ = cache.v.f_scatter_(2, &at(v.size()[3])?, &v)?;
    let keys = last + 1;
    let visible = if positions.iter().all(|&t| t == last) {
        None
    } else {
        Some(
            Tensor::f_arange(keys, (Kind::Int64, x.device()))?
                .f_view([1, keys])?
                .f_le_tensor(&plan.positions_tensor().f_view([b, 1])?)?
                .f_view([b, 1, 1, keys])?,
        )
    };
    let o = decode_attention(
        &q,
        &cache.k.f_narrow(2, 0, keys)?,
        &cache.v.f_narrow(2, 0, keys)?,
        visible.as_ref(),
    )?;
    attn.output(&o)
}
