//! libtorch's multi-tensor optimizer kernels, which tch does not bind (`glue/optim.cpp`): one
//! AdamW step over a whole parameter list ([`fused_adamw`], `at::_fused_adamw_`), the global
//! gradient norm ([`grad_norm`], `at::_foreach_norm`) and zeroing the gradients
//! ([`zero_grads`], `at::_foreach_zero_`). On CUDA each is a few kernel launches for the whole
//! list, where per-tensor operators launch one kernel per operator and tensor (an NSA layer has
//! about twenty parameter tensors). libtorch implements all three on the CPU too.
use std::os::raw::{c_char, c_int};

use tch::Tensor;
use torch_sys::C_tensor;

use crate::autograd::{finish, glue_error, GlueError, ERR_LEN};

extern "C" {
    fn nsa_fused_adamw(
        params: *const *const C_tensor,
        m: *const *const C_tensor,
        v: *const *const C_tensor,
        n: usize,
        step: f64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        grad_divisor: f64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn nsa_grad_norm(
        params: *const *const C_tensor,
        n: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut C_tensor;
    fn nsa_zero_grads(
        params: *const *const C_tensor,
        n: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// AdamW's hyperparameters for one [`fused_adamw`] call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// The step being taken, 1 for the first (bias corrections `1 − β^step`).
    pub step: u64,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// Decoupled: `p ← p · (1 − lr · weight_decay)` before the update.
    pub weight_decay: f64,
    pub eps: f64,
    /// Each gradient is divided by this first, and stored back divided (gradient clipping:
    /// `1 / clip`).
    pub grad_divisor: f64,
}

fn pointers(ts: &[Tensor]) -> Vec<*const C_tensor> {
    ts.iter().map(|t| t.as_ptr()).collect()
}

/// One AdamW step over `params` (each with a defined `.grad`), their first moments `m` and
/// second moments `v` (same shapes, dtypes and device, updated in place), as PyTorch's
/// `AdamW(fused=True)`: `g ← g / grad_divisor`, `p ← p (1 − lr·wd)`, `m ← β1 m + (1 − β1) g`,
/// `v ← β2 v + (1 − β2) g²`, `p ← p − lr / (1 − β1^t) · m / (√v / √(1 − β2^t) + eps)`.
pub fn fused_adamw(
    params: &[Tensor],
    m: &[Tensor],
    v: &[Tensor],
    h: AdamWStep,
) -> Result<(), GlueError> {
    if m.len() != params.len() || v.len() != params.len() {
        return Err(GlueError {
            call: "nsa_fused_adamw",
            message: format!(
                "{} parameters but {} first and {} second moments",
                params.len(),
                m.len(),
                v.len()
            ),
        });
    }
    let (p, mp, vp) = (pointers(params), pointers(m), pointers(v));
    let mut err = vec![0u8; ERR_LEN];
    // SAFETY: three arrays of `n` pointers to live tensors borrowed for the call; the glue
    // catches every exception and writes at most ERR_LEN bytes into `err`.
    let rc = unsafe {
        nsa_fused_adamw(
            p.as_ptr(),
            mp.as_ptr(),
            vp.as_ptr(),
            p.len(),
            h.step as f64,
            h.lr,
            h.beta1,
            h.beta2,
            h.weight_decay,
            h.eps,
            h.grad_divisor,
            err.as_mut_ptr().cast(),
            ERR_LEN,
        )
    };
    if rc != 0 {
        return Err(glue_error("nsa_fused_adamw", &err));
    }
    Ok(())
}

/// The L2 norm of the gradients of all `params` together (each must have a defined `.grad`),
/// an fp32 0-dim tensor on their device; NaN and infinity propagate.
pub fn grad_norm(params: &[Tensor]) -> Result<Tensor, GlueError> {
    let p = pointers(params);
    let mut err = vec![0u8; ERR_LEN];
    // SAFETY: as in `fused_adamw`; on success the glue returns a new tensor we own.
    let ptr = unsafe { nsa_grad_norm(p.as_ptr(), p.len(), err.as_mut_ptr().cast(), ERR_LEN) };
    finish("nsa_grad_norm", ptr, &err)
}

/// Zeroes the defined gradients of `params` in place.
pub fn zero_grads(params: &[Tensor]) -> Result<(), GlueError> {
    let p = pointers(params);
    let mut err = vec![0u8; ERR_LEN];
    // SAFETY: as in `fused_adamw`.
    let rc = unsafe { nsa_zero_grads(p.as_ptr(), p.len(), err.as_mut_ptr().cast(), ERR_LEN) };
    if rc != 0 {
        return Err(glue_error("nsa_zero_grads", &err));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// `(param, grad)` leaves on the CPU with their gradients set.
    fn params_with_grads(shapes: &[&[i64]]) -> Vec<Tensor> {
        shapes
            .iter()
            .map(|s| {
                let p = Tensor::randn(*s, (Kind::Float, Device::Cpu)).set_requires_grad(true);
                (&p * Tensor::randn(*s, (Kind::Float, Device::Cpu)))
                    .sum(Kind::Float)
                    .backward();
                p
            })
            .collect()
    }

    #[test]
    fn fused_adamw_follows_the_formula_with_clipping_and_decay() {
        let params = params_with_grads(&[&[3, 4], &[5], &[2, 2, 2]]);
        let m: Vec<Tensor> = params.iter().map(|p| p.randn_like() * 0.1).collect();
        let v: Vec<Tensor> = params.iter().map(|p| p.randn_like().abs() * 0.1).collect();
        let h = AdamWStep {
            step: 3,
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.95,
            weight_decay: 0.1,
            eps: 1e-8,
            grad_divisor: 2.0,
        };
        let f64s = |ts: &[Tensor]| -> Vec<Tensor> {
            ts.iter()
                .map(|t| t.detach().to_kind(Kind::Double))
                .collect()
        };
        let (p0, m0, v0) = (f64s(&params), f64s(&m), f64s(&v));
        let g0: Vec<Tensor> = params
            .iter()
            .map(|p| p.grad().to_kind(Kind::Double))
            .collect();
        tch::no_grad(|| fused_adamw(&params, &m, &v, h)).unwrap();
        let t = h.step as i32;
        let (bc1, bc2) = (1.0 - h.beta1.powi(t), 1.0 - h.beta2.powi(t));
        for i in 0..params.len() {
            let g = &g0[i] / h.grad_divisor;
            let want_m = &m0[i] * h.beta1 + &g * (1.0 - h.beta1);
            let want_v = &v0[i] * h.beta2 + g.square() * (1.0 - h.beta2);
            let decayed = &p0[i] * (1.0 - h.lr * h.weight_decay);
            let want_p = decayed - (&want_m / bc1) / ((&want_v / bc2).sqrt() + h.eps) * h.lr;
            let close = |got: &Tensor, want: &Tensor| {
                (got.to_kind(Kind::Double) - want)
                    .abs()
                    .max()
                    .double_value(&[])
                    < 1e-6
            };
            assert!(close(&m[i], &want_m), "m {i}");
            assert!(close(&v[i], &want_v), "v {i}");
            assert!(close(&params[i].detach(), &want_p), "param {i}");
            assert!(close(&params[i].grad(), &g), "grad {i} stored divided");
        }
    }

    #[test]
    fn norm_and_zero_cover_every_gradient() {
        let params = params_with_grads(&[&[3, 4], &[7]]);
        let want = params
            .iter()
            .map(|p| p.grad().square().sum(Kind::Float).double_value(&[]))
            .sum::<f64>()
            .sqrt();
        let got = grad_norm(&params).unwrap().double_value(&[]);
        assert!((got - want).abs() < 1e-5 * want, "{got} vs {want}");
        zero_grads(&params).unwrap();
        assert!(params
            .iter()
            .all(|p| p.grad().abs().max().double_value(&[]) == 0.0));
        let mismatch = fused_adamw(
            &params,
            &[],
            &[],
            AdamWStep {
                step: 1,
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.9,
                weight_decay: 0.0,
                eps: 1e-8,
                grad_divisor: 1.0,
            },
        );
        assert!(mismatch.unwrap_err().message.contains("2 parameters but 0"));
        let no_grad = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        let err = grad_norm(&[no_grad]).unwrap_err();
        assert!(err.message.contains("has no gradient"), "{err}");
    }
}
