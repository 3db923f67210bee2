//! Fused NSA attention on CUDA: the selected branch through the NVRTC kernels of
//! `nsa-sys/kernels/selected_{fwd,bwd}.cu`, the compressed branch and block selection through
//! those of `kernels/compressed.cu` ([`compressed_attention`], [`select_blocks`]) or, for the
//! compressed attention, cuDNN's fused attention over folded queries ([`CompressedBackend`]),
//! the sliding window through libtorch's own flash-attention kernel with its window parameters.
//! The differentiable ones are custom autograd functions in `glue/fused.cpp`; kernels run on
//! libtorch's current CUDA stream, on the tensors' memory.
//!
//! Kernels are compiled per device architecture on first use (NVRTC, [`crate::nvrtc`]),
//! loaded into the device's primary context (the one libtorch uses) and kept for the life of
//! the process. [`configure`] sets the compile options (the CUBIN cache folder) for devices
//! loaded afterwards; [`prebuild`] starts the families' compilations at once in the background,
//! so that a first start waits for the slowest family instead of the sum of all, and
//! [`finish_prebuilds`] waits for them before the process exits.
//!
//! Layouts: `q` `[B, S, H, dk]`, `k` `[B, S, Hkv, dk]`, `v` `[B, S, Hkv, dv]`, output
//! `[B, S, H, dv]`; query head `j` reads key head `j / (H / Hkv)`; block ids int64 or int32
//! `[B, S, Hkv, n]`. Semantics as `crate::autograd::block_attention`: token `t` reads the keys
//! `≤ t` of its selected blocks (block `j` = keys `j·L .. (j+1)·L`); ids are deduplicated and ids
//! outside `[0, ⌊t/L⌋]` are ignored (any value is accepted; none reads out of bounds).
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CString};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

use crate::autograd::{self, GlueError, ERR_LEN};
use crate::driver::{self, check, CuContext, CuFunction, CuModule};
use crate::nvrtc::{KernelSource, Nvrtc, NvrtcError, COMPRESSED, SELECTED_BWD, SELECTED_FWD};
use crate::SysError;

mod block_ids;
mod compressed;
mod decode;
mod pointwise;
mod prebuild;
mod selected_order;
mod window;
pub use block_ids::{clean_block_ids, inverse_index};
pub use compressed::{
    compressed_attention, compressed_forward, select_blocks, select_blocks_with, CompressedBackend,
    SelectCta, SelectParams, SELECT_MAX_TOP_N,
};
pub use decode::{
    decode_append, decode_kernels, AppendGates, AppendWrite, DecodeGraph, DecodeInputs,
    DecodeKernelTimes, DecodeKernels, DecodeLaunch, DecodeParams, DecodeShape, DecodeStep,
    StepPrologue, DECODE_MAX_DV, DECODE_MAX_GROUP, DECODE_MAX_SELECT_SLICES, DECODE_MAX_TOP_N,
};
pub use pointwise::{
    add_rms_norm, cmp_blocks, cmp_blocks_linear, gate_mix, gate_mix_project, pointwise_kernels,
    rms_norm, rope, swiglu, PointwiseKernels, RMS_NORM_MAX_DIM,
};
pub use prebuild::{finish_prebuilds, prebuild};
use selected_order::{dq_partial_bytes, forward_partial_bytes, key_outer_batch_chunk};
pub use selected_order::{
    set_key_outer_chunk_bytes, SelectedDq, SelectedForward, DQ_KEY_OUTER_MAX_PARTIAL_BYTES,
    KEY_OUTER_MAX_GROUP, KEY_OUTER_MAX_PARTIAL_BYTES, KEY_OUTER_MIN_BATCHED_BLOCKS,
    KEY_OUTER_MIN_BATCH_BLOCKS, KEY_OUTER_MIN_BLOCKS, TOKEN_WARP_MIN_GROUP,
};
pub use window::{
    sdpa_cudnn_enabled, sdpa_without_cudnn, set_head_chunk_bytes, set_window_wgmma_backward,
    set_window_wgmma_forward, window_attention, window_backward_kernel, window_forward_kernel,
    window_kernels, with_window_kernels, WindowKernels, WINDOW_WGMMA_BWD_SHAPES,
    WINDOW_WGMMA_SHAPES,
};

/// Options of the fused kernels' compilation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FusedOptions {
    /// Folder of the CUBIN cache (created if missing). `None`: compile in memory at every
    /// process start.
    pub cache_dir: Option<PathBuf>,
}

/// Errors of the fused attention functions.
#[derive(Debug, thiserror::Error)]
pub enum FusedError {
    /// An input the fused kernels do not take (dtype, device, shape, contiguity).
    #[error("fused attention: {what}: {reason}")]
    Input { what: &'static str, reason: String },
    /// Compiling the kernels failed.
    #[error(transparent)]
    Nvrtc(#[from] NvrtcError),
    /// The CUDA driver failed (no driver, module load, …).
    #[error(transparent)]
    Sys(#[from] SysError),
    /// libtorch raised inside the glue (launch failure, out of memory, …).
    #[error(transparent)]
    Glue(#[from] GlueError),
    /// A libtorch call made from Rust failed (allocation of a workspace, …).
    #[error(transparent)]
    Tch(#[from] tch::TchError),
}

/// Mirror of `NsaSlcTable` in `glue/slc_table.h` (sizes compared at each load).
#[repr(C)]
#[derive(Debug)]
struct SlcTable {
    launch: *const c_void,
    fwd_mma: [CuFunction; 9],
    fwd_simt: [CuFunction; 2],
    dq: [CuFunction; 2],
    dkdv: [CuFunction; 2],
    dkdv_reduce: [CuFunction; 2],
    dq_mma: [CuFunction; 9],
    dkdv_mma: [CuFunction; 9],
    cmp_fwd_mma: [CuFunction; 9],
    cmp_dq_mma: [CuFunction; 9],
    cmp_dkdv_mma: [CuFunction; 9],
    cmp_select: [CuFunction; 9],
    fwd_kv: [CuFunction; 9],
    fwd_combine: CuFunction,
    row_dot: [CuFunction; 2],
    cmp_fold: [CuFunction; 2],
    cmp_unfold: [CuFunction; 2],
    clean_ids: [CuFunction; 2],
    fwd_warp: [CuFunction; 9],
    dq_warp: [CuFunction; 9],
    dkdv_dq_mma: [CuFunction; 9],
    dq_reduce: CuFunction,
    max_smem: i32,
}

/// The selected-branch kernels loaded on one device.
#[derive(Debug)]
pub struct SelectedKernels {
    table: SlcTable,
    device: usize,
    arch: (i32, i32),
    from_cache: bool,
}

// SAFETY: the table holds driver function handles of modules that are never unloaded, valid in
// the device's primary context from any thread, and the address of cuLaunchKernel.
unsafe impl Send for SelectedKernels {}
// SAFETY: as above; nothing in it is mutated after loading.
unsafe impl Sync for SelectedKernels {}

impl SelectedKernels {
    /// The CUDA device ordinal the kernels are loaded on.
    pub fn device(&self) -> usize {
        self.device
    }
    /// The compute capability they were compiled for.
    pub fn arch(&self) -> (i32, i32) {
        self.arch
    }
    /// Whether the three CUBIN images (selected forward, backward, compressed) came from the disk
    /// cache.
    pub fn from_cache(&self) -> bool {
        self.from_cache
    }
    /// Largest dynamic shared memory per block the kernels may use (bytes).
    pub fn max_shared_memory(&self) -> i32 {
        self.table.max_smem
    }
}

/// Head sizes with tensor-core (bf16) forward and backward instantiations.
pub const MMA_HEAD_DIMS: [i64; 3] = [64, 128, 192];

/// Most query heads per K/V head the tensor-core kernels take (their 64-row tiles hold at least
/// one token's heads).
pub const MMA_MAX_GROUP: i64 = 64;

/// Whether the tensor-core kernels have an instantiation for head sizes `dk`, `dv` at `group`
/// query heads per K/V head (the glue's `mma_index`; the dtype must also compute in bf16).
pub fn tensor_core_shape(dk: i64, dv: i64, group: i64) -> bool {
    MMA_HEAD_DIMS.contains(&dk)
        && MMA_HEAD_DIMS.contains(&dv)
        && (1..=MMA_MAX_GROUP).contains(&group)
}

/// Most query heads per K/V head the token-warp kernels take: a warp's 16 tensor-core rows hold
/// one token's heads (the glue's `token_warps` rule).
pub const TOKEN_WARP_MAX_GROUP: i64 = 16;

/// Most block ids per token the token-warp kernels take: lane i of the warp holds id i.
pub const TOKEN_WARP_MAX_IDS: i64 = 32;

/// Whether [`SelectedForward::TokenWarps`] runs as asked at head sizes `dk`, `dv`, `group`
/// query heads per K/V head and `n` ids per token (bf16 compute); elsewhere it runs union tiles.
pub fn token_warp_shape(dk: i64, dv: i64, group: i64, n: i64) -> bool {
    tensor_core_shape(dk, dv, group) && group <= TOKEN_WARP_MAX_GROUP && n <= TOKEN_WARP_MAX_IDS
}

static OPTIONS: Mutex<Option<FusedOptions>> = Mutex::new(None);
static LOADED: Mutex<Option<HashMap<usize, &'static SelectedKernels>>> = Mutex::new(None);
static NVRTC: Mutex<Option<&'static Nvrtc>> = Mutex::new(None);

/// Sets the compile options for devices whose kernels are loaded after this call.
pub fn configure(options: FusedOptions) {
    *OPTIONS.lock().unwrap_or_else(|e| e.into_inner()) = Some(options);
}

fn nvrtc() -> Result<&'static Nvrtc, NvrtcError> {
    let mut slot = NVRTC.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = *slot {
        return Ok(n);
    }
    let n: &'static Nvrtc = Box::leak(Box::new(Nvrtc::open()?));
    *slot = Some(n);
    Ok(n)
}

/// A kernel family's CUBIN for one architecture, built at most once per process and shared by
/// the loaders and [`prebuild`]: a loader that needs a family still being built waits for that
/// build instead of starting its own.
type CubinSlot = Arc<Mutex<Option<Arc<Image>>>>;

/// A built kernel family: its CUBIN, and whether it came from the disk cache.
#[derive(Debug)]
struct Image {
    cubin: Vec<u8>,
    cached: bool,
}

/// A family (its file name) for a compute capability.
type CubinKey = (&'static str, (i32, i32));

static CUBINS: Mutex<Option<HashMap<CubinKey, CubinSlot>>> = Mutex::new(None);

/// The CUBIN of `src` for compute capability `arch`, through the disk cache of `opts`: from this
/// process's earlier build, or built now (other families build in parallel meanwhile). A failed
/// build is not remembered: the next caller tries again and gets the error itself.
fn cubin(
    src: &KernelSource,
    arch: (i32, i32),
    opts: &FusedOptions,
) -> Result<Arc<Image>, FusedError> {
    let slot = {
        let mut map = CUBINS.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(
            map.get_or_insert_with(HashMap::new)
                .entry((src.name, arch))
                .or_default(),
        )
    };
    let mut built = slot.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(image) = built.as_ref() {
        return Ok(Arc::clone(image));
    }
    let built_now = nvrtc()?.compile_cached(src, arch, opts.cache_dir.as_deref())?;
    let image = Arc::new(Image {
        cubin: built_now.cubin,
        cached: built_now.cached,
    });
    *built = Some(Arc::clone(&image));
    Ok(image)
}

/// [`configure`]'s options (the defaults until it is called).
fn current_options() -> FusedOptions {
    OPTIONS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_default()
}

/// The selected-branch kernels of CUDA device `device`, compiled and loaded on first use
/// (with the options of [`configure`]), then shared.
pub fn kernels(device: usize) -> Result<&'static SelectedKernels, FusedError> {
    loaded_once(&LOADED, device, load)
}

/// Kernels loaded per device: `cache`'s entry for `device`, or `load(device, options)` (the
/// options of [`configure`]) kept for the process's life.
fn loaded_once<T>(
    cache: &Mutex<Option<HashMap<usize, &'static T>>>,
    device: usize,
    load: impl FnOnce(usize, &FusedOptions) -> Result<T, FusedError>,
) -> Result<&'static T, FusedError> {
    let mut loaded = cache.lock().unwrap_or_else(|e| e.into_inner());
    let map = loaded.get_or_insert_with(HashMap::new);
    if let Some(k) = map.get(&device) {
        return Ok(k);
    }
    let opts = current_options();
    let k: &'static T = Box::leak(Box::new(load(device, &opts)?));
    map.insert(device, k);
    Ok(k)
}

/// A device made ready for loading kernels: its primary context (the one libtorch's runtime
/// uses, so handles loaded into it serve libtorch's streams) current on this thread, its compute
/// capability and the dynamic shared memory a block may opt into.
struct DeviceSetup {
    arch: (i32, i32),
    /// Shared memory one CTA may opt into.
    max_smem: i32,
    /// Streaming multiprocessors and the shared memory of each (the decode kernels size their
    /// grids to fill the device once).
    sm_count: i32,
    smem_per_sm: i32,
}

fn device_setup(device: usize) -> Result<DeviceSetup, FusedError> {
    let drv = driver::shared()?;
    let dev = device as i32;
    let mut ctx: CuContext = std::ptr::null_mut();
    // SAFETY: valid out-pointers; an invalid ordinal returns an error code.
    unsafe {
        check(
            "cuDevicePrimaryCtxRetain",
            (drv.primary_ctx_retain)(&mut ctx, dev),
        )?;
        check("cuCtxSetCurrent", (drv.ctx_set_current)(ctx))?;
    }
    let attribute = |attr| device_attribute(device, attr);
    Ok(DeviceSetup {
        arch: (
            attribute(driver::ATTR_CC_MAJOR)?,
            attribute(driver::ATTR_CC_MINOR)?,
        ),
        max_smem: attribute(driver::ATTR_MAX_SHARED_OPTIN)?,
        sm_count: attribute(driver::ATTR_MULTIPROCESSOR_COUNT)?,
        smem_per_sm: attribute(driver::ATTR_MAX_SHARED_PER_SM)?,
    })
}

/// A CUDA device attribute (`CU_DEVICE_ATTRIBUTE_*`) of device `device`; no context needed.
fn device_attribute(device: usize, attr: i32) -> Result<i32, FusedError> {
    let drv = driver::shared()?;
    let mut value = 0;
    // SAFETY: a valid out-pointer; an invalid ordinal or attribute returns an error code.
    check("cuDeviceGetAttribute", unsafe {
        (drv.device_get_attribute)(&mut value, attr, device as i32)
    })?;
    Ok(value)
}

/// Loads a CUBIN into the current context; the module is never unloaded.
fn load_module(image: &[u8]) -> Result<CuModule, SysError> {
    let drv = driver::shared()?;
    let mut m: CuModule = std::ptr::null_mut();
    // SAFETY: `image` is a complete CUBIN for this device's architecture, alive for the call;
    // the module is never unloaded (its functions are kept for the process's life).
    check("cuModuleLoadData", unsafe {
        (drv.module_load_data)(&mut m, image.as_ptr().cast())
    })?;
    Ok(m)
}

/// Kernel `name` of module `m`, allowed `max_smem` bytes of dynamic shared memory.
fn module_function(m: CuModule, name: &str, max_smem: i32) -> Result<CuFunction, SysError> {
    let drv = driver::shared()?;
    let cname = CString::new(name).map_err(|_| SysError::Call {
        call: "cuModuleGetFunction",
        code: -1,
    })?;
    let mut f: CuFunction = std::ptr::null_mut();
    // SAFETY: live module, NUL-terminated name, valid out-pointer; then the attribute call on
    // the function just returned.
    unsafe {
        check(
            "cuModuleGetFunction",
            (drv.module_get_function)(&mut f, m, cname.as_ptr()),
        )?;
        check(
            "cuFuncSetAttribute",
            (drv.func_set_attribute)(f, driver::FUNC_ATTR_MAX_DYNAMIC_SHARED, max_smem),
        )?;
    }
    Ok(f)
}

fn load(device: usize, opts: &FusedOptions) -> Result<SelectedKernels, FusedError> {
    // SAFETY: a pure function of the C++ struct's layout.
    let glue = unsafe { nsa_slc_table_size() };
    same_layout("NsaSlcTable", glue, std::mem::size_of::<SlcTable>())?;
    let drv = driver::shared()?;
    let DeviceSetup { arch, max_smem, .. } = device_setup(device)?;
    let (fwd, bwd, cmp) = (
        cubin(&SELECTED_FWD, arch, opts)?,
        cubin(&SELECTED_BWD, arch, opts)?,
        cubin(&COMPRESSED, arch, opts)?,
    );
    let fwd_mod = load_module(&fwd.cubin)?;
    let bwd_mod = load_module(&bwd.cubin)?;
    let cmp_mod = load_module(&cmp.cubin)?;
    let func = |m: CuModule, name: &str| module_function(m, name, max_smem);
    // The tensor-core instantiations of one family, indexed 3 * dk_index + dv_index.
    let mma_family = |m: CuModule, prefix: &str| -> Result<[CuFunction; 9], SysError> {
        let mut fns = [std::ptr::null_mut(); 9];
        for (i, dk) in MMA_HEAD_DIMS.iter().enumerate() {
            for (j, dv) in MMA_HEAD_DIMS.iter().enumerate() {
                fns[3 * i + j] = func(m, &format!("{prefix}_dk{dk}_dv{dv}"))?;
            }
        }
        Ok(fns)
    };
    let table = SlcTable {
        launch: drv.launch_kernel as *const c_void,
        fwd_mma: mma_family(fwd_mod, "nsa_slc_fwd_mma")?,
        fwd_simt: [
            func(fwd_mod, "nsa_slc_fwd_simt_f32")?,
            func(fwd_mod, "nsa_slc_fwd_simt_bf16")?,
        ],
        dq: [
            func(bwd_mod, "nsa_slc_dq_f32")?,
            func(bwd_mod, "nsa_slc_dq_bf16")?,
        ],
        dkdv: [
            func(bwd_mod, "nsa_slc_dkdv_f32")?,
            func(bwd_mod, "nsa_slc_dkdv_bf16")?,
        ],
        dkdv_reduce: [
            func(bwd_mod, "nsa_slc_dkdv_reduce_f32")?,
            func(bwd_mod, "nsa_slc_dkdv_reduce_bf16")?,
        ],
        dq_mma: mma_family(bwd_mod, "nsa_slc_dq_mma")?,
        dkdv_mma: mma_family(bwd_mod, "nsa_slc_dkdv_mma")?,
        cmp_fwd_mma: mma_family(cmp_mod, "nsa_cmp_fwd_mma")?,
        cmp_dq_mma: mma_family(cmp_mod, "nsa_cmp_dq_mma")?,
        cmp_dkdv_mma: mma_family(cmp_mod, "nsa_cmp_dkdv_mma")?,
        cmp_select: [
            func(cmp_mod, "nsa_cmp_select_bf16_dk64")?,
            func(cmp_mod, "nsa_cmp_select_bf16_dk128")?,
            func(cmp_mod, "nsa_cmp_select_bf16_dk192")?,
            func(cmp_mod, "nsa_cmp_select_f32_dk64")?,
            func(cmp_mod, "nsa_cmp_select_f32_dk128")?,
            func(cmp_mod, "nsa_cmp_select_f32_dk192")?,
            func(cmp_mod, "nsa_cmp_select_bf16_dk64_w8")?,
            func(cmp_mod, "nsa_cmp_select_bf16_dk128_w8")?,
            func(cmp_mod, "nsa_cmp_select_bf16_dk192_w8")?,
        ],
        fwd_kv: mma_family(fwd_mod, "nsa_slc_fwd_kv")?,
        fwd_combine: func(fwd_mod, "nsa_slc_fwd_combine")?,
        row_dot: [
            func(bwd_mod, "nsa_row_dot_f32")?,
            func(bwd_mod, "nsa_row_dot_bf16")?,
        ],
        cmp_fold: [
            func(cmp_mod, "nsa_cmp_fold_w1")?,
            func(cmp_mod, "nsa_cmp_fold_w4")?,
        ],
        cmp_unfold: [
            func(cmp_mod, "nsa_cmp_unfold_w1")?,
            func(cmp_mod, "nsa_cmp_unfold_w4")?,
        ],
        clean_ids: [
            func(fwd_mod, "nsa_clean_ids_i32")?,
            func(fwd_mod, "nsa_clean_ids_i64")?,
        ],
        fwd_warp: mma_family(fwd_mod, "nsa_slc_fwd_warp")?,
        dq_warp: mma_family(bwd_mod, "nsa_slc_dq_warp")?,
        dkdv_dq_mma: mma_family(bwd_mod, "nsa_slc_dkdv_dq_mma")?,
        dq_reduce: func(bwd_mod, "nsa_slc_dq_reduce")?,
        max_smem,
    };
    Ok(SelectedKernels {
        table,
        device,
        arch,
        from_cache: fwd.cached && bwd.cached && cmp.cached,
    })
}

/// A kernel table the glue reads and Rust fills has one layout on both sides (their sizes
/// agree), or an error that names it; checked before a table is filled.
fn same_layout(table: &'static str, glue: usize, rust: usize) -> Result<(), FusedError> {
    if glue == rust {
        return Ok(());
    }
    Err(FusedError::Glue(GlueError {
        call: "kernel table layout",
        message: format!(
            "{table} is {glue} bytes in the glue and {rust} in Rust: rebuild nsa-sys from one \
             source tree"
        ),
    }))
}

extern "C" {
    fn nsa_slc_table_size() -> usize;
    fn nsa_fused_dkdv_plan(
        starts: *const C_tensor,
        piece: i64,
        max_entries: i64,
        out: *mut *mut C_tensor,
        slots: *mut i64,
        err: *mut c_char,
        err_len: usize,
    ) -> std::os::raw::c_int;
    fn nsa_fused_compute_dtype(
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
    ) -> std::os::raw::c_int;
    fn nsa_fused_selected(
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        blocks: *const C_tensor,
        block_len: i64,
        scale: f64,
        strategy: i64,
        fwd_chunk: i64,
        dq_chunk: i64,
        table: *const SlcTable,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut C_tensor;
}

fn input(what: &'static str, reason: impl Into<String>) -> FusedError {
    FusedError::Input {
        what,
        reason: reason.into(),
    }
}

/// Checks `t` for the fused functions: on `device`, 4-d, contiguous, one of `kinds`.
fn check_tensor(
    what: &'static str,
    t: &Tensor,
    device: Device,
    kinds: &[Kind],
) -> Result<Vec<i64>, FusedError> {
    if t.device() != device {
        return Err(input(
            what,
            format!("on {:?}, expected {device:?}", t.device()),
        ));
    }
    let size = t.size();
    if size.len() != 4 {
        return Err(input(what, format!("must be 4-d, got {size:?}")));
    }
    if !kinds.contains(&t.kind()) {
        return Err(input(
            what,
            format!("dtype {:?}, expected one of {kinds:?}", t.kind()),
        ));
    }
    if !t.is_contiguous() {
        return Err(input(what, "must be contiguous"));
    }
    Ok(size)
}

/// Shapes `(B, S, H, Hkv, dk, dv)` of valid `q`, `k`, `v` on one CUDA device.
fn check_qkv(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    kinds: &[Kind],
) -> Result<(Device, [i64; 6]), FusedError> {
    let device = q.device();
    if !matches!(device, Device::Cuda(_)) {
        return Err(input("q", format!("on {device:?}: CUDA tensors only")));
    }
    let qs = check_tensor("q", q, device, kinds)?;
    let ks = check_tensor("k", k, device, kinds)?;
    let vs = check_tensor("v", v, device, kinds)?;
    let (b, s, h, dk) = (qs[0], qs[1], qs[2], qs[3]);
    let (hkv, dv) = (ks[2], vs[3]);
    if ks != [b, s, hkv, dk] || vs != [b, s, hkv, dv] {
        return Err(input(
            "k, v",
            format!(
                "q {qs:?} needs k [B, S, Hkv, dk] and v [B, S, Hkv, dv], got {ks:?} and {vs:?}"
            ),
        ));
    }
    if b < 1 || s < 1 || hkv < 1 || h % hkv != 0 || dk < 1 || dv < 1 {
        return Err(input(
            "q, k",
            format!("need B, S ≥ 1 and H a multiple of Hkv, got q {qs:?}, k {ks:?}"),
        ));
    }
    if i32::try_from(s).is_err() {
        return Err(input("q", format!("sequence length {s} exceeds i32")));
    }
    Ok((device, [b, s, h, hkv, dk, dv]))
}

/// The CUDA ordinal of `t`, or an input error naming `what`.
fn cuda_ordinal(what: &'static str, t: &Tensor) -> Result<usize, FusedError> {
    match t.device() {
        Device::Cuda(i) => Ok(i),
        d => Err(input(what, format!("on {d:?}: CUDA tensors only"))),
    }
}

fn glue_err(call: &'static str, err: &[u8]) -> FusedError {
    autograd::glue_error(call, err).into()
}

fn finish(call: &'static str, ptr: *mut C_tensor, err: &[u8]) -> Result<Tensor, FusedError> {
    Ok(autograd::finish(call, ptr, err)?)
}

/// How the dK/dV kernel splits the inverse index's segments into pieces of at most `piece`
/// tokens (see [`dkdv_plan`]). Work items come in segment order, the pieces of a segment
/// consecutive and in token order. The sizes `W`, `R` and `slots` are upper bounds known from
/// the shapes (the plan is built on the device without reading anything back); the real items
/// come first, then padding (`seg`/`red_seg` `-1`), which the kernels skip.
#[derive(Debug)]
pub struct DkdvPlan {
    /// Segment id of each work item, `-1` for padding, int64 `[W]`.
    pub seg: Tensor,
    /// Start of each work item's range of the token list, int64 `[W]` (0 for padding).
    pub a: Tensor,
    /// End (exclusive) of each work item's range, int64 `[W]` (0 for padding).
    pub b: Tensor,
    /// Scratch slot of each work item of a split segment, `-1` otherwise, int32 `[W]`.
    pub slot: Tensor,
    /// The split segments (more than one piece), ascending, then `-1`, int64 `[R]`.
    pub red_seg: Tensor,
    /// First scratch slot of each split segment, int32 `[R]`.
    pub red_slot0: Tensor,
    /// Number of pieces of each split segment, int32 `[R]`.
    pub red_count: Tensor,
    /// Scratch slots to allocate (a bound: at least the slots the real items use).
    pub slots: i64,
}

/// The dK/dV work plan the backward uses for segment starts `starts` (int64 `[nseg + 1]`, as
/// [`inverse_index`] returns), pieces of at most `piece` tokens and at most `max_entries`
/// tokens in all segments together (the bound that sizes the plan); exposed for tests.
pub fn dkdv_plan(starts: &Tensor, piece: i64, max_entries: i64) -> Result<DkdvPlan, FusedError> {
    if piece < 1 {
        return Err(input("piece", format!("must be positive, got {piece}")));
    }
    if max_entries < 0 {
        return Err(input(
            "max_entries",
            format!("must not be negative, got {max_entries}"),
        ));
    }
    let mut err = vec![0u8; ERR_LEN];
    let mut out = [std::ptr::null_mut::<C_tensor>(); 7];
    let mut slots = 0i64;
    // SAFETY: `starts` is live for the call; on success the glue stores seven heap-allocated
    // tensors whose ownership passes to us; it catches every exception.
    let rc = unsafe {
        nsa_fused_dkdv_plan(
            starts.as_ptr(),
            piece,
            max_entries,
            out.as_mut_ptr(),
            &mut slots,
            err.as_mut_ptr().cast(),
            ERR_LEN,
        )
    };
    if rc != 0 {
        return Err(glue_err("nsa_fused_dkdv_plan", &err));
    }
    let call = "nsa_fused_dkdv_plan";
    let [seg, a, b, slot, red_seg, red_slot0, red_count] = out.map(|p| finish(call, p, &err));
    Ok(DkdvPlan {
        seg: seg?,
        a: a?,
        b: b?,
        slot: slot?,
        red_seg: red_seg?,
        red_slot0: red_slot0?,
        red_count: red_count?,
        slots,
    })
}

/// The dtype the fused functions compute `q`, `k`, `v` in: their promoted type, or autocast's
/// dtype when CUDA autocast is on and the promoted type is fp32. `None` for anything but bf16
/// and fp32 (the fused functions reject those).
pub fn compute_kind(q: &Tensor, k: &Tensor, v: &Tensor) -> Option<Kind> {
    // SAFETY: live tensors borrowed for the call; the glue catches every exception.
    match unsafe { nsa_fused_compute_dtype(q.as_ptr(), k.as_ptr(), v.as_ptr()) } {
        1 => Some(Kind::Float),
        2 => Some(Kind::BFloat16),
        _ => None,
    }
}

/// Selected-branch attention (forward and backward fused kernels; see the module doc for the
/// semantics and layouts). `q`, `k`, `v`: bf16 or fp32, contiguous, on one CUDA device (mixed
/// bf16 / fp32 are computed in the common type, or autocast's when it is on); `blocks`: int64
/// or int32 `[B, S, Hkv, n]` on the same device; `block_len` = l'; `scale` multiplies the
/// scores. Differentiable in `q`, `k`, `v`; dK/dV are deterministic.
pub fn selected_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    blocks: &Tensor,
    block_len: i64,
    scale: f64,
) -> Result<Tensor, FusedError> {
    selected_attention_with(
        q,
        k,
        v,
        blocks,
        block_len,
        scale,
        SelectedForward::default(),
        SelectedDq::default(),
    )
}

/// [`selected_attention`] with the forward's loop order ([`SelectedForward`]) and the
/// backward's dQ ([`SelectedDq`]) chosen; the backward's dK/dV is the same for all.
#[allow(clippy::too_many_arguments)]
pub fn selected_attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    blocks: &Tensor,
    block_len: i64,
    scale: f64,
    forward: SelectedForward,
    dq: SelectedDq,
) -> Result<Tensor, FusedError> {
    let (device, [b, s, h, hkv, dk, dv]) = check_qkv(q, k, v, &[Kind::BFloat16, Kind::Float])?;
    let bs = check_tensor("blocks", blocks, device, &[Kind::Int64, Kind::Int])?;
    if bs[..3] != [b, s, hkv] || bs[3] < 1 {
        return Err(input(
            "blocks",
            format!("must be [B, S, Hkv, n ≥ 1] = [{b}, {s}, {hkv}, n], got {bs:?}"),
        ));
    }
    if block_len < 1 || i32::try_from(block_len).is_err() {
        return Err(input(
            "block_len",
            format!("must be in 1..2^31, got {block_len}"),
        ));
    }
    if !scale.is_finite() {
        return Err(input("scale", format!("must be finite, got {scale}")));
    }
    let Device::Cuda(ordinal) = device else {
        return Err(input("q", "CUDA tensors only"));
    };
    let kernels = kernels(ordinal)?;
    let n = bs[3];
    let forward = forward.resolve([b, s, h, dk], hkv, dv, n, block_len);
    let strategy = match forward {
        SelectedForward::KeyOuter => 1,
        SelectedForward::TokenWarps => 2,
        SelectedForward::UnionTiles | SelectedForward::Auto => 0,
    } + match dq.resolve(forward, [b, s, h, dk], hkv, n, block_len) {
        SelectedDq::KeyOuter => 4,
        SelectedDq::QueryOuter | SelectedDq::Auto => 0,
    };
    let fwd_chunk = key_outer_batch_chunk(b, forward_partial_bytes(s, h, dv, n, block_len));
    let dq_chunk = key_outer_batch_chunk(b, dq_partial_bytes(s, h, dk, n));
    let mut err = vec![0u8; ERR_LEN];
    // SAFETY: tensor pointers come from live tch tensors borrowed for the call; `table` points
    // to a leaked (process-lifetime) table; the glue catches every exception and writes at most
    // ERR_LEN bytes (NUL-terminated) into `err`.
    let ptr = unsafe {
        nsa_fused_selected(
            q.as_ptr(),
            k.as_ptr(),
            v.as_ptr(),
            blocks.as_ptr(),
            block_len,
            scale,
            strategy,
            fwd_chunk,
            dq_chunk,
            &kernels.table,
            err.as_mut_ptr().cast(),
            ERR_LEN,
        )
    };
    finish("nsa_fused_selected", ptr, &err)
}

#[cfg(test)]
mod tests;
