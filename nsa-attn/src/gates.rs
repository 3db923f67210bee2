//! Branch gates and the gated sum of the branch outputs (Eq. 5).
//!
//! Learned gates are `g = sigmoid(W_2 SiLU(W_1 x))`: `x` `[B, S, dim]` → `[B, S, gate_hidden]` →
//! `[B, S, 3·H]`, read heads-major as `[B, S, H, 3]` (the gate of head `h` and branch `c` is
//! output `3·h + c`, branches in [`Branch::ALL`] order: cmp, slc, win). [`GateOverride`] replaces
//! them with constants of the same layout. The branch outputs `o_c` `[B, S, H, dv]` are mixed as
//! `o = Σ_c g_c · o_c` `[B, S, H, dv]`. Variables, under the layer's `gate` path: `w1.*`, `w2.*`.
use tch::nn;
use tch::Tensor;

use crate::config::{AttnError, NsaConfig};
use crate::layer::{linear, Branch};
use crate::linear::f_linear;

/// How the branch outputs are mixed.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum GateOverride {
    /// The learned gates `sigmoid(MLP(x))` (training and inference).
    #[default]
    Learned,
    /// Gate 1 on one branch and 0 on the others (tests, ablations).
    Only(Branch),
    /// Constant gates `[cmp, slc, win]` for every token and head.
    Fixed([f64; 3]),
}

/// The gate MLP's two linear maps.
#[derive(Debug)]
pub(crate) struct Gates {
    w1: nn::Linear,
    w2: nn::Linear,
}

impl Gates {
    /// Creates `w1` then `w2` under `gate` (the layer's `gate` path).
    pub(crate) fn new(gate: &nn::Path<'_>, cfg: &NsaConfig) -> Result<Self, AttnError> {
        Ok(Self {
            w1: f_linear(
                gate / "w1",
                cfg.dim,
                cfg.nsa.gate_hidden,
                Default::default(),
            )?,
            w2: f_linear(
                gate / "w2",
                cfg.nsa.gate_hidden,
                3 * cfg.heads,
                Default::default(),
            )?,
        })
    }

    /// `W_1` and `W_2` (a decode step stacks `W_1` under the projections and computes the
    /// rest in its prologue kernel).
    pub(crate) fn linears(&self) -> (&nn::Linear, &nn::Linear) {
        (&self.w1, &self.w2)
    }

    /// Gates `[B, S, h, 3]` for `x` `[B, S, dim]` (shape already checked by the caller).
    pub(crate) fn apply(
        &self,
        x: &Tensor,
        over: GateOverride,
        (b, s, h): (i64, i64, i64),
    ) -> Result<Tensor, AttnError> {
        let constant = |vals: [f64; 3]| {
            Tensor::f_from_slice(&vals)?
                .f_to_kind(x.kind())?
                .f_to_device(x.device())?
                .f_expand([b, s, h, 3], false)
        };
        Ok(match over {
            GateOverride::Learned => {
                let hidden = linear(&self.w1, x)?.f_silu()?;
                // heads-major: the gate of (head, branch) is output head * 3 + branch.
                linear(&self.w2, &hidden)?
                    .f_sigmoid()?
                    .f_view([b, s, h, 3])?
            }
            GateOverride::Only(br) => {
                let mut vals = [0.0; 3];
                vals[br.gate_index() as usize] = 1.0;
                constant(vals)?
            }
            GateOverride::Fixed(vals) => constant(vals)?,
        })
    }
}

/// `o = Σ_c g_c · o_c` (Eq. 5): `gates` `[B, S, H, 3]`, branch outputs `[B, S, H, dv]` →
/// `[B, S, H, dv]`.
pub(crate) fn mix(
    gates: &Tensor,
    compressed: &Tensor,
    selected: &Tensor,
    window: &Tensor,
) -> Result<Tensor, AttnError> {
    let g = |br: Branch| gates.f_narrow(3, br.gate_index(), 1);
    Ok(compressed
        .f_mul(&g(Branch::Compressed)?)?
        .f_add(&selected.f_mul(&g(Branch::Selected)?)?)?
        .f_add(&window.f_mul(&g(Branch::Window)?)?)?)
}
