//! Pointwise work around the attention kernels, one kernel pass each forward and backward:
//! rotary position embedding ([`rope`]), the gated sum of the three branches ([`gate_mix`]),
//! the blocks the compressed branch's φ reads ([`cmp_blocks`], [`cmp_blocks_linear`]), and the model's RMSNorm
//! ([`rms_norm`]) and SwiGLU ([`swiglu`]). The kernels are `nsa-sys/kernels/pointwise.cu`; the
//! autograd functions are in `glue/pointwise.cpp` and `glue/model_ops.cpp`; they run on
//! libtorch's current CUDA stream.
//!
//! libtorch runs the same arithmetic as a chain of elementwise operators (RoPE: four
//! multiplications, a subtraction, an addition and a concatenation, each writing a full
//! tensor, and as many backward kernels), which the NSA layer applies four times per layer.
use std::collections::HashMap;
use std::ffi::{c_char, c_void};
use std::sync::Mutex;

use tch::{Kind, Tensor};
use torch_sys::C_tensor;

use super::{
    cubin, cuda_ordinal, device_setup, finish, input, load_module, loaded_once, module_function,
    same_layout,
};
use super::{FusedError, FusedOptions};
use crate::autograd::ERR_LEN;
use crate::driver::{self, CuFunction};
use crate::nvrtc::POINTWISE;

/// Mirror of `NsaPointwiseTable` in `glue/pointwise_table.h` (sizes compared at each load).
#[repr(C)]
#[derive(Debug)]
struct PointwiseTable {
    launch: *const c_void,
    /// Index `2 · (input fp32) + (output fp32)`.
    rope: [CuFunction; 4],
    /// bf16, fp32.
    mix: [CuFunction; 2],
    /// bf16, fp32.
    mix_bwd: [CuFunction; 2],
    /// bf16, fp32 (the loss's rows: `crate::loss`).
    ce_rows: [CuFunction; 2],
    /// Index `4 · (x fp32) + 2 · (added a fp32) + (output fp32)` (RMSNorm, [`rms_norm`]).
    norm: [CuFunction; 8],
    /// As `norm`.
    norm_bwd: [CuFunction; 8],
    /// bf16, fp32 (the MLP's SwiGLU: [`swiglu`]).
    swiglu: [CuFunction; 2],
    /// bf16, fp32.
    swiglu_bwd: [CuFunction; 2],
    /// bf16, fp32 (φ's input blocks: [`cmp_blocks`]).
    blocks: [CuFunction; 2],
    /// bf16, fp32.
    blocks_bwd: [CuFunction; 2],
    sm_count: i32,
}

/// The pointwise kernels loaded on one device.
#[derive(Debug)]
pub struct PointwiseKernels {
    table: PointwiseTable,
}

impl PointwiseKernels {
    /// The table the glue reads (`NsaPointwiseTable`), for glue outside this module
    /// (`crate::loss`); it lives as long as the process.
    pub(crate) fn table_ptr(&self) -> *const c_void {
        std::ptr::from_ref(&self.table).cast()
    }
}

// SAFETY: driver function handles of a module never unloaded, valid in the device's primary
// context from any thread, and the address of cuLaunchKernel; nothing is mutated after loading.
unsafe impl Send for PointwiseKernels {}
// SAFETY: as above.
unsafe impl Sync for PointwiseKernels {}

static LOADED: Mutex<Option<HashMap<usize, &'static PointwiseKernels>>> = Mutex::new(None);

/// The pointwise kernels of CUDA device `device`, compiled (or read from the CUBIN cache) and
/// loaded on first use.
pub fn pointwise_kernels(device: usize) -> Result<&'static PointwiseKernels, FusedError> {
    loaded_once(&LOADED, device, load)
}

fn load(device: usize, opts: &FusedOptions) -> Result<PointwiseKernels, FusedError> {
    // SAFETY: a pure function of the C++ struct's layout.
    let glue = unsafe { nsa_pointwise_table_size() };
    same_layout(
        "NsaPointwiseTable",
        glue,
        std::mem::size_of::<PointwiseTable>(),
    )?;
    let drv = driver::shared()?;
    let setup = device_setup(device)?;
    let module = load_module(&cubin(&POINTWISE, setup.arch, opts)?.cubin)?;
    let func = |name: &str| module_function(module, name, 0);
    // The RMSNorm backward's [warps][D] fp32 slices of dw: up to 48 KB, the most a launch may
    // ask for without opting in beyond the default (its attribute still has to allow it).
    let norm_smem = i32::try_from(RMS_NORM_MAX_DIM * 4).unwrap_or(i32::MAX);
    let func_smem = |name: &str| module_function(module, name, norm_smem);
    Ok(PointwiseKernels {
        table: PointwiseTable {
            launch: drv.launch_kernel as *const c_void,
            rope: [
                func("nsa_rope_bf16_bf16")?,
                func("nsa_rope_bf16_f32")?,
                func("nsa_rope_f32_bf16")?,
                func("nsa_rope_f32_f32")?,
            ],
            mix: [func("nsa_gate_mix_bf16")?, func("nsa_gate_mix_f32")?],
            mix_bwd: [
                func("nsa_gate_mix_bwd_bf16")?,
                func("nsa_gate_mix_bwd_f32")?,
            ],
            ce_rows: [func("nsa_ce_rows_bf16")?, func("nsa_ce_rows_f32")?],
            norm: [
                func("nsa_rms_norm_bf16_bf16_bf16")?,
                func("nsa_rms_norm_bf16_bf16_f32")?,
                func("nsa_rms_norm_bf16_f32_bf16")?,
                func("nsa_rms_norm_bf16_f32_f32")?,
                func("nsa_rms_norm_f32_bf16_bf16")?,
                func("nsa_rms_norm_f32_bf16_f32")?,
                func("nsa_rms_norm_f32_f32_bf16")?,
                func("nsa_rms_norm_f32_f32_f32")?,
            ],
            norm_bwd: [
                func_smem("nsa_rms_norm_bwd_bf16_bf16_bf16")?,
                func_smem("nsa_rms_norm_bwd_bf16_bf16_f32")?,
                func_smem("nsa_rms_norm_bwd_bf16_f32_bf16")?,
                func_smem("nsa_rms_norm_bwd_bf16_f32_f32")?,
                func_smem("nsa_rms_norm_bwd_f32_bf16_bf16")?,
                func_smem("nsa_rms_norm_bwd_f32_bf16_f32")?,
                func_smem("nsa_rms_norm_bwd_f32_f32_bf16")?,
                func_smem("nsa_rms_norm_bwd_f32_f32_f32")?,
            ],
            swiglu: [func("nsa_swiglu_bf16")?, func("nsa_swiglu_f32")?],
            swiglu_bwd: [func("nsa_swiglu_bwd_bf16")?, func("nsa_swiglu_bwd_f32")?],
            blocks: [func("nsa_cmp_blocks_bf16")?, func("nsa_cmp_blocks_f32")?],
            blocks_bwd: [
                func("nsa_cmp_blocks_bwd_bf16")?,
                func("nsa_cmp_blocks_bwd_f32")?,
            ],
            sm_count: setup.sm_count,
        },
    })
}

extern "C" {
    fn nsa_pointwise_table_size() -> usize;
    fn nsa_fused_rope(
        x: *const C_tensor,
        cos: *const C_tensor,
        sin: *const C_tensor,
        table: *const PointwiseTable,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut C_tensor;
    fn nsa_fused_rms_norm(
        x: *const C_tensor,
        a: *const C_tensor,
        w: *const C_tensor,
        eps: f64,
        sum_out: *mut *mut C_tensor,
        table: *const PointwiseTable,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut C_tensor;
    fn nsa_fused_swiglu(
        ab: *const C_tensor,
        table: *const PointwiseTable,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut C_tensor;
    fn nsa_fused_cmp_blocks(
        x: *const C_tensor,
        pos: *const C_tensor,
        block_len: i64,
        stride: i64,
        table: *const PointwiseTable,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut C_tensor;
    fn nsa_fused_cmp_blocks_linear(
        x: *const C_tensor,
        pos: *const C_tensor,
        w1: *const C_tensor,
        b1: *const C_tensor,
        block_len: i64,
        stride: i64,
        table: *const PointwiseTable,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut C_tensor;
    fn nsa_fused_gate_mix(
        oc: *const C_tensor,
        os: *const C_tensor,
        ow: *const C_tensor,
        g: *const C_tensor,
        table: *const PointwiseTable,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut C_tensor;
    fn nsa_fused_gate_mix_project(
        oc: *const C_tensor,
        os: *const C_tensor,
        ow: *const C_tensor,
        g: *const C_tensor,
        w: *const C_tensor,
        table: *const PointwiseTable,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut C_tensor;
}

/// Rotary position embedding, rotate-half form, of `x` `[B, S, X, dk]` (bf16 or fp32, on CUDA;
/// any strides with the last axis contiguous, so a slice of a stacked projection is read in
/// place) by the tables `cos`, `sin` (fp32 `[≥ S, dk/2]`, contiguous, on x's device; row `s` =
/// position `s`): pair `(i, i + dk/2)` of row `(b, s, h)` becomes
/// `(x_i cos − x_{i+dk/2} sin, x_{i+dk/2} cos + x_i sin)`, computed in fp32 and returned
/// contiguous in x's dtype. Differentiable in `x` (the backward rotates the gradient back, one
/// kernel); the tables get no gradient.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor, FusedError> {
    let size = x.size();
    let &[_, s, _, dk] = size.as_slice() else {
        return Err(input("x", format!("must be [B, S, X, dk], got {size:?}")));
    };
    if !matches!(x.kind(), Kind::BFloat16 | Kind::Float) {
        return Err(input("x", format!("bf16 or fp32, got {:?}", x.kind())));
    }
    if dk % 2 != 0 || x.stride()[3] != 1 {
        return Err(input(
            "x",
            format!(
                "dk must be even and the last axis contiguous, got {size:?} strides {:?}",
                x.stride()
            ),
        ));
    }
    if i32::try_from(s).is_err() || i32::try_from(size[2]).is_err() {
        return Err(input("x", format!("S and X must fit i32, got {size:?}")));
    }
    for (what, t) in [("cos", cos), ("sin", sin)] {
        let ts = t.size();
        if t.device() != x.device()
            || t.kind() != Kind::Float
            || !t.is_contiguous()
            || ts.len() != 2
            || ts[0] < s
            || ts[1] != dk / 2
        {
            return Err(input(
                what,
                format!(
                    "contiguous fp32 [≥ {s}, {}] on {:?}, got {:?} {ts:?} on {:?}",
                    dk / 2,
                    x.device(),
                    t.kind(),
                    t.device()
                ),
            ));
        }
    }
    let ordinal = cuda_ordinal("x", x)?;
    let tab = &pointwise_kernels(ordinal)?.table;
    let mut err = vec![0u8; ERR_LEN];
    // SAFETY: live tensors borrowed for the call; the table lives for the process; the glue
    // catches every exception and writes at most ERR_LEN bytes into `err`.
    let ptr = unsafe {
        nsa_fused_rope(
            x.as_ptr(),
            cos.as_ptr(),
            sin.as_ptr(),
            tab,
            err.as_mut_ptr().cast(),
            ERR_LEN,
        )
    };
    finish("nsa_fused_rope", ptr, &err)
}

/// The gated sum `o = g_cmp · oc + g_slc · os + g_win · ow` (Eq. 5) of the branch outputs
/// `oc`, `os`, `ow` `[B, S, H, dv]` with gates `g` `[B, S, H, 3]` (cmp, slc, win): one dtype
/// (bf16 or fp32), on one CUDA device, the gates contiguous. A branch output whose rows are
/// evenly spaced with the last axis contiguous (a contiguous tensor, or a narrowed view of a
/// wider one) is read in place and saved as it is for backward; any other is copied first.
/// fp32 arithmetic, one rounding per output element. Differentiable in all four; the backward's gate gradients are row sums over `dv`
/// in a fixed order (deterministic).
pub fn gate_mix(oc: &Tensor, os: &Tensor, ow: &Tensor, g: &Tensor) -> Result<Tensor, FusedError> {
    check_mix_operands(oc, os, ow, g)?;
    let tab = &pointwise_kernels(cuda_ordinal("oc", oc)?)?.table;
    let mut err = vec![0u8; ERR_LEN];
    // SAFETY: as in `rope`.
    let ptr = unsafe {
        nsa_fused_gate_mix(
            oc.as_ptr(),
            os.as_ptr(),
            ow.as_ptr(),
            g.as_ptr(),
            tab,
            err.as_mut_ptr().cast(),
            ERR_LEN,
        )
    };
    finish("nsa_fused_gate_mix", ptr, &err)
}

/// [`gate_mix`] followed by the output projection: `y = o · wᵀ` `[B, S, dim]` for `w`
/// `[dim, H · dv]` (contiguous, the branch outputs' dtype and device), with the gated sum `o`
/// computed as [`gate_mix`] computes it and the product by libtorch's matmul. The same values
/// as the two calls in sequence, but `o` is not kept for backward: the backward sums the
/// branches again from the operands [`gate_mix`] saves anyway, for `w`'s gradient, so the layer
/// holds one `[B, S, H, dv]` activation less. Differentiable in all five.
pub fn gate_mix_project(
    oc: &Tensor,
    os: &Tensor,
    ow: &Tensor,
    g: &Tensor,
    w: &Tensor,
) -> Result<Tensor, FusedError> {
    check_mix_operands(oc, os, ow, g)?;
    let size = oc.size();
    let ws = w.size();
    if ws.len() != 2 || ws[1] != size[2] * size[3] {
        return Err(input(
            "w",
            format!(
                "must be [dim, H · dv] = [dim, {}], got {ws:?}",
                size[2] * size[3]
            ),
        ));
    }
    expect_tensor("w", w, oc.kind(), &ws, oc.device(), true)?;
    let tab = &pointwise_kernels(cuda_ordinal("oc", oc)?)?.table;
    let mut err = vec![0u8; ERR_LEN];
    // SAFETY: as in `rope`.
    let ptr = unsafe {
        nsa_fused_gate_mix_project(
            oc.as_ptr(),
            os.as_ptr(),
            ow.as_ptr(),
            g.as_ptr(),
            w.as_ptr(),
            tab,
            err.as_mut_ptr().cast(),
            ERR_LEN,
        )
    };
    finish("nsa_fused_gate_mix_project", ptr, &err)
}

/// [`gate_mix`]'s dtype and shape rules (the device comes after, with the kernel table).
fn check_mix_operands(oc: &Tensor, os: &Tensor, ow: &Tensor, g: &Tensor) -> Result<(), FusedError> {
    let kind = oc.kind();
    if !matches!(kind, Kind::BFloat16 | Kind::Float) {
        return Err(input("oc", format!("bf16 or fp32, got {kind:?}")));
    }
    let size = oc.size();
    if size.len() != 4 {
        return Err(input("oc", format!("must be [B, S, H, dv], got {size:?}")));
    }
    let gate_size = [size[0], size[1], size[2], 3];
    for (what, t) in [("oc", oc), ("os", os), ("ow", ow)] {
        expect_tensor(what, t, kind, &size, oc.device(), false)?;
    }
    expect_tensor("g", g, kind, &gate_size, oc.device(), true)
}

/// Checks that `t` (argument `what`) has dtype `kind`, shape `want` and `device`, and is
/// contiguous where `contiguous` asks; the error names what was wanted and what came.
fn expect_tensor(
    what: &'static str,
    t: &Tensor,
    kind: Kind,
    want: &[i64],
    device: tch::Device,
    contiguous: bool,
) -> Result<(), FusedError> {
    if t.kind() == kind
        && t.size() == want
        && t.device() == device
        && (!contiguous || t.is_contiguous())
    {
        return Ok(());
    }
    let layout = if contiguous { "contiguous " } else { "" };
    Err(input(
        what,
        format!(
            "{layout}{kind:?} {want:?} on {device:?}, got {:?} {:?} on {:?}",
            t.kind(),
            t.size(),
            t.device()
        ),
    ))
}

/// The overlapping blocks the compressed branch's φ reads (Eq. 7), in φ's layout: for raw keys
/// or values `x` `[B, S, G, D]` (bf16 or fp32, on CUDA; any strides with the last axis
/// contiguous, so a slice of the stacked projection is read in place) and the position
/// embedding `pos` `[L, G, D]` (x's dtype; `None` for none), block `i` of head `g` is
/// `x[b, i·stride + p, g, :] + pos[p, g, :]` for `p < L`, returned contiguous as
/// `[B, Nc, G, L·D]` (position-major), `Nc = (S − L)/stride + 1`; each sum in fp32, rounded
/// once. One kernel forward; one backward for `x`'s gradient (each token sums what the blocks
/// covering it received, in ascending block order: deterministic, no atomics) and libtorch's
/// sum over batch and blocks for `pos`'s. Needs `1 ≤ L ≤ S` and `stride ≥ 1`. libtorch's
/// operators take an unfold view, an add and a copy forward, and unfold's backward through
/// a zero-filled tensor.
pub fn cmp_blocks(
    x: &Tensor,
    pos: Option<&Tensor>,
    block_len: i64,
    stride: i64,
) -> Result<Tensor, FusedError> {
    check_blocks(x, pos, block_len, stride)?;
    let ordinal = cuda_ordinal("x", x)?;
    let tab = &pointwise_kernels(ordinal)?.table;
    let mut err = vec![0u8; ERR_LEN];
    // SAFETY: as in `rope`; a null `pos` means none, which the glue checks for.
    let ptr = unsafe {
        nsa_fused_cmp_blocks(
            x.as_ptr(),
            pos.map_or(std::ptr::null(), |p| p.as_ptr()),
            block_len,
            stride,
            tab,
            err.as_mut_ptr().cast(),
            ERR_LEN,
        )
    };
    finish("nsa_fused_cmp_blocks", ptr, &err)
}

/// [`cmp_blocks`] followed by φ's first linear map: `blocks · w1ᵀ (+ b1)` `[B, Nc, G, F]` for
/// `w1` `[F, L·D]` (contiguous) and `b1` `[F]`, both in x's dtype and on its device, the
/// blocks as [`cmp_blocks`] writes them and the product by libtorch's matmul. The same values
/// as the two in sequence, but the blocks (twice the raw tensor at `L = 2·stride`) are not
/// kept for backward: it keeps `x` (a contiguous copy if `x` is a strided view, which would
/// otherwise keep its whole parent alive) and gathers the blocks again for `w1`'s gradient.
/// Differentiable in `x`, `pos`, `w1` and `b1`.
pub fn cmp_blocks_linear(
    x: &Tensor,
    pos: Option<&Tensor>,
    block_len: i64,
    stride: i64,
    w1: &Tensor,
    b1: Option<&Tensor>,
) -> Result<Tensor, FusedError> {
    check_blocks(x, pos, block_len, stride)?;
    let width = block_len * x.size()[3];
    let features = w1.size().first().copied().unwrap_or(0);
    expect_tensor("w1", w1, x.kind(), &[features, width], x.device(), true)?;
    if let Some(b1) = b1 {
        expect_tensor("b1", b1, x.kind(), &[features], x.device(), false)?;
    }
    let tab = &pointwise_kernels(cuda_ordinal("x", x)?)?.table;
    let mut err = vec![0u8; ERR_LEN];
    // SAFETY: as in `rope`; a null `pos` or `b1` means none, which the glue checks for.
    let ptr = unsafe {
        nsa_fused_cmp_blocks_linear(
            x.as_ptr(),
            pos.map_or(std::ptr::null(), |p| p.as_ptr()),
            w1.as_ptr(),
            b1.map_or(std::ptr::null(), |b| b.as_ptr()),
            block_len,
            stride,
            tab,
            err.as_mut_ptr().cast(),
            ERR_LEN,
        )
    };
    finish("nsa_fused_cmp_blocks_linear", ptr, &err)
}

/// [`cmp_blocks`]' rules for its operands (the device comes after, with the kernel table).
fn check_blocks(
    x: &Tensor,
    pos: Option<&Tensor>,
    block_len: i64,
    stride: i64,
) -> Result<(), FusedError> {
    let size = x.size();
    let &[_, s, g, d] = size.as_slice() else {
        return Err(input("x", format!("must be [B, S, G, D], got {size:?}")));
    };
    if !matches!(x.kind(), Kind::BFloat16 | Kind::Float) {
        return Err(input("x", format!("bf16 or fp32, got {:?}", x.kind())));
    }
    if x.stride()[3] != 1 {
        return Err(input(
            "x",
            format!("the last axis must be contiguous, strides {:?}", x.stride()),
        ));
    }
    if block_len < 1 || stride < 1 || block_len > s {
        return Err(input(
            "block_len",
            format!(
                "need 1 <= L <= S = {s} and stride >= 1, got L = {block_len}, stride = {stride}"
            ),
        ));
    }
    let nc = (s - block_len) / stride + 1;
    let fits = |v: i64| i32::try_from(v).is_ok();
    if !(fits(s) && fits(g) && fits(d) && fits(nc) && fits(block_len) && fits(stride)) {
        return Err(input(
            "x",
            format!("S, G, D and L must fit i32, got {size:?}"),
        ));
    }
    match pos {
        Some(pos) => expect_tensor("pos", pos, x.kind(), &[block_len, g, d], x.device(), false),
        None => Ok(()),
    }
}

/// The largest row length [`rms_norm`] takes (its backward keeps a `[warps][D]` fp32 slice of
/// `dw` per CTA in 48 KB of shared memory).
pub const RMS_NORM_MAX_DIM: i64 = 12288;

/// RMSNorm of the rows of `x` `[…, D]` by `w` `[D]`: `y = x / sqrt(mean(x²) + eps) · w`, the
/// statistics and products in fp32 (`(x · rstd) · w`, as nsa-model's operator path orders
/// them), one kernel forward and one backward (CUDA only; bf16 or fp32; `D ≤`
/// [`RMS_NORM_MAX_DIM`]). The result is contiguous and in the dtype the next operator computes
/// in: CUDA autocast's (bf16 in the trainer) when autocast is on and `x` is fp32, else `x`'s.
/// The operator path returns fp32 there and autocast casts it at the next matmul; here that
/// cast is the kernel's store. Differentiable in `x` (gradient in its dtype) and `w` (in its
/// dtype, the sum of a fixed grid's fp32 partials: deterministic on a given device).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor, FusedError> {
    Ok(norm_call(x, None, w, eps)?.1)
}

/// The residual sum `h + a` and its [`rms_norm`] in one kernel each way: `(sum, y)`. `sum` is
/// in `h`'s dtype, rounded once as libtorch's `h + a` is, and `y` normalises it as stored;
/// `a` (bf16 or fp32) has `h`'s shape. Differentiable in `h`, `a` and `w`; the backward adds
/// the gradient `sum` receives from its other uses (the residual stream) to the norm's, and
/// writes `h`'s and `a`'s gradients (each in its own dtype) in the same pass. Same dtypes,
/// limits and determinism as [`rms_norm`].
pub fn add_rms_norm(
    h: &Tensor,
    a: &Tensor,
    w: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor), FusedError> {
    let (sum, y) = norm_call(h, Some(a), w, eps)?;
    let sum = sum.ok_or_else(|| input("a", "the glue returned no sum".to_string()))?;
    Ok((sum, y))
}

/// [`rms_norm`] (`a` = `None`) or [`add_rms_norm`]: checks, then one glue call.
fn norm_call(
    x: &Tensor,
    a: Option<&Tensor>,
    w: &Tensor,
    eps: f64,
) -> Result<(Option<Tensor>, Tensor), FusedError> {
    let size = x.size();
    let Some(&d) = size.last() else {
        return Err(input("x", "must be [..., D], got a scalar".to_string()));
    };
    for (what, t) in [("x", Some(x)), ("a", a), ("w", Some(w))] {
        if let Some(t) = t {
            if !matches!(t.kind(), Kind::BFloat16 | Kind::Float) {
                return Err(input(what, format!("bf16 or fp32, got {:?}", t.kind())));
            }
        }
    }
    if !(1..=RMS_NORM_MAX_DIM).contains(&d) {
        return Err(input(
            "x",
            format!("D must lie in 1..={RMS_NORM_MAX_DIM}, got {size:?}"),
        ));
    }
    if let Some(a) = a {
        if a.size() != size || a.device() != x.device() {
            return Err(input(
                "a",
                format!(
                    "{size:?} on {:?}, got {:?} on {:?}",
                    x.device(),
                    a.size(),
                    a.device()
                ),
            ));
        }
    }
    if w.size() != [d] || w.device() != x.device() {
        return Err(input(
            "w",
            format!(
                "[{d}] on {:?}, got {:?} on {:?}",
                x.device(),
                w.size(),
                w.device()
            ),
        ));
    }
    if !eps.is_finite() || eps < 0.0 {
        return Err(input("eps", format!("a finite value >= 0, got {eps}")));
    }
    let ordinal = cuda_ordinal("x", x)?;
    let tab = &pointwise_kernels(ordinal)?.table;
    let mut err = vec![0u8; ERR_LEN];
    let mut sum: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: as in `rope`; `sum` is a valid out-pointer the glue sets only on success.
    let ptr = unsafe {
        nsa_fused_rms_norm(
            x.as_ptr(),
            a.map_or(std::ptr::null(), |a| a.as_ptr()),
            w.as_ptr(),
            eps,
            &mut sum,
            tab,
            err.as_mut_ptr().cast(),
            ERR_LEN,
        )
    };
    let y = finish("nsa_fused_rms_norm", ptr, &err)?;
    // SAFETY: a non-null `sum` is a fresh at::Tensor* the glue handed over (ownership to us).
    let sum = (!sum.is_null()).then(|| unsafe { Tensor::from_ptr(sum) });
    Ok((sum, y))
}

/// The MLP's SwiGLU on its stacked gate and up projections: `ab` `[…, 2H]` (the gate's `H`
/// columns first; bf16 or fp32, on CUDA) → `silu(ab[…, ..H]) · ab[…, H..]` `[…, H]`, contiguous,
/// in `ab`'s dtype; fp32 arithmetic, one rounding per element. One kernel forward and one
/// backward (the gradient `[…, 2H]` in `ab`'s dtype), where libtorch's operators take two and
/// three and write the SiLU in between.
pub fn swiglu(ab: &Tensor) -> Result<Tensor, FusedError> {
    let size = ab.size();
    if !matches!(ab.kind(), Kind::BFloat16 | Kind::Float) {
        return Err(input("ab", format!("bf16 or fp32, got {:?}", ab.kind())));
    }
    match size.last() {
        Some(&w) if w > 0 && w % 2 == 0 && i32::try_from(w / 2).is_ok() => {}
        _ => {
            return Err(input(
                "ab",
                format!("must be [..., 2H] with H >= 1, got {size:?}"),
            ))
        }
    }
    let ordinal = cuda_ordinal("ab", ab)?;
    let tab = &pointwise_kernels(ordinal)?.table;
    let mut err = vec![0u8; ERR_LEN];
    // SAFETY: as in `rope`.
    let ptr = unsafe { nsa_fused_swiglu(ab.as_ptr(), tab, err.as_mut_ptr().cast(), ERR_LEN) };
    finish("nsa_fused_swiglu", ptr, &err)
}

#[cfg(test)]
mod tests;
