//! The compressed branch's forward and block selection on CUDA: the kernels of
//! `nsa-sys/kernels/compressed.cu`, launched by `glue/fused.cpp` on libtorch's current stream,
//! or (the branch's attention, [`CompressedBackend::Cudnn`]) cuDNN's fused attention over
//! folded queries (`glue/cmp_cudnn.h`).
//!
//! Layouts: `q` `[B, S, H, dk]`, compressed keys `ck` `[B, Nc, Hkv, dk]` and values `cv`
//! `[B, Nc, Hkv, dv]`; token `t` attends compressed token `i` iff `i·d + l − 1 ≤ t` (Eq. 7).
use std::ffi::c_char;

use tch::{Kind, Tensor};
use torch_sys::C_tensor;

use super::{check_tensor, cuda_ordinal, finish, glue_err, input, kernels, FusedError, SlcTable};
use crate::autograd::ERR_LEN;

/// Selection's lengths and counts (nsa-select's `SelectConfig`) and Eq. 9's overlap taps
/// (`SelectConfig::overlap_taps`): selection block `j` receives compressed token
/// `j·tap_step + tap_first + k` with weight `tap_weights[k]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectParams {
    /// l: tokens per compressed token.
    pub block_len: i64,
    /// d: stride of the compressed tokens.
    pub stride: i64,
    /// l': tokens per selection block.
    pub select_len: i64,
    /// n: blocks per (token, group), at most [`SELECT_MAX_TOP_N`].
    pub top_n: i64,
    /// Forced local blocks (the current one and the `n_local − 1` before it), plus block 0.
    pub n_local: i64,
    /// Offset of block 0's first tap.
    pub tap_first: i64,
    /// Taps move by this many compressed tokens per block.
    pub tap_step: i64,
    /// Integer weight of each tap (1 to 32 taps).
    pub tap_weights: Vec<i64>,
}

/// Most blocks per token the selection kernel picks: a warp's lanes hold a token's picks.
pub const SELECT_MAX_TOP_N: i64 = 32;

/// How many warps a CTA of the selection kernel (`kernels/compressed.cu`, `nsa_cmp_select_*`)
/// has. Every size gives the same ids: a row's products, head sum and overlap sums do not
/// depend on which CTA computes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SelectCta {
    /// The size at which an SM holds more rows (token, head) at once, given its shared memory
    /// and the registers the kernels' launch bounds allow; four warps on a tie and for fp32.
    #[default]
    Auto,
    /// Four warps, 64 rows.
    Warps4,
    /// Eight warps, 128 rows, bf16 only: each tile of compressed keys serves twice the rows,
    /// and the per-token state (score ring, top list) of twice the tokens takes shared memory.
    Warps8,
}

impl SelectCta {
    fn warps(self) -> i64 {
        match self {
            SelectCta::Auto => 0,
            SelectCta::Warps4 => 4,
            SelectCta::Warps8 => 8,
        }
    }
}

/// Where the compressed branch's attention runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompressedBackend {
    /// cuDNN's fused attention over folded queries (the `d` queries that see the same
    /// compressed tokens become more query heads of one row; `glue/cmp_cudnn.h`), forward and
    /// backward. The kernels run instead while libtorch's deterministic algorithms are on
    /// (cuDNN's backward does not fix its dQ accumulation order) and where the compressed keys
    /// hold fewer tokens than the queries see.
    #[default]
    Cudnn,
    /// The NVRTC kernels of `kernels/compressed.cu` (deterministic backward).
    Kernels,
}

impl CompressedBackend {
    fn code(self) -> i32 {
        match self {
            CompressedBackend::Kernels => 0,
            CompressedBackend::Cudnn => 1,
        }
    }
}

extern "C" {
    fn nsa_fused_compressed(
        q: *const C_tensor,
        ck: *const C_tensor,
        cv: *const C_tensor,
        cl: i64,
        cd: i64,
        scale: f64,
        autograd: i32,
        backend: i32,
        table: *const SlcTable,
        out: *mut *mut C_tensor,
        lse: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn nsa_fused_select(
        q: *const C_tensor,
        ck: *const C_tensor,
        lse: *const C_tensor,
        cl: i64,
        cd: i64,
        select_len: i64,
        n: i64,
        n_local: i64,
        tap_first: i64,
        tap_step: i64,
        tap_w: *const i64,
        tap_count: i64,
        scale: f64,
        warps: i64,
        table: *const SlcTable,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut C_tensor;
}

/// Shapes `(B, S, H, Nc, Hkv, dk)` of `q` and `ck` (and the device), checked.
fn check_q_ck(q: &Tensor, ck: &Tensor, kinds: &[Kind]) -> Result<(usize, [i64; 6]), FusedError> {
    let device = q.device();
    let ordinal = cuda_ordinal("q", q)?;
    let qs = check_tensor("q", q, device, kinds)?;
    let ks = check_tensor("compressed keys", ck, device, &[q.kind()])?;
    let (b, s, h, dk) = (qs[0], qs[1], qs[2], qs[3]);
    let (nc, hkv) = (ks[1], ks[2]);
    if ks[0] != b || ks[3] != dk || hkv < 1 || h % hkv != 0 || b < 1 || s < 1 {
        return Err(input(
            "q, compressed keys",
            format!("q {qs:?} needs compressed keys [B, Nc, Hkv, dk] with H a multiple of Hkv, got {ks:?}"),
        ));
    }
    if i32::try_from(s).is_err() || i32::try_from(nc).is_err() {
        return Err(input("q", format!("sequence length {s} exceeds i32")));
    }
    Ok((ordinal, [b, s, h, nc, hkv, dk]))
}

fn check_lengths(block_len: i64, stride: i64) -> Result<(), FusedError> {
    if block_len < 1 || stride < 1 || i32::try_from(block_len.max(stride)).is_err() {
        return Err(input(
            "block_len, stride",
            format!("must be in 1..2^31, got l = {block_len}, d = {stride}"),
        ));
    }
    Ok(())
}

/// Shapes checked for the compressed branch: `q`, `ck`, `cv` (of `kinds`) and `l`, `d`, `scale`.
fn check_compressed(
    q: &Tensor,
    ck: &Tensor,
    cv: &Tensor,
    kinds: &[Kind],
    block_len: i64,
    stride: i64,
    scale: f64,
) -> Result<usize, FusedError> {
    let (ordinal, [b, _, _, nc, hkv, _]) = check_q_ck(q, ck, kinds)?;
    let vs = check_tensor("compressed values", cv, q.device(), kinds)?;
    if vs[..3] != [b, nc, hkv] {
        return Err(input(
            "compressed values",
            format!("must be [B, Nc, Hkv, dv] = [{b}, {nc}, {hkv}, dv], got {vs:?}"),
        ));
    }
    check_lengths(block_len, stride)?;
    if !scale.is_finite() {
        return Err(input("scale", format!("must be finite, got {scale}")));
    }
    Ok(ordinal)
}

/// The compressed branch with autograd: `(out [B, S, H, dv], lse fp32 [B, S, H])`, `out`
/// differentiable in `q`, `ck`, `cv` (on `backend`: the tensor-core forward, dQ and dK/dV
/// kernels, deterministic; or cuDNN), `lse` the rows' log-sum-exp (not differentiable; what
/// [`select_blocks`] needs). `q`, `ck`, `cv` bf16 or fp32 computed in bf16
/// ([`super::compute_kind`] must be bf16), dk and dv in [`super::MMA_HEAD_DIMS`], at most 64
/// query heads per group.
pub fn compressed_attention(
    q: &Tensor,
    ck: &Tensor,
    cv: &Tensor,
    block_len: i64,
    stride: i64,
    scale: f64,
    backend: CompressedBackend,
) -> Result<(Tensor, Tensor), FusedError> {
    compressed_call(q, ck, cv, (block_len, stride, scale), true, backend)
}

/// The compressed branch's forward alone (no autograd; on `backend`), for selection and inference:
/// `(out [B, S, H, dv] bf16, lse fp32 [B, S, H])`, `lse` the natural log-sum-exp of each row's
/// scaled scores (`+inf` for a row that sees no compressed token, whose output is 0). Inputs as
/// [`compressed_attention`].
pub fn compressed_forward(
    q: &Tensor,
    ck: &Tensor,
    cv: &Tensor,
    block_len: i64,
    stride: i64,
    scale: f64,
    backend: CompressedBackend,
) -> Result<(Tensor, Tensor), FusedError> {
    compressed_call(q, ck, cv, (block_len, stride, scale), false, backend)
}

fn compressed_call(
    q: &Tensor,
    ck: &Tensor,
    cv: &Tensor,
    (block_len, stride, scale): (i64, i64, f64),
    autograd: bool,
    backend: CompressedBackend,
) -> Result<(Tensor, Tensor), FusedError> {
    let kinds = [Kind::BFloat16, Kind::Float];
    let ordinal = check_compressed(q, ck, cv, &kinds, block_len, stride, scale)?;
    let kernels = kernels(ordinal)?;
    let mut err = vec![0u8; ERR_LEN];
    let mut out: *mut C_tensor = std::ptr::null_mut();
    let mut lse: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: live tensors borrowed for the call, a process-lifetime kernel table, valid
    // out-pointers; the glue catches every exception and writes at most ERR_LEN bytes to `err`.
    let rc = unsafe {
        nsa_fused_compressed(
            q.as_ptr(),
            ck.as_ptr(),
            cv.as_ptr(),
            block_len,
            stride,
            scale,
            i32::from(autograd),
            backend.code(),
            &kernels.table,
            &mut out,
            &mut lse,
            err.as_mut_ptr().cast(),
            ERR_LEN,
        )
    };
    let call = "nsa_fused_compressed";
    if rc != 0 {
        return Err(glue_err(call, &err));
    }
    Ok((finish(call, out, &err)?, finish(call, lse, &err)?))
}

/// Block selection (Eqs. 8–11) inside one kernel from the compressed branch's `lse`
/// ([`compressed_forward`]): int64 `[B, S, Hkv, n]`, ascending, `−1` padded, as nsa-select's
/// `select_blocks` returns. `q`, `ck` both bf16 (scores on tensor cores) or both fp32, dk in
/// [`super::MMA_HEAD_DIMS`], at most 64 query heads per group, at most [`SELECT_MAX_TOP_N`]
/// blocks per token; `lse` fp32 `[B, S, H]`. The kernel's CTA size is chosen as
/// [`SelectCta::Auto`] says. Shared memory does not grow with the sequence: each block's score
/// is final a tile after its first, and it goes straight into the token's top list.
pub fn select_blocks(
    q: &Tensor,
    ck: &Tensor,
    lse: &Tensor,
    params: &SelectParams,
    scale: f64,
) -> Result<Tensor, FusedError> {
    select_blocks_with(q, ck, lse, params, scale, SelectCta::Auto)
}

/// [`select_blocks`] with CTAs of the given size ([`SelectCta::Warps8`] needs bf16 inputs).
pub fn select_blocks_with(
    q: &Tensor,
    ck: &Tensor,
    lse: &Tensor,
    params: &SelectParams,
    scale: f64,
    cta: SelectCta,
) -> Result<Tensor, FusedError> {
    let (ordinal, [b, s, h, _, _, _]) = check_q_ck(q, ck, &[Kind::BFloat16, Kind::Float])?;
    if lse.device() != q.device() || lse.kind() != Kind::Float || lse.size() != [b, s, h] {
        return Err(input(
            "lse",
            format!(
                "must be fp32 [B, S, H] = [{b}, {s}, {h}] on {:?}, got {:?} {:?} on {:?}",
                q.device(),
                lse.kind(),
                lse.size(),
                lse.device()
            ),
        ));
    }
    let p = params;
    check_lengths(p.block_len, p.stride)?;
    let taps = p.tap_weights.len() as i64;
    if p.select_len < 1
        || !(1..=SELECT_MAX_TOP_N).contains(&p.top_n)
        || p.n_local < 0
        || p.tap_step < 1
        || !(1..=32).contains(&taps)
    {
        return Err(input(
            "params",
            format!("invalid selection parameters {p:?}"),
        ));
    }
    if !scale.is_finite() {
        return Err(input("scale", format!("must be finite, got {scale}")));
    }
    if cta == SelectCta::Warps8 && q.kind() != Kind::BFloat16 {
        return Err(input(
            "cta",
            format!("CTAs of 8 warps need bf16 inputs, got {:?}", q.kind()),
        ));
    }
    let kernels = kernels(ordinal)?;
    let mut err = vec![0u8; ERR_LEN];
    // SAFETY: as in `compressed_forward`; `tap_weights` outlives the call and holds `taps`
    // values.
    let ptr = unsafe {
        nsa_fused_select(
            q.as_ptr(),
            ck.as_ptr(),
            lse.as_ptr(),
            p.block_len,
            p.stride,
            p.select_len,
            p.top_n,
            p.n_local,
            p.tap_first,
            p.tap_step,
            p.tap_weights.as_ptr(),
            taps,
            scale,
            cta.warps(),
            &kernels.table,
            err.as_mut_ptr().cast(),
            ERR_LEN,
        )
    };
    finish("nsa_fused_select", ptr, &err)
}
