//! The sliding-window branch (`glue/window.cpp`, `WindowFlash`): the forward and the backward
//! on Hopper's warpgroup MMA (`kernels/window_fwd.cu`, `kernels/window_bwd.cu`, sm_90 only) or
//! on libtorch's flash-attention kernels; and the bound on the temporaries of the GQA
//! backward calls that the glue splits by groups of KV heads (the window's flash backward, the
//! compressed branch's cuDNN backward).
use std::collections::HashMap;
use std::ffi::{c_char, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

use super::{
    check_qkv, compute_kind, cubin, device_setup, finish, input, load_module, loaded_once,
    module_function, same_layout, FusedError, FusedOptions,
};
use crate::autograd::ERR_LEN;
use crate::driver::{self, CuFunction};
use crate::nvrtc::{WINDOW_BWD, WINDOW_FWD};

extern "C" {
    fn nsa_fused_window(
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        window: i64,
        scale: f64,
        table: *const c_void,
        bwd_table: *const c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut C_tensor;
    fn nsa_window_table_size() -> usize;
    #[cfg(test)]
    fn nsa_window_shapes(out: *mut i64, bwd: *mut i64);
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

/// `(dk, dv)` of the wgmma window forward's instantiations, in the glue's table order: `dk` the
/// one head size of q, k and v that flash's backward needs (v zero-padded to it), `dv` the
/// value columns that are real.
pub const WINDOW_WGMMA_SHAPES: [(i64, i64); 6] = [
    (64, 64),
    (128, 64),
    (128, 128),
    (192, 64),
    (192, 128),
    (192, 192),
];

/// `(dk, dv)` of the wgmma window backward's instantiations (dQ, then dK and dV), in the glue's
/// table order: [`WINDOW_WGMMA_SHAPES`] less `(192, 192)`, whose key-outer kernel would hold
/// 192 fp32 accumulators a thread for dK and dV alone (flash's backward runs there).
pub const WINDOW_WGMMA_BWD_SHAPES: [(i64, i64); 5] =
    [(64, 64), (128, 64), (128, 128), (192, 64), (192, 128)];

/// Mirror of `NsaWindowTable` in `glue/window.cpp` (sizes compared at each load).
#[repr(C)]
#[derive(Debug)]
struct WindowTable {
    launch: *const c_void,
    /// [`WINDOW_WGMMA_SHAPES`]' order.
    fwd: [CuFunction; 6],
    /// [`WINDOW_WGMMA_BWD_SHAPES`]' order: the dQ kernels, then the dK/dV kernels.
    bwd_dq: [CuFunction; 5],
    bwd_dkdv: [CuFunction; 5],
    max_smem: i32,
}

/// The wgmma window kernels loaded on one device (compute capability 9.0).
#[derive(Debug)]
pub struct WindowKernels {
    table: WindowTable,
}

// SAFETY: driver function handles of a module never unloaded, valid in the device's primary
// context from any thread, and the address of cuLaunchKernel; nothing is mutated after loading.
unsafe impl Send for WindowKernels {}
// SAFETY: as above.
unsafe impl Sync for WindowKernels {}

static LOADED: Mutex<Option<HashMap<usize, &'static Option<WindowKernels>>>> = Mutex::new(None);
static WGMMA_FORWARD: AtomicBool = AtomicBool::new(true);
static WGMMA_BACKWARD: AtomicBool = AtomicBool::new(true);

/// The wgmma window kernels of CUDA device `device`, compiled (or read from the CUBIN
/// cache) and loaded on first use; `None` on devices other than compute capability 9.0 (the
/// kernels use Hopper's own instructions).
pub fn window_kernels(device: usize) -> Result<Option<&'static WindowKernels>, FusedError> {
    Ok(loaded_once(&LOADED, device, load)?.as_ref())
}

fn load(device: usize, opts: &FusedOptions) -> Result<Option<WindowKernels>, FusedError> {
    // SAFETY: a pure function of the C++ struct's layout.
    let glue = unsafe { nsa_window_table_size() };
    same_layout("NsaWindowTable", glue, std::mem::size_of::<WindowTable>())?;
    let setup = device_setup(device)?;
    if !WINDOW_FWD.builds_for(setup.arch) {
        return Ok(None);
    }
    let drv = driver::shared()?;
    let module = load_module(&cubin(&WINDOW_FWD, setup.arch, opts)?.cubin)?;
    let mut fwd = [std::ptr::null_mut(); 6];
    for (f, (dk, dv)) in fwd.iter_mut().zip(WINDOW_WGMMA_SHAPES) {
        *f = module_function(
            module,
            &format!("nsa_window_fwd_dk{dk}_dv{dv}"),
            setup.max_smem,
        )?;
    }
    let module = load_module(&cubin(&WINDOW_BWD, setup.arch, opts)?.cubin)?;
    let mut bwd_dq = [std::ptr::null_mut(); 5];
    let mut bwd_dkdv = [std::ptr::null_mut(); 5];
    for ((dq, dkdv), (dk, dv)) in bwd_dq
        .iter_mut()
        .zip(bwd_dkdv.iter_mut())
        .zip(WINDOW_WGMMA_BWD_SHAPES)
    {
        let name = |part: &str| format!("nsa_window_bwd_{part}_dk{dk}_dv{dv}");
        *dq = module_function(module, &name("dq"), setup.max_smem)?;
        *dkdv = module_function(module, &name("dkdv"), setup.max_smem)?;
    }
    Ok(Some(WindowKernels {
        table: WindowTable {
            launch: drv.launch_kernel as *const c_void,
            fwd,
            bwd_dq,
            bwd_dkdv,
            max_smem: setup.max_smem,
        },
    }))
}

/// Whether [`window_attention`] runs its forward on the wgmma kernel where one exists (on by
/// default); `false` sends every forward to libtorch's flash kernel, as on other GPUs. Returns
/// the previous setting. Process-wide: the GPU check and benchmarks compare the two forwards.
pub fn set_window_wgmma_forward(on: bool) -> bool {
    WGMMA_FORWARD.swap(on, Ordering::Relaxed)
}

/// Whether [`window_attention`] runs its backward on the wgmma kernels where they exist (on by
/// default); `false` sends every backward to libtorch's flash kernel. Returns the previous
/// setting. Process-wide, read when the forward runs; as [`set_window_wgmma_forward`].
pub fn set_window_wgmma_backward(on: bool) -> bool {
    WGMMA_BACKWARD.swap(on, Ordering::Relaxed)
}

/// Runs `f` with [`window_attention`]'s wgmma forward and backward switched as given (see
/// [`set_window_wgmma_forward`] and [`set_window_wgmma_backward`]; `None` leaves a switch as
/// it is), then puts both back as they were, also when `f` panics. The switches are
/// process-wide: this is for the GPU check and the benchmarks, which compare the wgmma kernels
/// with flash's.
pub fn with_window_kernels<T>(
    wgmma_forward: Option<bool>,
    wgmma_backward: Option<bool>,
    f: impl FnOnce() -> T,
) -> T {
    /// The switches' settings before the call, restored when dropped.
    struct Restore(Option<bool>, Option<bool>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(on) = self.0 {
                set_window_wgmma_forward(on);
            }
            if let Some(on) = self.1 {
                set_window_wgmma_backward(on);
            }
        }
    }
    let _restore = Restore(
        wgmma_forward.map(set_window_wgmma_forward),
        wgmma_backward.map(set_window_wgmma_backward),
    );
    f()
}

/// The forward [`window_attention`] runs for inputs of `device` with head size `d` (q and k) and
/// `value_cols` (v): `"wgmma"` (this crate's Hopper kernel) or `"flash"` (libtorch's). Loads the
/// kernels on first use; a device whose kernels fail to load counts as `"flash"` here
/// (`window_attention` returns that error).
pub fn window_forward_kernel(device: Device, d: i64, value_cols: i64) -> &'static str {
    match wgmma_kernels_for(Direction::Forward, device, d, value_cols) {
        Ok(Some(_)) => "wgmma",
        _ => "flash",
    }
}

/// The backward [`window_attention`] runs for such inputs, as [`window_forward_kernel`].
pub fn window_backward_kernel(device: Device, d: i64, value_cols: i64) -> &'static str {
    match wgmma_kernels_for(Direction::Backward, device, d, value_cols) {
        Ok(Some(_)) => "wgmma",
        _ => "flash",
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Forward,
    Backward,
}

/// The wgmma kernels [`window_attention`] runs on in `direction` for these inputs: `None` where
/// that direction's switch is off, the head sizes have no instantiation for it, or the device
/// is not a Hopper GPU.
fn wgmma_kernels_for(
    direction: Direction,
    device: Device,
    d: i64,
    value_cols: i64,
) -> Result<Option<&'static WindowKernels>, FusedError> {
    let on = match direction {
        Direction::Forward => {
            WINDOW_WGMMA_SHAPES.contains(&(d, value_cols)) && WGMMA_FORWARD.load(Ordering::Relaxed)
        }
        Direction::Backward => {
            WINDOW_WGMMA_BWD_SHAPES.contains(&(d, value_cols))
                && WGMMA_BACKWARD.load(Ordering::Relaxed)
        }
    };
    match device {
        Device::Cuda(i) if on => window_kernels(i),
        _ => Ok(None),
    }
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

/// Sliding-window attention: query `t` reads keys `t − window + 1 ..= t`. Computed in bf16 only
/// ([`compute_kind`] must be bf16), CUDA, q and k of head size `dk` ≤ 256 (a multiple of 8), v
/// of head size `dv` ≤ `dk`; other inputs get [`FusedError::Input`] (callers fall back to the
/// lean path, or zero-pad q and k where dk < dv: zero columns change no score). Returns
/// `[B, S, H, dv]`; differentiable in `q`, `k`, `v`.
///
/// The forward runs on this crate's wgmma kernel where [`window_forward_kernel`] says so
/// (compute capability 9.0, `(dk, dv)` in [`WINDOW_WGMMA_SHAPES`], inputs starting 16-byte
/// aligned), else on libtorch's flash kernel. The backward, on either forward's output and
/// log-sum-exp, runs on this crate's deterministic wgmma kernels where
/// [`window_backward_kernel`] says so (`(dk, dv)` in [`WINDOW_WGMMA_BWD_SHAPES`]), else on
/// flash's. Flash takes one head size for q, k and v: the glue zero-pads v (and the output and
/// its gradient) to dk where a flash kernel runs, and nowhere else.
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
    if dk > 256 || dk % 8 != 0 || dv > dk {
        return Err(input(
            "q, v",
            format!(
                "the window kernels need dv ≤ dk ≤ 256, dk a multiple of 8; got dk {dk}, dv {dv}"
            ),
        ));
    }
    if window < 1 {
        return Err(input("window", format!("must be positive, got {window}")));
    }
    let table_of = |direction| -> Result<*const c_void, FusedError> {
        Ok(wgmma_kernels_for(direction, q.device(), dk, dv)?
            .map_or(std::ptr::null(), |k| std::ptr::from_ref(&k.table).cast()))
    };
    let (table, bwd_table) = (
        table_of(Direction::Forward)?,
        table_of(Direction::Backward)?,
    );
    let mut err = vec![0u8; ERR_LEN];
    // SAFETY: live tensors borrowed for the call; `table` and `bwd_table` are null or a loaded
    // table that lives as long as the process; the glue catches every exception and writes at most ERR_LEN
    // bytes into `err`.
    let ptr = unsafe {
        nsa_fused_window(
            q.as_ptr(),
            k.as_ptr(),
            v.as_ptr(),
            window,
            scale,
            table,
            bwd_table,
            err.as_mut_ptr().cast(),
            ERR_LEN,
        )
    };
    finish("nsa_fused_window", ptr, &err)
}

#[cfg(test)]
mod tests {
    /// `MACRO(a, b, ...)` lines of a kernel source, as numbers.
    fn instantiations(source: &str, prefix: &str) -> Vec<Vec<i64>> {
        source
            .lines()
            .filter_map(|l| l.strip_prefix(prefix))
            .map(|rest| {
                rest.trim_end_matches(')')
                    .split(',')
                    .map(|a| a.trim().parse().expect("a number"))
                    .collect()
            })
            .collect()
    }

    /// The lists of the wgmma window kernels' instantiations agree: the kernels'
    /// `NSA_WINDOW_FWD(dk, dv, BN, WGS)` and `NSA_WINDOW_BWD(dk, dv, BN)` lines, the glue's
    /// tables (the forward's with the BN and warpgroups that its grid and shared-memory carve-up
    /// use; the backward's carve-up assumes 64) and [`super::WINDOW_WGMMA_SHAPES`] /
    /// [`super::WINDOW_WGMMA_BWD_SHAPES`] (the Rust table's orders).
    #[test]
    fn window_instantiations_agree() {
        let kernel = instantiations(crate::nvrtc::WINDOW_FWD.source, "NSA_WINDOW_FWD(");
        let kernel_bwd = instantiations(crate::nvrtc::WINDOW_BWD.source, "NSA_WINDOW_BWD(");
        let (mut glue, mut glue_bwd) = ([0i64; 24], [0i64; 10]);
        // SAFETY: writes exactly 24 and 10 integers into the buffers.
        unsafe { super::nsa_window_shapes(glue.as_mut_ptr(), glue_bwd.as_mut_ptr()) };
        let glue: Vec<Vec<i64>> = glue.chunks(4).map(<[i64]>::to_vec).collect();
        assert_eq!(
            kernel, glue,
            "window_fwd.cu's instantiations vs the glue's table"
        );
        let rust: Vec<(i64, i64)> = glue.iter().map(|r| (r[0], r[1])).collect();
        assert_eq!(rust, super::WINDOW_WGMMA_SHAPES.to_vec());
        let glue_bwd: Vec<Vec<i64>> = glue_bwd.chunks(2).map(|c| vec![c[0], c[1], 64]).collect();
        assert_eq!(
            kernel_bwd, glue_bwd,
            "window_bwd.cu's instantiations vs the glue's table (64 keys a dq tile)"
        );
        let rust_bwd: Vec<(i64, i64)> = glue_bwd.iter().map(|r| (r[0], r[1])).collect();
        assert_eq!(rust_bwd, super::WINDOW_WGMMA_BWD_SHAPES.to_vec());
    }
}
