//! The attention-backend audit: which kernel computes each branch, for the run log.
use nsa_sys::SdpaBackend;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::config::AttnError;
use crate::layer::{AttnPath, NsaAttention};

/// The kernel that computes one branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BranchKernel {
    /// Explicit mask + softmax over the full score matrix (reference path, libtorch ops).
    ReferenceMasked,
    /// `nsa_sys::autograd::span_attention`: chunked over queries, contiguous key span per chunk;
    /// only the inputs are saved, and backward recomputes each chunk's probabilities from them.
    ChunkedSpan,
    /// `nsa_sys::autograd::block_attention`: chunked over queries, per-query gather of the
    /// selected blocks; only the inputs are saved, and backward recomputes each chunk's
    /// probabilities from them.
    ChunkedBlockGather,
    /// `nsa_sys::fused::selected_attention`: the NVRTC selected-branch kernels (tensor-core
    /// bf16 forward, SIMT fp32; dQ and inverse-index dK/dV backward).
    FusedSelected,
    /// `nsa_sys::fused::window_attention`: libtorch's flash-attention kernel with its window.
    FlashWindow,
    /// `nsa_sys::fused::window_attention` with its forward on nsa-sys's wgmma kernel (Hopper,
    /// `kernels/window_fwd.cu`) and its backward on nsa-sys's wgmma kernels
    /// (`kernels/window_bwd.cu`).
    WgmmaWindow,
    /// The same with flash's backward: head sizes without a wgmma backward (dk = dv = 192) or
    /// the backward switched off (`nsa_sys::fused::set_window_wgmma_backward`).
    WgmmaForwardWindow,
    /// The same with flash's forward and the wgmma backward (the forward switched off).
    WgmmaBackwardWindow,
    /// `nsa_sys::fused::compressed_attention`: cuDNN's fused attention over folded queries
    /// (the NVRTC compressed-branch kernels where cuDNN does not apply, and their
    /// deterministic backward under deterministic algorithms), whose log-sum-exp also feeds the
    /// selection kernel.
    FusedCompressed,
}

impl BranchKernel {
    /// Whether this is one of the fused path's window kernels (either forward).
    pub fn is_fused_window(self) -> bool {
        matches!(
            self,
            BranchKernel::FlashWindow
                | BranchKernel::WgmmaWindow
                | BranchKernel::WgmmaForwardWindow
                | BranchKernel::WgmmaBackwardWindow
        )
    }
}

impl std::fmt::Display for BranchKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BranchKernel::ReferenceMasked => "reference masked softmax (libtorch ops)",
            BranchKernel::ChunkedSpan => "chunked span attention, recompute backward (nsa-sys)",
            BranchKernel::ChunkedBlockGather => {
                "chunked block-gather attention, recompute backward (nsa-sys)"
            }
            BranchKernel::FusedSelected => "fused selected-block kernels (NVRTC, nsa-sys)",
            BranchKernel::FlashWindow => "flash attention with a sliding window (libtorch)",
            BranchKernel::WgmmaWindow => {
                "sliding-window forward and backward on wgmma (NVRTC, nsa-sys)"
            }
            BranchKernel::WgmmaForwardWindow => {
                "sliding-window forward on wgmma (NVRTC, nsa-sys), flash backward (libtorch)"
            }
            BranchKernel::WgmmaBackwardWindow => {
                "sliding-window flash forward (libtorch), backward on wgmma (NVRTC, nsa-sys)"
            }
            BranchKernel::FusedCompressed => {
                "compressed branch on cuDNN over folded queries, selection kernel (NVRTC, nsa-sys)"
            }
        })
    }
}

/// Which kernel ran for each branch on a given path, device and dtype; recorded once per run.
///
/// None of the NSA branches calls `scaled_dot_product_attention` (no SDPA backend takes
/// per-query key sets without an O(S²) mask); `dense_sdpa` records what SDPA picks for dense
/// causal attention of the same shape (the baseline NSA is measured against).
#[derive(Debug, Clone, Serialize)]
pub struct AttnAudit {
    /// `"reference"`, `"lean"` or `"fused"`.
    pub path: &'static str,
    /// Device, e.g. `cuda:0`.
    pub device: String,
    /// Element type, e.g. `bfloat16`.
    pub dtype: String,
    /// Compressed-branch kernel.
    pub compressed: BranchKernel,
    /// Selected-branch kernel.
    pub selected: BranchKernel,
    /// Sliding-window kernel.
    pub window: BranchKernel,
    /// SDPA's backend for dense causal attention with this layer's H, Hkv, dk, dv
    /// (`enable_gqa` when Hkv < H).
    pub dense_sdpa: SdpaBackend,
}

impl std::fmt::Display for AttnAudit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "nsa-attn {} path on {} {}: cmp = {}; slc = {}; win = {}; dense SDPA baseline = {}",
            self.path,
            self.device,
            self.dtype,
            self.compressed,
            self.selected,
            self.window,
            self.dense_sdpa
        )
    }
}

fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

fn kind_name(kind: Kind) -> String {
    match kind {
        Kind::BFloat16 => "bfloat16".into(),
        Kind::Half => "float16".into(),
        Kind::Float => "float32".into(),
        Kind::Double => "float64".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

impl NsaAttention {
    /// The kernels `path` uses for each branch, and SDPA's choice for the dense baseline of
    /// this shape on `device` in `kind` (probed with a 256-token input).
    pub fn audit(
        &self,
        path: AttnPath,
        device: Device,
        kind: Kind,
    ) -> Result<AttnAudit, AttnError> {
        let c = self.config();
        let (compressed, selected, window, name) = match path {
            AttnPath::Reference => (
                BranchKernel::ReferenceMasked,
                BranchKernel::ReferenceMasked,
                BranchKernel::ReferenceMasked,
                "reference",
            ),
            AttnPath::Lean(_) => (
                BranchKernel::ChunkedSpan,
                BranchKernel::ChunkedBlockGather,
                BranchKernel::ChunkedSpan,
                "lean",
            ),
            AttnPath::Fused(_) => {
                // The same rule as `crate::fused::{selected,window}_supported` for inputs of
                // this kind on this device.
                let cuda = matches!(device, Device::Cuda(_));
                let selected = if cuda && matches!(kind, Kind::BFloat16 | Kind::Float) {
                    BranchKernel::FusedSelected
                } else {
                    BranchKernel::ChunkedBlockGather
                };
                let (dk, dv) = (c.head_dim_k, c.head_dim_v);
                let bf16 = cuda && kind == Kind::BFloat16;
                let d = crate::fused::window_head_dim(dk, dv);
                let window = if bf16 && d <= 256 {
                    let fwd = nsa_sys::fused::window_forward_kernel(device, d, dv);
                    match (fwd, nsa_sys::fused::window_backward_kernel(device, d, dv)) {
                        ("wgmma", "wgmma") => BranchKernel::WgmmaWindow,
                        ("wgmma", _) => BranchKernel::WgmmaForwardWindow,
                        (_, "wgmma") => BranchKernel::WgmmaBackwardWindow,
                        _ => BranchKernel::FlashWindow,
                    }
                } else {
                    BranchKernel::ChunkedSpan
                };
                let group = c.heads / c.kv_heads.max(1);
                let compressed = if bf16 && nsa_sys::fused::tensor_core_shape(dk, dv, group) {
                    BranchKernel::FusedCompressed
                } else {
                    BranchKernel::ChunkedSpan
                };
                (compressed, selected, window, "fused")
            }
        };
        let dense_sdpa = tch::no_grad(|| -> Result<SdpaBackend, AttnError> {
            let s = 256;
            let q = Tensor::f_zeros([1, c.heads, s, c.head_dim_k], (kind, device))?;
            let k = Tensor::f_zeros([1, c.kv_heads, s, c.head_dim_k], (kind, device))?;
            let v = Tensor::f_zeros([1, c.kv_heads, s, c.head_dim_v], (kind, device))?;
            Ok(SdpaBackend::choice(&q, &k, &v, true))
        })?;
        Ok(AttnAudit {
            path: name,
            device: device_name(device),
            dtype: kind_name(kind),
            compressed,
            selected,
            window,
            dense_sdpa,
        })
    }
}
