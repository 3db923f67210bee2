// Linear + cross-entropy in one autograd function, chunk by chunk over the rows: the language
// model's output head and its loss without the [N, V] logits.
//
// Computes mean over the scored rows (target != ignore) of
//   logsumexp(h_i · W^T) − (h_i · W^T)[target_i]
// for h [N, D] and W [V, D]. The plain path (logits = h · W^T, then cross-entropy in float32)
// holds the float32 logits [N, V], their log-softmax for backward and the gradient of each:
// 6.6 GB apiece for 32,768 tokens over a 50,304-token vocabulary. Here each chunk of rows makes
// its logits, log-sum-exp, loss and the gradient of its logits, and multiplies that gradient
// into dh (its rows) and dW (summed over chunks in float32) at once. Since the loss ends the
// graph, its gradient with respect to h and W is known in forward; backward scales the saved
// dh and dW by the incoming gradient of the loss. Peak extra memory: one chunk's logits in the
// matmul dtype (and, on the CPU path, in float32), plus dh and a float32 dW.
//
// Arithmetic: matmuls in `compute` (bfloat16 under the trainer's bf16 autocast, else float32),
// logits, log-sum-exp and the logits' gradient in float32, the gradient rounded to `compute`
// for its two matmuls, dW accumulated in float32. The count of scored rows stays on the device
// (no host synchronisation); no scored row gives NaN, as libtorch's cross-entropy does.
//
// On CUDA (a kernel table given) one kernel per chunk, nsa_ce_rows (kernels/pointwise.cu),
// reads the chunk's logits in `compute` and writes each row's loss and, over the logits, their
// gradient: one pass over memory for what libtorch's operators do in about ten (cast to fp32,
// logsumexp, exp, one-hot, scale, cast back). Elsewhere (CPU) those operators, with the same
// arithmetic.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "launch.h"
#include "pointwise_table.h"

#include <algorithm>

namespace {

using at::Tensor;
using nsa_glue::write_error;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// nsa_ce_rows over logits [rows, V] (contiguous, bf16 or fp32, overwritten by their
// gradient, which is returned): adds the chunk's summed row losses to `loss`.
Tensor kernel_rows(const NsaPointwiseTable* tab, Tensor logits, const Tensor& ts, int64_t ignore,
                   const Tensor& inv, Tensor& loss) {
  const int64_t rows = logits.size(0);
  TORCH_CHECK(logits.size(1) < (int64_t(1) << 31), "linear cross-entropy: V must fit i32");
  auto row_loss = at::empty({rows}, logits.options().dtype(at::kFloat));
  void* zp = logits.data_ptr();
  const void* tp = ts.data_ptr();
  long long ig = ignore;
  const void* ip = inv.data_ptr();
  void* lp = row_loss.data_ptr();
  int v = int(logits.size(1));
  void* args[] = {&zp, &tp, &ig, &ip, &lp, &v};
  const int fp32 = logits.scalar_type() == at::kFloat ? 1 : 0;
  c10::DeviceGuard guard(logits.device());
  nsa_glue::launch_kernel(tab->launch, tab->ce_rows[fp32], "nsa_ce_rows", rows, 1, 1,
                          /*threads=*/256, 0, nsa_glue::current_stream(logits.device()), args);
  loss.add_(row_loss.sum());
  return logits;
}

// The same with libtorch's operators (the CPU), logits in float32: returns the gradient in
// `compute`.
Tensor operator_rows(const Tensor& raw, const Tensor& ts, const Tensor& keep, const Tensor& inv,
                     Tensor& loss, at::ScalarType compute) {
  const int64_t rows = raw.size(0);
  // Ignored rows point at class 0; their loss and gradient are multiplied by 0.
  const auto index = ts.masked_fill(keep.logical_not(), 0).unsqueeze(1);
  auto logits = raw.to(at::kFloat);  // [rows, V]
  const auto lse = logits.logsumexp(1, /*keepdim=*/true);
  const auto picked = logits.gather(1, index);
  const auto weight = keep.to(at::kFloat).unsqueeze(1);
  loss.add_(((lse - picked) * weight).sum());
  // d loss / d logits = (softmax − one-hot) · weight / count, in the logits' buffer. The
  // one-hot goes in by index_put_ (one element per row), which libtorch's deterministic mode
  // accepts; scatter_add_ on a 2-D CUDA tensor it refuses.
  logits.sub_(lse).exp_();
  const auto at_target = (picked - lse).exp_().squeeze(1);  // the softmax at the target
  logits.index_put_({at::arange(rows, index.options()), index.squeeze(1)}, at_target - 1.0);
  logits.mul_(weight * inv);
  return logits.to(compute);
}

struct LinearCrossEntropy : public torch::autograd::Function<LinearCrossEntropy> {
  static Tensor forward(AutogradContext* ctx, Tensor h, Tensor w, Tensor target, int64_t ignore,
                        int64_t chunk, bool bf16, int64_t table) {
    const auto compute = bf16 ? at::kBFloat16 : at::kFloat;
    const auto hc = h.to(compute).contiguous();
    const auto wc = w.to(compute);
    target = target.contiguous();
    const auto* tab = reinterpret_cast<const NsaPointwiseTable*>(table);
    const bool kernel = tab != nullptr && h.is_cuda();
    const int64_t n = h.size(0);
    const auto scored = target.ne(ignore);
    // 1 / (number of scored rows): inf when there is none, so the loss is NaN (0 · inf).
    const auto inv = scored.sum().to(at::kFloat).reciprocal();
    auto dh = at::empty(h.sizes(), h.options().dtype(compute));
    auto dw = at::zeros(w.sizes(), w.options().dtype(at::kFloat));
    auto loss = at::zeros({}, h.options().dtype(at::kFloat));
    for (int64_t start = 0; start < n; start += chunk) {
      const int64_t rows = std::min(chunk, n - start);
      const auto hs = hc.narrow(0, start, rows);
      const auto ts = target.narrow(0, start, rows);
      // The gradient of the loss with respect to this chunk's logits, in `compute`.
      const auto g = kernel ? kernel_rows(tab, at::mm(hs, wc.t()), ts, ignore, inv, loss)
                            : operator_rows(at::mm(hs, wc.t()), ts, scored.narrow(0, start, rows),
                                            inv, loss, compute);
      auto dh_rows = dh.narrow(0, start, rows);
      at::mm_out(dh_rows, g, wc);
      dw.add_(at::mm(g.t(), hs));
    }
    loss.mul_(inv);
    ctx->save_for_backward({dh, dw});
    ctx->saved_data["h_type"] = static_cast<int64_t>(h.scalar_type());
    ctx->saved_data["w_type"] = static_cast<int64_t>(w.scalar_type());
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto g = grads[0].to(at::kFloat);
    const auto h_type = static_cast<at::ScalarType>(ctx->saved_data["h_type"].toInt());
    const auto w_type = static_cast<at::ScalarType>(ctx->saved_data["w_type"].toInt());
    auto dh = (saved[0].to(at::kFloat) * g).to(h_type);
    auto dw = (saved[1] * g).to(w_type);
    return {dh, dw, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

}  // namespace

extern "C" {

// The mean cross-entropy of h · W^T against target over the rows whose target is not `ignore`
// (shapes and dtypes checked by the Rust caller, repeated here): a new at::Tensor* (a float32
// scalar; ownership to the caller), or nullptr with a message in err.
// `table`: the pointwise kernels of h's device (NsaPointwiseTable), or nullptr for libtorch's
// operators.
at::Tensor* nsa_linear_cross_entropy(const at::Tensor* h, const at::Tensor* w,
                                     const at::Tensor* target, int64_t ignore, int64_t chunk,
                                     int bf16, const void* table, char* err, size_t err_len) {
  try {
    TORCH_CHECK(chunk > 0, "linear cross-entropy: chunk must be positive");
    TORCH_CHECK(h->dim() == 2 && w->dim() == 2 && h->size(1) == w->size(1),
                "linear cross-entropy: h [N, D] and w [V, D] expected");
    TORCH_CHECK(target->dim() == 1 && target->size(0) == h->size(0) &&
                    target->scalar_type() == at::kLong,
                "linear cross-entropy: target must be int64 [N]");
    auto loss = LinearCrossEntropy::apply(*h, *w, *target, ignore, chunk, bf16 != 0,
                                          reinterpret_cast<int64_t>(table));
    return new at::Tensor(std::move(loss));
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
    return nullptr;
  }
}

}  // extern "C"
