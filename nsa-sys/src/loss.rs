//! The output head and its loss in one autograd function (`glue/loss.cpp`): the mean
//! cross-entropy of `h · Wᵀ` against the targets, chunk by chunk over the rows, so the
//! `[N, V]` logits (6.6 GB in float32 for 32,768 tokens over 50,304 ids, and as much again for
//! their log-softmax and each gradient) never exist. Its gradients with respect to `h` and `W`
//! are computed in forward (the loss ends the graph) and scaled in backward. On CUDA each chunk's
//! loss and logit gradient are one kernel (`nsa_ce_rows`, `kernels/pointwise.cu`); elsewhere
//! libtorch's operators do the same arithmetic.
use std::os::raw::c_char;

use tch::{Kind, Tensor};
use torch_sys::C_tensor;

use crate::autograd::{finish, GlueError, ERR_LEN};

extern "C" {
    fn nsa_linear_cross_entropy(
        h: *const C_tensor,
        w: *const C_tensor,
        target: *const C_tensor,
        ignore: i64,
        chunk: i64,
        bf16: i32,
        table: *const std::ffi::c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut C_tensor;
}

/// Why [`linear_cross_entropy`] refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum LossError {
    /// A tensor or option that does not fit (shape, dtype, device, chunk).
    #[error("linear cross-entropy: {0}")]
    Input(String),
    /// libtorch raised inside the glue (out of memory, a target out of range, …).
    #[error(transparent)]
    Glue(#[from] GlueError),
    /// The CUDA kernel could not be compiled or loaded.
    #[error(transparent)]
    Kernels(#[from] crate::fused::FusedError),
}

/// The mean over the rows with `target[i] != ignore` of `logsumexp(h[i] · Wᵀ) − (h[i] · Wᵀ)[target[i]]`:
/// a float32 scalar, differentiable with respect to `h` and `w` (first order). NaN when no row
/// is scored, as libtorch's cross-entropy gives.
///
/// `h`: `[N, D]`, float32 or bfloat16; `w`: `[V, D]`, float32 or bfloat16, on `h`'s device;
/// `target`: int64 `[N]` on the same device, each scored target in `0..V` (not checked on the
/// host: that would synchronise; an id out of range is libtorch's error on the CPU and makes
/// the loss NaN on CUDA). `chunk`: rows per chunk (its logits, `chunk · V` in the matmul dtype
/// plus a float32 copy on the CPU, are the largest temporary). `bf16`: run the matmuls in
/// bfloat16 (the trainer's bf16 autocast), else float32.
pub fn linear_cross_entropy(
    h: &Tensor,
    w: &Tensor,
    target: &Tensor,
    ignore: i64,
    chunk: i64,
    bf16: bool,
) -> Result<Tensor, LossError> {
    let bad = |m: String| Err(LossError::Input(m));
    let (hs, ws, ts) = (h.size(), w.size(), target.size());
    if hs.len() != 2 || ws.len() != 2 || hs[1] != ws[1] {
        return bad(format!(
            "h [N, D] and w [V, D] expected, got {hs:?} and {ws:?}"
        ));
    }
    if ts.len() != 1 || ts[0] != hs[0] {
        return bad(format!("target must be [N = {}], got {ts:?}", hs[0]));
    }
    let float = |k: Kind| matches!(k, Kind::Float | Kind::BFloat16);
    if !float(h.kind()) || !float(w.kind()) {
        return bad(format!(
            "h and w must be float32 or bfloat16, got {:?} and {:?}",
            h.kind(),
            w.kind()
        ));
    }
    if target.kind() != Kind::Int64 {
        return bad(format!("target must be int64, got {:?}", target.kind()));
    }
    if w.device() != h.device() || target.device() != h.device() {
        return bad(format!(
            "h, w and target must share a device, got {:?}, {:?} and {:?}",
            h.device(),
            w.device(),
            target.device()
        ));
    }
    if chunk <= 0 {
        return bad(format!("chunk must be positive, got {chunk}"));
    }
    let table = match h.device() {
        tch::Device::Cuda(ordinal) => crate::fused::pointwise_kernels(ordinal)?.table_ptr(),
        _ => std::ptr::null(),
    };
    let mut err = vec![0u8; ERR_LEN];
    // SAFETY: all tensor pointers come from live tch tensors borrowed for the call; the table
    // (or null) lives as long as the process; the glue writes at most ERR_LEN bytes
    // (NUL-terminated) into `err` and catches every exception.
    let ptr = unsafe {
        nsa_linear_cross_entropy(
            h.as_ptr(),
            w.as_ptr(),
            target.as_ptr(),
            ignore,
            chunk,
            i32::from(bf16),
            table,
            err.as_mut_ptr().cast(),
            ERR_LEN,
        )
    };
    Ok(finish("nsa_linear_cross_entropy", ptr, &err)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Reduction};

    /// The plain path: float32 logits, then libtorch's cross-entropy.
    fn reference(h: &Tensor, w: &Tensor, target: &Tensor, ignore: i64, bf16: bool) -> Tensor {
        let logits = if bf16 {
            h.to_kind(Kind::BFloat16)
                .matmul(&w.to_kind(Kind::BFloat16).tr())
                .to_kind(Kind::Float)
        } else {
            h.matmul(&w.tr())
        };
        logits.cross_entropy_loss::<Tensor>(target, None, Reduction::Mean, ignore, 0.0)
    }

    fn rel(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a - b).abs().max().double_value(&[]);
        d / b.abs().max().double_value(&[]).max(1e-12)
    }

    /// Loss and both gradients against the plain path on fresh random inputs: float32 and
    /// bfloat16 matmuls, chunks that do not divide N, one chunk, and ignored rows.
    #[test]
    fn equals_the_plain_path() {
        let dev = Device::Cpu;
        let ignore = -100;
        for (n, d, v, chunk, bf16, tol) in [
            (37, 16, 50, 8, false, 1e-5),
            (37, 16, 50, 64, false, 1e-5),
            (64, 32, 300, 7, false, 1e-5),
            (64, 32, 300, 16, true, 2e-2),
        ] {
            let h0 = Tensor::randn([n, d], (Kind::Float, dev));
            let w0 = Tensor::randn([v, d], (Kind::Float, dev)) * 0.3;
            let mut target = Tensor::randint(v, [n], (Kind::Int64, dev));
            // About a third of the rows are not scored.
            let skip = Tensor::rand([n], (Kind::Float, dev)).lt(0.33);
            target = target.masked_fill(&skip, ignore);
            let grads = |fused: bool| {
                let h = h0.copy().set_requires_grad(true);
                let w = w0.copy().set_requires_grad(true);
                let loss = if fused {
                    linear_cross_entropy(&h, &w, &target, ignore, chunk, bf16).unwrap()
                } else {
                    reference(&h, &w, &target, ignore, bf16)
                };
                loss.backward();
                (loss.detach(), h.grad(), w.grad())
            };
            let (l0, dh0, dw0) = grads(false);
            let (l1, dh1, dw1) = grads(true);
            let case = format!("n {n} d {d} v {v} chunk {chunk} bf16 {bf16}");
            assert_eq!(l1.kind(), Kind::Float, "{case}");
            assert!(rel(&l1, &l0) < tol, "{case}: loss {l1} vs {l0}");
            assert!(rel(&dh1, &dh0) < tol, "{case}: dh {}", rel(&dh1, &dh0));
            assert!(rel(&dw1, &dw0) < tol, "{case}: dw {}", rel(&dw1, &dw0));
            assert_eq!(dh1.kind(), Kind::Float, "{case}: dh in h's kind");
        }
    }

    #[test]
    fn no_scored_row_is_nan_as_in_libtorch() {
        let h = Tensor::randn([5, 4], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([7, 4], (Kind::Float, Device::Cpu));
        let target = Tensor::full([5], -1, (Kind::Int64, Device::Cpu));
        let fused = linear_cross_entropy(&h, &w, &target, -1, 2, false).unwrap();
        assert!(fused.double_value(&[]).is_nan());
        assert!(reference(&h, &w, &target, -1, false)
            .double_value(&[])
            .is_nan());
    }

    #[test]
    fn bad_input_is_an_input_error() {
        let f = (Kind::Float, Device::Cpu);
        let h = Tensor::zeros([4, 3], f);
        let w = Tensor::zeros([5, 3], f);
        let t = Tensor::zeros([4], (Kind::Int64, Device::Cpu));
        for (got, what) in [
            (
                linear_cross_entropy(&h, &Tensor::zeros([5, 2], f), &t, -1, 2, false),
                "[V, D]",
            ),
            (
                linear_cross_entropy(
                    &h,
                    &w,
                    &Tensor::zeros([3], (Kind::Int64, Device::Cpu)),
                    -1,
                    2,
                    false,
                ),
                "target must be [N",
            ),
            (
                linear_cross_entropy(&h, &w, &t.to_kind(Kind::Int), -1, 2, false),
                "int64",
            ),
            (
                linear_cross_entropy(&h.to_kind(Kind::Half), &w, &t, -1, 2, false),
                "float32 or bfloat16",
            ),
            (linear_cross_entropy(&h, &w, &t, -1, 0, false), "chunk"),
        ] {
            match got {
                Err(LossError::Input(m)) => assert!(m.contains(what), "{m}"),
                other => panic!("{what}: {other:?}"),
            }
        }
    }
}
