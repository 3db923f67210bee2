// libtorch's multi-tensor optimizer kernels, which tch does not bind: one AdamW step over a
// list of parameters (at::_fused_adamw_), the global gradient norm (at::_foreach_norm) and
// zeroing the gradients (at::_foreach_zero_). On CUDA each is a few launches for the whole
// list where per-tensor operators take one launch per operator and tensor; libtorch also has
// CPU implementations of all three. Every entry point catches C++ exceptions and reports them
// through the error buffer (launch.h).
#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "launch.h"

namespace {

std::vector<at::Tensor> list(const at::Tensor* const* ts, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.push_back(*ts[i]);
  return out;
}

std::vector<at::Tensor> grads_of(const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> out;
  out.reserve(params.size());
  for (const auto& p : params) {
    TORCH_CHECK(p.grad().defined(), "a parameter has no gradient");
    out.push_back(p.grad());
  }
  return out;
}

}  // namespace

extern "C" {

// One AdamW step (decoupled weight decay) over params[0..n) with their .grad, first and second
// moments m, v: the gradient is divided by grad_divisor first (and stored back so divided),
// bias corrections use `step` (the step being taken, 1 for the first). Returns 0, or -1 with
// a message in err.
int nsa_fused_adamw(const at::Tensor* const* params, const at::Tensor* const* m,
                    const at::Tensor* const* v, size_t n, double step, double lr, double beta1,
                    double beta2, double weight_decay, double eps, double grad_divisor, char* err,
                    size_t err_len) {
  try {
    if (n == 0) return 0;
    auto ps = list(params, n), ms = list(m, n), vs = list(v, n);
    auto gs = grads_of(ps);
    auto opts = ps[0].options().dtype(at::kFloat);
    // The kernel reads each tensor's step count and never writes it: one tensor serves all.
    std::vector<at::Tensor> steps(n, at::full({}, step, opts));
    std::optional<at::Tensor> scale;
    if (grad_divisor != 1.0) scale = at::full({}, grad_divisor, opts);
    at::_fused_adamw_(ps, gs, ms, vs, /*max_exp_avg_sqs=*/{}, steps, lr, beta1, beta2,
                      weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false, scale,
                      /*found_inf=*/std::nullopt);
    return 0;
  } catch (const std::exception& e) {
    nsa_glue::write_error(e.what(), err, err_len);
    return -1;
  }
}

// The L2 norm of all the gradients of params[0..n) together, as a new fp32 0-dim tensor on
// their device (NaN and infinity propagate). Returns nullptr with a message in err on failure.
at::Tensor* nsa_grad_norm(const at::Tensor* const* params, size_t n, char* err, size_t err_len) {
  try {
    TORCH_CHECK(n > 0, "no parameters");
    auto gs = grads_of(list(params, n));
    auto norms = at::_foreach_norm(gs, 2, at::kFloat);
    return new at::Tensor(at::stack(norms).square().sum().sqrt());
  } catch (const std::exception& e) {
    nsa_glue::write_error(e.what(), err, err_len);
    return nullptr;
  }
}

// Zeroes the defined gradients of params[0..n). Returns 0, or -1 with a message in err.
int nsa_zero_grads(const at::Tensor* const* params, size_t n, char* err, size_t err_len) {
  try {
    std::vector<at::Tensor> gs;
    for (size_t i = 0; i < n; ++i) {
      if (params[i]->grad().defined()) gs.push_back(params[i]->grad());
    }
    if (!gs.empty()) at::_foreach_zero_(gs);
    return 0;
  } catch (const std::exception& e) {
    nsa_glue::write_error(e.what(), err, err_len);
    return -1;
  }
}

}  // extern "C"
