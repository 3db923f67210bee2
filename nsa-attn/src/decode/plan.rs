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
    /// of the pending block, or positions in the raw buffer with `shared_kv`.
    pub(crate) sources: Tensor,
    /// `[E]`: the new compressed token's index `i`.
    pub(crate) index: Tensor,
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
        cfg.validate()?;
        let batch = lengths.len() as i64;
        if batch == 0 || lengths.iter().any(|&t| t < 0) {
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
        let sel = cfg.select_config();
        let (l, d, w) = (sel.block_len, sel.stride, cfg.nsa.window);
        let positions = lengths.to_vec();
        let visible: Vec<i64> = positions
            .iter()
            .map(|&t| sel.num_visible_compressed(t))
            .collect();
        let window_count: Vec<i64> = positions.iter().map(|&t| w.min(t + 1)).collect();
        let last = positions.iter().copied().max().unwrap_or(0);
        let emitting: Vec<(i64, i64)> = (0..batch)
            .zip(&positions)
            .filter(|&(_, &t)| t + 1 >= l && (t + 1 - l) % d == 0)
            .map(|(b, &t)| (b, t))
            .collect();

        let mut pack = Pack::default();
        let rows = pack.push(0..batch);
        let kv_heads = pack.push(0..cfg.kv_heads);
        let pos = pack.push(positions.iter().copied());
        let vis = pack.push(visible.iter().copied());
        let win_count = pack.push(window_count.iter().copied());
        let win_start = pack.push(positions.iter().zip(&window_count).map(|(t, c)| t + 1 - c));
        let win_slot = pack.push(positions.iter().map(|t| t % w));
        let pend_slot = pack.push(positions.iter().map(|t| t % l));
        let select_offsets = pack.push(0..sel.select_len);
        let window_offsets = pack.push(0..w);
        let emission = (!emitting.is_empty()).then(|| {
            let shared = cfg.nsa.shared_kv;
            (
                pack.push(emitting.iter().map(|&(b, _)| b)),
                pack.push(emitting.iter().flat_map(|&(_, t)| {
                    (t + 1 - l..=t).map(move |p| if shared { p } else { p % l })
                })),
                pack.push(emitting.iter().map(|&(_, t)| (t + 1 - l) / d)),
            )
        });
        let mut distinct: Vec<i64> = positions.clone();
        distinct.sort_unstable();
        distinct.dedup();
        let groups: Vec<(i64, Option<(i64, i64)>)> = if distinct.len() == 1 {
            vec![(distinct[0], None)]
        } else {
            distinct
                .iter()
                .map(|&t| {
                    let members = (0..batch).filter(|&b| positions[b as usize] == t);
                    (t, Some(pack.push(members)))
                })
                .collect()
        };
        let ids = tokens.map(|ids| pack.push(ids.iter().copied()));

        let host = Tensor::f_from_slice(&pack.0)?;
        let all = if device.is_cuda() {
            // Pinned host memory and a non-blocking copy: the step does not wait for the GPU
            // (libtorch's caching host allocator keeps the buffer until the copy is done).
            // `_pin_memory` with the device, not `pin_memory`, which warns on every call that
            // its device argument is deprecated.
            host.f_internal_pin_memory(device)?
                .f_to_device_(device, Kind::Int64, true, false)?
        } else {
            host.f_to_device(device)?
        };
        let seg = |(start, len): (i64, i64)| all.f_narrow(0, start, len);
        let dev = PlanTensors {
            rows: seg(rows)?,
            kv_heads: seg(kv_heads)?,
            positions: seg(pos)?,
            visible: seg(vis)?,
            window_count: seg(win_count)?,
            window_start: seg(win_start)?,
            window_slot: seg(win_slot)?,
            pending_slot: seg(pend_slot)?,
            select_offsets: seg(select_offsets)?,
            window_offsets: seg(window_offsets)?,
            emission: emission
                .map(|(r, s, i)| -> Result<Emission, AttnError> {
                    Ok(Emission {
                        rows: seg(r)?,
                        sources: seg(s)?.f_view([r.1, l])?,
                        index: seg(i)?,
                    })
                })
                .transpose()?,
            tokens: ids.map(seg).transpose()?,
        };
        let rope = Rope::at_positions(
            cfg.rope_base,
            cfg.head_dim_k,
            &dev.positions.f_view([batch, 1])?,
            kind,
        )?;
        let position_groups = groups
            .into_iter()
            .map(|(t, members)| Ok((t, members.map(seg).transpose()?)))
            .collect::<Result<Vec<_>, AttnError>>()?;
        Ok(Self {
            cfg: *cfg,
            kind,
            device,
            max_visible: visible.iter().copied().max().unwrap_or(0),
            num_blocks: sel.num_select_blocks(last + 1),
            positions,
            visible,
            window_count,
            position_groups,
            rope,
            dev,
        })
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
