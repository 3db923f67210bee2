// Custom autograd functions for nsa-attn's lean (long-sequence) attention path.
//
// Both functions compute softmax attention of every query over a per-query key set, chunk by
// chunk over the query axis, and save only their inputs for backward. A chunk always holds
// whole rows (all keys of its queries), so backward recomputes each chunk's probabilities with
// exactly the forward arithmetic (bit-identical, no log-sum-exp needed) and derives the score
// gradients from them. The memory held between forward and backward is the inputs,
// O(S * H * dk + Sk * G * (dk + dv)), independent of how many keys each query reads;
// temporaries are O(chunk * keys per query).
//
// Layouts (row-major, as tch hands them over):
//   q [B, S, H, dk], k [B, Sk, G, dk], v [B, Sk, G, dv], out [B, S, H, dv]; H = G * h and query
//   head j reads key head j / h (group-major, as SDPA's enable_gqa).
//
// Span attention: query t reads keys [lo[t], hi[t]) (lo, hi: int64 [S], shared by batch and
//   heads): the sliding window and the compressed branch.
// Block attention: query t of batch b, group g reads the blocks blocks[b, t, g, :] (int64
//   [B, S, G, n], -1 = unused slot), keys [j * L, (j + 1) * L) of block j, limited to keys <= t:
//   the selected branch. Ids are cleaned first (blocks.h): duplicates count once, ids outside
//   [0, t / L] are ignored.
//
// Rows with no visible key output zeros and get zero gradients.
// Arithmetic: scores, softmax and gradient accumulators in float32 (float64 for float64 inputs);
// matmuls in the input dtype.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include "blocks.h"
#include "launch.h"

#include <algorithm>
#include <limits>
#include <memory>
#include <cstring>
#include <string>
#include <vector>

namespace {

using nsa_glue::write_error;

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::ScalarType acc_type(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Stable softmax pieces over the last axis of masked scores `s` (masked entries = -inf).
// Returns the probabilities, 0 on rows where every key is masked.
Tensor masked_softmax(const Tensor& s) {
  auto m = std::get<0>(s.max(-1, /*keepdim=*/true));
  auto empty = at::isinf(m);  // only -inf can occur: all keys masked
  auto m_safe = m.masked_fill(empty, 0.0);
  auto p = (s - m_safe).exp();
  auto l = p.sum(-1, /*keepdim=*/true);
  auto l_safe = l.masked_fill(empty, 1.0);
  return p / l_safe;
}

// Gradient of the scores from the gradient of the probabilities: p * (dp - rowsum(p * dp)).
// rowsum(p * dp) equals rowsum(dout * out) (flash attention's D) in exact arithmetic; this form
// is the one autograd's softmax backward uses, so the two paths round alike (a row with a
// single key gets exactly zero score gradient, as it should), and `out` need not be saved.
Tensor softmax_grad(const Tensor& p, const Tensor& dp) {
  auto D = (p * dp).sum(-1, /*keepdim=*/true);
  return p * (dp - D);
}

// ---------------------------------------------------------------------------------------------
// Span attention
// ---------------------------------------------------------------------------------------------

struct SpanPlan {
  int64_t c0, c1, a, b;  // query chunk [c0, c1), key span [a, b)
};

std::vector<SpanPlan> span_plan(const Tensor& lo_cpu, const Tensor& hi_cpu, int64_t s,
                                int64_t sk, int64_t chunk) {
  std::vector<SpanPlan> plan;
  auto lo = lo_cpu.accessor<int64_t, 1>();
  auto hi = hi_cpu.accessor<int64_t, 1>();
  for (int64_t c0 = 0; c0 < s; c0 += chunk) {
    int64_t c1 = std::min(s, c0 + chunk);
    int64_t a = sk, b = 0;
    for (int64_t t = c0; t < c1; ++t) {
      int64_t l = std::max<int64_t>(0, lo[t]);
      int64_t h = std::min<int64_t>(sk, hi[t]);
      if (h > l) {
        a = std::min(a, l);
        b = std::max(b, h);
      }
    }
    plan.push_back({c0, c1, a, b});
  }
  return plan;
}

// Masked, scaled scores of one span chunk: [B, G, T, h, Tk] in the accumulation dtype.
Tensor span_scores(const Tensor& qc, const Tensor& kc, const Tensor& lo, const Tensor& hi,
                   const SpanPlan& c, int64_t heads_per_group, double scale) {
  auto sizes = qc.sizes();  // [B, G, T*h, dk]
  int64_t B = sizes[0], G = sizes[1], T = c.c1 - c.c0, Tk = c.b - c.a;
  auto s = at::matmul(qc, kc.transpose(-1, -2)).to(acc_type(qc)).mul_(scale);
  s = s.view({B, G, T, heads_per_group, Tk});
  auto pos = at::arange(c.a, c.b, lo.options());
  auto lo_c = lo.narrow(0, c.c0, T).unsqueeze(1);
  auto hi_c = hi.narrow(0, c.c0, T).unsqueeze(1);
  auto visible = pos.unsqueeze(0).ge(lo_c).logical_and(pos.unsqueeze(0).lt(hi_c));  // [T, Tk]
  return s.masked_fill(visible.logical_not().view({1, 1, T, 1, Tk}),
                       -std::numeric_limits<double>::infinity());
}

// q chunk as [B, G, T*h, dk] (rows ordered (t, head-in-group)).
Tensor group_rows(const Tensor& x, int64_t c0, int64_t T, int64_t G) {
  auto sz = x.sizes();  // [B, S, H, d]
  int64_t B = sz[0], H = sz[2], d = sz[3];
  return x.narrow(1, c0, T).reshape({B, T, G, H / G, d}).permute({0, 2, 1, 3, 4}).reshape(
      {B, G, T * (H / G), d});
}

// Inverse of group_rows for a chunk result [B, G, T*h, d] -> [B, T, H, d].
Tensor ungroup_rows(const Tensor& x, int64_t T, int64_t h) {
  auto sz = x.sizes();
  int64_t B = sz[0], G = sz[1], d = sz[3];
  return x.view({B, G, T, h, d}).permute({0, 2, 1, 3, 4}).reshape({B, T, G * h, d});
}

struct SpanAttention : public torch::autograd::Function<SpanAttention> {
  static Tensor forward(AutogradContext* ctx, Tensor q, Tensor k, Tensor v, Tensor lo, Tensor hi,
                        double scale, int64_t chunk) {
    TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "span attention: 4-d q, k, v");
    int64_t B = q.size(0), S = q.size(1), H = q.size(2), G = k.size(2), Sk = k.size(1);
    int64_t dv = v.size(3), h = H / G;
    TORCH_CHECK(H % G == 0, "span attention: heads not divisible by key heads");
    TORCH_CHECK(lo.numel() == S && hi.numel() == S, "span attention: lo/hi must have S entries");
    auto lo_cpu = lo.to(at::kCPU).to(at::kLong).contiguous();
    auto hi_cpu = hi.to(at::kCPU).to(at::kLong).contiguous();
    auto lo_d = lo.to(q.device()).to(at::kLong);
    auto hi_d = hi.to(q.device()).to(at::kLong);
    auto out = at::zeros({B, S, H, dv}, v.options());
    auto kt = k.permute({0, 2, 1, 3});  // [B, G, Sk, dk]
    auto vt = v.permute({0, 2, 1, 3});
    for (const auto& c : span_plan(lo_cpu, hi_cpu, S, Sk, chunk)) {
      if (c.b <= c.a) continue;
      int64_t T = c.c1 - c.c0, Tk = c.b - c.a;
      auto qc = group_rows(q, c.c0, T, G);
      auto s = span_scores(qc, kt.narrow(2, c.a, Tk), lo_d, hi_d, c, h, scale);
      auto p = masked_softmax(s);
      auto o = at::matmul(p.view({B, G, T * h, Tk}).to(v.scalar_type()), vt.narrow(2, c.a, Tk));
      out.narrow(1, c.c0, T).copy_(ungroup_rows(o, T, h));
    }
    ctx->save_for_backward({q, k, v, lo_d, hi_d, lo_cpu, hi_cpu});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["chunk"] = chunk;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto q = saved[0], k = saved[1], v = saved[2];
    auto lo_d = saved[3], hi_d = saved[4], lo_cpu = saved[5], hi_cpu = saved[6];
    double scale = ctx->saved_data["scale"].toDouble();
    int64_t chunk = ctx->saved_data["chunk"].toInt();
    auto dout = grads[0];
    int64_t S = q.size(1), H = q.size(2), G = k.size(2), Sk = k.size(1), h = H / G;
    auto acc = acc_type(q);
    auto dq = at::zeros(q.sizes(), q.options());
    auto dk = at::zeros({k.size(0), G, Sk, k.size(3)}, k.options().dtype(acc));
    auto dvv = at::zeros({v.size(0), G, Sk, v.size(3)}, v.options().dtype(acc));
    auto kt = k.permute({0, 2, 1, 3});
    auto vt = v.permute({0, 2, 1, 3});
    for (const auto& c : span_plan(lo_cpu, hi_cpu, S, Sk, chunk)) {
      if (c.b <= c.a) continue;
      int64_t T = c.c1 - c.c0, Tk = c.b - c.a;
      auto qc = group_rows(q, c.c0, T, G);
      auto kc = kt.narrow(2, c.a, Tk);
      auto vc = vt.narrow(2, c.a, Tk);
      auto s = span_scores(qc, kc, lo_d, hi_d, c, h, scale);
      auto p = masked_softmax(s).view({s.size(0), G, T * h, Tk});
      auto doc = group_rows(dout, c.c0, T, G);  // [B, G, T*h, dv]
      dvv.narrow(2, c.a, Tk).add_(at::matmul(p.transpose(-1, -2).to(v.scalar_type()), doc).to(acc));
      auto dp = at::matmul(doc, vc.transpose(-1, -2)).to(acc);
      auto ds = softmax_grad(p, dp).mul_(scale).to(q.scalar_type());
      dq.narrow(1, c.c0, T).copy_(ungroup_rows(at::matmul(ds, kc), T, h));
      dk.narrow(2, c.a, Tk).add_(at::matmul(ds.transpose(-1, -2), qc).to(acc));
    }
    return {dq,
            dk.permute({0, 2, 1, 3}).to(k.scalar_type()),
            dvv.permute({0, 2, 1, 3}).to(v.scalar_type()),
            Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// ---------------------------------------------------------------------------------------------
// Block attention
// ---------------------------------------------------------------------------------------------

// Flat row indices into k.reshape({B*Sk*G, d}) for one query chunk, and their visibility.
// `blocks` must hold each row's distinct valid ids (0 <= j <= t / L) before its -1 slots
// (BlockAttention::forward arranges that); a query t then has at most t / L + 1 valid slots,
// so only the first min(n, (c1 - 1) / L + 1) slots of the chunk [c0, c1) are read (short
// sequences gather fewer keys).
// Returns (rows [B, T, G, K] int64, visible [B, T, G, K] bool) with K = n_used * L.
std::pair<Tensor, Tensor> block_rows(const Tensor& blocks, int64_t c0, int64_t T, int64_t L,
                                     int64_t Sk) {
  int64_t B = blocks.size(0), G = blocks.size(2);
  int64_t n = std::min(blocks.size(3), (c0 + T - 1) / L + 1);
  auto opts = blocks.options();
  auto bc = blocks.narrow(1, c0, T).narrow(3, 0, n);                           // [B, T, G, n]
  auto pos = bc.unsqueeze(-1) * L + at::arange(L, opts).view({1, 1, 1, 1, L});  // [B,T,G,n,L]
  auto t = at::arange(c0, c0 + T, opts).view({1, T, 1, 1, 1});
  auto visible = bc.ge(0).unsqueeze(-1).logical_and(pos.le(t)).logical_and(pos.lt(Sk));
  pos = pos.masked_fill(visible.logical_not(), 0);
  auto b = at::arange(B, opts).view({B, 1, 1, 1, 1});
  auto g = at::arange(G, opts).view({1, 1, G, 1, 1});
  auto rows = (b * Sk + pos) * G + g;
  return {rows.reshape({B, T, G, n * L}), visible.reshape({B, T, G, n * L})};
}

struct BlockAttention : public torch::autograd::Function<BlockAttention> {
  static Tensor forward(AutogradContext* ctx, Tensor q, Tensor k, Tensor v, Tensor blocks,
                        int64_t block_len, double scale, int64_t chunk) {
    TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && blocks.dim() == 4,
                "block attention: 4-d q, k, v, blocks");
    int64_t B = q.size(0), S = q.size(1), H = q.size(2), G = k.size(2), Sk = k.size(1);
    int64_t dk = k.size(3), dv = v.size(3), h = H / G;
    TORCH_CHECK(H % G == 0, "block attention: heads not divisible by key heads");
    TORCH_CHECK(blocks.size(0) == B && blocks.size(1) == S && blocks.size(2) == G,
                "block attention: blocks must be [B, S, G, n]");
    auto kc_all = k.contiguous();
    auto vc_all = v.contiguous();
    // Each row's distinct valid ids first (descending), -1 after: a repeated id counts once
    // and ids outside [0, t / L] are ignored, whatever the caller passed. block_rows relies on
    // this to read only the first t / L + 1 slots of a row.
    auto blk = nsa_glue::clean_block_ids(blocks.to(q.device()), block_len, Sk);
    auto kflat = kc_all.view({B * Sk * G, dk});
    auto vflat = vc_all.view({B * Sk * G, dv});
    auto out = at::zeros({B, S, H, dv}, v.options());
    for (int64_t c0 = 0; c0 < S; c0 += chunk) {
      int64_t T = std::min(chunk, S - c0);
      auto [rows, visible] = block_rows(blk, c0, T, block_len, Sk);
      int64_t K = rows.size(3);
      auto kc = kflat.index_select(0, rows.flatten()).view({B, T, G, K, dk});
      auto vc = vflat.index_select(0, rows.flatten()).view({B, T, G, K, dv});
      auto qc = q.narrow(1, c0, T).reshape({B, T, G, h, dk});
      auto s = at::matmul(qc, kc.transpose(-1, -2)).to(acc_type(q)).mul_(scale);
      s = s.masked_fill(visible.logical_not().unsqueeze(3),
                        -std::numeric_limits<double>::infinity());
      auto p = masked_softmax(s);
      auto o = at::matmul(p.to(v.scalar_type()), vc);  // [B, T, G, h, dv]
      out.narrow(1, c0, T).copy_(o.reshape({B, T, H, dv}));
    }
    ctx->save_for_backward({q, kc_all, vc_all, blk});
    ctx->saved_data["block_len"] = block_len;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["chunk"] = chunk;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto q = saved[0], k = saved[1], v = saved[2], blk = saved[3];
    int64_t block_len = ctx->saved_data["block_len"].toInt();
    double scale = ctx->saved_data["scale"].toDouble();
    int64_t chunk = ctx->saved_data["chunk"].toInt();
    auto dout = grads[0];
    int64_t B = q.size(0), S = q.size(1), H = q.size(2), G = k.size(2), Sk = k.size(1);
    int64_t dk = k.size(3), dv = v.size(3), h = H / G;
    auto acc = acc_type(q);
    auto kflat = k.view({B * Sk * G, dk});
    auto vflat = v.view({B * Sk * G, dv});
    auto dq = at::zeros(q.sizes(), q.options());
    auto dkf = at::zeros({B * Sk * G, dk}, k.options().dtype(acc));
    auto dvf = at::zeros({B * Sk * G, dv}, v.options().dtype(acc));
    for (int64_t c0 = 0; c0 < S; c0 += chunk) {
      int64_t T = std::min(chunk, S - c0);
      auto [rows, visible] = block_rows(blk, c0, T, block_len, Sk);
      int64_t K = rows.size(3);
      auto flat_rows = rows.flatten();
      auto kc = kflat.index_select(0, flat_rows).view({B, T, G, K, dk});
      auto vc = vflat.index_select(0, flat_rows).view({B, T, G, K, dv});
      auto qc = q.narrow(1, c0, T).reshape({B, T, G, h, dk});
      auto s = at::matmul(qc, kc.transpose(-1, -2)).to(acc).mul_(scale);
      s = s.masked_fill(visible.logical_not().unsqueeze(3),
                        -std::numeric_limits<double>::infinity());
      auto p = masked_softmax(s);  // [B, T, G, h, K]
      auto doc = dout.narrow(1, c0, T).reshape({B, T, G, h, dv});
      auto dv_c = at::matmul(p.transpose(-1, -2).to(v.scalar_type()), doc);  // [B,T,G,K,dv]
      dvf.index_add_(0, flat_rows, dv_c.reshape({-1, dv}).to(acc));
      auto dp = at::matmul(doc, vc.transpose(-1, -2)).to(acc);
      auto ds = softmax_grad(p, dp).mul_(scale).to(q.scalar_type());
      dq.narrow(1, c0, T).copy_(at::matmul(ds, kc).reshape({B, T, H, dk}));
      auto dk_c = at::matmul(ds.transpose(-1, -2), qc);  // [B, T, G, K, dk]
      dkf.index_add_(0, flat_rows, dk_c.reshape({-1, dk}).to(acc));
    }
    return {dq, dkf.view({B, Sk, G, dk}).to(k.scalar_type()),
            dvf.view({B, Sk, G, dv}).to(v.scalar_type()), Tensor(), Tensor(), Tensor(),
            Tensor()};
  }
};

// Under CUDA autocast q, k and v can arrive in different dtypes (linear outputs in bf16, RoPE or
// phi outputs in fp32). The functions compute in one dtype: autocast's when autocast is on for
// q's device and the promoted type is fp32, else the promoted type. The casts happen outside
// the Function, so autograd routes each gradient back through its cast to the input's dtype.
at::ScalarType common_type(const Tensor& q, const Tensor& k, const Tensor& v) {
  auto dt = at::promote_types(at::promote_types(q.scalar_type(), k.scalar_type()), v.scalar_type());
  if (q.is_cuda() && dt == at::kFloat && at::autocast::is_autocast_enabled(at::kCUDA)) {
    dt = at::autocast::get_autocast_dtype(at::kCUDA);
  }
  return dt;
}

// Runs `f(q, k, v)` on inputs cast to their common dtype, with autocast excluded inside so that
// forward and backward (which autograd runs without autocast) do the same arithmetic.
template <typename F>
Tensor with_common_dtype(const Tensor& q, const Tensor& k, const Tensor& v, F f) {
  auto dt = common_type(q, k, v);
  auto qc = q.to(dt), kc = k.to(dt), vc = v.to(dt);
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  return f(qc, kc, vc);
}

}  // namespace

extern "C" {

// Returns a new torch::Tensor* (ownership passes to the caller) or nullptr with a message in err.
at::Tensor* nsa_span_attention(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v,
                               const at::Tensor* lo, const at::Tensor* hi, double scale,
                               int64_t chunk, char* err, size_t err_len) {
  try {
    TORCH_CHECK(chunk > 0, "span attention: chunk must be positive");
    auto out = with_common_dtype(*q, *k, *v, [&](const Tensor& qc, const Tensor& kc, const Tensor& vc) {
      return SpanAttention::apply(qc, kc, vc, *lo, *hi, scale, chunk);
    });
    return new at::Tensor(std::move(out));
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
    return nullptr;
  }
}

at::Tensor* nsa_block_attention(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v,
                                const at::Tensor* blocks, int64_t block_len, double scale,
                                int64_t chunk, char* err, size_t err_len) {
  try {
    TORCH_CHECK(chunk > 0 && block_len > 0, "block attention: chunk and block_len positive");
    auto out = with_common_dtype(*q, *k, *v, [&](const Tensor& qc, const Tensor& kc, const Tensor& vc) {
      return BlockAttention::apply(qc, kc, vc, *blocks, block_len, scale, chunk);
    });
    return new at::Tensor(std::move(out));
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
    return nullptr;
  }
}

}  // extern "C"

// Gradient-ready hooks (nsa_sys::autograd::GradReadyHooks): a post hook on each parameter's
// gradient accumulator, the node that adds a backward pass's gradient into `param.grad`. The
// engine runs it right after that addition (once per backward, with the gradients of every use
// of the parameter already summed), on the thread that runs the parameter's device's backward
// work, with that thread's current CUDA stream being the one the gradient was computed on. This
// is how PyTorch DDP's reducer learns that a gradient is final.
typedef void (*nsa_grad_ready_fn)(void* ctx, size_t index);

namespace {

struct GradReadyHook : torch::autograd::FunctionPostHook {
  GradReadyHook(nsa_grad_ready_fn fn, void* ctx, size_t index) : fn_(fn), ctx_(ctx), index_(index) {}
  variable_list operator()(const variable_list& outputs, const variable_list& /*inputs*/) override {
    fn_(ctx_, index_);
    return outputs;
  }
  nsa_grad_ready_fn fn_;
  void* ctx_;
  size_t index_;
};

}  // namespace

// Holds the accumulators (the variables keep only a weak reference; holding them keeps the same
// node, and so the hook, in every later graph) and removes the hooks when destroyed.
struct NsaGradHooks {
  std::vector<std::pair<std::shared_ptr<torch::autograd::Node>, uintptr_t>> hooks;
  ~NsaGradHooks() {
    for (auto& h : hooks) h.first->del_post_hook(h.second);
  }
};

extern "C" {

// Registers `fn(ctx, i)` to run when parameter i's gradient has been accumulated. Returns an
// owner to pass to nsa_grad_hooks_free, or nullptr with a message in err (nothing registered).
NsaGradHooks* nsa_grad_hooks_new(const at::Tensor* const* params, size_t n, nsa_grad_ready_fn fn,
                                 void* ctx, char* err, size_t err_len) {
  try {
    auto owner = std::make_unique<NsaGradHooks>();
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& p = *params[i];
      TORCH_CHECK(p.defined() && p.requires_grad() && p.is_leaf(), "parameter ", i,
                  " is not a leaf tensor that requires grad");
      auto acc = torch::autograd::impl::grad_accumulator(p);
      TORCH_CHECK(acc != nullptr, "parameter ", i, " has no gradient accumulator");
      auto key = acc->add_post_hook(std::make_unique<GradReadyHook>(fn, ctx, i));
      owner->hooks.emplace_back(std::move(acc), key);
    }
    return owner.release();
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
    return nullptr;
  }
}

void nsa_grad_hooks_free(NsaGradHooks* owner) { delete owner; }

// Backward from several outputs at once, each with its gradient (torch::autograd::backward):
// one pass over their common graph, the gradients accumulating into the leaves' .grad as
// Tensor.backward does. 0, or 1 with a message in err.
int nsa_backward(const at::Tensor* const* outputs, const at::Tensor* const* grads, size_t n,
                 char* err, size_t err_len) {
  try {
    std::vector<at::Tensor> outs, gs;
    outs.reserve(n);
    gs.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      outs.push_back(*outputs[i]);
      gs.push_back(*grads[i]);
    }
    torch::autograd::backward(outs, gs);
    return 0;
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
    return 1;
  }
}

}  // extern "C"
