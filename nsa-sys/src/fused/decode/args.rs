//! Mirrors of the decode kernels' argument structs (decode.cu, decode_tiles.cuh, select.cuh),
//! passed by value to the launches: field for field, `#[repr(C)]`.

/// Most overlap taps (`NSA_MAX_TAPS`).
pub(super) const MAX_TAPS: usize = 32;

/// Mirror of `nsa::Taps` (select.cuh).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(super) struct Taps {
    pub(super) first: i32,
    pub(super) step: i32,
    pub(super) count: i32,
    pub(super) w: [i32; MAX_TAPS],
}

/// Mirror of `nsa::DecodeArgs` (decode.cu).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(super) struct DecodeArgs {
    pub(super) b: i32,
    pub(super) hkv: i32,
    pub(super) hpg: i32,
    pub(super) dk: i32,
    pub(super) dv: i32,
    pub(super) cl: i32,
    pub(super) cd: i32,
    pub(super) select_len: i32,
    pub(super) n: i32,
    pub(super) n_local: i32,
    pub(super) w: i32,
    pub(super) chunks_cmp: i32,
    pub(super) tpb: i32,
    pub(super) chunks_win: i32,
    pub(super) nb: i32,
    pub(super) nc: i32,
    pub(super) tpc_cmp: i32,
    pub(super) tpc_att: i32,
    pub(super) parts_cmp: i32,
    pub(super) parts_slc: i32,
    pub(super) parts_win: i32,
    pub(super) sel_slices: i32,
    pub(super) slice_blocks: i32,
    pub(super) cap_raw: i64,
    pub(super) cap_cmp: i64,
    pub(super) cap_win: i64,
    pub(super) scale_log2: f32,
    pub(super) taps: Taps,
}

/// Most cache writes of one prologue launch (`NSA_APPEND_MAX_WRITES`).
pub(super) const APPEND_MAX_WRITES: usize = 6;

/// Mirror of `nsa::AppendWrite` (decode.cu): device addresses of the cache tensor and the slots.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct AppendWriteArgs {
    pub(super) dst: u64,
    pub(super) slots: u64,
    pub(super) cap: i64,
    pub(super) col: i32,
    pub(super) width: i32,
    pub(super) rotate: i32,
    pub(super) pad: i32,
}

/// Mirror of `nsa::AppendArgs` (decode.cu).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct AppendArgs {
    pub(super) b: i32,
    pub(super) w: i32,
    pub(super) h: i32,
    pub(super) hkv: i32,
    pub(super) half: i32,
    pub(super) writes: i32,
    pub(super) hidden: i32,
    pub(super) gate_col: i32,
    pub(super) b1: u64,
    pub(super) w2: u64,
    pub(super) b2: u64,
    pub(super) write: [AppendWriteArgs; APPEND_MAX_WRITES],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_append_mirrors_have_the_kernels_layout() {
        // 8 ints, 3 addresses, then 6 writes of 2 addresses, a length and 4 ints.
        assert_eq!(std::mem::size_of::<AppendWriteArgs>(), 40);
        assert_eq!(std::mem::offset_of!(AppendArgs, b1), 32);
        assert_eq!(std::mem::offset_of!(AppendArgs, write), 56);
        assert_eq!(std::mem::size_of::<AppendArgs>(), 56 + 6 * 40);
    }
}
