// The decoder block's pointwise work outside attention, one kernel each way, over
// kernels/pointwise.cu and launched with the pointwise kernel table (NsaPointwiseTable) on
// libtorch's current CUDA stream: RMSNorm (RmsNormFused, nsa_rms_norm{,_bwd}_{IN}_{OUT}) and
// the MLP's SwiGLU (SwiGluFused, nsa_swiglu{,_bwd}_{T}).
//
// RmsNormFused:
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

int kernel_index(at::ScalarType in, at::ScalarType out) {
  return 2 * (in == at::kFloat ? 1 : 0) + (out == at::kFloat ? 1 : 0);
}

struct RmsNormFused : public torch::autograd::Function<RmsNormFused> {
  static Tensor forward(AutogradContext* ctx, Tensor x, Tensor w, double eps, int64_t out_type,
                        int64_t table) {
    const auto* tab = table_of(table);
    const int64_t D = x.size(-1);
    const auto x2 = x.contiguous().view({-1, D});
    const auto w32 = w.to(at::kFloat).contiguous();
    const int64_t rows = x2.size(0);
    const auto out = static_cast<at::ScalarType>(out_type);
    auto y = at::empty(x.sizes(), x.options().dtype(out));
    auto rstd = at::empty({rows}, x.options().dtype(at::kFloat));
    if (rows > 0) {
      const void* xp = x2.data_ptr();
      const void* wp = w32.data_ptr();
      float e = float(eps);
      void* yp = y.data_ptr();
      void* rp = rstd.data_ptr();
      int d32 = int(D);
      long long n = rows;
      void* args[] = {&xp, &wp, &e, &yp, &rp, &d32, &n};
      const int64_t warps = kThreads / 32;
      const int64_t grid = std::min<int64_t>((rows + warps - 1) / warps, int64_t(tab->sm_count) * 16);
      c10::DeviceGuard guard(x.device());
      nsa_glue::launch_kernel(tab->launch, tab->norm[kernel_index(x.scalar_type(), out)],
                              "nsa_rms_norm", grid, 1, 1, kThreads, 0,
                              nsa_glue::current_stream(x.device()), args);
    }
    ctx->save_for_backward({x2, w32, rstd});
    ctx->saved_data["table"] = table;
    ctx->saved_data["out"] = out_type;
    ctx->saved_data["w_type"] = static_cast<int64_t>(w.scalar_type());
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto& x2 = s[0];
    const auto& w32 = s[1];
    const auto& rstd = s[2];
    const auto* tab = table_of(ctx->saved_data["table"].toInt());
    const auto out = static_cast<at::ScalarType>(ctx->saved_data["out"].toInt());
    const auto w_type = static_cast<at::ScalarType>(ctx->saved_data["w_type"].toInt());
    const int64_t D = x2.size(1), rows = x2.size(0);
    const auto dy = grads[0].to(out).contiguous();
    auto dx = at::empty(x2.sizes(), x2.options());
    const int64_t warps = std::min<int64_t>(kThreads / 32, kSharedFloats / D);
    // A grid fixed by (rows, D, the device's SM count), so dw's partials sum in a fixed order.
    const int64_t grid =
        std::max<int64_t>(1, std::min<int64_t>((rows + warps - 1) / warps, int64_t(tab->sm_count) * 8));
    auto dw_part = at::empty({grid, D}, x2.options().dtype(at::kFloat));
    const void* xp = x2.data_ptr();
    const void* wp = w32.data_ptr();
    const void* rp = rstd.data_ptr();
    const void* gp = dy.data_ptr();
    void* dxp = dx.data_ptr();
    void* pp = dw_part.data_ptr();
    int d32 = int(D);
    long long n = rows;
    void* args[] = {&xp, &wp, &rp, &gp, &dxp, &pp, &d32, &n};
    c10::DeviceGuard guard(x2.device());
    nsa_glue::launch_kernel(tab->launch, tab->norm_bwd[kernel_index(x2.scalar_type(), out)],
                            "nsa_rms_norm_bwd", grid, 1, 1, warps * 32, warps * D * 4,
                            nsa_glue::current_stream(x2.device()), args);
    auto dw = dw_part.sum(0).to(w_type);
    return {dx.view(grads[0].sizes()), dw, Tensor(), Tensor(), Tensor()};
  }
};

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
at::Tensor* nsa_fused_rms_norm(const at::Tensor* x, const at::Tensor* w, double eps,
                               const NsaPointwiseTable* table, char* err, size_t err_len) {
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
    auto out = xt;
    if (xt == at::kFloat && at::autocast::is_autocast_enabled(at::kCUDA)) {
      out = at::autocast::get_autocast_dtype(at::kCUDA);
    }
    TORCH_CHECK(out == at::kFloat || out == at::kBFloat16,
                "fused rms norm: autocast's dtype must be bf16 (got ", out, ")");
    auto y = RmsNormFused::apply(*x, *w, eps, static_cast<int64_t>(out),
                                 reinterpret_cast<int64_t>(table));
    return new at::Tensor(std::move(y));
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
