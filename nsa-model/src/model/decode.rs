//! Decoding a whole model: [`KvCache`], [`Model::prefill`], [`Model::decode_step`], and
//! [`Model::forward_with_blocks`] (the forward with given selections, for comparisons).
//!
//! The cache holds one entry per block: an [`NsaCache`] (nsa-attn's per-branch state) for NSA
//! attention, a [`DenseCache`] (keys and values of every position) for dense attention, and the
//! lengths of the sequences on the host. A step embeds one token per sequence, runs every block
//! on it with its cache, and returns the logits of the next token; one [`DecodePlan`] (the
//! positions and everything derived from them, in one host→device copy that also carries the
//! token ids) serves all blocks.
use nsa_attn::{DecodePlan, ForwardOpts, NsaAttention, NsaCache, StepReads};
use nsa_sys::cuda::CudaGraph;
use tch::{Device, Kind, Tensor};

use super::{use_kernels, Attention, Model};
use crate::config::{AttentionKind, ModelError};
use crate::dense::{decode_attention, Rope};

mod graph_check;
#[cfg(test)]
mod tests;

pub use graph_check::decode_graph_check;

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

/// Positions a captured step covers past the one it was captured at: the decode kernels are
/// sized for them, and a step past them captures anew (a few milliseconds).
const GRAPH_SLACK: i64 = 256;

/// One decode step of the whole model captured as a CUDA graph and the outputs it writes. Field
/// order is drop order: the outputs live in the graph's memory pool and go before it.
#[derive(Debug)]
struct Captured {
    logits: Tensor,
    /// Every NSA block's selected blocks, stacked `[blocks, B, Hkv, n]` by the graph itself so
    /// that a replay copies them out once (`None` for a dense model).
    blocks: Option<Tensor>,
    graph: CudaGraph,
}

/// A model's captured decode step: the fixed-layout plan it reads (refilled before each
/// replay), captured with the emission of compressed tokens and, for NSA models, once more
/// without it, which replays where no sequence completes a block (`d − 1` of every `d`
/// positions).
#[derive(Debug)]
struct StepGraph {
    with_emission: Captured,
    without_emission: Option<Captured>,
    plan: DecodePlan,
}

/// Whether [`Model::decode_step`] captures its steps as CUDA graphs.
#[derive(Debug)]
enum GraphState {
    /// Eager steps (the default).
    Off,
    /// Capture and replay where the model and device allow it.
    On(Option<Box<StepGraph>>),
    /// Asked for, and not possible: why.
    Unavailable(String),
}

/// The decode state of a whole model for a batch of sequences.
#[derive(Debug)]
pub struct KvCache {
    /// Declared first: a captured step writes into the layers' buffers.
    graph: GraphState,
    /// Steps that replayed a graph.
    replays: u64,
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

    /// With `on`, [`Model::decode_step`] runs its steps as CUDA graphs where it can: the first
    /// step (and the first after every 256 positions or a growth of the buffers) runs eagerly
    /// with a fixed-layout plan and captures the next one, twice for NSA models: with the
    /// emission of compressed tokens and without it, replayed at the positions where no
    /// sequence completes a block. The others replay a capture, so a step costs one transfer,
    /// one graph launch and copies of the logits and of the selected blocks instead of
    /// hundreds of operator launches. Needs a CUDA device and, for NSA blocks, the decode kernels
    /// ([`nsa_attn::NsaAttention::decode_on_kernels`]); otherwise, or when a capture fails,
    /// steps stay eager and [`KvCache::graph_unavailable`] says why. The logits are those of
    /// eager steps with the same plan, bit for bit (`nsa-train check --gpu` compares them).
    pub fn use_graphs(&mut self, on: bool) {
        self.graph = if on {
            GraphState::On(None)
        } else {
            GraphState::Off
        };
    }

    /// Why steps run eagerly although [`KvCache::use_graphs`] asked for graphs.
    pub fn graph_unavailable(&self) -> Option<&str> {
        match &self.graph {
            GraphState::Unavailable(why) => Some(why),
            _ => None,
        }
    }

    /// Whether the next step can replay a captured graph.
    pub fn has_graph(&self) -> bool {
        matches!(&self.graph, GraphState::On(Some(_)))
    }

    /// Steps so far that replayed a captured graph.
    pub fn graph_replays(&self) -> u64 {
        self.replays
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
    /// Whether a decoder should ask for [`KvCache::use_graphs`] by default: for models with
    /// NSA blocks, not for dense ones. A graph replays a step with a fixed-layout plan; for a
    /// dense model that means attention over every key up to the plan's bound (the positions
    /// of the next 256 steps), masked, where an eager step's SDPA reads only the keys that
    /// exist, and a dense step has few launches to save: on the H200, `125m` after a 32k
    /// prompt generated 136.4 tokens/s eagerly and 128.4 from graphs, NSA 73.8 and 160.8
    /// (BENCHMARKS.md, generation). Graphs still work for dense models when asked for.
    pub fn decodes_faster_from_graphs(&self) -> bool {
        self.blocks
            .iter()
            .any(|block| matches!(block.attn, Attention::Nsa(_)))
    }

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
                graph: GraphState::Off,
                replays: 0,
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
        if matches!(cache.graph, GraphState::On(_)) {
            if let Some(why) = self.graph_blocker(opts) {
                cache.graph = GraphState::Unavailable(why);
            } else {
                return self.graph_step(cache, next, opts);
            }
        }
        let kind = self.embed.kind();
        let plan = DecodePlan::new(
            &self.cfg.nsa_config(),
            &cache.lengths,
            kind,
            self.device(),
            Some(next),
        )?;
        self.eager_step(cache, &plan, opts)
    }

    /// A step run now with `plan`: advances the cache, or marks it unusable on failure.
    fn eager_step(
        &self,
        cache: &mut KvCache,
        plan: &DecodePlan,
        opts: &ForwardOpts,
    ) -> Result<DecodeStep, ModelError> {
        match self.step(cache, plan, opts, Run::Now) {
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

    /// Why this model's steps cannot be CUDA graphs with `opts`, if they cannot.
    fn graph_blocker(&self, opts: &ForwardOpts) -> Option<String> {
        let (kind, device) = (self.embed.kind(), self.device());
        if !device.is_cuda() {
            return Some(format!(
                "CUDA graphs need a CUDA device, the model is on {device:?}"
            ));
        }
        self.blocks.iter().find_map(|block| match &block.attn {
            Attention::Nsa(attn) if !attn.decode_on_kernels(opts, kind, device) => Some(format!(
                "the NSA decode step runs on libtorch's operators here (the decode kernels \
                 take the fused path, bf16 or float32, and their head and group limits; \
                 this is {kind:?}, path {:?})",
                opts.path
            )),
            _ => None,
        })
    }

    /// A step through the cache's graph: replayed when one covers the batch's positions;
    /// otherwise run eagerly with a fixed-layout plan, after which the next step is captured.
    fn graph_step(
        &self,
        cache: &mut KvCache,
        next: &[i64],
        opts: &ForwardOpts,
    ) -> Result<DecodeStep, ModelError> {
        let last = cache.lengths.iter().copied().max().unwrap_or(0);
        if let GraphState::On(Some(g)) = &mut cache.graph {
            if last <= g.plan.position_bound() {
                g.plan.refill(&cache.lengths, Some(next))?;
                let captured = match &g.without_emission {
                    Some(lean) if !g.plan.emits() => lean,
                    _ => &g.with_emission,
                };
                let replayed = captured.graph.replay();
                let advanced = replayed.map_err(ModelError::from).and_then(|()| {
                    for layer in &mut cache.layers {
                        if let LayerCache::Nsa(c) = layer {
                            c.advance(&g.plan)?;
                        }
                    }
                    Ok(())
                });
                if let Err(e) = advanced {
                    cache.poisoned = true;
                    return Err(e);
                }
                for len in &mut cache.lengths {
                    *len += 1;
                }
                cache.replays += 1;
                let reads = match &captured.blocks {
                    Some(stacked) => {
                        let all = stacked.f_detach_copy()?;
                        (0..all.size()[0])
                            .map(|i| Ok(StepReads::for_plan(&g.plan, all.f_select(0, i)?)))
                            .collect::<Result<_, ModelError>>()?
                    }
                    None => Vec::new(),
                };
                return Ok(DecodeStep {
                    logits: captured.logits.f_detach_copy()?,
                    reads,
                });
            }
        }
        // Drop the old graph (and its pool) before the buffers grow.
        cache.graph = GraphState::On(None);
        let Device::Cuda(ordinal) = self.device() else {
            return Err(ModelError::Shape("CUDA graphs need a CUDA device".into()));
        };
        let mut plan = self.fixed_plan(cache, next)?;
        let bound = plan.position_bound();
        let step = self.eager_step(cache, &plan, opts)?;
        if cache.lengths.iter().all(|&t| t <= bound) {
            // The capture runs nothing: the token ids and the cache's contents do not matter.
            plan.refill(&cache.lengths, Some(&vec![0; next.len()]))?;
            let nsa = self.decodes_faster_from_graphs();
            let captured =
                self.capture_step(ordinal, cache, &plan, opts)
                    .and_then(|with_emission| {
                        let without_emission = match nsa {
                            true => {
                                plan.set_emission(false)?;
                                let lean = self.capture_step(ordinal, cache, &plan, opts);
                                plan.set_emission(true)?;
                                Some(lean?)
                            }
                            false => None,
                        };
                        Ok(StepGraph {
                            with_emission,
                            without_emission,
                            plan,
                        })
                    });
            cache.graph = match captured {
                Ok(g) => GraphState::On(Some(Box::new(g))),
                Err(e) => GraphState::Unavailable(format!("capturing a decode step failed: {e}")),
            };
        }
        Ok(step)
    }

    /// The step with `plan` captured as a CUDA graph on device `ordinal`, the NSA blocks'
    /// selections stacked inside it.
    fn capture_step(
        &self,
        ordinal: usize,
        cache: &mut KvCache,
        plan: &DecodePlan,
        opts: &ForwardOpts,
    ) -> Result<Captured, ModelError> {
        let (graph, (logits, blocks)) = CudaGraph::capture(ordinal, || {
            let out = self.step(cache, plan, opts, Run::Enqueue)?;
            let blocks: Vec<&Tensor> = out.reads.iter().map(|r| &r.blocks).collect();
            let stacked = match blocks.is_empty() {
                true => None,
                false => Some(Tensor::f_stack(&blocks, 0)?),
            };
            Ok::<_, ModelError>((out.logits, stacked))
        })?;
        Ok(Captured {
            logits,
            blocks,
            graph,
        })
    }

    /// A fixed-layout plan for the cache's next step (token ids `next`), bounded at the
    /// largest position plus [`GRAPH_SLACK`] or the buffers' capacity, whichever is smaller;
    /// the buffers first grow to hold the next token, as an eager step's would.
    fn fixed_plan(&self, cache: &mut KvCache, next: &[i64]) -> Result<DecodePlan, ModelError> {
        let last = cache.lengths.iter().copied().max().unwrap_or(0);
        for layer in &mut cache.layers {
            match layer {
                LayerCache::Nsa(c) => c.reserve(last + 1)?,
                LayerCache::Dense(c) => c.reserve(last + 1)?,
            }
        }
        let capacity = cache
            .layers
            .iter()
            .map(|l| match l {
                LayerCache::Nsa(c) => c.capacity(),
                LayerCache::Dense(c) => c.capacity(),
            })
            .min()
            .unwrap_or(last + 1);
        let bound = (last + GRAPH_SLACK).min(capacity - 1).max(last);
        Ok(DecodePlan::fixed(
            &self.cfg.nsa_config(),
            &cache.lengths,
            self.embed.kind(),
            self.device(),
            Some(next),
            bound,
        )?)
    }

    fn step(
        &self,
        cache: &mut KvCache,
        plan: &DecodePlan,
        opts: &ForwardOpts,
        run: Run,
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
                    let step = match run {
                        Run::Now => attn.decode_step_planned(&x, c, plan, opts)?,
                        Run::Enqueue => attn.enqueue_step(&x, c, plan, opts)?,
                    };
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
        let (h, rope) = self.embed_with_rope(tokens, s)?;
        let mut given = blocks.iter();
        self.forward_in_decode_order(h, Some(&rope), opts, |_, attn, x| {
            let sel = given
                .next()
                .ok_or_else(|| ModelError::Shape("missing a selection".into()))?;
            Ok(attn.forward_branches_with_blocks(x, sel, opts)?.output)
        })
    }

    /// The stack on the embedded tokens `h` `[B, S, D]` with the residual adds where decoding
    /// makes them (`Block::finish`), each NSA block's attention output from
    /// `nsa(index, attention, x)` for its normed input `x` and each dense block's with `rope`;
    /// returns the logits. [`Model::forward_with_blocks`] and [`Model::inspect`] are this with
    /// their own NSA step.
    pub(super) fn forward_in_decode_order(
        &self,
        mut h: Tensor,
        rope: Option<&Rope>,
        opts: &ForwardOpts,
        mut nsa: impl FnMut(usize, &NsaAttention, &Tensor) -> Result<Tensor, ModelError>,
    ) -> Result<Tensor, ModelError> {
        let kernel = use_kernels(opts, &h);
        for (index, block) in self.blocks.iter().enumerate() {
            let x = block.attn_norm.forward(&h, kernel)?;
            let a = match (&block.attn, rope) {
                (Attention::Nsa(attn), _) => nsa(index, attn, &x)?,
                (Attention::Dense(attn), Some(rope)) => attn.forward(&x, rope)?,
                (Attention::Dense(_), None) => {
                    return Err(ModelError::Shape(
                        "dense attention needs the RoPE tables Model::forward builds".into(),
                    ))
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

/// How [`Model::step`] treats the NSA caches' lengths.
#[derive(Debug, Clone, Copy)]
enum Run {
    /// An eager step: the layers' caches grow as needed and advance.
    Now,
    /// A step being captured: nothing grows or advances (a replay advances them).
    Enqueue,
}

/// A dense block's step: the new keys and values into the cache, then SDPA of the new query
/// over each sequence's `t_b + 1` keys (without a mask when all sequences are at one position).
/// With a fixed-layout plan, over the `bound + 1` slots the plan may reach, masked, so that
/// every step of a graph has the same shapes.
fn dense_step(
    attn: &crate::dense::DenseAttention,
    x: &Tensor,
    cache: &mut DenseCache,
    plan: &DecodePlan,
) -> Result<Tensor, ModelError> {
    let positions = plan.positions();
    let last = positions.iter().copied().max().unwrap_or(0);
    cache.reserve(plan.position_bound() + 1)?;
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
    let fixed = plan.is_fixed();
    let keys = if fixed {
        plan.position_bound() + 1
    } else {
        last + 1
    };
    let visible = if !fixed && positions.iter().all(|&t| t == last) {
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
