//! Compression φ of the compressed branch (Eq. 7): raw keys or values → one token per block.
//!
//! Compressed token `i` summarises the tokens `[i·d, i·d + l)` (block length `l`, stride `d`):
//! `k̃_i = φ(k_{i·d} + p_0, …, k_{i·d+l−1} + p_{l−1})`, with a learned intra-block position
//! embedding `p` and φ ∈ {mean, linear, MLP, mean + MLP} ([`Phi`]). By default keys are compressed after
//! RoPE ([`crate::rope`]), so a compressed key mixes the rotations of the tokens it covers; with
//! `cmp_rope = "compressed"` ([`crate::CmpRope`]) φ reads them unrotated and the layer rotates
//! the compressed key ([`crate::NsaAttention`]'s projections).
//!
//! Layouts: raw keys / values `[B, S, Hkv, dk]` / `[B, S, Hkv, dv]` → blocks `[B, Nc, l, Hkv, d]`
//! (plus the position embedding `[l, Hkv, d]`) → compressed `[B, Nc, Hkv, d]`, with
//! `Nc = (S − l)/d + 1`, or 0 if `S < l`. The linear and MLP φ see a block flattened per head,
//! `[B, Nc, Hkv, l·d]` (position-major). Variables, under the layer's `cmp` path: `pos_v`,
//! `pos_k` (the MLP variants only), and φ's weights `phi_k.*`, `phi_v.*` (all but the mean).
use tch::nn;
use tch::{Kind, TchError, Tensor};

use crate::config::{AttnError, NsaConfig, NsaParams, Phi};
use crate::layer::linear;
use crate::linear::f_linear;

/// φ applied to one of keys or values.
#[derive(Debug)]
enum PhiMap {
    Mean,
    Linear(nn::Linear),
    Mlp(nn::Linear, nn::Linear),
    /// The mean plus the MLP of the same two maps.
    MeanMlp(nn::Linear, nn::Linear),
}

impl PhiMap {
    /// `output_bias`: whether the last linear map has a bias. Keys get none: a bias shifts every
    /// compressed key by the same vector, which adds the same `q·b` to all scores of a row and
    /// cancels in the softmax (its gradient is identically zero).
    fn new(
        vs: &nn::Path<'_>,
        nsa: &NsaParams,
        width: i64,
        output_bias: bool,
    ) -> Result<Self, TchError> {
        let block_len = nsa.select.block_len;
        let last = nn::LinearConfig {
            bias: output_bias,
            ..Default::default()
        };
        let mlp = || -> Result<_, TchError> {
            Ok((
                f_linear(
                    vs / "w1",
                    block_len * width,
                    nsa.phi_hidden,
                    Default::default(),
                )?,
                f_linear(vs / "w2", nsa.phi_hidden, width, last)?,
            ))
        };
        Ok(match nsa.phi {
            Phi::Mean => PhiMap::Mean,
            Phi::Linear => PhiMap::Linear(f_linear(vs, block_len * width, width, last)?),
            Phi::Mlp => {
                let (w1, w2) = mlp()?;
                PhiMap::Mlp(w1, w2)
            }
            Phi::MeanMlp => {
                let (w1, w2) = mlp()?;
                PhiMap::MeanMlp(w1, w2)
            }
        })
    }

    /// `blocks` `[B, Nc, l, G, d]` → `[B, Nc, G, d]` (φ of Eq. 7).
    fn apply(&self, blocks: &Tensor) -> Result<Tensor, TchError> {
        let flat = || {
            let s = blocks.size();
            blocks
                .f_permute([0, 1, 3, 2, 4])?
                .f_reshape([s[0], s[1], s[3], s[2] * s[4]])
        };
        let mean = || blocks.f_mean_dim(2, false, None);
        match self {
            PhiMap::Mean => mean(),
            PhiMap::Linear(_) | PhiMap::Mlp(..) => self.apply_flat(&flat()?),
            PhiMap::MeanMlp(..) => mean()?.f_add(&self.apply_flat(&flat()?)?),
        }
    }

    /// The linear map, or the MLP (of the MLP variants), on blocks already flattened per head,
    /// `[B, Nc, G, l·d]`.
    fn apply_flat(&self, flat: &Tensor) -> Result<Tensor, TchError> {
        match self {
            PhiMap::Mean => Err(TchError::Kind(
                "the mean φ reads [B, Nc, l, G, d] blocks, not flattened ones".into(),
            )),
            PhiMap::Linear(w) => linear(w, flat),
            PhiMap::Mlp(w1, w2) | PhiMap::MeanMlp(w1, w2) => {
                linear(w2, &linear(w1, flat)?.f_gelu("none")?)
            }
        }
    }

    /// Whether φ reads the blocks flattened per head (all but the mean).
    fn reads_flat(&self) -> bool {
        !matches!(self, PhiMap::Mean)
    }

    /// The linear, MLP or mean + MLP φ of the blocks `[i·stride, i·stride + l)` of `raw`
    /// `[B, S, G, d]` (plus `pos`, in raw's dtype) on nsa-sys's kernels: the blocks and the
    /// first linear map in one autograd function (`nsa_sys::fused::cmp_blocks_linear`), which
    /// keeps `raw` rather than the blocks (twice its size) for backward. The weights are cast
    /// to raw's dtype first, as autocast's `linear` casts them.
    fn apply_kernel(
        &self,
        raw: &Tensor,
        pos: Option<&Tensor>,
        l: i64,
        stride: i64,
    ) -> Result<Tensor, AttnError> {
        let (first, second) = match self {
            PhiMap::Mean => {
                return Err(AttnError::Torch(TchError::Kind(
                    "the mean φ has no linear map for the blocks kernel".into(),
                )))
            }
            PhiMap::Linear(w) => (w, None),
            PhiMap::Mlp(w1, w2) | PhiMap::MeanMlp(w1, w2) => (w1, Some(w2)),
        };
        let kind = raw.kind();
        let w = first.ws.f_to_kind(kind)?.f_contiguous()?;
        let b = first.bs.as_ref().map(|b| b.f_to_kind(kind)).transpose()?;
        let y = nsa_sys::fused::cmp_blocks_linear(raw, pos, l, stride, &w, b.as_ref())?;
        let y = match second {
            Some(w2) => linear(w2, &y.f_gelu("none")?)?,
            None => y,
        };
        if !matches!(self, PhiMap::MeanMlp(..)) {
            return Ok(y);
        }
        // The mean of the blocks `[i·stride, i·stride + l)` of `raw + pos`: the mean of raw's
        // blocks (a strided view, reduced) plus the mean of the position embedding.
        let mut mean = raw.f_unfold(1, l, stride)?.f_mean_dim(-1, false, None)?;
        if let Some(pos) = pos {
            mean = mean.f_add(&pos.f_mean_dim(0, false, None)?)?;
        }
        Ok(mean.f_add(&y)?)
    }
}

/// The compressed branch's position embeddings and φ for keys and values.
#[derive(Debug)]
pub(crate) struct Compression {
    /// Key-side position embedding `[l, Hkv, dk]`; only with the MLP φ (see [`Phi`]).
    pos_k: Option<Tensor>,
    /// Value-side position embedding `[l, Hkv, dv]`.
    pos_v: Tensor,
    phi_k: PhiMap,
    phi_v: PhiMap,
    /// Block length `l`.
    block_len: i64,
    /// Stride `d` between block starts.
    stride: i64,
}

impl Compression {
    /// Creates the variables under `cmp` (the layer's `cmp` path), in the order `pos_k`, `pos_v`,
    /// `phi_k`, `phi_v`: the order fixes their random initialisation for a given seed.
    pub(crate) fn new(cmp: &nn::Path<'_>, cfg: &NsaConfig) -> Result<Self, AttnError> {
        let pos_init = nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let (l, g) = (cfg.nsa.select.block_len, cfg.kv_heads);
        Ok(Self {
            // With mean or linear φ a key-side embedding would only shift all compressed keys
            // alike, which cancels in the softmax: it is created for the MLP variants only.
            pos_k: cfg
                .nsa
                .phi
                .has_mlp()
                .then(|| cmp.f_var("pos_k", &[l, g, cfg.head_dim_k], pos_init))
                .transpose()?,
            pos_v: cmp.f_var("pos_v", &[l, g, cfg.head_dim_v], pos_init)?,
            phi_k: PhiMap::new(&(cmp / "phi_k"), &cfg.nsa, cfg.head_dim_k, false)?,
            phi_v: PhiMap::new(&(cmp / "phi_v"), &cfg.nsa, cfg.head_dim_v, true)?,
            block_len: l,
            stride: cfg.nsa.select.stride,
        })
    }

    /// Compressed keys `[B, Nc, Hkv, dk]` and values `[B, Nc, Hkv, dv]` from the raw `k`
    /// `[B, S, Hkv, dk]` (rotated or not, as `cmp_rope` says: the layer decides) and `v`
    /// `[B, S, Hkv, dv]`. With `kernel`, CUDA
    /// tensors in bf16 or fp32 and any φ but the mean, φ's input blocks come from one kernel
    /// each way instead of unfold, add and copy, in one autograd function with φ's first
    /// linear map (`nsa_sys::fused::cmp_blocks_linear`) that does not keep the blocks; the
    /// values are the same (each element one rounded sum either way).
    pub(crate) fn apply(
        &self,
        k: &Tensor,
        v: &Tensor,
        kernel: bool,
    ) -> Result<(Tensor, Tensor), AttnError> {
        let cmp_k = self.compress(k, self.pos_k.as_ref(), &self.phi_k, kernel)?;
        let cmp_v = self.compress(v, Some(&self.pos_v), &self.phi_v, kernel)?;
        Ok((cmp_k, cmp_v))
    }

    /// φ over the blocks `[i·d, i·d + l)` of `raw` `[B, S, G, d]` → `[B, Nc, G, d]`.
    fn compress(
        &self,
        raw: &Tensor,
        pos: Option<&Tensor>,
        phi: &PhiMap,
        kernel: bool,
    ) -> Result<Tensor, AttnError> {
        let sz = raw.size();
        let (b, s, g, d) = (sz[0], sz[1], sz[2], sz[3]);
        let (l, stride) = (self.block_len, self.stride);
        if kernel
            && phi.reads_flat()
            && s >= l
            && raw.device().is_cuda()
            && matches!(raw.kind(), Kind::BFloat16 | Kind::Float)
        {
            let pos = pos.map(|p| p.f_to_kind(raw.kind())).transpose()?;
            return phi.apply_kernel(raw, pos.as_ref(), l, stride);
        }
        let blocks = if s < l {
            // No complete block yet: an empty [B, 0, l, G, d] that still flows through φ, so
            // every parameter gets a (zero) gradient rather than none.
            raw.f_narrow(1, 0, 0)?
                .f_unsqueeze(2)?
                .f_expand([b, 0, l, g, d], false)?
        } else {
            // unfold: [B, Nc, G, d, l] -> [B, Nc, l, G, d]
            raw.f_unfold(1, l, stride)?.f_permute([0, 1, 4, 2, 3])?
        };
        let blocks = match pos {
            Some(pos) => blocks.f_add(&pos.f_to_kind(raw.kind())?)?,
            None => blocks,
        };
        Ok(phi.apply(&blocks)?)
    }
}
