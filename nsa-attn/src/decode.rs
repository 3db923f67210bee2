//! Decoding: prefill a batch of prompts, then one new token per sequence per step, each step
//! reading only what NSA's three branches read — `#compressed + n·l' + min(w, s)` keys per K/V
//! group instead of all `s`.
//!
//! # Use
//!
//! [`NsaAttention::prefill`] runs the layer's full-sequence forward on the prompts (any
//! [`crate::AttnPath`]) and returns its outputs with an [`NsaCache`];
//! [`NsaAttention::decode_step`] then takes the next token of every sequence, `x` `[B, 1, dim]`,
//! and returns its output `[B, 1, dim]` with the [`StepReads`] of the step. A batch may hold
//! sequences of different lengths: prompts are right-padded to a common `S` and their true
//! lengths passed to `prefill`; each sequence then continues at its own position. A model runs
//! one [`DecodePlan`] per step for all of its layers ([`NsaAttention::decode_step_planned`]).
//! Decoding is inference: no gradient flows.
//!
//! # The cache and its invariants
//!
//! An [`NsaCache`] holds, for sequence `b` of length `len_b` (positions `0 .. len_b`), with
//! every buffer in the heads-major layout `[B, Hkv, slots, d]` (SDPA's, so dense attention can
//! read the same keys) and in the activations' kind:
//!
//! - **raw** keys (with RoPE at their own positions) and values of the selected branch, slots
//!   `0 .. capacity`: slot `p` holds position `p` for `p < len_b`; later slots are padding or
//!   left over and never read. With `shared_kv` this one buffer serves all three branches.
//! - **window ring** (independent K/V only): the window branch's keys and values, slot `p mod w`
//!   holding the newest position `p < len_b` of that residue, i.e. the last `min(w, len_b)`
//!   tokens.
//! - **pending ring** (independent K/V, or `shared_kv` with `cmp_rope = "compressed"`): the raw
//!   keys and values φ reads — the compressed branch's, unrotated with `cmp_rope =
//!   "compressed"` — of the last `min(l, len_b)` tokens, slot `p mod l`: the pending block φ
//!   needs (for the MLP and linear φ the whole block, in order, with its intra-block position
//!   embeddings added by φ). Without it φ reads the raw buffer.
//! - **compressed**: the emitted compressed tokens (keys rotated at `i·d + l − 1` with
//!   `cmp_rope = "compressed"`), `num_compressed(len_b) = ⌊(len_b − l)/d⌋ + 1`
//!   of them (0 while `len_b < l`). Token `i` is written by the step that adds position
//!   `i·d + l − 1` — the step at which it becomes visible (Eq. 7) — from the pending block, so a
//!   new compressed token is emitted every `d` steps once `l` tokens exist. Slots past the
//!   count hold padding and are never read.
//! - the lengths `len_b`, on the host.
//!
//! A step writes the new token's keys and values into every buffer, emits compressed tokens for
//! the sequences whose token completes a block, attends, and only then advances the lengths. A
//! step that fails after it started writing marks the cache unusable (every later call is an
//! error) rather than leaving it describing a prefix it does not hold. Buffers grow (doubling)
//! when a sequence reaches `capacity`.
//!
//! # One step
//!
//! For the new token `t_b` of each sequence (`q` `[B, 1, H, dk]`, RoPE at `t_b`): the compressed
//! branch attends the visible compressed tokens and gives `p_cmp` (Eq. 8); nsa-select's
//! [`nsa_select::block_scores`] and [`nsa_select::select_blocks`] choose the blocks (one call
//! per distinct position in the batch: the same code and the same bits as the full-sequence
//! path's selection); the selected branch gathers the keys of those blocks `≤ t_b`; the window
//! branch reads the ring. Each branch is a grouped single-query softmax (`[B, Hkv, h, K]`
//! scores, no repeated keys), probabilities in float32 as on every path. Prefill plus decode
//! computes the full-sequence forward's outputs at every position (tested: fp32 within 1e-5 of
//! the forward given the same blocks, float64 with the forward's own selection).
//!
//! Host synchronisation: a step makes none of its own. Its bookkeeping (positions, ring slots,
//! which sequences emit, the rows per distinct position) is computed on the host from the
//! lengths and reaches the device in one pinned, asynchronous copy ([`DecodePlan`]); the
//! selected-branch read counts are computed from the selected blocks only when asked
//! ([`StepReads::selected`]).
//!
//! What a step launches besides attention, kept small because a decoding model pays it per
//! layer and token: the projection is one matmul over stacked weights the cache keeps from
//! its first eager step (`NsaCache`'s `projection`), the queries and keys are rotated by one
//! RoPE launch on CUDA, and a captured step can leave out the emission of compressed tokens
//! ([`DecodePlan::set_emission`]) for the positions where no sequence completes a block.
mod attend;
mod cache;
mod check;
mod fused;
mod plan;
#[cfg(test)]
mod tests;

use nsa_select::SelectImpl;
use nsa_sys::fused as sys;
use tch::{Kind, Tensor};

pub use cache::NsaCache;
pub use check::{
    decode_check, decode_parity, decode_sequence, DecodedSequence, Parity, ParitySelection,
};
pub use fused::kernel_step;
pub use plan::DecodePlan;

use crate::config::{AttnError, CmpRope, NsaConfig};
use crate::gates::{self, GateOverride};
use crate::layer::{BranchOutputs, ForwardOpts, NsaAttention, RawProjections};
use crate::rope::Rope;
use crate::Branch;
use attend::{attend, selected_slots};
use cache::{check_lengths, KvBuf};
use plan::PlanTensors;

/// What one decode step read, per sequence: the per-step read counter.
#[derive(Debug)]
pub struct StepReads {
    /// Compressed tokens visible to each sequence's new token (Eq. 7), `[B]`.
    pub compressed: Vec<i64>,
    /// Window keys, `min(w, t + 1)` per sequence, `[B]`.
    pub window: Vec<i64>,
    /// The selected blocks, int64 `[B, Hkv, n]`, sorted, `−1` padded.
    pub blocks: Tensor,
    /// The new tokens' positions `t_b`, `[B]`.
    positions: Vec<i64>,
    /// The selection block length `l'`.
    select_len: i64,
}

impl StepReads {
    /// The counts of a step with `plan` (its positions) that selected `blocks` (int64
    /// `[B, Hkv, n]`, distinct ids per row, `−1` padded): how a model that replays captured
    /// steps reports each replay's reads from a copy of the blocks it wrote.
    pub fn for_plan(plan: &DecodePlan, blocks: Tensor) -> Self {
        let (cfg, positions) = (plan.config(), plan.positions());
        let sel = cfg.select_config();
        Self {
            compressed: positions
                .iter()
                .map(|&t| sel.num_visible_compressed(t))
                .collect(),
            window: positions
                .iter()
                .map(|&t| cfg.nsa.window.min(t + 1))
                .collect(),
            blocks,
            positions: positions.to_vec(),
            select_len: sel.select_len,
        }
    }

    /// Keys in the selected ranges (distinct positions `≤ t` of the selected blocks) per
    /// sequence and K/V group, int64 `[B, Hkv]` on the blocks' device: block `j` contributes
    /// `clamp(t + 1 − j·l', 0, l')` keys. Computed when asked, so a step spends nothing on it.
    pub fn selected(&self) -> Result<Tensor, AttnError> {
        let b = self.positions.len() as i64;
        let ends = Tensor::f_from_slice(&self.positions)?
            .f_to_device(self.blocks.device())?
            .f_add_scalar(1)?
            .f_view([b, 1, 1])?;
        let keys = ends
            .f_sub(&self.blocks.f_mul_scalar(self.select_len)?)?
            .f_clamp(0, self.select_len)?
            .f_mul(&self.blocks.f_ge(0)?)?;
        Ok(keys.f_sum_dim_intlist(-1, false, Kind::Int64)?)
    }

    /// Keys read per sequence and group, `compressed + selected + window`: int64 `[B, Hkv]`.
    pub fn total(&self) -> Result<Tensor, AttnError> {
        let b = self.compressed.len() as i64;
        let selected = self.selected()?;
        let per_sequence: Vec<i64> = self
            .compressed
            .iter()
            .zip(&self.window)
            .map(|(c, w)| c + w)
            .collect();
        Ok(selected.f_add(
            &Tensor::f_from_slice(&per_sequence)?
                .f_to_device(selected.device())?
                .f_view([b, 1])?,
        )?)
    }
}

/// The result of one decode step of a layer.
#[derive(Debug)]
pub struct LayerStep {
    /// The layer output for the new tokens, `[B, 1, dim]`.
    pub output: Tensor,
    /// What the step read.
    pub reads: StepReads,
}

impl NsaAttention {
    /// Runs the layer on prompts `x` `[B, S, dim]` (right-padded: sequence `b`'s tokens are
    /// `0 .. lengths[b]`, `1 ≤ lengths[b] ≤ S`) with `opts`' path and returns the forward's
    /// results — rows `t < lengths[b]` are exactly the full-sequence forward's, later rows are
    /// padding — and the cache of those tokens, with room for `capacity` tokens per sequence
    /// (at least `S`; more is allocated when needed).
    pub fn prefill(
        &self,
        x: &Tensor,
        lengths: &[i64],
        capacity: i64,
        opts: &ForwardOpts,
    ) -> Result<(BranchOutputs, NsaCache), AttnError> {
        let sz = x.size();
        let (b, s) = match sz.as_slice() {
            &[b, s, d] if d == self.config().dim && s > 0 => (b, s),
            _ => {
                return Err(AttnError::Shape {
                    what: "x",
                    expected: format!("[B, S > 0, dim = {}]", self.config().dim),
                    got: sz,
                })
            }
        };
        check_lengths(lengths)?;
        if lengths.len() as i64 != b || lengths.iter().any(|&n| n > s) {
            return Err(AttnError::Option {
                option: "lengths",
                reason: format!(
                    "need {b} lengths in 1..={s} for x of shape {sz:?}, got {lengths:?}"
                ),
            });
        }
        let _no_grad = tch::no_grad_guard();
        let c = self.config();
        let rope = Rope::new(c.rope_base, c.head_dim_k, s, x.kind(), x.device())?;
        let raw = self.project_raw(x, &rope, None)?;
        // libtorch's operators for RoPE and φ's blocks, as the decode steps compress.
        let p = self.compress_projections(&raw, false)?;
        let blocks = self.select(&p, opts.path, opts.select)?;
        let out = self.finish(x, &p, blocks, opts, None, None)?;
        let cache = NsaCache::from_prefill(
            c,
            &raw,
            |br| self.kv_index(br),
            self.phi_input(&raw),
            (&p.cmp_k, &p.cmp_v),
            lengths,
            capacity,
        )?;
        Ok((out, cache))
    }

    /// One decode step: `x` `[B, 1, dim]` holds the next token of every sequence of `cache`
    /// (sequence `b`'s at position `cache.lengths()[b]`). Returns its output `[B, 1, dim]`
    /// and what it read, and appends the token to the cache. `opts` gives the gates and the
    /// nsa-select implementation; the path does not matter (a step has one implementation,
    /// libtorch ops on the cache's device).
    pub fn decode_step(
        &self,
        x: &Tensor,
        cache: &mut NsaCache,
        opts: &ForwardOpts,
    ) -> Result<LayerStep, AttnError> {
        let plan = DecodePlan::new(self.config(), cache.lengths(), x.kind(), x.device(), None)?;
        self.decode_step_planned(x, cache, &plan, opts)
    }

    /// [`NsaAttention::decode_step`] with a plan made for the cache's lengths (a model makes
    /// one plan per step for all its layers).
    pub fn decode_step_planned(
        &self,
        x: &Tensor,
        cache: &mut NsaCache,
        plan: &DecodePlan,
        opts: &ForwardOpts,
    ) -> Result<LayerStep, AttnError> {
        self.check_step(x, cache, plan)?;
        let last = plan.positions.iter().copied().max().unwrap_or(0);
        cache.reserve(last + 1)?;
        if plan.skip_emission && plan.emits() {
            return Err(AttnError::Option {
                option: "plan",
                reason: "the plan leaves out the emission of compressed tokens, and a sequence \
                         completes a block at this step"
                    .into(),
            });
        }
        let _no_grad = tch::no_grad_guard();
        match self.step(x, cache, plan, opts, Run::Now) {
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

    /// [`NsaAttention::decode_step_planned`] without its host-side effects, for a step that is
    /// captured as a CUDA graph ([`nsa_sys::cuda::CudaGraph`]) and replayed later with the plan
    /// refilled ([`DecodePlan::refill`]): the cache is not grown (its capacity must hold the
    /// plan's position bound) and its lengths are not advanced ([`NsaCache::advance`] does
    /// that after each run of the enqueued work). A failure does not mark the cache unusable
    /// (a capture runs nothing): run eager steps with [`NsaAttention::decode_step_planned`].
    pub fn enqueue_step(
        &self,
        x: &Tensor,
        cache: &mut NsaCache,
        plan: &DecodePlan,
        opts: &ForwardOpts,
    ) -> Result<LayerStep, AttnError> {
        self.check_step(x, cache, plan)?;
        if plan.position_bound >= cache.capacity() {
            return Err(AttnError::Option {
                option: "cache",
                reason: format!(
                    "holds {} positions; the plan reaches position {}",
                    cache.capacity(),
                    plan.position_bound
                ),
            });
        }
        let _no_grad = tch::no_grad_guard();
        self.step(x, cache, plan, opts, Run::Enqueue)
    }

    /// Whether a decode step of this layer with `opts` on activations of `kind` on `device`
    /// runs on the decode kernels (and so can be captured as a CUDA graph with a fixed-layout
    /// plan): the fused path on CUDA, bf16 (with tensor-core head dims) or float32, and the
    /// kernels' limits on the group size, n and dv.
    pub fn decode_on_kernels(&self, opts: &ForwardOpts, kind: Kind, device: tch::Device) -> bool {
        fused::supported(self.config(), opts, kind, device)
    }

    fn check_step(&self, x: &Tensor, cache: &NsaCache, plan: &DecodePlan) -> Result<(), AttnError> {
        let c = self.config();
        let unusable = |reason: String| {
            Err(AttnError::Option {
                option: "cache",
                reason,
            })
        };
        if cache.poisoned {
            return unusable("a previous decode step failed part-way; prefill again".into());
        }
        if cache.cfg != *c || plan.cfg != *c {
            return unusable("the cache or plan was made for another layer configuration".into());
        }
        if plan.positions != cache.lengths {
            return unusable(format!(
                "the plan is for positions {:?}, the cache holds {:?} tokens",
                plan.positions, cache.lengths
            ));
        }
        let want = [cache.batch(), 1, c.dim];
        if x.size() != want {
            return Err(AttnError::Shape {
                what: "x",
                expected: format!("{want:?} (one token per cached sequence)"),
                got: x.size(),
            });
        }
        let (kind, device) = (cache.raw.k.kind(), cache.raw.k.device());
        if (x.kind(), x.device()) != (kind, device) || (plan.kind, plan.device) != (kind, device) {
            return unusable(format!(
                "x is {:?} on {:?} and the plan for {:?} on {:?}, the cache holds {kind:?} on {device:?}",
                x.kind(),
                x.device(),
                plan.kind,
                plan.device
            ));
        }
        Ok(())
    }

    fn step(
        &self,
        x: &Tensor,
        cache: &mut NsaCache,
        plan: &DecodePlan,
        opts: &ForwardOpts,
        run: Run,
    ) -> Result<LayerStep, AttnError> {
        let c = *self.config();
        let (b, g, h) = (cache.batch(), c.kv_heads, c.heads_per_group());
        let dev = &plan.dev;
        // On the decode kernels a step starts with one prologue kernel (`prologue`); W_1 of the
        // learned gates then rides in the projection matmul.
        let on_kernels = fused::supported(&c, opts, x.kind(), x.device());
        let tables = plan.rope.sequence_tables().filter(|_| on_kernels);
        let gate_rows = tables.is_some() && opts.gates == GateOverride::Learned;
        let key = self.stacked_weights_key(gate_rows);
        let weights = match &cache.projection {
            Some((kept, weights)) if *kept == key => weights.shallow_clone(),
            _ => {
                let weights = self.stacked_weights(gate_rows)?;
                // Kept by eager steps only: a copy made during a capture would live in the
                // graph's memory pool.
                if matches!(run, Run::Now) {
                    cache.projection = Some((key, weights.shallow_clone()));
                }
                weights
            }
        };
        // 1. The new token's keys and values into every buffer.
        let (q, kernel_gates) = match tables {
            Some((cos, sin)) => {
                let stacked = x.f_linear::<&Tensor>(&weights, None)?.f_view([b, -1])?;
                let p = self.prologue(&stacked, (cos, sin), cache, dev, gate_rows)?;
                (p.q.f_view([b, g, h, c.head_dim_k])?, p.gates)
            }
            None => {
                let raw = self.project_raw(x, &plan.rope, Some(&weights))?;
                self.append_with_operators(&raw, cache, dev)?;
                (raw.q.f_view([b, g, h, c.head_dim_k])?, None)
            }
        };

        // 2. Compressed tokens of the blocks this token completes: φ over the pending block.
        // A fixed-layout plan lists every sequence; without compressed slots (a capacity
        // below l) none can complete a block.
        // A plan with the emission left out (`DecodePlan::set_emission`) skips it.
        let emission = dev
            .emission
            .as_ref()
            .filter(|_| !plan.skip_emission)
            .filter(|em| em.emit.is_none() || cache.compressed.slots() > 0);
        if let Some(em) = emission {
            // A fixed-layout plan's emission lists every sequence in order.
            let rows = em.emit.is_none().then_some(&em.rows);
            let source = cache.pending.as_ref().unwrap_or(&cache.raw);
            let (bk, bv) = source.read_rows(rows, &dev.kv_heads, &em.sources)?;
            let (ck, cv) = self.compression().apply(&bk, &bv, false)?;
            let ck = self.rotate_emitted(ck, &em.index)?;
            let (mut ck, mut cv) = (ck.f_select(1, 0)?, cv.f_select(1, 0)?);
            if let Some(emit) = &em.emit {
                // Sequences that complete no block write back what their slot holds.
                let (held_k, held_v) = cache.compressed.read_at(rows, &dev.kv_heads, &em.index)?;
                let keep = emit.f_eq(0)?.f_view([-1, 1, 1])?;
                ck = held_k.f_where_self(&keep, &ck)?;
                cv = held_v.f_where_self(&keep, &cv)?;
            }
            cache
                .compressed
                .put(rows, &dev.kv_heads, &em.index, &ck, &cv)?;
        }

        let gates = match kernel_gates {
            Some(gates) => gates,
            None => self.gates(x, opts.gates)?,
        };
        if on_kernels {
            // 3–7 on the decode kernels.
            let (mixed, blocks) = fused::attend(&c, &q, cache, plan, &gates)?;
            return self.finish_step(&mixed, blocks, plan);
        }

        // 3. Compressed branch over the visible compressed tokens; its probabilities are p_cmp.
        let width = plan.max_visible;
        let (o_cmp, p_cmp) = if width == 0 {
            let zeros = Tensor::f_zeros([b, g, h, c.head_dim_v], (x.kind(), x.device()))?;
            let none = Tensor::f_zeros([b, g, h, 0], (Kind::Float, x.device()))?;
            (zeros, none)
        } else {
            let visible = Tensor::f_arange(width, (Kind::Int64, x.device()))?
                .f_view([1, width])?
                .f_lt_tensor(&dev.visible.f_view([b, 1])?)?
                .f_view([b, 1, 1, width])?;
            let keys = cache.compressed.k.f_narrow(2, 0, width)?;
            let values = cache.compressed.v.f_narrow(2, 0, width)?;
            attend(&q, &keys, &values, &visible)?
        };

        // 4. Selection (Eqs. 9–11) by nsa-select, one call per distinct position.
        let blocks = self.select_step(&p_cmp, plan, opts.select)?;

        // 5. Selected branch: the keys ≤ t of the selected blocks.
        let (slots, valid) =
            selected_slots(&blocks, dev, c.nsa.select.select_len, cache.capacity())?;
        let (ks, vs) = cache.raw.read_slots(&slots)?;
        let (o_slc, _) = attend(&q, &ks, &vs, &valid.f_unsqueeze(2)?)?;

        // 6. Window: the last min(w, t + 1) tokens, from the ring (or the raw buffer).
        let w = c.nsa.window;
        let in_window = dev
            .window_offsets
            .f_view([1, w])?
            .f_lt_tensor(&dev.window_count.f_view([b, 1])?)?;
        let (kw, vw) = match &cache.window {
            Some(ring) => (ring.k.shallow_clone(), ring.v.shallow_clone()),
            None => {
                let positions = dev
                    .window_offsets
                    .f_view([1, w])?
                    .f_add(&dev.window_start.f_view([b, 1])?)?
                    .f_clamp_max(cache.capacity() - 1)?
                    .f_view([b, 1, w])?
                    .f_expand([b, g, w], false)?;
                cache.raw.read_slots(&positions)?
            }
        };
        let (o_win, _) = attend(&q, &kw, &vw, &in_window.f_view([b, 1, 1, w])?)?;

        // 7. Gates (Eq. 5) and the output projection.
        let heads = |o: &Tensor| o.f_reshape([b, 1, c.heads, c.head_dim_v]);
        let mixed = gates::mix(&gates, &heads(&o_cmp)?, &heads(&o_slc)?, &heads(&o_win)?)?;
        self.finish_step(&mixed, blocks, plan)
    }

    /// Step 1 with libtorch's operators: the raw projections' new keys and values into the
    /// raw buffer, the window ring and the pending ring (one scatter per tensor).
    fn append_with_operators(
        &self,
        raw: &RawProjections,
        cache: &mut NsaCache,
        dev: &PlanTensors,
    ) -> Result<(), AttnError> {
        let new = |br: Branch| -> Result<(Tensor, Tensor), AttnError> {
            let (k, v) = &raw.kv[self.kv_index(br)];
            Ok((k.f_select(1, 0)?, v.f_select(1, 0)?))
        };
        let (k, v) = new(Branch::Selected)?;
        cache.raw.put(None, &dev.kv_heads, &dev.positions, &k, &v)?;
        if let Some(ring) = &mut cache.window {
            let (k, v) = new(Branch::Window)?;
            ring.put(None, &dev.kv_heads, &dev.window_slot, &k, &v)?;
        }
        if let Some(ring) = &mut cache.pending {
            let (k, v) = self.phi_input(raw);
            let (k, v) = (k.f_select(1, 0)?, v.f_select(1, 0)?);
            ring.put(None, &dev.kv_heads, &dev.pending_slot, &k, &v)?;
        }
        Ok(())
    }

    /// Step 1 on the prologue kernel (`nsa_sys::fused::decode_append`) from the stacked
    /// projections `[B, W]` of the new tokens: the rotated queries, the writes of
    /// [`NsaAttention::prologue_writes`] and, with `gate_rows` (W_1's rows stacked last), the
    /// learned gates.
    fn prologue(
        &self,
        stacked: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        cache: &NsaCache,
        dev: &PlanTensors,
        gate_rows: bool,
    ) -> Result<sys::StepPrologue, AttnError> {
        let writes = self.prologue_writes(cache, dev);
        let gates = gate_rows.then(|| self.prologue_gates());
        let heads = self.config().heads;
        Ok(sys::decode_append(
            stacked, heads, cos, sin, &writes, gates,
        )?)
    }

    /// The prologue's cache writes: the same as [`NsaAttention::append_with_operators`], read
    /// from the stacked row `[q | keys of each pair | values of each pair | W_1 x]`, keys
    /// rotated where `project_raw` rotates them (all but φ's with `cmp_rope = "compressed"`).
    fn prologue_writes<'a>(
        &self,
        cache: &'a NsaCache,
        dev: &'a PlanTensors,
    ) -> Vec<sys::AppendWrite<'a>> {
        let c = self.config();
        let (h, g, dk, dv) = (c.heads, c.kv_heads, c.head_dim_k, c.head_dim_v);
        let pairs = self.kv_pairs();
        let cols = |br: Branch| {
            let pair = self.kv_index(br) as i64;
            (
                h * dk + pair * g * dk,
                h * dk + pairs * g * dk + pair * g * dv,
            )
        };
        fn write<'a>(
            buf: &'a KvBuf,
            slots: &'a Tensor,
            (key_col, value_col): (i64, i64),
            rotate: bool,
        ) -> [sys::AppendWrite<'a>; 2] {
            [
                sys::AppendWrite {
                    dst: &buf.k,
                    slots,
                    col: key_col,
                    rotate,
                },
                sys::AppendWrite {
                    dst: &buf.v,
                    slots,
                    col: value_col,
                    rotate: false,
                },
            ]
        }
        let mut writes = write(&cache.raw, &dev.positions, cols(Branch::Selected), true).to_vec();
        if let Some(ring) = &cache.window {
            writes.extend(write(ring, &dev.window_slot, cols(Branch::Window), true));
        }
        if let Some(ring) = &cache.pending {
            let rotated = c.nsa.cmp_rope == CmpRope::Raw;
            writes.extend(write(
                ring,
                &dev.pending_slot,
                cols(Branch::Compressed),
                rotated,
            ));
        }
        writes
    }

    /// The prologue's gates: `W_1 x` in the stacked row's last `gate_hidden` columns.
    fn prologue_gates(&self) -> sys::AppendGates<'_> {
        let c = self.config();
        let pairs = self.kv_pairs();
        let (w1, w2) = self.gate_linears();
        sys::AppendGates {
            col: c.heads * c.head_dim_k + pairs * c.kv_heads * (c.head_dim_k + c.head_dim_v),
            b1: w1.bs.as_ref(),
            w2: &w2.ws,
            b2: w2.bs.as_ref(),
        }
    }

    /// With `cmp_rope = "compressed"`, the emitted compressed keys `ck` `[E, 1, Hkv, dk]` of
    /// tokens `index` `[E]` rotated at their positions `i·d + l − 1`, with the bits of the
    /// full-sequence forward's rotation ([`Rope::at_positions`] equals [`Rope::strided`]);
    /// otherwise `ck`.
    fn rotate_emitted(&self, ck: Tensor, index: &Tensor) -> Result<Tensor, AttnError> {
        let c = self.config();
        if c.nsa.cmp_rope == CmpRope::Raw {
            return Ok(ck);
        }
        let sel = c.select_config();
        let positions = index
            .f_mul_scalar(sel.stride)?
            .f_add_scalar(sel.block_len - 1)?
            .f_view([-1, 1])?;
        let rope = Rope::at_positions(c.rope_base, c.head_dim_k, &positions, ck.kind())?;
        rope.apply(&ck)
    }

    /// The output projection of the mixed branch outputs `[B, 1, H, dv]` and the step's read
    /// counts: the `blocks` `[B, Hkv, n]` it selected.
    fn finish_step(
        &self,
        mixed: &Tensor,
        blocks: Tensor,
        plan: &DecodePlan,
    ) -> Result<LayerStep, AttnError> {
        Ok(LayerStep {
            output: self.output_projection(mixed)?,
            reads: StepReads::for_plan(plan, blocks),
        })
    }

    /// Selected blocks `[B, Hkv, n]` from the step's `p_cmp` `[B, Hkv, h, Nc]`: block scores for
    /// the whole batch, then top-n per distinct position (nsa-select takes one start position
    /// per call).
    fn select_step(
        &self,
        p_cmp: &Tensor,
        plan: &DecodePlan,
        imp: SelectImpl,
    ) -> Result<Tensor, AttnError> {
        let c = self.config();
        let sel = c.select_config();
        let sz = p_cmp.size();
        let p_cmp = p_cmp.f_reshape([sz[0], 1, c.heads, sz[3]])?;
        let scores = nsa_select::block_scores(&p_cmp, c.heads_per_group(), plan.num_blocks, &sel)?;
        let blocks = match plan.position_groups.as_slice() {
            [(t, None)] => nsa_select::select_blocks(&scores, *t, &sel, imp)?,
            groups => {
                let mut all = Tensor::f_full(
                    [sz[0], 1, c.kv_heads, sel.top_n],
                    -1,
                    (Kind::Int64, p_cmp.device()),
                )?;
                for (t, rows) in groups {
                    let rows = rows.as_ref().ok_or_else(|| AttnError::Option {
                        option: "plan",
                        reason: "a position group without rows".into(),
                    })?;
                    let part =
                        nsa_select::select_blocks(&scores.f_index_select(0, rows)?, *t, &sel, imp)?;
                    let _ = all.f_index_copy_(0, rows, &part)?;
                }
                all
            }
        };
        Ok(blocks.f_select(1, 0)?)
    }
}

/// Whether a step runs now or is enqueued for a capture (`NsaAttention::enqueue_step`).
#[derive(Debug, Clone, Copy)]
enum Run {
    Now,
    Enqueue,
}

/// The read counts a step must report for a sequence at position `t` whose group selected
/// `blocks` (ids, `−1` padding): `(compressed, selected, window)` = (visible compressed tokens,
/// distinct positions `≤ t` in the selected blocks, `min(w, t + 1)`). The formula the
/// [`StepReads`] counter is tested against.
pub fn expected_reads(cfg: &NsaConfig, t: i64, blocks: &[i64]) -> (i64, i64, i64) {
    let sel = cfg.select_config();
    let mut ids: Vec<i64> = blocks.iter().copied().filter(|&j| j >= 0).collect();
    ids.sort_unstable();
    ids.dedup();
    let selected = ids
        .iter()
        .map(|&j| (t + 1 - j * sel.select_len).clamp(0, sel.select_len))
        .sum();
    (
        sel.num_visible_compressed(t),
        selected,
        cfg.nsa.window.min(t + 1),
    )
}
