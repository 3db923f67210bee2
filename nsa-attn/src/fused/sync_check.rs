//! The GPU check's proof that the fused layer never waits for the device: one layer forward and
//! backward (bf16 autocast, every branch on its fused kernel) run under libtorch's sync debug
//! mode set to error ([`nsa_sys::cuda::SyncDebugGuard`]), so any host synchronisation inside
//! (an `.item()`, a blocking copy, `nonzero`, `masked_select`, `bincount`, a stream
//! synchronize) fails the row with libtorch's message and the stage (forward or backward) it
//! happened in. A control row first checks that the mode does trip on a deliberate `.item()`.
//! One more row runs the window branch's forward and backward from a thread on which no CUDA
//! call ran before (no CUDA context bound), as autograd's device thread or a user's thread
//! may: every launch must bind the device's context itself.
use nsa_select::SelectImpl;
use nsa_sys::cuda::{SyncDebugGuard, SyncDebugMode};
use tch::{nn, Device, Kind, Tensor};

use super::CheckRow;
use crate::config::{AttnError, NsaConfig};
use crate::gates::GateOverride;
use crate::layer::{AttnPath, ForwardOpts, LeanOpts, NsaAttention};
use crate::BranchKernel;

fn check_err(reason: impl Into<String>) -> AttnError {
    AttnError::Option {
        option: "gpu_check",
        reason: reason.into(),
    }
}

fn guard() -> Result<SyncDebugGuard, AttnError> {
    SyncDebugGuard::new(SyncDebugMode::Error).map_err(|e| check_err(e.to_string()))
}

fn row(name: String, result: Result<String, AttnError>) -> CheckRow {
    let passed = result.is_ok();
    CheckRow {
        name,
        max_rel_err: 0.0,
        tolerance: 0.0,
        passed,
        detail: match result {
            Ok(d) => d,
            Err(e) => e.to_string(),
        },
    }
}

/// The layer shapes of the rows: (name, B, S, dim, H, Hkv, dk, dv, l, d, l', n, w).
type Shape = (&'static str, [i64; 12]);
const SHAPES: [Shape; 2] = [
    ("small", [2, 512, 256, 8, 2, 64, 64, 32, 16, 64, 4, 128]),
    // The paper's heads and lengths (H = 64, Hkv = 4, dk = 192, dv = 128, n = 16, w = 512).
    (
        "medium",
        [1, 8192, 1024, 64, 4, 192, 128, 32, 16, 64, 16, 512],
    ),
];

/// Rows: the control (the mode trips on `.item()`), then one per shape: forward and backward
/// of a fused layer with no host synchronisation, its peak CUDA memory in the detail.
pub fn check_rows(device: Device) -> Vec<CheckRow> {
    let mut rows = vec![row(
        "sync debug mode trips on a deliberate .item()".into(),
        control(device),
    )];
    for (label, shape) in SHAPES {
        let [b, s, dim, h, hkv, dk, dv, l, d, lp, n, w] = shape;
        let name = format!(
            "layer fwd+bwd, no host sync ({label}) B={b} S={s} H={h} Hkv={hkv} dk={dk} dv={dv} l'={lp} n={n} w={w}"
        );
        let mut cfg = super::check_layer_config(dim, (h, hkv), (dk, dv), (l, d, lp, n));
        cfg.nsa.window = w;
        rows.push(row(name, layer_without_sync(cfg, b, s, device)));
    }
    rows.push(row(
        "window fwd+bwd from a thread with no CUDA context, bitwise equal to the main thread's"
            .into(),
        window_on_fresh_thread(device),
    ));
    rows
}

/// The fused window branch's output and input gradients (the output's gradient handed to
/// autograd, so the window's own backward node runs first on autograd's device thread) at the
/// paper's head sizes, computed on this thread and on a new one whose first CUDA work is the
/// branch's kernels (its inputs were made here); the two must be bitwise equal (the kernels are
/// deterministic). Before the glue bound the context itself, the new thread's first launch
/// failed with CUDA_ERROR_INVALID_CONTEXT (201).
fn window_on_fresh_thread(device: Device) -> Result<String, AttnError> {
    let cfg = super::check_layer_config(1024, (16, 2), (192, 128), (32, 16, 64, 4));
    let (b, s) = (1, 1500);
    let opt = (Kind::BFloat16, device);
    let q = Tensor::f_randn([b, s, 16, 192], opt)?;
    let k = Tensor::f_randn([b, s, 2, 192], opt)?;
    let v = Tensor::f_randn([b, s, 2, 128], opt)?;
    let g = Tensor::f_randn([b, s, 16, 128], opt)?;
    let run = move |q: Tensor, k: Tensor, v: Tensor, g: Tensor| -> Result<Vec<Tensor>, AttnError> {
        let (q, k, v) = (
            q.f_detach()?.f_set_requires_grad(true)?,
            k.f_detach()?.f_set_requires_grad(true)?,
            v.f_detach()?.f_set_requires_grad(true)?,
        );
        let out = crate::fused::window(&q, &k, &v, &cfg, LeanOpts::default().window_chunk)?;
        nsa_sys::autograd::backward(&[&out], &[&g])?;
        let mut all = vec![out.f_detach()?];
        for t in [&q, &k, &v] {
            all.push(t.f_grad()?);
        }
        Ok(all)
    };
    let (q2, k2, v2, g2) = (
        q.shallow_clone(),
        k.shallow_clone(),
        v.shallow_clone(),
        g.shallow_clone(),
    );
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
    let here = run(q, k, v, g)?;
    let there = std::thread::spawn(move || run(q2, k2, v2, g2))
        .join()
        .map_err(|_| check_err("the new thread panicked"))??;
    for (name, (a, b)) in ["output", "dQ", "dK", "dV"]
        .iter()
        .zip(here.iter().zip(&there))
    {
        if !a.f_equal(b)? {
            return Err(check_err(format!("{name} differs between the two threads")));
        }
    }
    Ok("output and dQ, dK, dV bitwise equal".into())
}

fn control(device: Device) -> Result<String, AttnError> {
    let x = Tensor::f_ones([4], (Kind::Float, device))?;
    let under_guard = {
        let _g = guard()?;
        x.f_sum(Kind::Float)?.f_double_value(&[])
    };
    match under_guard {
        Err(e) => Ok(format!("tripped: {}", first_line(&e.to_string()))),
        Ok(_) => Err(check_err(
            "libtorch's sync debug mode did not trip on .item(): the layer rows prove nothing",
        )),
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

fn layer_without_sync(cfg: NsaConfig, b: i64, s: i64, device: Device) -> Result<String, AttnError> {
    let vs = nn::VarStore::new(device);
    let layer = NsaAttention::new(&vs.root(), cfg)?;
    let path = AttnPath::Fused(LeanOpts::default());
    let audit = layer.audit(path, device, Kind::BFloat16)?;
    let fused = audit.compressed == BranchKernel::FusedCompressed
        && audit.selected == BranchKernel::FusedSelected
        && audit.window.is_fused_window();
    if !fused {
        return Err(check_err(format!(
            "not every branch is fused at this shape: {} / {} / {}",
            audit.compressed, audit.selected, audit.window
        )));
    }
    let opts = ForwardOpts {
        path,
        gates: GateOverride::Learned,
        select: SelectImpl::Vectorized,
        nvtx: false,
    };
    let x = Tensor::f_randn([b, s, cfg.dim], (Kind::Float, device))?.f_set_requires_grad(true)?;
    let mut inputs = vs.trainable_variables();
    inputs.push(x.shallow_clone());
    let forward = || -> Result<Tensor, AttnError> {
        let out = nsa_sys::train::with_bf16_autocast(|| layer.forward(&x, &opts))?;
        Ok(out
            .f_to_kind(Kind::Float)?
            .f_square()?
            .f_mean(Kind::Float)?)
    };
    let backward = |loss: &Tensor| -> Result<Vec<Tensor>, AttnError> {
        Ok(Tensor::f_run_backward(&[loss], &inputs, false, false)?)
    };
    // Warm-up outside the guard: kernel loads, allocator and pinned staging buffers.
    backward(&forward()?)?;
    let ordinal = match device {
        Device::Cuda(i) => i,
        _ => return Err(check_err("needs a CUDA device")),
    };
    tch::Cuda::synchronize(ordinal as i64);
    nsa_sys::train::cuda_reset_peak(ordinal);
    let base = nsa_sys::train::cuda_memory(ordinal).map_or(0, |m| m.allocated);
    let loss = {
        let _g = guard()?;
        forward().map_err(|e| check_err(format!("forward synchronised: {e}")))?
    };
    let grads = {
        let _g = guard()?;
        backward(&loss).map_err(|e| check_err(format!("backward synchronised: {e}")))?
    };
    tch::Cuda::synchronize(ordinal as i64);
    let mut finite = true;
    for g in &grads {
        finite &= g.f_isfinite()?.f_all()?.f_int64_value(&[])? == 1;
    }
    if !finite {
        return Err(check_err("non-finite gradients"));
    }
    let peak = nsa_sys::train::cuda_memory(ordinal).map_or(0, |m| m.peak_allocated);
    Ok(format!(
        "no synchronising call; {} gradients; peak {:.1} MB over the {:.1} MB held before",
        grads.len(),
        peak.saturating_sub(base) as f64 / 1e6,
        base as f64 / 1e6
    ))
}
