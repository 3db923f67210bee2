//! [`NsaCache`]: one layer's decode state, its buffers and the index writes and gathers the
//! decode step does on them.
use tch::{Device, Kind, Tensor};

use crate::config::{AttnError, CmpRope, NsaConfig};
use crate::layer::RawProjections;

use super::plan::DecodePlan;

/// A tensor constructor: shape and options to a tensor (`Tensor::f_zeros`, `Tensor::f_randn`).
type MakeTensor = fn(&[i64], (Kind, Device)) -> Result<Tensor, tch::TchError>;

/// Keys and values of one buffer, `[B, Hkv, N, dk]` and `[B, Hkv, N, dv]`.
#[derive(Debug)]
pub(crate) struct KvBuf {
    pub(crate) k: Tensor,
    pub(crate) v: Tensor,
}

impl KvBuf {
    /// A buffer of `slots` slots for `batch` sequences, made by `make(shape, options)`
    /// (`Tensor::f_zeros`, `Tensor::f_randn`).
    fn new(
        cfg: &NsaConfig,
        (batch, slots): (i64, i64),
        (kind, device): (Kind, Device),
        make: MakeTensor,
    ) -> Result<Self, AttnError> {
        let shape = |d| [batch, cfg.kv_heads, slots, d];
        Ok(Self {
            k: make(&shape(cfg.head_dim_k), (kind, device))?,
            v: make(&shape(cfg.head_dim_v), (kind, device))?,
        })
    }

    pub(crate) fn slots(&self) -> i64 {
        self.k.size()[2]
    }

    /// The advanced index of `(rows[e], :, slots[e])`: `[E, 1]`, `[1, G]`, `[E, 1]`, broadcast
    /// to the `[E, G]` positions of a value's first axes.
    fn index(
        rows: &Tensor,
        kv_heads: &Tensor,
        slots: &Tensor,
    ) -> Result<[Option<Tensor>; 3], AttnError> {
        let (e, g) = (rows.size()[0], kv_heads.size()[0]);
        Ok([
            Some(rows.f_view([e, 1])?),
            Some(kv_heads.f_view([1, g])?),
            Some(slots.f_view([e, 1])?),
        ])
    }

    /// Writes `k` `[E, Hkv, dk]`, `v` `[E, Hkv, dv]` at `(rows[e], :, slots[e])`; `rows`
    /// `None`: every sequence (`E = B`, row `e` is sequence `e`), one scatter per tensor (an
    /// index write over broadcast row and group indices first copies them: three launches
    /// where this takes one).
    pub(crate) fn put(
        &mut self,
        rows: Option<&Tensor>,
        kv_heads: &Tensor,
        slots: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(), AttnError> {
        match rows {
            Some(rows) => {
                let index = Self::index(rows, kv_heads, slots)?;
                let _ = self.k.f_index_put_(&index, k, false)?;
                let _ = self.v.f_index_put_(&index, v, false)?;
            }
            None => {
                let _ = self
                    .k
                    .f_scatter_(2, &Self::each(slots, &self.k)?, &k.f_unsqueeze(2)?)?;
                let _ = self
                    .v
                    .f_scatter_(2, &Self::each(slots, &self.v)?, &v.f_unsqueeze(2)?)?;
            }
        }
        Ok(())
    }

    /// What [`KvBuf::put`] with the same indices would overwrite: `[E, Hkv, dk]`, `[E, Hkv, dv]`.
    pub(crate) fn read_at(
        &self,
        rows: Option<&Tensor>,
        kv_heads: &Tensor,
        slots: &Tensor,
    ) -> Result<(Tensor, Tensor), AttnError> {
        match rows {
            Some(rows) => {
                let index = Self::index(rows, kv_heads, slots)?;
                Ok((self.k.f_index(&index)?, self.v.f_index(&index)?))
            }
            None => {
                let take = |t: &Tensor| -> Result<Tensor, AttnError> {
                    Ok(t.f_gather(2, &Self::each(slots, t)?, false)?
                        .f_squeeze_dim(2)?)
                };
                Ok((take(&self.k)?, take(&self.v)?))
            }
        }
    }

    /// The scatter / gather index of slot `slots[b]` of every group of sequence `b` in `t`
    /// `[B, Hkv, N, d]`: `[B, Hkv, 1, d]`, a broadcast view.
    fn each(slots: &Tensor, t: &Tensor) -> Result<Tensor, AttnError> {
        let sz = t.size();
        Ok(slots
            .f_view([sz[0], 1, 1, 1])?
            .f_expand([sz[0], sz[1], 1, sz[3]], false)?)
    }

    /// Keys and values at `slots` `[B, Hkv, K]` (per sequence and group): `[B, Hkv, K, d]`.
    pub(crate) fn read_slots(&self, slots: &Tensor) -> Result<(Tensor, Tensor), AttnError> {
        let take = |t: &Tensor| -> Result<Tensor, AttnError> {
            let sz = slots.size();
            let d = t.size()[3];
            let index = slots
                .f_unsqueeze(-1)?
                .f_expand([sz[0], sz[1], sz[2], d], false)?;
            Ok(t.f_gather(2, &index, false)?)
        };
        Ok((take(&self.k)?, take(&self.v)?))
    }

    /// The same slots `[E, K]` for every group (`kv_heads`: `0 .. Hkv`) of rows `rows` `[E]`
    /// (`None`: every sequence, `E = B`): `[E, K, Hkv, d]` (the raw layout φ reads). One gather
    /// of the `E·Hkv·K` rows (not a copy of the rows' whole buffers first: the raw buffer holds
    /// every cached position).
    pub(crate) fn read_rows(
        &self,
        rows: Option<&Tensor>,
        kv_heads: &Tensor,
        slots: &Tensor,
    ) -> Result<(Tensor, Tensor), AttnError> {
        let g = kv_heads.size()[0];
        let (e, k) = (slots.size()[0], slots.size()[1]);
        let gathered = match rows {
            Some(rows) => {
                let index = [
                    Some(rows.f_view([e, 1, 1])?),
                    Some(kv_heads.f_view([1, g, 1])?),
                    Some(slots.f_view([e, 1, k])?),
                ];
                (self.k.f_index(&index)?, self.v.f_index(&index)?)
            }
            None => self.read_slots(&slots.f_view([e, 1, k])?.f_expand([e, g, k], false)?)?,
        };
        Ok((
            gathered.0.f_permute([0, 2, 1, 3])?,
            gathered.1.f_permute([0, 2, 1, 3])?,
        ))
    }

    /// The same buffer with `slots` slots (the first `min(old, slots)` kept).
    fn resized(&self, slots: i64) -> Result<Self, AttnError> {
        let grow = |t: &Tensor| -> Result<Tensor, AttnError> {
            let mut sz = t.size();
            let keep = sz[2].min(slots);
            sz[2] = slots;
            let out = Tensor::f_zeros(sz.as_slice(), (t.kind(), t.device()))?;
            out.f_narrow(2, 0, keep)?
                .f_copy_(&t.f_narrow(2, 0, keep)?)?;
            Ok(out)
        };
        Ok(Self {
            k: grow(&self.k)?,
            v: grow(&self.v)?,
        })
    }

    fn bytes(&self) -> i64 {
        let size = |t: &Tensor| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64;
        size(&self.k) + size(&self.v)
    }
}

/// One NSA layer's decode state for a batch of sequences: what each branch reads at the next
/// step. See the [module docs](crate::decode) for the invariants.
#[derive(Debug)]
pub struct NsaCache {
    pub(crate) cfg: NsaConfig,
    /// Tokens cached per sequence.
    pub(crate) lengths: Vec<i64>,
    /// Raw keys / values the selected branch reads (all branches with `shared_kv`),
    /// `[B, Hkv, capacity, d]`, positions `0 .. len_b` valid.
    pub(crate) raw: KvBuf,
    /// Ring of the last `w` window keys / values, `[B, Hkv, w, d]`, slot `p mod w`
    /// (`None` with `shared_kv`: the window reads `raw`).
    pub(crate) window: Option<KvBuf>,
    /// Ring of the last `l` raw keys / values φ compresses (the compressed branch's; with
    /// `cmp_rope = "compressed"` unrotated), `[B, Hkv, l, d]`, slot `p mod l`: the pending block
    /// φ compresses when it completes (`None` where `raw` holds what φ reads:
    /// [`has_pending_ring`]).
    pub(crate) pending: Option<KvBuf>,
    /// Emitted compressed keys / values, `[B, Hkv, num_compressed(capacity), d]`, tokens
    /// `0 .. num_compressed(len_b)` valid.
    pub(crate) compressed: KvBuf,
    /// A step failed after it had started writing: the cache no longer describes a prefix.
    pub(crate) poisoned: bool,
    /// The layer's stacked projection weights, made by the first eager step and reused by the
    /// later ones (a step would otherwise copy them: 33 MB at the paper shape), with the
    /// weights' addresses they were copied from (`NsaAttention::stacked_weights_key`). A cache
    /// decodes with the weights its first step saw: weights changed in place afterwards (an
    /// optimizer step) need a new prefill.
    pub(crate) projection: Option<(Vec<usize>, Tensor)>,
    /// The decode kernels' ticket counters, int32 `[B, Hkv]`, zero between steps (the kernels
    /// leave them so): kept here, a step allocates nothing that needs filling.
    pub(crate) tickets: Tensor,
}

impl NsaCache {
    /// The cache after prefilling `lengths[b]` tokens of each sequence from the prefill's raw
    /// projections (`[B, S, Hkv, d]`, positions `0 .. S`), the raw keys and values φ reads
    /// (`phi_input`) and compressed tokens.
    pub(crate) fn from_prefill(
        cfg: &NsaConfig,
        raw: &RawProjections,
        kv_index: impl Fn(crate::Branch) -> usize,
        phi_input: (&Tensor, &Tensor),
        compressed: (&Tensor, &Tensor),
        lengths: &[i64],
        capacity: i64,
    ) -> Result<Self, AttnError> {
        use crate::Branch;
        let q = &raw.q;
        let (batch, s, kind, device) = (q.size()[0], q.size()[1], q.kind(), q.device());
        let capacity = capacity.max(s);
        let heads_major = |t: &Tensor| t.f_permute([0, 2, 1, 3]);
        let (slc_k, slc_v) = &raw.kv[kv_index(Branch::Selected)];
        let zeros = |slots| {
            KvBuf::new(cfg, (batch, slots), (kind, device), |s, o| {
                Tensor::f_zeros(s, o)
            })
        };
        let raw_buf = zeros(capacity)?;
        raw_buf.k.f_narrow(2, 0, s)?.f_copy_(&heads_major(slc_k)?)?;
        raw_buf.v.f_narrow(2, 0, s)?.f_copy_(&heads_major(slc_v)?)?;
        let sel = cfg.select_config();
        let cmp_buf = zeros(sel.num_compressed(capacity))?;
        let nc = compressed.0.size()[1];
        cmp_buf
            .k
            .f_narrow(2, 0, nc)?
            .f_copy_(&heads_major(compressed.0)?)?;
        cmp_buf
            .v
            .f_narrow(2, 0, nc)?
            .f_copy_(&heads_major(compressed.1)?)?;
        let ring = |(k, v): (&Tensor, &Tensor), size: i64| -> Result<KvBuf, AttnError> {
            let full = KvBuf {
                k: heads_major(k)?,
                v: heads_major(v)?,
            };
            // Slot j holds the newest position p < len with p ≡ j (mod size); slots no position
            // has reached yet (j ≥ len) hold position 0 and are never read.
            let slots: Vec<i64> = lengths
                .iter()
                .flat_map(|&len| {
                    (0..size).map(move |j| ((len - 1) - (len - 1 - j).rem_euclid(size)).max(0))
                })
                .collect();
            let slots = Tensor::f_from_slice(&slots)?
                .f_to_device(device)?
                .f_view([batch, 1, size])?
                .f_expand([batch, cfg.kv_heads, size], false)?;
            let (k, v) = full.read_slots(&slots)?;
            Ok(KvBuf { k, v })
        };
        let window = match cfg.nsa.shared_kv {
            true => None,
            false => {
                let (k, v) = &raw.kv[kv_index(Branch::Window)];
                Some(ring((k, v), cfg.nsa.window)?)
            }
        };
        let pending = match has_pending_ring(cfg) {
            true => Some(ring(phi_input, sel.block_len)?),
            false => None,
        };
        Ok(Self {
            cfg: *cfg,
            lengths: lengths.to_vec(),
            raw: raw_buf,
            window,
            pending,
            compressed: cmp_buf,
            poisoned: false,
            projection: None,
            tickets: Tensor::f_zeros([batch, cfg.kv_heads], (Kind::Int, device))?,
        })
    }

    /// A cache of `lengths[b]` tokens per sequence whose keys and values are random normal
    /// numbers (not the state of any input): what benchmarks of the decode step need at cache
    /// sizes whose prefill would not fit or take long, since a step's cost does not depend on
    /// the values. `capacity` (≥ every length) is the room before the buffers grow.
    pub fn filled_random(
        cfg: &NsaConfig,
        lengths: &[i64],
        capacity: i64,
        kind: Kind,
        device: Device,
    ) -> Result<Self, AttnError> {
        cfg.validate()?;
        check_lengths(lengths)?;
        let batch = lengths.len() as i64;
        let capacity = capacity.max(lengths.iter().copied().max().unwrap_or(1));
        let sel = cfg.select_config();
        let ring = |slots| {
            KvBuf::new(cfg, (batch, slots), (kind, device), |s, o| {
                Tensor::f_randn(s, o)
            })
        };
        let window = match cfg.nsa.shared_kv {
            true => None,
            false => Some(ring(cfg.nsa.window)?),
        };
        let pending = match has_pending_ring(cfg) {
            true => Some(ring(sel.block_len)?),
            false => None,
        };
        Ok(Self {
            cfg: *cfg,
            lengths: lengths.to_vec(),
            raw: ring(capacity)?,
            window,
            pending,
            compressed: ring(sel.num_compressed(capacity))?,
            poisoned: false,
            projection: None,
            tickets: Tensor::f_zeros([batch, cfg.kv_heads], (Kind::Int, device))?,
        })
    }

    /// Tokens cached per sequence.
    pub fn lengths(&self) -> &[i64] {
        &self.lengths
    }

    /// Sequences in the batch.
    pub fn batch(&self) -> i64 {
        self.lengths.len() as i64
    }

    /// Tokens each sequence can hold before the buffers grow.
    pub fn capacity(&self) -> i64 {
        self.raw.slots()
    }

    /// Bytes of all buffers.
    pub fn bytes(&self) -> i64 {
        [
            Some(&self.raw),
            self.window.as_ref(),
            self.pending.as_ref(),
            Some(&self.compressed),
        ]
        .into_iter()
        .flatten()
        .map(KvBuf::bytes)
        .sum()
    }

    /// The raw keys `[B, Hkv, capacity, dk]` (with RoPE) and values `[B, Hkv, capacity, dv]`
    /// the selected branch reads; sequence `b`'s positions `0 .. lengths()[b]` are valid. Dense
    /// attention over the same keys is the baseline a decode step is measured against.
    pub fn selected_kv(&self) -> (&Tensor, &Tensor) {
        (&self.raw.k, &self.raw.v)
    }

    /// The configuration the cache was built for.
    pub fn config(&self) -> &NsaConfig {
        &self.cfg
    }

    /// Records that the work of a step enqueued with `plan` ([`crate::NsaAttention::enqueue_step`],
    /// e.g. a replay of its CUDA graph) ran: the lengths advance by one token each. The plan
    /// must be for the cache's current lengths.
    pub fn advance(&mut self, plan: &DecodePlan) -> Result<(), AttnError> {
        if self.poisoned || plan.positions != self.lengths {
            return Err(AttnError::Option {
                option: "cache",
                reason: format!(
                    "cannot advance: {} (the plan is for positions {:?}, the cache holds {:?})",
                    if self.poisoned {
                        "a step failed part-way"
                    } else {
                        "another step's plan"
                    },
                    plan.positions,
                    self.lengths
                ),
            });
        }
        for len in &mut self.lengths {
            *len += 1;
        }
        Ok(())
    }

    /// Makes room for `tokens` tokens per sequence (at least doubling), keeping the contents.
    /// Nothing changes if an allocation fails.
    pub fn reserve(&mut self, tokens: i64) -> Result<(), AttnError> {
        if tokens <= self.capacity() {
            return Ok(());
        }
        let capacity = tokens.max(2 * self.capacity());
        let raw = self.raw.resized(capacity)?;
        let compressed = self
            .compressed
            .resized(self.cfg.select_config().num_compressed(capacity))?;
        self.raw = raw;
        self.compressed = compressed;
        Ok(())
    }
}

/// Whether a cache keeps a ring of the raw keys and values φ reads: with separate K/V pairs
/// (the compressed branch's own), and with `shared_kv` under `cmp_rope = "compressed"` (φ reads
/// the shared keys unrotated; the raw buffer holds them rotated). Otherwise φ reads `raw`.
pub(crate) fn has_pending_ring(cfg: &NsaConfig) -> bool {
    !cfg.nsa.shared_kv || cfg.nsa.cmp_rope == CmpRope::Compressed
}

/// At least one sequence, each with at least one token.
pub(crate) fn check_lengths(lengths: &[i64]) -> Result<(), AttnError> {
    if lengths.is_empty() || lengths.iter().any(|&n| n < 1) {
        return Err(AttnError::Option {
            option: "lengths",
            reason: format!("need one length ≥ 1 per sequence, got {lengths:?}"),
        });
    }
    Ok(())
}
