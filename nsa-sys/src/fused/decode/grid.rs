//! How the decode step's launches fill the device: shared memory of the warp-level tile
//! kernels, CTAs resident at once, tiles per CTA, and the selection kernel's slices.

/// Most heads per group of the warp-level tile kernels (one 16-row tensor-core block).
pub(super) const WARP_MAX_GROUP: i64 = 16;

/// Shared memory of the warp-level tile kernels (decode.cu's warp_tiles_partial): Q, then per
/// warp `stages` K and V stages, reused by the final merge (m, l and o of the four warps).
pub(super) fn warp_tile_smem(dk: i64, dv: i64, stages: i64) -> i64 {
    2 * 16 * (dk + 8) + (128 * stages * (dk + dv + 16)).max(512 + 256 * dv)
}

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

/// Most selection CTAs per (b, g): the last one merges every slice's list, a warp taking
/// several in turn.
pub(super) const MAX_SELECT_SLICES: i64 = 64;

/// The selection kernel's slices of the `nb` blocks for `groups` (b, g) pairs on `sms` SMs:
/// (CTAs per pair, blocks per CTA), enough CTAs to fill the device once, each taking a multiple
/// of 32 blocks (a warp's chunk) and at most [`MAX_SELECT_SLICES`] per pair.
pub(super) fn select_slices(nb: i64, groups: i64, sms: i64) -> (i64, i64) {
    let want = ((sms + groups - 1) / groups).clamp(1, MAX_SELECT_SLICES);
    let chunks = (nb + 31) / 32;
    let per = (chunks + want - 1) / want * 32;
    ((nb + per - 1) / per, per)
}
