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
//!
//! Also here: [`GradReadyHooks`], a callback when a parameter's gradient is final during
//! backward (what data parallelism needs to start reducing a bucket before backward ends).
use std::os::raw::{c_char, c_int, c_void};

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
    fn nsa_grad_hooks_new(
        params: *const *const C_tensor,
        n: usize,
        fn_: extern "C" fn(*mut c_void, usize),
        ctx: *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut c_void;
    fn nsa_grad_hooks_free(owner: *mut c_void);
    fn nsa_backward(
        outputs: *const *const C_tensor,
        grads: *const *const C_tensor,
        n: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// Backward from several outputs at once, `grads[i]` the gradient of `outputs[i]` (PyTorch's
/// `torch.autograd.backward(outputs, grads)`): one pass over their common graph, gradients
/// accumulating into the leaves' `.grad`. tch's `backward` takes one scalar output; activation
/// recomputation hands a block's two outputs their gradients this way.
pub fn backward(outputs: &[&Tensor], grads: &[&Tensor]) -> Result<(), GlueError> {
    if outputs.len() != grads.len() {
        return Err(GlueError {
            call: "nsa_backward",
            message: format!("{} outputs and {} gradients", outputs.len(), grads.len()),
        });
    }
    let outs: Vec<*const C_tensor> = outputs.iter().map(|t| t.as_ptr()).collect();
    let gs: Vec<*const C_tensor> = grads.iter().map(|t| t.as_ptr()).collect();
    let mut err = vec![0u8; ERR_LEN];
    // SAFETY: the pointers come from live tch tensors borrowed for the call; the glue writes at
    // most ERR_LEN bytes (NUL-terminated) into `err` and catches every exception.
    let rc = unsafe {
        nsa_backward(
            outs.as_ptr(),
            gs.as_ptr(),
            outs.len(),
            err.as_mut_ptr().cast(),
            ERR_LEN,
        )
    };
    if rc != 0 {
        return Err(glue_error("nsa_backward", &err));
    }
    Ok(())
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

/// Bytes of the error buffer every glue call may fill (NUL-terminated).
pub(crate) const ERR_LEN: usize = 4096;

/// The error the glue wrote into `err` (NUL-terminated).
pub(crate) fn glue_error(call: &'static str, err: &[u8]) -> GlueError {
    let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
    GlueError {
        call,
        message: String::from_utf8_lossy(&err[..end]).into_owned(),
    }
}

/// The tensor a glue call returned, or the error it wrote into `err` when it returned null.
pub(crate) fn finish(
    call: &'static str,
    ptr: *mut C_tensor,
    err: &[u8],
) -> Result<Tensor, GlueError> {
    if ptr.is_null() {
        return Err(glue_error(call, err));
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
/// `j·block_len .. (j+1)·block_len`, and only keys `≤ t` (and `< Sk`) are attended. A repeated id
/// counts once and ids outside `[0, ⌊t/block_len⌋]` are ignored (any order, any values). Temporaries of
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

/// The callback of [`GradReadyHooks`].
type ReadyFn = Box<dyn Fn(usize) + Send + Sync>;

/// Calls `f(i)` each time parameter `i`'s gradient has been accumulated into its `.grad` during a
/// backward pass: once per backward, after the gradients of all its uses were summed (a post hook
/// on the parameter's gradient accumulator, as PyTorch DDP's reducer uses).
///
/// Where it runs: on the thread that executes the backward work of the parameter's device (for
/// CUDA parameters an autograd worker thread, not the caller of `backward`), while `backward` is
/// still running; for CUDA, that thread's current stream is the one the gradient was computed
/// on (with `tch`, the legacy default stream), so work `f` enqueues there is ordered after the
/// gradient. `f` must not call `backward`. A panic in `f` is caught and ignored (the hook then
/// counts as not called), because it must not unwind through libtorch.
///
/// Dropping the value removes the hooks. Do not drop it while a backward pass runs.
pub struct GradReadyHooks {
    owner: *mut c_void,
    // Boxed twice so the context pointer handed to C++ is thin and stays put.
    _callback: Box<ReadyFn>,
}

// SAFETY: the owner only removes hooks from autograd nodes when dropped (no thread affinity),
// and the callback is `Send + Sync`.
unsafe impl Send for GradReadyHooks {}

impl std::fmt::Debug for GradReadyHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GradReadyHooks").finish_non_exhaustive()
    }
}

extern "C" fn call_ready(ctx: *mut c_void, index: usize) {
    // SAFETY: `ctx` is the `Box<ReadyFn>` owned by the `GradReadyHooks` whose hooks call this;
    // the hooks are removed before that box is freed.
    let f = unsafe { &*(ctx as *const ReadyFn) };
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(index)));
}

impl GradReadyHooks {
    /// Registers `f` on every tensor of `params` (leaf tensors that require grad). On error
    /// nothing stays registered.
    pub fn new(
        params: &[Tensor],
        f: impl Fn(usize) + Send + Sync + 'static,
    ) -> Result<Self, GlueError> {
        let callback: Box<ReadyFn> = Box::new(Box::new(f));
        let ptrs: Vec<*const C_tensor> = params.iter().map(|t| t.as_ptr()).collect();
        let ctx = &*callback as *const ReadyFn as *mut c_void;
        let mut err = vec![0u8; ERR_LEN];
        // SAFETY: `ptrs` point to live tensors borrowed for the call (the glue keeps references
        // to their gradient accumulators, not to the tensors); `ctx` stays valid until `drop`
        // removes the hooks; the glue catches every exception and writes at most ERR_LEN bytes.
        let owner = unsafe {
            nsa_grad_hooks_new(
                ptrs.as_ptr(),
                ptrs.len(),
                call_ready,
                ctx,
                err.as_mut_ptr().cast(),
                ERR_LEN,
            )
        };
        if owner.is_null() {
            return Err(glue_error("nsa_grad_hooks_new", &err));
        }
        Ok(GradReadyHooks {
            owner,
            _callback: callback,
        })
    }
}

impl Drop for GradReadyHooks {
    fn drop(&mut self) {
        // SAFETY: `owner` came from nsa_grad_hooks_new and is freed once; the callback box is
        // dropped after this, when no hook can call it any more.
        unsafe { nsa_grad_hooks_free(self.owner) };
    }
}
