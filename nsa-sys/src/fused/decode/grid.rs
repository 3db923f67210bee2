//! How the decode step's launches fill the device: shared memory of the warp-level tile
//! kernels, CTAs resident at once, tiles per CTA, and the selection kernel's slices.

/// Most heads per group of the warp-level tile kernels (one 16-row tensor-core block).
pub(super) const WARP_MAX_GROUP: i64 = 16;

/// Shared memory of the warp-level tile kernels (decode.cu's warp_tiles_partial): the stage
/// barriers, Q, then per warp `stages` K and V stages, reused by the final merge (m, l and o
/// of the four warps, o's rows `dv + 8` floats apart).
pub(super) fn warp_tile_smem(dk: i64, dv: i64, stages: i64) -> i64 {
    WARP_TILE_BARRIER_BYTES
        + 2 * 16 * (dk + 8)
        + (128 * stages * (dk + dv + 16)).max(512 + 256 * (dv + 8))
}

/// Shared bytes before the warp-level tile kernels' Q: the warps' stage barriers
/// (`NSA_DEC_BARRIER_BYTES`).
const WARP_TILE_BARRIER_BYTES: i64 = 64;

/// Most CTAs of a tile kernel an SM runs at once (its registers allow about this many).
pub(super) const TILE_CTAS_PER_SM: i64 = 4;

/// CTAs of the double-buffered tile kernels (`smem` bytes each) resident on the whole device
/// at once; 0 when one does not fit (then every CTA takes one tile).
pub(super) fn resident_ctas(smem: i64, max_smem: i64, sm_count: i64, smem_per_sm: i64) -> i64 {
    if smem > max_smem {
        return 0;
    }
    // The driver reserves 1 KiB of each CTA's shared memory for itself.
    let per_sm = (smem_per_sm / (smem + 1024)).min(TILE_CTAS_PER_SM);
    sm_count.max(0) * per_sm.max(0)
}

/// Tiles per CTA of a tile launch with `tiles` tiles per (b, g) and `groups` (b, g) pairs:
/// the fewest that fit the grid into the `resident` CTAs once (fewer partials to merge, each
/// CTA's loads overlapping its compute), at least 1 (then one tile per CTA, the most CTAs).
pub(super) fn tiles_per_cta(tiles: i64, groups: i64, resident: i64) -> i64 {
    if resident <= 0 || tiles <= 1 {
        return 1;
    }
    let total = tiles * groups;
    ((total + resident - 1) / resident).clamp(1, tiles)
}

/// Tiles per CTA of the selected and window launch, whose CTAs each take tiles of one branch:
/// `slc` selected and `win` window tiles per (b, g). [`tiles_per_cta`]'s count over both,
/// raised while the two branches' partials, each rounded up, overfill the resident CTAs (the
/// few CTAs of a second wave would cost a whole CTA's time).
pub(super) fn branch_tiles_per_cta(slc: i64, win: i64, groups: i64, resident: i64) -> i64 {
    let mut tpc = tiles_per_cta(slc + win, groups, resident);
    let parts = |t: i64| (slc + t - 1) / t + (win + t - 1) / t;
    while resident > 0 && tpc < slc.max(win) && parts(tpc) * groups > resident {
        tpc += 1;
    }
    tpc
}

/// Most threads of a combine CTA (`NSA_DEC_COMBINE_THREADS`).
pub(super) const COMBINE_MAX_THREADS: i64 = 1024;

/// Fewest threads of a combine CTA: a warp per branch merges the parts' states.
pub(super) const COMBINE_MIN_THREADS: i64 = 96;

/// The combine kernel's part groups for `parts` partials per (b, g) and value head size `dv`:
/// one per partial, up to [`COMBINE_MAX_THREADS`] threads of `dv / 4` column groups each, and
/// at least [`COMBINE_MIN_THREADS`] threads (groups without partials add nothing). Returns
/// (part groups, threads).
pub(super) fn combine_parts(parts: i64, dv: i64) -> (i64, i64) {
    let columns = (dv / 4).max(1);
    let fewest = (COMBINE_MIN_THREADS + columns - 1) / columns;
    let groups = parts.min(COMBINE_MAX_THREADS / columns).max(fewest);
    (groups, groups * columns)
}

/// Most selection CTAs per (b, g): the last one merges every slice's list, a warp taking
/// several in turn (`NSA_DEC_MAX_SELECT_SLICES`, which sizes each warp's loads of them).
pub const MAX_SELECT_SLICES: i64 = 64;

/// The selection kernel's slices of the `nb` blocks for `groups` (b, g) pairs on `sms` SMs:
/// (CTAs per pair, blocks per CTA), enough CTAs to fill the device once and slices of at most
/// [`SELECT_SLICE_BLOCKS`] blocks (see [`slices_of`]), except that blocks within one pass of a
/// CTA's `threads` (a block a thread) stay in one CTA: there the hand-off between slices costs
/// more than the sums it spreads (round 23: one CTA per group took 7 % less time per step at
/// 16k cached tokens, batch 1, and 5 % at batch 8; at 64k the slices took 26–35 % less).
pub(super) fn select_slices(nb: i64, groups: i64, sms: i64, threads: i64) -> (i64, i64) {
    if nb <= threads {
        return slices_of(nb, 1);
    }
    let fill = (sms + groups - 1) / groups;
    slices_of(
        nb,
        fill.max((nb + SELECT_SLICE_BLOCKS - 1) / SELECT_SLICE_BLOCKS),
    )
}

/// Most blocks in one selection slice where the device is already full: a slice's sums and
/// its list are a chain of dependent steps, and since the last CTA merges the slices' lists
/// only among warps that had blocks (round 29), shorter slices cost less than the hand-off
/// they add (64k cached tokens, batch 8, H100: 16 slices of 64 blocks 0.074 ms a step, the
/// 5 of 224 that filling the device alone asks for 0.079).
pub(super) const SELECT_SLICE_BLOCKS: i64 = 64;

/// The `nb` blocks cut into at most `want` slices (clamped to 1 ..= [`MAX_SELECT_SLICES`]), each
/// a multiple of 32 blocks (a warp's chunk): (slices, blocks per slice). Fewer slices than
/// `want` when the blocks run out.
pub(super) fn slices_of(nb: i64, want: i64) -> (i64, i64) {
    let want = want.clamp(1, MAX_SELECT_SLICES);
    let chunks = (nb + 31) / 32;
    let per = (chunks + want - 1) / want * 32;
    ((nb + per - 1) / per, per)
}

/// How a decode step's launches are shaped where the device's own pick is not wanted: the
/// checks cover both tile layouts with it and `nsa-train bench decode-launch` sweeps it.
/// Decoding uses the default (`None` everywhere: the device's pick).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecodeLaunch {
    /// CTAs each tile launch aims for; `None`: as many as the device runs at once. Fewer CTAs
    /// take more tiles each (double-buffered, their softmax state kept across tiles) and leave
    /// fewer partials to merge.
    pub tile_ctas: Option<i64>,
    /// Selection CTAs per (b, g), 1 to [`MAX_SELECT_SLICES`] (fewer when the blocks run out);
    /// `None`: enough to fill the device once, in slices of at most 64 blocks.
    pub select_slices: Option<i64>,
    /// Programmatic dependent launches: each kernel after the first may start while the one
    /// before it ends, waiting inside (`griddepcontrol.wait`) only where it reads that
    /// kernel's results; the window's tiles do not wait for the selection at all.
    /// Compute capability 9.0 and up; `None`: on where the device has it.
    pub programmatic: Option<bool>,
}

/// The launch shapes a [`super::DecodeStep`] took: tiles per CTA and CTAs per (b, g) of the
/// compressed launch, of the selected and window launch, and the selection's slices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeShape {
    pub cmp_tiles_per_cta: i64,
    pub cmp_ctas: i64,
    pub attend_tiles_per_cta: i64,
    pub attend_ctas: i64,
    pub select_slices: i64,
    pub blocks_per_slice: i64,
    /// Whether the kernels after the first launch as programmatic dependents.
    pub programmatic: bool,
}

impl DecodeShape {
    pub(super) fn of(a: &super::DecodeArgs, programmatic: bool) -> Self {
        DecodeShape {
            cmp_tiles_per_cta: i64::from(a.tpc_cmp),
            cmp_ctas: i64::from(a.parts_cmp),
            attend_tiles_per_cta: i64::from(a.tpc_att),
            attend_ctas: i64::from(a.parts_slc + a.parts_win),
            select_slices: i64::from(a.sel_slices),
            blocks_per_slice: i64::from(a.slice_blocks),
            programmatic,
        }
    }
}
