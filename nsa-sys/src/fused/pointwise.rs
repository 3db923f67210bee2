//! Pointwise work around the attention kernels, one kernel pass each forward and backward:
//! rotary position embedding ([`rope`]) and the gated sum of the three branches
//! ([`gate_mix`]). The kernels are `nsa-sys/kernels/pointwise.cu`; the autograd functions are in
//! `glue/pointwise.cpp`; they run on libtorch's current CUDA stream.
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
    cuda_ordinal, device_setup, finish, input, load_module, loaded_once, module_function, nvrtc,
};
use super::{FusedError, FusedOptions};
use crate::autograd::ERR_LEN;
use crate::driver::{self, CuFunction};
use crate::nvrtc::POINTWISE;

/// Mirror of `NsaPointwiseTable` in `glue/pointwise.cpp`.
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
    let drv = driver::shared()?;
    let setup = device_setup(device)?;
    let image = nvrtc()?.compile_cached(&POINTWISE, setup.arch, opts.cache_dir.as_deref())?;
    let module = load_module(&image.cubin)?;
    let func = |name: &str| module_function(module, name, 0);
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
            sm_count: setup.sm_count,
        },
    })
}

extern "C" {
    fn nsa_fused_rope(
        x: *const C_tensor,
        cos: *const C_tensor,
        sin: *const C_tensor,
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
    let kind = oc.kind();
    if !matches!(kind, Kind::BFloat16 | Kind::Float) {
        return Err(input("oc", format!("bf16 or fp32, got {kind:?}")));
    }
    let size = oc.size();
    if size.len() != 4 {
        return Err(input("oc", format!("must be [B, S, H, dv], got {size:?}")));
    }
    let gate_size = [size[0], size[1], size[2], 3];
    for (what, t, want) in [
        ("oc", oc, size.as_slice()),
        ("os", os, size.as_slice()),
        ("ow", ow, size.as_slice()),
        ("g", g, gate_size.as_slice()),
    ] {
        let layout_ok = what != "g" || t.is_contiguous();
        if t.device() != oc.device() || t.kind() != kind || !layout_ok || t.size() != want {
            let layout = if what == "g" { "contiguous " } else { "" };
            return Err(input(
                what,
                format!(
                    "{layout}{kind:?} {want:?} on {:?}, got {:?} {:?} on {:?}",
                    oc.device(),
                    t.kind(),
                    t.size(),
                    t.device()
                ),
            ));
        }
    }
    let ordinal = cuda_ordinal("oc", oc)?;
    let tab = &pointwise_kernels(ordinal)?.table;
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn reason(e: FusedError) -> String {
        match e {
            FusedError::Input { what, reason } => format!("{what}: {reason}"),
            other => panic!("expected an input error, got {other}"),
        }
    }

    #[test]
    fn bad_inputs_are_typed_errors_before_any_device_work() {
        let f = (Kind::Float, Device::Cpu);
        let (cos, sin) = (Tensor::zeros([8, 4], f), Tensor::zeros([8, 4], f));
        let x = Tensor::zeros([1, 8, 2, 8], f);
        let cases = [
            (
                rope(&Tensor::zeros([8, 2, 8], f), &cos, &sin),
                "x: must be [B, S, X, dk]",
            ),
            (
                rope(&Tensor::zeros([1, 8, 2, 7], f), &cos, &sin),
                "dk must be even",
            ),
            (rope(&x.transpose(2, 3), &cos, &sin), "last axis contiguous"),
            (rope(&x.to_kind(Kind::Half), &cos, &sin), "bf16 or fp32"),
            (
                rope(&x, &Tensor::zeros([7, 4], f), &sin),
                "cos: contiguous fp32 [≥ 8, 4]",
            ),
            (
                rope(&x, &cos, &sin.to_kind(Kind::Double)),
                "sin: contiguous fp32",
            ),
            (rope(&x, &cos, &sin), "x: on Cpu: CUDA tensors only"),
        ];
        for (got, want) in cases {
            let msg = reason(got.expect_err(want));
            assert!(msg.contains(want), "{msg:?} lacks {want:?}");
        }
        let o = Tensor::zeros([1, 8, 2, 4], f);
        let g = Tensor::zeros([1, 8, 2, 3], f);
        let cases = [
            (
                gate_mix(&o, &o, &o.narrow(3, 0, 2), &g),
                "ow: Float [1, 8, 2, 4] on Cpu, got Float [1, 8, 2, 2]",
            ),
            (
                gate_mix(&o, &o, &o, &Tensor::zeros([1, 8, 2, 2], f)),
                "g: contiguous Float [1, 8, 2, 3]",
            ),
            (
                gate_mix(&o, &o, &o, &Tensor::zeros([1, 8, 3, 2], f).transpose(2, 3)),
                "g: contiguous Float [1, 8, 2, 3]",
            ),
            (
                gate_mix(&o, &o.to_kind(Kind::BFloat16), &o, &g),
                "os: Float [1, 8, 2, 4]",
            ),
            (
                gate_mix(&o.to_kind(Kind::Int), &o, &o, &g),
                "oc: bf16 or fp32",
            ),
            (gate_mix(&o, &o, &o, &g), "oc: on Cpu: CUDA tensors only"),
        ];
        for (got, want) in cases {
            let msg = reason(got.expect_err(want));
            assert!(msg.contains(want), "{msg:?} lacks {want:?}");
        }
    }
}
