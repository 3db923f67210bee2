//! The selected branch's block ids on the host side of the kernels: the cleaning every path
//! agrees on (duplicates once, ids outside `[0, ⌊t/l'⌋]` dropped) and the backward's inverse
//! index, exposed for tests and inspection.
use std::ffi::c_char;

use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

use super::{finish, glue_err, input, kernels, FusedError, SlcTable};
use crate::autograd::ERR_LEN;

extern "C" {
    fn nsa_fused_inverse_index(
        blocks: *const C_tensor,
        block_len: i64,
        tokens: *mut *mut C_tensor,
        starts: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> std::os::raw::c_int;
    fn nsa_fused_clean_ids(
        blocks: *const C_tensor,
        block_len: i64,
        num_keys: i64,
        table: *const SlcTable,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut C_tensor;
}

fn check_blocks(blocks: &Tensor, block_len: i64) -> Result<(), FusedError> {
    let size = blocks.size();
    if size.len() != 4 || !matches!(blocks.kind(), Kind::Int64 | Kind::Int) {
        return Err(input(
            "blocks",
            format!(
                "int64 or int32 [B, S, Hkv, n], got {:?} {size:?}",
                blocks.kind()
            ),
        ));
    }
    if block_len < 1 || i32::try_from(block_len).is_err() {
        return Err(input(
            "block_len",
            format!("must be in 1..2^31, got {block_len}"),
        ));
    }
    Ok(())
}

/// The block ids the selected-branch kernels read, from `blocks` (int64 or int32
/// `[B, S, Hkv, n]`) for keys `0 .. num_keys` in blocks of `block_len`: int32, each row's
/// distinct ids `j` with `0 ≤ j ≤ ⌊t / block_len⌋` (and inside the keys) in descending order,
/// then `−1`. On CUDA (n ≤ 32) one kernel (`nsa_clean_ids`), elsewhere libtorch's operators
/// (`glue/blocks.h`, the lean path's): the GPU check requires the two equal.
pub fn clean_block_ids(
    blocks: &Tensor,
    block_len: i64,
    num_keys: i64,
) -> Result<Tensor, FusedError> {
    check_blocks(blocks, block_len)?;
    let table: *const SlcTable = match blocks.device() {
        Device::Cuda(ordinal) => &kernels(ordinal)?.table,
        _ => std::ptr::null(),
    };
    let mut err = vec![0u8; ERR_LEN];
    // SAFETY: `blocks` is a live tensor borrowed for the call; `table` is null or a
    // process-lifetime table; the glue catches every exception and writes at most ERR_LEN bytes
    // into `err`.
    let ptr = unsafe {
        nsa_fused_clean_ids(
            blocks.as_ptr(),
            block_len,
            num_keys,
            table,
            err.as_mut_ptr().cast(),
            ERR_LEN,
        )
    };
    finish("nsa_fused_clean_ids", ptr, &err)
}

/// The inverse index the selected branch's backward builds from `blocks` (int `[B, S, Hkv, n]`,
/// any device, block length `block_len`), exposed for tests and inspection: after cleaning the
/// ids (duplicates once, ids outside `[0, ⌊t/l'⌋]` dropped), `tokens` (int32 `[B·S·Hkv·n]`,
/// of which the first `E = starts[B·Hkv·NB]` entries are the index and the rest padding)
/// lists for every segment `(b, g, j)`, in that order, the tokens that selected block `j`,
/// ascending; segment `(b, g, j)` is `tokens[starts[i] .. starts[i + 1]]` with
/// `i = (b·Hkv + g)·NB + j` (`starts` int64 `[B·Hkv·NB + 1]`, `NB = ⌈S/l'⌉`). Its sizes follow
/// from the shapes, so building it never waits for the device.
pub fn inverse_index(blocks: &Tensor, block_len: i64) -> Result<(Tensor, Tensor), FusedError> {
    check_blocks(blocks, block_len)?;
    let mut err = vec![0u8; ERR_LEN];
    let (mut tokens, mut starts) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: `blocks` is a live tensor borrowed for the call; on success the glue stores two
    // heap-allocated tensors whose ownership passes to us; it catches every exception.
    let rc = unsafe {
        nsa_fused_inverse_index(
            blocks.as_ptr(),
            block_len,
            &mut tokens,
            &mut starts,
            err.as_mut_ptr().cast(),
            ERR_LEN,
        )
    };
    if rc != 0 {
        return Err(glue_err("nsa_fused_inverse_index", &err));
    }
    Ok((
        finish("nsa_fused_inverse_index", tokens, &err)?,
        finish("nsa_fused_inverse_index", starts, &err)?,
    ))
}
