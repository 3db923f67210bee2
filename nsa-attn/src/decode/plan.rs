//! [`DecodePlan`]: the per-step bookkeeping of a decode step, computed on the host from the
//! cached lengths and handed to the device in one transfer.
use tch::{Device, Kind, Tensor};

use crate::config::{AttnError, NsaConfig};
use crate::rope::Rope;

/// Everything a decode step needs to know about the batch's positions, for one step of every
/// NSA layer of a model (the layers share one configuration, so one plan serves them all).
///
/// Built on the host from the cached lengths, with nsa-select's scalar rules
/// ([`nsa_select::SelectConfig::num_visible_compressed`] and friends), then copied to the device
/// in **one** host→device transfer (pinned and asynchronous on CUDA), so that a step issues no
/// host↔device synchronisation of its own. The RoPE tables of the new tokens' positions are
/// computed on the device from that transfer.
///
/// A **fixed-layout** plan ([`DecodePlan::fixed`]) keeps its device tensors at the same
/// addresses and shapes for every step ([`DecodePlan::refill`] overwrites them in place), so a
/// step enqueued with it can be captured once as a CUDA graph and replayed: every sequence
/// takes part in the emission of compressed tokens (those that complete no block write back
/// what their slot held), and the decode kernels are sized for positions up to a bound fixed
/// when the plan is made. Its RoPE tables are rows of tables computed once for every position
/// it can describe ([`DecodePlan::refill`] gathers them: four index launches instead of the
/// angles' dozen operators), so a refill costs the host a handful of launches.
#[derive(Debug)]
pub struct DecodePlan {
    pub(crate) cfg: NsaConfig,
    pub(crate) kind: Kind,
    pub(crate) device: Device,
    /// `t_b`: the position of sequence `b`'s new token (= its cached length before the step).
    pub(crate) positions: Vec<i64>,
    /// Compressed tokens visible to each new token (Eq. 7), after this step's emissions.
    pub(crate) visible: Vec<i64>,
    /// `min(w, t_b + 1)`: window keys each new token reads.
    pub(crate) window_count: Vec<i64>,
    /// The widest compressed-token prefix any sequence reads.
    pub(crate) max_visible: i64,
    /// Selection blocks to score: enough for the largest position.
    pub(crate) num_blocks: i64,
    /// Distinct positions with their batch rows (`None`: every row has this position).
    pub(crate) position_groups: Vec<(i64, Option<Tensor>)>,
    pub(crate) rope: Rope,
    pub(crate) dev: PlanTensors,
    /// The largest position the plan describes during its life: the maximum of `positions`, or
    /// a fixed-layout plan's bound (what the decode kernels are sized for).
    pub(crate) position_bound: i64,
    /// A fixed-layout plan: the one transfer's device buffer, which [`DecodePlan::refill`]
    /// overwrites, and the RoPE tables it gathers from.
    fixed: Option<Fixed>,
    /// Steps with this plan leave out the emission of compressed tokens
    /// ([`DecodePlan::set_emission`]).
    pub(crate) skip_emission: bool,
}

/// What a fixed-layout plan keeps for its refills.
#[derive(Debug)]
struct Fixed {
    /// The one transfer's device buffer (every [`PlanTensors`] tensor is a view of it).
    all: Tensor,
    /// The first position of `tables`: the smallest position the plan was made for.
    first: i64,
    /// RoPE tables ([`Rope::strided`], with the kernel's where it applies) of the positions
    /// `first ..= position_bound`, so position `p` has the bits [`Rope::at_positions`] gives it.
    tables: Rope,
    /// `[B]`: `t_b − first`, the rows of `tables` for the plan's positions (a view of `all`).
    rows: Tensor,
}

/// The plan's device tensors (int64, views of one transfer).
#[derive(Debug)]
pub(crate) struct PlanTensors {
    /// `[B]`: `0 .. B`.
    pub(crate) rows: Tensor,
    /// `[Hkv]`: `0 .. Hkv`.
    pub(crate) kv_heads: Tensor,
    /// `[B]`: `t_b`.
    pub(crate) positions: Tensor,
    /// `[B]`: compressed tokens visible to `t_b`.
    pub(crate) visible: Tensor,
    /// `[B]`: `min(w, t_b + 1)`.
    pub(crate) window_count: Tensor,
    /// `[B]`: `t_b + 1 − min(w, t_b + 1)`, the first window position.
    pub(crate) window_start: Tensor,
    /// `[B]`: `t_b mod w`, the window ring slot of the new token.
    pub(crate) window_slot: Tensor,
    /// `[B]`: `t_b mod l`, the pending-block ring slot of the new token.
    pub(crate) pending_slot: Tensor,
    /// `[l']`: `0 .. l'`.
    pub(crate) select_offsets: Tensor,
    /// `[w]`: `0 .. w`.
    pub(crate) window_offsets: Tensor,
    /// Sequences that complete a compressed block this step.
    pub(crate) emission: Option<Emission>,
    /// `[B]`: token ids handed to [`DecodePlan::new`].
    pub(crate) tokens: Option<Tensor>,
}

/// The sequences whose new token completes a compressed block (`t_b = i·d + l − 1`).
#[derive(Debug)]
pub(crate) struct Emission {
    /// `[E]`: their batch rows.
    pub(crate) rows: Tensor,
    /// `[E, l]`: where the block's raw tokens `t_b − l + 1 ..= t_b` sit, in order: ring slots
    /// of the pending block, or positions in the raw buffer where the cache has no pending
    /// ring (`shared_kv` with `cmp_rope = "raw"`).
    pub(crate) sources: Tensor,
    /// `[E]`: the new compressed token's index `i`.
    pub(crate) index: Tensor,
    /// Fixed-layout plans: `[B]`, 1 where sequence `b` completes a block (`E = B`: the others
    /// take part with slot 0 as their source and index 0 as their target, and write back what
    /// index 0 holds); `None`: every listed sequence emits.
    pub(crate) emit: Option<Tensor>,
}

/// Host integers gathered for one transfer: each `push` returns the segment's (offset, len).
#[derive(Default)]
struct Pack(Vec<i64>);

impl Pack {
    fn push(&mut self, values: impl IntoIterator<Item = i64>) -> (i64, i64) {
        let start = self.0.len();
        self.0.extend(values);
        (start as i64, (self.0.len() - start) as i64)
    }
}

/// The host side of a plan: its integers in transfer order and where each segment lies.
struct Packed {
    pack: Pack,
    rows: (i64, i64),
    kv_heads: (i64, i64),
    positions: (i64, i64),
    visible: (i64, i64),
    window_count: (i64, i64),
    window_start: (i64, i64),
    window_slot: (i64, i64),
    pending_slot: (i64, i64),
    select_offsets: (i64, i64),
    window_offsets: (i64, i64),
    emission: Option<EmissionSegments>,
    /// Distinct positions with their rows: a segment of the transfer (ordinary plans) or
    /// host rows for a transfer of their own (fixed-layout plans).
    groups: Vec<(i64, Option<GroupRows>)>,
    tokens: Option<(i64, i64)>,
    /// Fixed-layout plans: the first position of the plan's RoPE tables and the segment of
    /// `t_b − first`, their rows.
    rope_rows: Option<(i64, Segment)>,
}

/// A segment of the transfer: (offset, length).
type Segment = (i64, i64);

/// The emission's segments: rows, sources, index and (fixed-layout plans) the flags.
type EmissionSegments = (Segment, Segment, Segment, Option<Segment>);

/// Where the batch rows of one position group are.
enum GroupRows {
    Segment((i64, i64)),
    Host(Vec<i64>),
}

/// Checks the lengths and tokens of a plan for `cfg`.
fn check_inputs(cfg: &NsaConfig, lengths: &[i64], tokens: Option<&[i64]>) -> Result<(), AttnError> {
    cfg.validate()?;
    if lengths.is_empty() || lengths.iter().any(|&t| t < 0) {
        return Err(AttnError::Option {
            option: "lengths",
            reason: format!("need one non-negative length per sequence, got {lengths:?}"),
        });
    }
    if let Some(ids) = tokens.filter(|ids| ids.len() != lengths.len()) {
        return Err(AttnError::Option {
            option: "tokens",
            reason: format!("{} ids for {} sequences", ids.len(), lengths.len()),
        });
    }
    Ok(())
}

/// The plan's integers for sequences at `positions`. `fixed` (a fixed-layout plan, with the
/// first position of its RoPE tables): every sequence in the emission (with its flag), the
/// position groups kept out of the transfer and the rows of the RoPE tables added, so the
/// layout depends only on the batch size, the configuration and whether `tokens` are given.
fn pack(cfg: &NsaConfig, positions: &[i64], tokens: Option<&[i64]>, fixed: Option<i64>) -> Packed {
    let sel = cfg.select_config();
    let (l, d, w) = (sel.block_len, sel.stride, cfg.nsa.window);
    let batch = positions.len() as i64;
    let emits = |t: i64| completes_block(cfg, t);
    let window_count: Vec<i64> = positions.iter().map(|&t| w.min(t + 1)).collect();
    let mut pack = Pack::default();
    let rows = pack.push(0..batch);
    let kv_heads = pack.push(0..cfg.kv_heads);
    let pos = pack.push(positions.iter().copied());
    let visible = pack.push(positions.iter().map(|&t| sel.num_visible_compressed(t)));
    let win_count = pack.push(window_count.iter().copied());
    let window_start = pack.push(positions.iter().zip(&window_count).map(|(t, c)| t + 1 - c));
    let window_slot = pack.push(positions.iter().map(|t| t % w));
    let pending_slot = pack.push(positions.iter().map(|t| t % l));
    let select_offsets = pack.push(0..sel.select_len);
    let window_offsets = pack.push(0..w);
    let ring = super::cache::has_pending_ring(cfg);
    // The raw tokens t − l + 1 ..= t of a block ending at t: ring slots, or raw positions.
    let sources = move |t: i64| (t + 1 - l..=t).map(move |p| if ring { p % l } else { p });
    let emission = if fixed.is_some() {
        Some((
            rows,
            pack.push(positions.iter().flat_map(|&t| {
                let ok = emits(t);
                sources(t).map(move |p| if ok { p } else { 0 })
            })),
            pack.push(
                positions
                    .iter()
                    .map(|&t| if emits(t) { (t + 1 - l) / d } else { 0 }),
            ),
            Some(pack.push(positions.iter().map(|&t| i64::from(emits(t))))),
        ))
    } else {
        let emitting: Vec<(i64, i64)> = (0..batch)
            .zip(positions)
            .filter(|&(_, &t)| emits(t))
            .map(|(b, &t)| (b, t))
            .collect();
        (!emitting.is_empty()).then(|| {
            (
                pack.push(emitting.iter().map(|&(b, _)| b)),
                pack.push(emitting.iter().flat_map(|&(_, t)| sources(t))),
                pack.push(emitting.iter().map(|&(_, t)| (t + 1 - l) / d)),
                None,
            )
        })
    };
    let mut distinct: Vec<i64> = positions.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    let groups = if distinct.len() == 1 {
        vec![(distinct[0], None)]
    } else {
        distinct
            .iter()
            .map(|&t| {
                let members = (0..batch).filter(|&b| positions[b as usize] == t);
                let rows = if fixed.is_some() {
                    GroupRows::Host(members.collect())
                } else {
                    GroupRows::Segment(pack.push(members))
                };
                (t, Some(rows))
            })
            .collect()
    };
    let tokens = tokens.map(|ids| pack.push(ids.iter().copied()));
    let rope_rows = fixed.map(|first| (first, pack.push(positions.iter().map(|t| t - first))));
    Packed {
        pack,
        rows,
        kv_heads,
        positions: pos,
        visible,
        window_count: win_count,
        window_start,
        window_slot,
        pending_slot,
        select_offsets,
        window_offsets,
        emission,
        groups,
        tokens,
        rope_rows,
    }
}

/// The position groups' batch rows on `device`: segments of `all` or transfers of their own.
fn position_groups(
    groups: Vec<(i64, Option<GroupRows>)>,
    all: &Tensor,
    device: Device,
) -> Result<Vec<(i64, Option<Tensor>)>, AttnError> {
    groups
        .into_iter()
        .map(|(t, members)| {
            let rows = match members {
                None => None,
                Some(GroupRows::Segment((start, len))) => Some(all.f_narrow(0, start, len)?),
                Some(GroupRows::Host(rows)) => Some(to_device(&rows, device)?),
            };
            Ok((t, rows))
        })
        .collect()
}

/// Whether the token at position `t` completes a compressed block (`t = i·d + l − 1`), so a
/// step that adds it emits compressed token `i`.
fn completes_block(cfg: &NsaConfig, t: i64) -> bool {
    let sel = cfg.select_config();
    t + 1 >= sel.block_len && (t + 1 - sel.block_len) % sel.stride == 0
}

/// `values` as int64 on `device`: pinned host memory and a non-blocking copy on CUDA (the step
/// does not wait for the GPU; libtorch's caching host allocator keeps the buffer until the
/// copy is done). `_pin_memory` with the device, not `pin_memory`, which warns on every call
/// that its device argument is deprecated.
fn to_device(values: &[i64], device: Device) -> Result<Tensor, AttnError> {
    let host = Tensor::f_from_slice(values)?;
    Ok(if device.is_cuda() {
        host.f_internal_pin_memory(device)?
            .f_to_device_(device, Kind::Int64, true, false)?
    } else {
        host.f_to_device(device)?
    })
}

impl DecodePlan {
    /// The plan for one step of sequences holding `lengths` tokens each (the new token of
    /// sequence `b` sits at position `lengths[b]`), for layers of configuration `cfg` whose
    /// activations have `kind` on `device`. `tokens` (the new token ids, one per sequence, for
    /// a model's embedding) travel in the same transfer.
    pub fn new(
        cfg: &NsaConfig,
        lengths: &[i64],
        kind: Kind,
        device: Device,
        tokens: Option<&[i64]>,
    ) -> Result<Self, AttnError> {
        check_inputs(cfg, lengths, tokens)?;
        let packed = pack(cfg, lengths, tokens, None);
        let all = to_device(&packed.pack.0, device)?;
        let bound = lengths.iter().copied().max().unwrap_or(0);
        Self::materialise(cfg, lengths, kind, device, packed, all, bound)
    }

    /// A fixed-layout plan (see the type's docs) for sequences holding `lengths` tokens, whose
    /// positions will stay `≤ position_bound` for as long as it serves (at least the largest
    /// of `lengths`). Its position groups (the non-kernel step's per-position selection) are
    /// separate transfers: a step on libtorch's operators runs with it too, but only the
    /// decode kernels' step is fit for a graph.
    pub fn fixed(
        cfg: &NsaConfig,
        lengths: &[i64],
        kind: Kind,
        device: Device,
        tokens: Option<&[i64]>,
        position_bound: i64,
    ) -> Result<Self, AttnError> {
        check_inputs(cfg, lengths, tokens)?;
        let last = lengths.iter().copied().max().unwrap_or(0);
        if position_bound < last {
            return Err(AttnError::Option {
                option: "position_bound",
                reason: format!("{position_bound} is below the largest position {last}"),
            });
        }
        let first = lengths.iter().copied().min().unwrap_or(0);
        let packed = pack(cfg, lengths, tokens, Some(first));
        let all = to_device(&packed.pack.0, device)?;
        Self::materialise(cfg, lengths, kind, device, packed, all, position_bound)
    }

    /// Overwrites a fixed-layout plan in place for the next step: sequences holding `lengths`
    /// tokens (each position `≤` the plan's bound), new token ids `tokens` (given exactly when
    /// the plan was made with them), no position below the smallest it was made for. One
    /// transfer and four gathers of RoPE rows, on the current stream, before the step that
    /// reads them.
    pub fn refill(&mut self, lengths: &[i64], tokens: Option<&[i64]>) -> Result<(), AttnError> {
        let Some(fixed) = &self.fixed else {
            return Err(AttnError::Option {
                option: "plan",
                reason: "only a fixed-layout plan (DecodePlan::fixed) can be refilled".into(),
            });
        };
        check_inputs(&self.cfg, lengths, tokens)?;
        if lengths.len() != self.positions.len() || tokens.is_some() != self.dev.tokens.is_some() {
            return Err(AttnError::Option {
                option: "plan",
                reason: format!(
                    "made for {} sequences {} token ids; refilled with {} {}",
                    self.positions.len(),
                    if self.dev.tokens.is_some() {
                        "with"
                    } else {
                        "without"
                    },
                    lengths.len(),
                    if tokens.is_some() { "with" } else { "without" },
                ),
            });
        }
        if let Some(&t) = lengths.iter().find(|&&t| t > self.position_bound) {
            return Err(AttnError::Option {
                option: "plan",
                reason: format!(
                    "position {t} is past the plan's bound {}",
                    self.position_bound
                ),
            });
        }
        if let Some(&t) = lengths.iter().find(|&&t| t < fixed.first) {
            return Err(AttnError::Option {
                option: "plan",
                reason: format!(
                    "position {t} is before the plan's first position {} (its RoPE tables \
                     start there)",
                    fixed.first
                ),
            });
        }
        let packed = pack(&self.cfg, lengths, tokens, Some(fixed.first));
        let fresh = to_device(&packed.pack.0, self.device)?;
        fixed.all.shallow_clone().f_copy_(&fresh)?;
        self.rope.gather_rows(&fixed.tables, &fixed.rows)?;
        self.position_groups = position_groups(packed.groups, &fixed.all, self.device)?;
        self.set_positions(lengths);
        Ok(())
    }

    /// The host's per-sequence counts for sequences at `positions`.
    fn set_positions(&mut self, positions: &[i64]) {
        let sel = self.cfg.select_config();
        self.positions = positions.to_vec();
        self.visible = positions
            .iter()
            .map(|&t| sel.num_visible_compressed(t))
            .collect();
        self.window_count = positions
            .iter()
            .map(|&t| self.cfg.nsa.window.min(t + 1))
            .collect();
        self.max_visible = self.visible.iter().copied().max().unwrap_or(0);
        let last = positions.iter().copied().max().unwrap_or(0);
        self.num_blocks = sel.num_select_blocks(last + 1);
    }

    /// Whether the plan has a fixed layout ([`DecodePlan::fixed`]).
    pub fn is_fixed(&self) -> bool {
        self.fixed.is_some()
    }

    /// Whether a sequence's new token completes a compressed block at the plan's positions,
    /// so that the step must emit a compressed token.
    pub fn emits(&self) -> bool {
        self.positions
            .iter()
            .any(|&t| completes_block(&self.cfg, t))
    }

    /// Switches the emission of compressed tokens off (`on = false`) or back on for the steps
    /// enqueued with this fixed-layout plan: a model captures two graphs of its step, one
    /// with the emission (φ over the pending block, for every sequence) and one without, and
    /// replays the second at the `d − 1` of every `d` positions where no sequence completes a
    /// block ([`DecodePlan::emits`]). An eager step refuses a plan without the emission at a
    /// position that needs it; the caller that replays a graph captured without it must check
    /// [`DecodePlan::emits`] itself (replayed there, the cache would miss a compressed token).
    pub fn set_emission(&mut self, on: bool) -> Result<(), AttnError> {
        if self.fixed.is_none() {
            return Err(AttnError::Option {
                option: "plan",
                reason: "only a fixed-layout plan (DecodePlan::fixed) leaves out the emission"
                    .into(),
            });
        }
        self.skip_emission = !on;
        Ok(())
    }

    /// The largest position the plan describes during its life.
    pub fn position_bound(&self) -> i64 {
        self.position_bound
    }

    /// The plan over `all`, the device copy of `packed` (a fixed-layout plan's where `packed`
    /// has RoPE rows).
    fn materialise(
        cfg: &NsaConfig,
        lengths: &[i64],
        kind: Kind,
        device: Device,
        packed: Packed,
        all: Tensor,
        position_bound: i64,
    ) -> Result<Self, AttnError> {
        let l = cfg.select_config().block_len;
        let batch = lengths.len() as i64;
        let seg = |(start, len): (i64, i64)| all.f_narrow(0, start, len);
        let dev = PlanTensors {
            rows: seg(packed.rows)?,
            kv_heads: seg(packed.kv_heads)?,
            positions: seg(packed.positions)?,
            visible: seg(packed.visible)?,
            window_count: seg(packed.window_count)?,
            window_start: seg(packed.window_start)?,
            window_slot: seg(packed.window_slot)?,
            pending_slot: seg(packed.pending_slot)?,
            select_offsets: seg(packed.select_offsets)?,
            window_offsets: seg(packed.window_offsets)?,
            emission: packed
                .emission
                .map(|(r, s, i, e)| -> Result<Emission, AttnError> {
                    Ok(Emission {
                        rows: seg(r)?,
                        sources: seg(s)?.f_view([r.1, l])?,
                        index: seg(i)?,
                        emit: e.map(seg).transpose()?,
                    })
                })
                .transpose()?,
            tokens: packed.tokens.map(seg).transpose()?,
        };
        let rope = Rope::at_positions(
            cfg.rope_base,
            cfg.head_dim_k,
            &dev.positions.f_view([batch, 1])?,
            kind,
        )?
        // One rotation kernel launch for all the step's heads on CUDA.
        .with_kernel(true)?;
        let position_groups = position_groups(packed.groups, &all, device)?;
        let fixed = match packed.rope_rows {
            Some((first, rows)) => {
                let span = (first, 1, position_bound - first + 1);
                let tables = Rope::strided(cfg.rope_base, cfg.head_dim_k, span, kind, device)?
                    .with_kernel(true)?;
                Some(Fixed {
                    rows: seg(rows)?,
                    all,
                    first,
                    tables,
                })
            }
            None => None,
        };
        let mut plan = Self {
            cfg: *cfg,
            kind,
            device,
            positions: Vec::new(),
            visible: Vec::new(),
            window_count: Vec::new(),
            max_visible: 0,
            num_blocks: 0,
            position_groups,
            rope,
            dev,
            position_bound,
            fixed,
            skip_emission: false,
        };
        plan.set_positions(lengths);
        Ok(plan)
    }

    /// The position of each sequence's new token (its cached length before the step).
    pub fn positions(&self) -> &[i64] {
        &self.positions
    }

    /// The positions as int64 `[B]` on the device.
    pub fn positions_tensor(&self) -> &Tensor {
        &self.dev.positions
    }

    /// `0 .. B` as int64 `[B]` on the device (for index writes into per-sequence buffers).
    pub fn rows(&self) -> &Tensor {
        &self.dev.rows
    }

    /// RoPE tables for the new tokens' positions: [`Rope::apply`] on `[B, 1, heads, dk]`.
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// The token ids handed to [`DecodePlan::new`], int64 `[B]` on the device.
    pub fn tokens(&self) -> Option<&Tensor> {
        self.dev.tokens.as_ref()
    }

    /// The configuration the plan was made for.
    pub fn config(&self) -> &NsaConfig {
        &self.cfg
    }
}
