//! Gradient compression: the dtype gradients travel in.
//!
//! With [`Compression::Bf16`] or [`Compression::Fp16`] each bucket's flat buffer is cast into a
//! persistent buffer of the wire dtype, summed across ranks in that dtype, cast back into the flat
//! buffer and divided there (in the gradient's own dtype) by the world size. `None` sums the flat
//! buffer itself.
//!
//! # Error bound
//!
//! Let `u` be the wire format's unit roundoff (bf16: 8 significand bits, `u = 2⁻⁸`; fp16: 11
//! bits, `u = 2⁻¹¹`) and `η` half its smallest subnormal spacing (fp16: `2⁻²⁵`; bf16 has fp32's
//! exponent range, `η = 2⁻¹³⁴`, negligible). For one element with per-rank gradients
//! `g_1 … g_W` and exact average `ḡ = Σ g_r / W`:
//!
//! - casting each `g_r` errs by at most `u|g_r| + η`;
//! - the all-reduce performs at most `W − 1` additions in the wire dtype (a ring does; the
//!   in-process backend sums exactly and rounds once), each erring by at most
//!   `u·|partial sum| + η ≤ u(1 + u)ᵂ Σ|g_r| + η`;
//! - casting back is exact; dividing by `W` in fp32/fp64 adds a relative `2⁻²⁴` at most.
//!
//! Summing and dividing by `W`:
//!
//! ```text
//! |avg_compressed − ḡ| ≤ u·(1 + u)ᵂ·Σ_r|g_r| + 2η + 2⁻²⁴·|ḡ|  ≤  1.04·u·Σ_r|g_r| + 2η   (W ≤ 8, as (1 + 2⁻⁸)⁸ < 1.032)
//! ```
//!
//! i.e. about `W·u` times the mean magnitude of the per-rank gradients. Values beyond the wire
//! format's range are not bounded: fp16 overflows to ±inf above 65504 (use bf16 or no compression
//! for unscaled gradients that large). `tests/ddp.rs` checks this bound for W = 2 and 4.
use std::fmt;
use std::str::FromStr;

use tch::Kind;

use crate::DdpError;

/// How gradients travel: as they are, or cast to bf16 / fp16. Serialises (serde) and parses
/// ([`FromStr`]) as `"none"`, `"bf16"` or `"fp16"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Communicate in the gradient's own dtype.
    #[default]
    None,
    /// Communicate in bfloat16 (same range as fp32, 8 significand bits).
    Bf16,
    /// Communicate in float16 (max 65504, 11 significand bits).
    Fp16,
}

impl Compression {
    /// The dtype a buffer of `kind` travels in.
    pub fn wire_kind(self, kind: Kind) -> Kind {
        match self {
            Compression::None => kind,
            Compression::Bf16 => Kind::BFloat16,
            Compression::Fp16 => Kind::Half,
        }
    }

    /// The wire format's unit roundoff `u` (0 for `None`); see the module docs.
    pub fn unit_roundoff(self) -> f64 {
        match self {
            Compression::None => 0.0,
            Compression::Bf16 => 2f64.powi(-8),
            Compression::Fp16 => 2f64.powi(-11),
        }
    }

    /// Half the wire format's smallest subnormal spacing `η` (0 for `None`).
    pub fn underflow_error(self) -> f64 {
        match self {
            Compression::None => 0.0,
            Compression::Bf16 => 2f64.powi(-134),
            Compression::Fp16 => 2f64.powi(-25),
        }
    }

    /// The name accepted by [`FromStr`].
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Bf16 => "bf16",
            Compression::Fp16 => "fp16",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Compression {
    type Err = DdpError;

    /// Parses `none`, `bf16` or `fp16` (case-insensitive, surrounding spaces ignored).
    fn from_str(s: &str) -> Result<Self, DdpError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(Compression::None),
            "bf16" => Ok(Compression::Bf16),
            "fp16" => Ok(Compression::Fp16),
            _ => Err(DdpError::UnknownCompression(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for c in [Compression::None, Compression::Bf16, Compression::Fp16] {
            assert_eq!(c.name().parse::<Compression>().unwrap(), c);
            assert_eq!(c.to_string(), c.name());
        }
        assert_eq!(" BF16 ".parse::<Compression>().unwrap(), Compression::Bf16);
        assert_eq!(Compression::Fp16.wire_kind(Kind::Float), Kind::Half);
        assert_eq!(Compression::None.wire_kind(Kind::Double), Kind::Double);
    }
}
