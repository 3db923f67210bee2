// The decoder block's pointwise work outside attention, one kernel each way, over
// kernels/pointwise.cu and launched with the pointwise kernel table (NsaPointwiseTable) on
// libtorch's current CUDA stream: RMSNorm (RmsNormFused, nsa_rms_norm{,_bwd}_{IN}_{A}_{OUT}) and
// the MLP's SwiGLU (SwiGluFused, nsa_swiglu{,_bwd}_{T}).
//
// RmsNormFused (and AddRmsNormFused: the residual sum h + a, h's dtype, rounded once as
// libtorch's add, then its norm; returns both, and its backward adds the sum's own gradient
// to the norm's before writing dh and da):
//   x [..., D] (bf16 or fp32), w [D] (bf16 or fp32), eps -> y [..., D], contiguous, in the
//   dtype the next operator would compute in: CUDA autocast's (bf16 under the trainer) when
//   autocast is on and x is fp32, else x's. nsa-model's operator path computes the norm in fp32
//   and autocast then casts the result for the next matmul; here that cast is the kernel's
//   store, so neither the fp32 output nor the cast (nor its backward) exists.
//   Backward: dx in x's dtype and dw in w's, from x, w and the saved rstd [rows] (fp32). dw is
//   the sum over a fixed grid's partials [CTAs, D] (fp32): deterministic for a given device.
//
// SwiGluFused: ab [..., 2H] (bf16 or fp32; the gate projection's H columns, then the up
//   projection's) -> o [..., H] = silu(ab[..., :H]) * ab[..., H:], contiguous, in ab's dtype.
//   Backward: dab [..., 2H] in ab's dtype.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/custom_function.h>

#include "launch.h"
#include "pointwise_table.h"

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <tuple>

namespace {

using at::Tensor;
using nsa_glue::write_error;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kThreads = 256;         // NSA_POINTWISE_THREADS
constexpr int64_t kSharedFloats = 12288;  // 48 KB: the backward's [warps][D] dw slices

const NsaPointwiseTable* table_of(int64_t ptr) {
  return reinterpret_cast<const NsaPointwiseTable*>(ptr);
}

int is32(at::ScalarType t) { return t == at::kFloat ? 1 : 0; }

// The table index of nsa_rms_norm{,_bwd}_{IN}_{A}_{OUT}.
int kernel_index(at::ScalarType in, at::ScalarType a, at::ScalarType out) {
  return 4 * is32(in) + 2 * is32(a) + is32(out);
}

// The forward kernel over x2 [rows, D] (plus a2 into sum2 when a2 is defined): returns
// (y [rows, D] in `out`, rstd [rows]).
std::tuple<Tensor, Tensor> norm_forward(const NsaPointwiseTable* tab, const Tensor& x2,
                                        const Tensor& a2, const Tensor& sum2, const Tensor& w32,
                                        double eps, at::ScalarType out) {
  const int64_t rows = x2.size(0), D = x2.size(1);
  auto y = at::empty(x2.sizes(), x2.options().dtype(out));
  auto rstd = at::empty({rows}, x2.options().dtype(at::kFloat));
  if (rows > 0) {
    const void* xp = x2.data_ptr();
    const void* ap = a2.defined() ? a2.data_ptr() : nullptr;
    void* sp = a2.defined() ? sum2.data_ptr() : nullptr;
    const void* wp = w32.data_ptr();
    float e = float(eps);
    void* yp = y.data_ptr();
    void* rp = rstd.data_ptr();
    int d32 = int(D);
    long long n = rows;
    void* args[] = {&xp, &ap, &sp, &wp, &e, &yp, &rp, &d32, &n};
    const int64_t warps = kThreads / 32;
    const int64_t grid =
        std::min<int64_t>((rows + warps - 1) / warps, int64_t(tab->sm_count) * 16);
    const auto a_t = a2.defined() ? a2.scalar_type() : x2.scalar_type();
    c10::DeviceGuard guard(x2.device());
    nsa_glue::launch_kernel(tab->launch, tab->norm[kernel_index(x2.scalar_type(), a_t, out)],
                            "nsa_rms_norm", grid, 1, 1, kThreads, 0,
                            nsa_glue::current_stream(x2.device()), args);
  }
  return {y, rstd};
}

// The backward kernel: (dx [rows, D] in x2's dtype, plus dres when defined; da in `a_type`
// when `with_a`, else undefined; dw in `w_type`).
std::tuple<Tensor, Tensor, Tensor> norm_backward(const NsaPointwiseTable* tab, const Tensor& x2,
                                                 const Tensor& w32, const Tensor& rstd,
                                                 const Tensor& grad_y, const Tensor& grad_sum,
                                                 at::ScalarType out, bool with_a,
                                                 at::ScalarType a_type, at::ScalarType w_type) {
  const int64_t D = x2.size(1), rows = x2.size(0);
  const auto dy = grad_y.defined() ? grad_y.to(out).contiguous().view({-1, D})
                                   : at::zeros(x2.sizes(), x2.options().dtype(out));
  const auto dres = grad_sum.defined() ? grad_sum.to(x2.scalar_type()).contiguous().view({-1, D})
                                       : Tensor();
  auto dx = at::empty(x2.sizes(), x2.options());
  auto da = with_a ? at::empty(x2.sizes(), x2.options().dtype(a_type)) : Tensor();
  const int64_t warps = std::min<int64_t>(kThreads / 32, kSharedFloats / D);
  // A grid fixed by (rows, D, the device's SM count), so dw's partials sum in a fixed order.
  const int64_t grid = std::max<int64_t>(
      1, std::min<int64_t>((rows + warps - 1) / warps, int64_t(tab->sm_count) * 8));
  auto dw_part = at::empty({grid, D}, x2.options().dtype(at::kFloat));
  const void* xp = x2.data_ptr();
  const void* wp = w32.data_ptr();
  const void* rp = rstd.data_ptr();
  const void* gp = dy.data_ptr();
  const void* resp = dres.defined() ? dres.data_ptr() : nullptr;
  void* dxp = dx.data_ptr();
  void* dap = with_a ? da.data_ptr() : nullptr;
  void* pp = dw_part.data_ptr();
  int d32 = int(D);
  long long n = rows;
  void* args[] = {&xp, &wp, &rp, &gp, &resp, &dxp, &dap, &pp, &d32, &n};
  const auto a_t = with_a ? a_type : x2.scalar_type();
  c10::DeviceGuard guard(x2.device());
  nsa_glue::launch_kernel(tab->launch, tab->norm_bwd[kernel_index(x2.scalar_type(), a_t, out)],
                          "nsa_rms_norm_bwd", grid, 1, 1, warps * 32, warps * D * 4,
                          nsa_glue::current_stream(x2.device()), args);
  return {dx, da, dw_part.sum(0).to(w_type)};
}

struct RmsNormFused : public torch::autograd::Function<RmsNormFused> {
  static Tensor forward(AutogradContext* ctx, Tensor x, Tensor w, double eps, int64_t out_type,
                        int64_t table) {
    const int64_t D = x.size(-1);
    const auto x2 = x.contiguous().view({-1, D});
    const auto w32 = w.to(at::kFloat).contiguous();
    const auto out = static_cast<at::ScalarType>(out_type);
    auto [y, rstd] = norm_forward(table_of(table), x2, Tensor(), Tensor(), w32, eps, out);
    ctx->save_for_backward({x2, w32, rstd});
    ctx->saved_data["table"] = table;
    ctx->saved_data["out"] = out_type;
    ctx->saved_data["w_type"] = static_cast<int64_t>(w.scalar_type());
    return y.view(x.sizes());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto out = static_cast<at::ScalarType>(ctx->saved_data["out"].toInt());
    const auto w_type = static_cast<at::ScalarType>(ctx->saved_data["w_type"].toInt());
    auto [dx, da, dw] = norm_backward(table_of(ctx->saved_data["table"].toInt()), s[0], s[1],
                                      s[2], grads[0], Tensor(), out, false, out, w_type);
    return {dx.view(grads[0].sizes()), dw, Tensor(), Tensor(), Tensor()};
  }
};

// The residual sum h + a and its RMSNorm in one pass: {sum (h's dtype), y}.
struct AddRmsNormFused : public torch::autograd::Function<AddRmsNormFused> {
  static variable_list forward(AutogradContext* ctx, Tensor h, Tensor a, Tensor w, double eps,
                               int64_t out_type, int64_t table) {
    const int64_t D = h.size(-1);
    const auto h2 = h.contiguous().view({-1, D});
    const auto a2 = a.contiguous().view({-1, D});
    const auto w32 = w.to(at::kFloat).contiguous();
    const auto out = static_cast<at::ScalarType>(out_type);
    auto sum2 = at::empty(h2.sizes(), h2.options());
    auto [y, rstd] = norm_forward(table_of(table), h2, a2, sum2, w32, eps, out);
    ctx->save_for_backward({sum2, w32, rstd});
    ctx->saved_data["table"] = table;
    ctx->saved_data["out"] = out_type;
    ctx->saved_data["w_type"] = static_cast<int64_t>(w.scalar_type());
    ctx->saved_data["a_type"] = static_cast<int64_t>(a.scalar_type());
    return {sum2.view(h.sizes()), y.view(h.sizes())};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto out = static_cast<at::ScalarType>(ctx->saved_data["out"].toInt());
    const auto w_type = static_cast<at::ScalarType>(ctx->saved_data["w_type"].toInt());
    const auto a_type = static_cast<at::ScalarType>(ctx->saved_data["a_type"].toInt());
    auto [dh, da, dw] = norm_backward(table_of(ctx->saved_data["table"].toInt()), s[0], s[1],
                                      s[2], grads[1], grads[0], out, true, a_type, w_type);
    const auto sizes = grads[0].defined() ? grads[0].sizes() : grads[1].sizes();
    return {dh.view(sizes), da.view(sizes), dw, Tensor(), Tensor(), Tensor()};
  }
};

// The dtype of a norm's result: autocast's when CUDA autocast is on and x is fp32, else x's.
at::ScalarType norm_out_type(at::ScalarType xt) {
  auto out = xt;
  if (xt == at::kFloat && at::autocast::is_autocast_enabled(at::kCUDA)) {
    out = at::autocast::get_autocast_dtype(at::kCUDA);
  }
  TORCH_CHECK(out == at::kFloat || out == at::kBFloat16,
              "fused rms norm: autocast's dtype must be bf16 (got ", out, ")");
  return out;
}

int fp32(const Tensor& t) { return t.scalar_type() == at::kFloat ? 1 : 0; }

// Elementwise grid: enough CTAs to fill the device a few times over, never more than needed.
int64_t grid_for(const NsaPointwiseTable* tab, int64_t work) {
  return std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads,
                                                int64_t(tab->sm_count) * 16));
}

// 1 when every row of a [rows, 2H] / [rows, H] pair starts 16-byte aligned and H is a whole
// number of 16-byte vectors: the kernels then move 16 bytes per thread.
int vec_ok(const Tensor& t, int64_t H, std::initializer_list<const Tensor*> others) {
  const int64_t w = 16 / t.element_size();
  if (H % w != 0) return 0;
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return 0;
  for (const Tensor* o : others) {
    if (reinterpret_cast<uintptr_t>(o->data_ptr()) % 16 != 0) return 0;
  }
  return 1;
}

struct SwiGluFused : public torch::autograd::Function<SwiGluFused> {
  static Tensor forward(AutogradContext* ctx, Tensor ab, int64_t table) {
    const auto* tab = table_of(table);
    const int64_t two_h = ab.size(-1), H = two_h / 2;
    const auto ab2 = ab.contiguous().view({-1, two_h});
    const int64_t rows = ab2.size(0);
    auto out_sizes = ab.sizes().vec();
    out_sizes.back() = H;
    auto o = at::empty(out_sizes, ab.options());
    int vec = vec_ok(ab2, H, {&o});
    const int64_t work = rows * (vec ? H / (16 / ab2.element_size()) : H);
    if (work > 0) {
      const void* ap = ab2.data_ptr();
      void* op = o.data_ptr();
      int h32 = int(H);
      long long n = rows;
      void* args[] = {&ap, &op, &h32, &n, &vec};
      c10::DeviceGuard guard(ab.device());
      nsa_glue::launch_kernel(tab->launch, tab->swiglu[fp32(ab2)], "nsa_swiglu",
                              grid_for(tab, work), 1, 1, kThreads, 0,
                              nsa_glue::current_stream(ab.device()), args);
    }
    ctx->save_for_backward({ab2});
    ctx->saved_data["table"] = table;
    ctx->saved_data["sizes"] = ab.sizes().vec();
    return o;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto& ab2 = s[0];
    const auto* tab = table_of(ctx->saved_data["table"].toInt());
    const int64_t two_h = ab2.size(1), H = two_h / 2, rows = ab2.size(0);
    const auto dout = grads[0].to(ab2.scalar_type()).contiguous();
    auto dab = at::empty(ab2.sizes(), ab2.options());
    int vec = vec_ok(ab2, H, {&dout, &dab});
    const int64_t work = rows * (vec ? H / (16 / ab2.element_size()) : H);
    if (work > 0) {
      const void* ap = ab2.data_ptr();
      const void* gp = dout.data_ptr();
      void* dp = dab.data_ptr();
      int h32 = int(H);
      long long n = rows;
      void* args[] = {&ap, &gp, &dp, &h32, &n, &vec};
      c10::DeviceGuard guard(ab2.device());
      nsa_glue::launch_kernel(tab->launch, tab->swiglu_bwd[fp32(ab2)], "nsa_swiglu_bwd",
                              grid_for(tab, work), 1, 1, kThreads, 0,
                              nsa_glue::current_stream(ab2.device()), args);
    }
    return {dab.view(ctx->saved_data["sizes"].toIntVector()), Tensor()};
  }
};

}  // namespace

extern "C" {

// RMSNorm of x's rows by w (checked by the Rust caller, repeated here): a new at::Tensor*
// (ownership to the caller), or nullptr with a message in err.
// With a (not null): the residual sum x + a (into *sum_out, x's dtype) and its norm.
at::Tensor* nsa_fused_rms_norm(const at::Tensor* x, const at::Tensor* a, const at::Tensor* w,
                               double eps, at::Tensor** sum_out, const NsaPointwiseTable* table,
                               char* err, size_t err_len) {
  try {
    TORCH_CHECK(table != nullptr, "fused rms norm: no kernel table");
    const auto xt = x->scalar_type(), wt = w->scalar_type();
    TORCH_CHECK(xt == at::kFloat || xt == at::kBFloat16, "fused rms norm: x must be bf16 or fp32");
    TORCH_CHECK(wt == at::kFloat || wt == at::kBFloat16, "fused rms norm: w must be bf16 or fp32");
    TORCH_CHECK(x->is_cuda() && w->device() == x->device() && x->dim() >= 1 && w->dim() == 1 &&
                    w->size(0) == x->size(-1),
                "fused rms norm: x [..., D] and w [D] on one CUDA device");
    TORCH_CHECK(x->size(-1) > 0 && x->size(-1) <= kSharedFloats,
                "fused rms norm: D must lie in 1..=", kSharedFloats);
    if (a == nullptr) {
      auto y = RmsNormFused::apply(*x, *w, eps, static_cast<int64_t>(norm_out_type(xt)),
                                   reinterpret_cast<int64_t>(table));
      return new at::Tensor(std::move(y));
    }
    const auto a_t = a->scalar_type();
    TORCH_CHECK(a_t == at::kFloat || a_t == at::kBFloat16, "fused rms norm: a must be bf16 or fp32");
    TORCH_CHECK(a->device() == x->device() && a->sizes() == x->sizes(),
                "fused rms norm: a must have x's shape and device");
    auto outs = AddRmsNormFused::apply(*x, *a, *w, eps, static_cast<int64_t>(norm_out_type(xt)),
                                       reinterpret_cast<int64_t>(table));
    *sum_out = new at::Tensor(std::move(outs[0]));
    return new at::Tensor(std::move(outs[1]));
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
    return nullptr;
  }
}

// SwiGLU of a stacked gate / up projection ab [..., 2H] (checked by the Rust caller, repeated
// here): a new at::Tensor* (ownership to the caller), or nullptr with a message in err.
at::Tensor* nsa_fused_swiglu(const at::Tensor* ab, const NsaPointwiseTable* table, char* err,
                             size_t err_len) {
  try {
    TORCH_CHECK(table != nullptr, "fused swiglu: no kernel table");
    const auto t = ab->scalar_type();
    TORCH_CHECK(t == at::kFloat || t == at::kBFloat16, "fused swiglu: ab must be bf16 or fp32");
    TORCH_CHECK(ab->is_cuda() && ab->dim() >= 1 && ab->size(-1) % 2 == 0 &&
                    ab->size(-1) / 2 < (int64_t(1) << 31),
                "fused swiglu: ab must be a CUDA [..., 2H] tensor");
    auto o = SwiGluFused::apply(*ab, reinterpret_cast<int64_t>(table));
    return new at::Tensor(std::move(o));
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
    return nullptr;
  }
}

}  // extern "C"
