//! Custom autograd functions from `glue/autograd.cpp`: memory-lean attention for `nsa-attn`.
//!
//! Both functions run softmax attention chunk by chunk over the query axis and save only their
//! inputs for backward; a chunk holds whole rows, so backward recomputes each chunk's
//! probabilities with the forward arithmetic (bit-identical). Nothing of size (queries × keys)
//! survives a chunk, so forward + backward of a long sequence holds only the inputs,
//! O(S · H · dk + Sk · G · (dk + dv)), between the passes.
//!
//! Layouts: `q` `[B, S, H, dk]`, `k` `[B, Sk, G, dk]`, `v` `[B, Sk, G, dv]`, output
//! `[B, S, H, dv]`; `H = G · h`, query head `j` reads key head `j / h` (group-major, like SDPA's
//! `enable_gqa`). Scores are scaled by `scale`; softmax and gradient accumulation run in float32
//! (float64 for float64 inputs). Rows that see no key output zeros and get zero gradients.
//! Gradients flow to `q`, `k` and `v`; index tensors are not differentiable. First-order only.
use std::os::raw::c_char;

use tch::Tensor;
use torch_sys::C_tensor;

extern "C" {
    fn nsa_span_attention(
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        lo: *const C_tensor,
        hi: *const C_tensor,
        scale: f64,
        chunk: i64,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut C_tensor;
    fn nsa_block_attention(
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        blocks: *const C_tensor,
        block_len: i64,
        scale: f64,
        chunk: i64,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut C_tensor;
}

/// An exception thrown by libtorch inside the glue (bad shapes, out of memory, …).
#[derive(Debug, thiserror::Error)]
#[error("{call}: {message}")]
pub struct GlueError {
    /// The glue function that failed.
    pub call: &'static str,
    /// libtorch's exception message.
    pub message: String,
}

const ERR_LEN: usize = 4096;

fn finish(call: &'static str, ptr: *mut C_tensor, err: &[u8]) -> Result<Tensor, GlueError> {
    if ptr.is_null() {
        let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
        return Err(GlueError {
            call,
            message: String::from_utf8_lossy(&err[..end]).into_owned(),
        });
    }
    // SAFETY: the glue returns a heap-allocated `torch::Tensor*` whose ownership passes to us;
    // tch's `Tensor` frees it on drop.
    Ok(unsafe { Tensor::from_ptr(ptr) })
}

/// Span attention: query `t` attends keys `lo[t] .. hi[t]` (end exclusive).
///
/// `lo`, `hi`: int64 `[S]`, shared by the batch and all heads (any device; they are copied to
/// the host once to plan the key span of each query chunk). `chunk`: queries per chunk; the
/// temporaries of one chunk are O(chunk · H · span), span = the union of its rows' key ranges.
pub fn span_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lo: &Tensor,
    hi: &Tensor,
    scale: f64,
    chunk: i64,
) -> Result<Tensor, GlueError> {
    let mut err = vec![0u8; ERR_LEN];
    // SAFETY: all tensor pointers come from live tch tensors borrowed for the call; the glue
    // writes at most ERR_LEN bytes (NUL-terminated) into `err` and catches every exception.
    let ptr = unsafe {
        nsa_span_attention(
            q.as_ptr(),
            k.as_ptr(),
            v.as_ptr(),
            lo.as_ptr(),
            hi.as_ptr(),
            scale,
            chunk,
            err.as_mut_ptr().cast(),
            ERR_LEN,
        )
    };
    finish("nsa_span_attention", ptr, &err)
}

/// Block attention: query `t` of batch `b`, key group `g` attends the keys of blocks
/// `blocks[b, t, g, :]` (int64 `[B, S, G, n]`, `-1` = unused slot); block `j` holds keys
/// `j·block_len .. (j+1)·block_len`, and only keys `≤ t` (and `< Sk`) are attended. Temporaries of
/// one chunk are O(chunk · G · n · block_len · (dk + dv)) for the gathered keys.
pub fn block_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    blocks: &Tensor,
    block_len: i64,
    scale: f64,
    chunk: i64,
) -> Result<Tensor, GlueError> {
    let mut err = vec![0u8; ERR_LEN];
    // SAFETY: as in `span_attention`.
    let ptr = unsafe {
        nsa_block_attention(
            q.as_ptr(),
            k.as_ptr(),
            v.as_ptr(),
            blocks.as_ptr(),
            block_len,
            scale,
            chunk,
            err.as_mut_ptr().cast(),
            ERR_LEN,
        )
    };
    finish("nsa_block_attention", ptr, &err)
}
