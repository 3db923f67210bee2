//! Rotary position embedding (RoPE) of queries and keys, rotate-half form.
//!
//! [`Rope`] holds cos/sin tables `[S, 1, dk/2]` for positions `0..S` and rotates a tensor
//! `[B, S, heads, dk]` (queries `[B, S, H, dk]` or keys `[B, S, Hkv, dk]`) to the same shape:
//! pair `(i, i + dk/2)` of a head at position `s` turns by the angle `s · base^(−2i/dk)`. Values
//! get no RoPE. Compressed keys get none of their own by default: φ ([`crate::phi`]) mixes the
//! already rotated keys of the tokens a block covers; with `cmp_rope = "compressed"`
//! ([`crate::CmpRope`]) φ reads unrotated keys and compressed key `i` is rotated at position
//! `i·d + l − 1` ([`Rope::strided`]).
//!
//! [`Rope::with_kernel`] rotates CUDA tensors with one fused kernel each way
//! (`nsa_sys::fused::rope`) instead of libtorch's chain of elementwise operators; the fused
//! path of the NSA layer and of the dense baseline use it.
use tch::{Device, Kind, TchError, Tensor};

use crate::config::AttnError;

/// Rotary position embedding, rotate-half form, for positions `0..S` over head dim `dk`: pair
/// `(i, i + dk/2)` of a head at position `s` is rotated by `s · base^(−2i/dk)`. Computed in
/// float64 and stored in the activations' kind. Shared with `nsa-model`'s dense baseline, so
/// NSA and dense models place positions identically.
#[derive(Debug)]
pub struct Rope {
    /// `[S, 1, dk/2]`
    cos: Tensor,
    /// `[S, 1, dk/2]`
    sin: Tensor,
    /// fp32 `[S, dk/2]` cos and sin for the fused kernel (CUDA tables of [`Rope::new`] and
    /// [`Rope::strided`]), or fp32 `[B, dk/2]` for tables of [`Rope::at_positions`] with one
    /// position per sequence (see `per_sequence`).
    kernel: Option<(Tensor, Tensor)>,
    /// The kernel tables hold one row per sequence (`[B, dk/2]`, tables of
    /// [`Rope::at_positions`] for `[B, 1]` positions): [`Rope::apply`] rotates `[B, 1, X, dk]`
    /// by handing the kernel the sequences as its position axis.
    per_sequence: bool,
}

impl Rope {
    /// Tables for `s` positions `0 .. s`.
    pub fn new(
        base: f64,
        dk: i64,
        s: i64,
        kind: Kind,
        device: tch::Device,
    ) -> Result<Self, TchError> {
        Self::strided(base, dk, (0, 1, s), kind, device)
    }

    /// Tables for the `count` positions `start, start + step, …` (`[count, 1, dk/2]`, so
    /// [`Rope::apply`] rotates `[B, count, heads, dk]` and [`Rope::with_kernel`] applies): the
    /// positions of compressed keys, `i·d + l − 1` ([`Rope::new`] is `(0, 1, s)`). Position `p`
    /// gets the same bits as in [`Rope::at_positions`].
    pub fn strided(
        base: f64,
        dk: i64,
        (start, step, count): (i64, i64, i64),
        kind: Kind,
        device: tch::Device,
    ) -> Result<Self, TchError> {
        let angles = Tensor::f_arange(count, (Kind::Int64, device))?
            .f_mul_scalar(step)?
            .f_add_scalar(start)?
            .f_to_kind(Kind::Double)?
            .f_outer(&inverse_frequencies(base, dk, device)?)?
            .f_unsqueeze(1)?;
        Self::from_angles(&angles, kind)
    }

    /// Tables for the given absolute positions, int64 `[B, S]` (each sequence of a batch at its
    /// own positions, as in decoding): [`Rope::apply`] then rotates `[B, S, heads, dk]` with
    /// row `(b, s)` at position `positions[b, s]`. The angles are computed exactly as in
    /// [`Rope::new`], so position `p` gets the same bits either way.
    pub fn at_positions(
        base: f64,
        dk: i64,
        positions: &Tensor,
        kind: Kind,
    ) -> Result<Self, TchError> {
        let inv_freq = inverse_frequencies(base, dk, positions.device())?;
        // [B, S, 1] · [dk/2] -> [B, S, 1, dk/2]
        let angles = positions
            .f_to_kind(Kind::Double)?
            .f_unsqueeze(-1)?
            .f_mul(&inv_freq)?
            .f_unsqueeze(2)?;
        Self::from_angles(&angles, kind)
    }

    /// Overwrites these tables of one position per sequence ([`Rope::at_positions`] for
    /// `[B, 1]` positions) in place with rows `rows` (int64 `[B]`) of `table`'s
    /// ([`Rope::strided`], same kind, device and kernel setting): a fixed-layout decode plan's
    /// tables keep their addresses from step to step, and a gather per table costs the host
    /// less than the angles' operators. Same bits as new tables at those positions, since
    /// `strided` and `at_positions` compute a position alike.
    pub(crate) fn gather_rows(&mut self, table: &Rope, rows: &Tensor) -> Result<(), TchError> {
        let half = *self.cos.size().last().unwrap_or(&0);
        let batch = rows.size().first().copied().unwrap_or(0);
        let gather = |into: &Tensor, from: &Tensor| -> Result<(), TchError> {
            let from = from.f_view([-1, half])?;
            // The result is `into`'s view, written in place.
            from.f_index_select_out(&into.f_view([batch, half])?, 0, rows)
                .map(drop)
        };
        gather(&self.cos, &table.cos)?;
        gather(&self.sin, &table.sin)?;
        match (&self.kernel, &table.kernel) {
            (Some((cos, sin)), Some((from_cos, from_sin))) => {
                gather(cos, from_cos)?;
                gather(sin, from_sin)
            }
            (None, None) => Ok(()),
            _ => Err(TchError::Kind(
                "RoPE rows gathered between tables with and without the kernel's".into(),
            )),
        }
    }

    fn from_angles(angles: &Tensor, kind: Kind) -> Result<Self, TchError> {
        Ok(Self {
            cos: angles.f_cos()?.f_to_kind(kind)?,
            sin: angles.f_sin()?.f_to_kind(kind)?,
            kernel: None,
            per_sequence: false,
        })
    }

    /// With `on`, [`Rope::apply`] rotates bf16 and fp32 tensors on CUDA with the fused kernel
    /// (`nsa_sys::fused::rope`: one pass forward, one backward, fp32 arithmetic, the result
    /// in the input's dtype). Applies to CUDA tables of [`Rope::new`] and [`Rope::strided`],
    /// and of [`Rope::at_positions`] with one position per sequence; others (CPU, several
    /// positions per sequence) keep libtorch's operators.
    ///
    /// What differs from libtorch's operators: the fp32 products are rounded once per output
    /// element instead of once per operator, and a bf16 input stays bf16 (libtorch promotes it
    /// to the tables' fp32 when the activations are fp32 under autocast; the attention kernels
    /// then round it back to bf16).
    ///
    /// Tables of [`Rope::at_positions`] for one position per sequence (`[B, 1]`, a decode
    /// step's) take the kernel too: it rotates `[B, 1, X, dk]` with the sequences as its
    /// position axis, one launch for every head of the step's queries and keys.
    pub fn with_kernel(mut self, on: bool) -> Result<Self, TchError> {
        self.kernel = None;
        self.per_sequence = false;
        let size = self.cos.size();
        let one_per_sequence = size.len() == 4 && size[1] == 1 && size[2] == 1;
        if on
            && matches!(self.cos.device(), Device::Cuda(_))
            && (size.len() == 3 || one_per_sequence)
        {
            let table = |t: &Tensor| -> Result<Tensor, TchError> {
                let rows = t.size()[0];
                t.f_reshape([rows, -1])?
                    .f_to_kind(Kind::Float)?
                    .f_contiguous()
            };
            self.kernel = Some((table(&self.cos)?, table(&self.sin)?));
            self.per_sequence = one_per_sequence;
        }
        Ok(self)
    }

    /// Whether [`Rope::apply`] rotates with the fused kernel (for tensors on its device in
    /// bf16 or fp32).
    pub(crate) fn uses_kernel(&self) -> bool {
        self.kernel.is_some()
    }

    /// The tables in the activations' kind, `[S or B, 1, (1,) dk/2]` (tests replaying a
    /// kernel's rotation with libtorch's operators).
    #[cfg(test)]
    pub(crate) fn tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    /// The fused kernel's tables of a table with one position per sequence
    /// ([`Rope::at_positions`] for `[B, 1]` positions on CUDA, with the kernel): fp32
    /// `[B, dk/2]` cos and sin, row `b` = sequence `b`'s position (a decode step's prologue).
    pub(crate) fn sequence_tables(&self) -> Option<(&Tensor, &Tensor)> {
        match self.per_sequence {
            true => self.kernel.as_ref().map(|(c, s)| (c, s)),
            false => None,
        }
    }

    /// The fp32 `[S, dk/2]` cos and sin tables the fused kernel reads (`None` without
    /// [`Rope::with_kernel`], or where it does not apply).
    pub(crate) fn kernel_tables(&self) -> Option<(&Tensor, &Tensor)> {
        if self.per_sequence {
            return None;
        }
        self.kernel.as_ref().map(|(c, s)| (c, s))
    }

    /// `x` `[B, S, heads, dk]` → the same shape, rotated by position.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor, AttnError> {
        if let Some((cos, sin)) = &self.kernel {
            let last_contiguous = x.dim() == 4 && x.stride()[3] == 1;
            if x.device() == cos.device()
                && matches!(x.kind(), Kind::BFloat16 | Kind::Float)
                && last_contiguous
            {
                if !self.per_sequence {
                    return Ok(nsa_sys::fused::rope(x, cos, sin)?);
                }
                let size = x.size();
                if size[1] == 1 && size[0] == cos.size()[0] {
                    // [B, 1, X, dk] as [1, B, X, dk]: sequence b is the kernel's position b.
                    let rotated = nsa_sys::fused::rope(&x.f_permute([1, 0, 2, 3])?, cos, sin)?;
                    return Ok(rotated.f_permute([1, 0, 2, 3])?);
                }
            }
        }
        Ok(self.apply_operators(x)?)
    }

    /// [`Rope::apply`] with libtorch's elementwise operators.
    fn apply_operators(&self, x: &Tensor) -> Result<Tensor, TchError> {
        let half = x.size().get(3).copied().unwrap_or(0) / 2;
        let x1 = x.f_narrow(3, 0, half)?;
        let x2 = x.f_narrow(3, half, half)?;
        Tensor::f_cat(
            &[
                x1.f_mul(&self.cos)?.f_sub(&x2.f_mul(&self.sin)?)?,
                x2.f_mul(&self.cos)?.f_add(&x1.f_mul(&self.sin)?)?,
            ],
            3,
        )
    }
}

/// `base^(−2i/dk)` for `i < dk/2`, float64.
fn inverse_frequencies(base: f64, dk: i64, device: tch::Device) -> Result<Tensor, TchError> {
    Tensor::f_arange(dk / 2, (Kind::Double, device))?
        .f_mul_scalar(-2.0 * base.ln() / dk as f64)?
        .f_exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_is_identity_at_zero_preserves_norms_and_sees_only_offsets() {
        let (s, dk) = (9, 8);
        let rope = Rope::new(10_000.0, dk, s, Kind::Double, Device::Cpu).unwrap();
        let q =
            Tensor::randn([1, 1, 1, dk], (Kind::Double, Device::Cpu)).expand([1, s, 1, dk], false);
        let k =
            Tensor::randn([1, 1, 1, dk], (Kind::Double, Device::Cpu)).expand([1, s, 1, dk], false);
        let (rq, rk) = (rope.apply(&q).unwrap(), rope.apply(&k).unwrap());
        let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
        assert!(
            diff(&rq.narrow(1, 0, 1), &q.narrow(1, 0, 1)) < 1e-12,
            "position 0 is unrotated"
        );
        assert!(
            diff(
                &rq.square().sum_dim_intlist(-1, false, None),
                &q.square().sum_dim_intlist(-1, false, None)
            ) < 1e-10
        );
        // <R_m q, R_n k> depends on m − n only.
        let dot = |m: i64, n: i64| {
            (rq.get(0).get(m) * rk.get(0).get(n))
                .sum(Kind::Double)
                .double_value(&[])
        };
        assert!((dot(5, 2) - dot(7, 4)).abs() < 1e-10);
        assert!((dot(3, 3) - dot(0, 0)).abs() < 1e-10);
        assert!(
            (dot(5, 2) - dot(4, 2)).abs() > 1e-6,
            "different offsets differ"
        );
    }

    #[test]
    fn the_kernel_applies_to_cuda_sequence_tables_only() {
        let on_cpu = Rope::new(10_000.0, 8, 5, Kind::Float, Device::Cpu)
            .unwrap()
            .with_kernel(true)
            .unwrap();
        assert!(on_cpu.kernel_tables().is_none());
        let x = Tensor::randn([2, 5, 3, 8], (Kind::Float, Device::Cpu));
        let plain = Rope::new(10_000.0, 8, 5, Kind::Float, Device::Cpu).unwrap();
        assert!(on_cpu.apply(&x).unwrap().equal(&plain.apply(&x).unwrap()));
    }

    #[test]
    fn tables_at_given_positions_equal_the_sequence_tables_bit_for_bit() {
        let (dk, s) = (8, 40);
        let whole = Rope::new(10_000.0, dk, s, Kind::Float, Device::Cpu).unwrap();
        let x = Tensor::randn([1, s, 3, dk], (Kind::Float, Device::Cpu));
        let rotated = whole.apply(&x).unwrap();
        // Two sequences at their own positions, one token each.
        let positions = Tensor::from_slice(&[17i64, 39]).view([2, 1]);
        let at = Rope::at_positions(10_000.0, dk, &positions, Kind::Float).unwrap();
        let tokens = Tensor::cat(&[x.narrow(1, 17, 1), x.narrow(1, 39, 1)], 0);
        let want = Tensor::cat(&[rotated.narrow(1, 17, 1), rotated.narrow(1, 39, 1)], 0);
        assert!(at.apply(&tokens).unwrap().equal(&want));
    }

    #[test]
    fn strided_tables_equal_the_sequence_tables_at_their_positions() {
        let (dk, s) = (8, 64);
        let whole = Rope::new(10_000.0, dk, s, Kind::Float, Device::Cpu).unwrap();
        let x = Tensor::randn([2, 4, 3, dk], (Kind::Float, Device::Cpu));
        // Positions 31, 47, 63 (l = 32, d = 16) and one more past the sequence's.
        let strided = Rope::strided(10_000.0, dk, (31, 16, 4), Kind::Float, Device::Cpu).unwrap();
        let got = strided.apply(&x).unwrap();
        for (i, p) in [31i64, 47, 63].into_iter().enumerate() {
            let one = Tensor::zeros([2, s, 3, dk], (Kind::Float, Device::Cpu));
            one.narrow(1, p, 1).copy_(&x.narrow(1, i as i64, 1));
            let want = whole.apply(&one).unwrap().narrow(1, p, 1);
            assert!(got.narrow(1, i as i64, 1).equal(&want), "position {p}");
        }
        let at = Rope::at_positions(
            10_000.0,
            dk,
            &Tensor::from_slice(&[79i64, 79]).view([2, 1]),
            Kind::Float,
        )
        .unwrap();
        assert!(got
            .narrow(1, 3, 1)
            .equal(&at.apply(&x.narrow(1, 3, 1)).unwrap()));
    }
}
