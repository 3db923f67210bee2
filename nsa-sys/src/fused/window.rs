//! The sliding-window branch on libtorch's flash-attention kernel (`glue/fused.cpp`,
//! `WindowFlash`), and the bound on the temporaries of the GQA backward calls that the glue
//! splits by groups of KV heads (the window's flash backward, the compressed branch's cuDNN
//! backward).
use std::ffi::c_char;

use tch::{Kind, Tensor};
use torch_sys::C_tensor;

use super::{check_qkv, compute_kind, finish, input, FusedError};
use crate::autograd::ERR_LEN;

extern "C" {
    fn nsa_fused_window(
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        window: i64,
        scale: f64,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut C_tensor;
    fn nsa_fused_set_head_chunk_bytes(bytes: i64) -> i64;
    fn nsa_sdpa_without_cudnn(
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        mask: *const C_tensor,
        enable_gqa: bool,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut C_tensor;
    fn nsa_sdpa_cudnn_enabled() -> bool;
}

/// Whether libtorch's SDPA may pick its cuDNN backend: libtorch's process-wide switch, on unless
/// turned off (and on again after [`sdpa_without_cudnn`]).
pub fn sdpa_cudnn_enabled() -> bool {
    // SAFETY: reads a flag of libtorch's global context.
    unsafe { nsa_sdpa_cudnn_enabled() }
}

/// libtorch's `scaled_dot_product_attention(q, k, v, mask, enable_gqa)` (no dropout, not
/// causal, default scale) with its cuDNN backend off for the call: libtorch picks among flash,
/// memory-efficient and math. For decoding over a cache that grows by one key per step: cuDNN's
/// SDPA builds a graph for every new shape, which costs milliseconds at each step, while flash
/// takes any length. libtorch's errors (shapes, a mask no backend takes) come back as
/// [`FusedError::Glue`]. The switch is process-wide for the duration of the call: another
/// thread's SDPA at that moment would skip cuDNN too.
pub fn sdpa_without_cudnn(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    enable_gqa: bool,
) -> Result<Tensor, FusedError> {
    let mut err = vec![0u8; ERR_LEN];
    // SAFETY: live tensors (and the mask or null) borrowed for the call; the glue catches every
    // exception and writes at most ERR_LEN bytes into `err`.
    let ptr = unsafe {
        nsa_sdpa_without_cudnn(
            q.as_ptr(),
            k.as_ptr(),
            v.as_ptr(),
            mask.map_or(std::ptr::null(), |m| m.as_ptr()),
            enable_gqa,
            err.as_mut_ptr().cast(),
            ERR_LEN,
        )
    };
    finish("nsa_sdpa_without_cudnn", ptr, &err)
}

/// Sets the bound, in bytes, on the temporaries of one GQA backward call (1 GiB unless set)
/// and returns the previous one.
///
/// The backward of the window branch (flash attention: an fp32 dQ accumulator and dK/dV per
/// query head before the group sum) and of the compressed branch on cuDNN (folded copies of
/// dout, q and out) hold temporaries that grow with `S · H`: 6.4 GB and 5.4 GB at the paper
/// shape and 64k tokens. Where one call's would exceed the bound, the glue makes one call per
/// group of KV heads (the fewest groups, a divisor of `Hkv`, that keep each under it; at most
/// one KV head per call). The heads are independent, so the results are the same; only the
/// number of launches grows. Values below 1 count as 1 (one KV head per call wherever
/// `Hkv > 1`): the GPU check uses that to run the split path on small shapes.
pub fn set_head_chunk_bytes(bytes: i64) -> i64 {
    // SAFETY: stores an integer in the glue's atomic; no other state.
    unsafe { nsa_fused_set_head_chunk_bytes(bytes.max(1)) }
}

/// Sliding-window attention through libtorch's flash-attention kernel: query `t` reads keys
/// `t − window + 1 ..= t`. Computed in bf16 only ([`compute_kind`] must be bf16), `dk == dv`
/// (≤ 256, a multiple of 8), CUDA; other inputs get [`FusedError::Input`] (callers fall back to
/// the lean path). Differentiable in `q`, `k`, `v`.
pub fn window_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    window: i64,
    scale: f64,
) -> Result<Tensor, FusedError> {
    let (_, [_, _, _, _, dk, dv]) = check_qkv(q, k, v, &[Kind::BFloat16, Kind::Float])?;
    if compute_kind(q, k, v) != Some(Kind::BFloat16) {
        return Err(input(
            "q, k, v",
            "the flash window kernel computes in bf16 only (bf16 inputs or bf16 autocast)",
        ));
    }
    if dk != dv || dk > 256 || dk % 8 != 0 {
        return Err(input(
            "q, v",
            format!("flash attention needs dk == dv ≤ 256, a multiple of 8; got dk {dk}, dv {dv}"),
        ));
    }
    if window < 1 {
        return Err(input("window", format!("must be positive, got {window}")));
    }
    let mut err = vec![0u8; ERR_LEN];
    // SAFETY: live tensors borrowed for the call; the glue catches every exception and writes
    // at most ERR_LEN bytes into `err`.
    let ptr = unsafe {
        nsa_fused_window(
            q.as_ptr(),
            k.as_ptr(),
            v.as_ptr(),
            window,
            scale,
            err.as_mut_ptr().cast(),
            ERR_LEN,
        )
    };
    finish("nsa_fused_window", ptr, &err)
}
