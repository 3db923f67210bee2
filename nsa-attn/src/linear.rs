//! [`f_linear`]: tch's `nn::linear` without the panic.
//!
//! `tch::nn::linear` creates its variables with `nn::Path::var`, which unwraps libtorch's
//! result: an allocation failure (say, a layer too large for the device) would abort the
//! caller. [`f_linear`] creates the same variables through `nn::Path::f_var` and returns the
//! error instead.
use std::borrow::Borrow;

use tch::nn;
use tch::TchError;

/// Creates a linear layer's variables under `vs`, exactly as `tch::nn::linear` does (a drop-in: same arguments) — same
/// names (`bias` `[out_dim]` when `c.bias`, `weight` `[out_dim, in_dim]`), same initialisation
/// (`c.ws_init` for the weight; `c.bs_init`, or uniform in ±1/√in_dim, for the bias) and the
/// same creation order (bias first, then weight), so a seeded model and its checkpoints are
/// bit-identical to one built with `nn::linear` — but a libtorch failure is an `Err`.
pub fn f_linear<'a, T: Borrow<nn::Path<'a>>>(
    vs: T,
    in_dim: i64,
    out_dim: i64,
    c: nn::LinearConfig,
) -> Result<nn::Linear, TchError> {
    let vs = vs.borrow();
    // tch draws the bias first: keeping its order keeps the random stream, and so every
    // initial value, unchanged.
    let bs = if c.bias {
        let bs_init = c.bs_init.unwrap_or_else(|| {
            let bound = 1.0 / (in_dim as f64).sqrt();
            nn::Init::Uniform {
                lo: -bound,
                up: bound,
            }
        });
        Some(vs.f_var("bias", &[out_dim], bs_init)?)
    } else {
        None
    };
    let ws = vs.f_var("weight", &[out_dim, in_dim], c.ws_init)?;
    Ok(nn::Linear { ws, bs })
}
