//! The decode step's own buffers: the partial states, the compressed scores and their
//! log-sum-exp, the selection's lists and picks, the ticket counters and the output.
//!
//! Every buffer but the tickets is allocated uninitialised: the kernels write each element
//! before any kernel reads it (`poison` lets the GPU check prove that). The tickets must start
//! at zero, and the kernels leave them at zero: a caller that makes a step per decode step
//! (a captured layer step does, inside its CUDA graph) hands in its own, so that making a step
//! launches nothing.
use tch::{Device, Kind, Tensor};

use crate::fused::{input, FusedError};

/// The buffers of one `DecodeStep` (layouts in decode.cu's header).
#[derive(Debug)]
pub(super) struct Scratch {
    pub(super) part_ml: Tensor,
    pub(super) part_o: Tensor,
    pub(super) scores: Tensor,
    pub(super) lse2: Tensor,
    pub(super) tickets: Tensor,
    pub(super) lists: Tensor,
    pub(super) ids: Tensor,
    pub(super) out: Tensor,
}

/// The sizes the buffers follow: batch, groups, heads per group, partial states per (b, g),
/// score width, selection slices, picks, dv, and the output's dtype.
#[derive(Debug, Clone, Copy)]
pub(super) struct ScratchShape {
    pub(super) b: i64,
    pub(super) hkv: i64,
    pub(super) hpg: i64,
    pub(super) parts: i64,
    pub(super) score_width: i64,
    pub(super) slices: i64,
    pub(super) n: i64,
    pub(super) dv: i64,
    pub(super) kind: Kind,
}

impl Scratch {
    /// The buffers of a step on `dev`, with the caller's ticket counters (int32 `[B, Hkv]`
    /// zeros, contiguous, on `dev`) or new ones.
    pub(super) fn new(
        s: ScratchShape,
        dev: Device,
        tickets: Option<&Tensor>,
    ) -> Result<Self, FusedError> {
        let f32e = |shape: &[i64]| Tensor::f_empty(shape, (Kind::Float, dev));
        let tickets = match tickets {
            Some(t) => {
                if t.kind() != Kind::Int
                    || t.device() != dev
                    || t.size() != [s.b, s.hkv]
                    || !t.is_contiguous()
                {
                    return Err(input(
                        "tickets",
                        format!(
                            "contiguous int32 [{}, {}] on {dev:?}, got {:?} {:?} on {:?}",
                            s.b,
                            s.hkv,
                            t.kind(),
                            t.size(),
                            t.device()
                        ),
                    ));
                }
                t.shallow_clone()
            }
            None => Tensor::f_zeros([s.b, s.hkv], (Kind::Int, dev))?,
        };
        Ok(Self {
            part_ml: f32e(&[s.b, s.hkv, s.parts, s.hpg, 2])?,
            part_o: f32e(&[s.b, s.hkv, s.parts, s.hpg, s.dv])?,
            scores: f32e(&[s.b, s.hkv, s.hpg, s.score_width])?,
            lse2: f32e(&[s.b, s.hkv, s.hpg])?,
            tickets,
            lists: Tensor::f_empty([s.b, s.hkv, s.slices, 32], (Kind::Int64, dev))?,
            ids: Tensor::f_empty([s.b, s.hkv, s.n], (Kind::Int64, dev))?,
            out: Tensor::f_empty([s.b, s.hkv * s.hpg, s.dv], (s.kind, dev))?,
        })
    }

    /// Fills every buffer but the tickets with values no kernel writes: NaN in the floats,
    /// all ones in the selection's lists, `−2` in the picks (an id the kernels never write,
    /// which the attend kernel takes for padding). A launch that read an element before
    /// writing it then shows NaN or a wrong pick.
    pub(super) fn poison(&self) -> Result<(), FusedError> {
        for t in [
            &self.part_ml,
            &self.part_o,
            &self.scores,
            &self.lse2,
            &self.out,
        ] {
            let _ = t.shallow_clone().f_fill_(f64::NAN)?;
        }
        let _ = self.lists.shallow_clone().f_fill_(-1)?;
        let _ = self.ids.shallow_clone().f_fill_(-2)?;
        Ok(())
    }
}
