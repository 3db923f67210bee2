// Custom autograd functions over the pointwise kernels of nsa-sys/kernels/pointwise.cu:
// rotary position embedding (RopeFused), the gated sum of the three branches (GateMixFused, and
// GateMixProjFused with the output projection after it) and the blocks φ compresses
// (CmpBlocksFused, and CmpBlocksLinearFused with φ's first linear map after them).
// Launched with the cuLaunchKernel pointer and CUfunction handles Rust loaded
// (NsaPointwiseTable), on libtorch's current CUDA stream of the tensors' device.
//
//   RopeFused:    x [B, S, X, dk] (bf16 or fp32, last axis contiguous, other strides free),
//                 cos / sin fp32 [S, dk/2] -> y [B, S, X, dk] contiguous in x's dtype.
//                 Backward: the inverse rotation of dy (any float dtype) -> dx in x's dtype.
//   GateMixFused: branch outputs oc, os, ow [B, S, H, dv] and gates g [B, S, H, 3], one dtype
//                 (bf16 or fp32) -> o [B, S, H, dv]. Backward: doc, dos, dow and dg. The
//                 branch outputs are read in place when their rows are evenly spaced with the
//                 last axis contiguous (row_stride), as a narrowed wider output is; others are
//                 copied first.
//   GateMixProjFused: the same operands and w [dim, H * dv] -> y = mix · wᵀ [B, S, dim];
//                 backward sums the branches again instead of keeping the sum.
//   CmpBlocksLinearFused: the blocks below and φ's first linear map after them,
//                 [B, Nc, G, L * D] · w1ᵀ (+ b1); backward gathers the blocks again from x.
//   CmpBlocksFused: raw keys or values x [B, S, G, D] (bf16 or fp32, last axis contiguous,
//                 other strides free) and the position embedding pos [L, G, D] (x's dtype; an
//                 empty placeholder with has_pos = 0 for none) -> blocks [B, Nc, G, L * D]
//                 contiguous, Nc = (S - L) / stride + 1 >= 1: block i of head g is
//                 x[i * stride .. i * stride + L, g, :] plus pos[:, g, :], flattened
//                 position-major. Backward: dx (a gather over the blocks covering each token,
//                 deterministic) and dpos (libtorch's sum over batch and blocks).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "launch.h"
#include "pointwise_table.h"

#include <algorithm>
#include <initializer_list>
#include <cstdint>
#include <cstring>


namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using nsa_glue::write_error;

constexpr int64_t kThreads = 256;  // NSA_POINTWISE_THREADS

const NsaPointwiseTable* table_of(int64_t ptr) {
  return reinterpret_cast<const NsaPointwiseTable*>(ptr);
}

// Launches `fn` over `work` items with grid-stride loops: enough CTAs to fill the device a
// few times over, never more than the work needs.
void launch(const NsaPointwiseTable* tab, void* fn, const char* what, int64_t work,
            const c10::Device& device, void** args) {
  TORCH_CHECK(fn != nullptr, what, ": kernel not loaded");
  if (work == 0) return;
  int64_t grid = std::min<int64_t>((work + kThreads - 1) / kThreads, int64_t(tab->sm_count) * 16);
  // The kernel handles belong to the device's primary context: make it current.
  c10::DeviceGuard guard(device);
  nsa_glue::launch_kernel(tab->launch, fn, what, grid, 1, 1, kThreads, 0,
                          nsa_glue::current_stream(device), args);
}

int fp32(const Tensor& t) { return t.scalar_type() == at::kFloat ? 1 : 0; }

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// A kernel's vec: 1 when rows of `width` elements at the given strides (in elements) can be
// read and written `per` elements (16 bytes) at a time from every pointer (null counts as
// aligned: an absent operand), else 0.
int vector_rows(int per, int64_t width, std::initializer_list<long long> strides,
                std::initializer_list<const void*> ptrs) {
  if (width % per != 0) return 0;
  for (long long st : strides)
    if (st % per != 0) return 0;
  for (const void* p : ptrs)
    if (!aligned16(p)) return 0;
  return 1;
}

// y = rotate(x, sign) into a new contiguous tensor of dtype `out_type`.
Tensor rotate(const NsaPointwiseTable* tab, const Tensor& x, const Tensor& cos_t,
              const Tensor& sin_t, float sign, at::ScalarType out_type) {
  auto y = at::empty(x.sizes(), x.options().dtype(out_type));
  int64_t S = x.size(1), X = x.size(2), half = x.size(3) / 2;
  int64_t pairs = x.size(0) * S * X * half;
  long long xb = x.stride(0), xs = x.stride(1), xh = x.stride(2), n = pairs;
  const void* xp = x.data_ptr();
  const void* cp = cos_t.data_ptr();
  const void* sp = sin_t.data_ptr();
  void* yp = y.data_ptr();
  int s32 = int(S), x32 = int(X), h32 = int(half);
  // Eight pairs a thread where every access can be 16 bytes wide.
  int vec = vector_rows(8, half, {xb, xs, xh}, {xp, cp, sp, yp});
  void* args[] = {&xp, &xb, &xs, &xh, &cp, &sp, &sign, &yp, &s32, &x32, &h32, &n, &vec};
  launch(tab, tab->rope[2 * fp32(x) + (out_type == at::kFloat ? 1 : 0)], "nsa_rope",
         vec ? pairs / 8 : pairs, x.device(), args);
  return y;
}

struct RopeFused : public torch::autograd::Function<RopeFused> {
  static Tensor forward(AutogradContext* ctx, Tensor x, Tensor cos_t, Tensor sin_t,
                        int64_t table) {
    ctx->save_for_backward({cos_t, sin_t});
    ctx->saved_data["table"] = table;
    ctx->saved_data["fp32"] = int64_t(fp32(x));
    return rotate(table_of(table), x, cos_t, sin_t, 1.0f, x.scalar_type());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    auto out_type = ctx->saved_data["fp32"].toInt() != 0 ? at::kFloat : at::kBFloat16;
    auto dy = grads[0];
    if (dy.scalar_type() != at::kFloat && dy.scalar_type() != at::kBFloat16) dy = dy.to(out_type);
    if (dy.stride(3) != 1) dy = dy.contiguous();
    auto dx = rotate(table_of(ctx->saved_data["table"].toInt()), dy, s[0], s[1], -1.0f, out_type);
    return {dx, Tensor(), Tensor(), Tensor()};
  }
};

// The row stride of x [B, S, H, dv] if its rows (b, s, h) are evenly spaced, at least dv
// apart, with the last axis contiguous (a contiguous tensor: dv; a narrowed view of a
// contiguous [B, S, H, D]: D); -1 otherwise. Axes of size 1 may have any stride.
int64_t row_stride(const Tensor& x) {
  if (x.dim() != 4 || x.stride(3) != 1) return -1;
  if (x.numel() == 0) return x.size(3);
  int64_t rs = -1, below = 1;  // below: rows per step of the axis
  for (int axis = 2; axis >= 0; --axis) {
    if (x.size(axis) != 1) {
      if (rs < 0) {
        if (x.stride(axis) % below != 0) return -1;
        rs = x.stride(axis) / below;
      } else if (x.stride(axis) != rs * below) {
        return -1;
      }
    }
    below *= x.size(axis);
  }
  if (rs < 0) rs = x.size(3);  // a single row
  return rs >= x.size(3) ? rs : -1;
}

// x itself when row_stride(x) applies, else a contiguous copy.
Tensor rows_readable(const Tensor& x) { return row_stride(x) >= 0 ? x : x.contiguous(); }

// The gated sum of branch outputs whose rows row_stride can read (see GateMixFused).
Tensor mix_rows(const NsaPointwiseTable* tab, const Tensor& oc, const Tensor& os,
                const Tensor& ow, const Tensor& g) {
  auto o = at::empty(oc.sizes(), oc.options());
  int dv = int(oc.size(3));
  long long rows = dv == 0 ? 0 : oc.numel() / dv;
  long long rc = row_stride(oc), rs = row_stride(os), rw = row_stride(ow);
  const void *pc = oc.data_ptr(), *ps = os.data_ptr(), *pw = ow.data_ptr(), *pg = g.data_ptr();
  void* po = o.data_ptr();
  const int per = 16 / int(oc.element_size());
  int vec = vector_rows(per, dv, {rc, rs, rw}, {pc, ps, pw, po});
  void* args[] = {&pc, &ps, &pw, &pg, &po, &dv, &rows, &rc, &rs, &rw, &vec};
  launch(tab, tab->mix[fp32(oc)], "nsa_gate_mix", rows * (vec ? dv / per : dv), oc.device(),
         args);
  return o;
}

// The gated sum's backward: {doc, dos, dow, dg} from the saved operands and dout (any float
// dtype and layout; cast and made contiguous here).
variable_list mix_rows_backward(const NsaPointwiseTable* tab, const Tensor& oc, const Tensor& os,
                                const Tensor& ow, const Tensor& g, const Tensor& grad) {
  auto dout = grad.to(oc.scalar_type()).contiguous();
  auto opts = oc.options();
  auto doc = at::empty(oc.sizes(), opts), dos = at::empty(oc.sizes(), opts),
       dow = at::empty(oc.sizes(), opts);
  auto dg = at::empty_like(g);
  int dv = int(oc.size(3));
  long long rows = oc.numel() / dv;
  long long rc = row_stride(oc), rs = row_stride(os), rw = row_stride(ow);
  const void *pc = oc.data_ptr(), *ps = os.data_ptr(), *pw = ow.data_ptr(), *pg = g.data_ptr(),
             *pd = dout.data_ptr();
  void *qc = doc.data_ptr(), *qs = dos.data_ptr(), *qw = dow.data_ptr(), *qg = dg.data_ptr();
  const int per = 16 / int(oc.element_size());
  int vec = vector_rows(per, dv, {rc, rs, rw}, {pc, ps, pw, pd, qc, qs, qw});
  void* args[] = {&pc, &ps, &pw, &pg, &pd, &qc, &qs, &qw, &qg, &dv, &rows, &rc, &rs, &rw, &vec};
  // Eight lanes per row with vec, else one warp per row.
  launch(tab, tab->mix_bwd[fp32(oc)], "nsa_gate_mix_bwd", rows * (vec ? 8 : 32), oc.device(),
         args);
  return {doc, dos, dow, dg};
}

struct GateMixFused : public torch::autograd::Function<GateMixFused> {
  static Tensor forward(AutogradContext* ctx, Tensor oc, Tensor os, Tensor ow, Tensor g,
                        int64_t table) {
    ctx->save_for_backward({oc, os, ow, g});
    ctx->saved_data["table"] = table;
    return mix_rows(table_of(table), oc, os, ow, g);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    auto d = mix_rows_backward(table_of(ctx->saved_data["table"].toInt()), s[0], s[1], s[2], s[3],
                               grads[0]);
    return {d[0], d[1], d[2], d[3], Tensor()};
  }
};

// The gated sum followed by the output projection, y = mix · wᵀ with w [dim, H * dv] in the
// branch outputs' dtype: the same arithmetic as GateMixFused and a matmul, but the sum (the
// matmul's input, [B, S, H, dv]) is not kept for backward. The backward sums again from the
// branch outputs and gates it saves anyway (one pass over four [B, S, H, dv] tensors) for w's
// gradient, so a layer holds one fewer activation of that size.
struct GateMixProjFused : public torch::autograd::Function<GateMixProjFused> {
  static Tensor forward(AutogradContext* ctx, Tensor oc, Tensor os, Tensor ow, Tensor g, Tensor w,
                        int64_t table) {
    ctx->save_for_backward({oc, os, ow, g, w});
    ctx->saved_data["table"] = table;
    auto o = mix_rows(table_of(table), oc, os, ow, g);
    const int64_t B = oc.size(0), S = oc.size(1);
    return at::mm(o.view({B * S, w.size(1)}), w.t()).view({B, S, w.size(0)});
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    const auto* tab = table_of(ctx->saved_data["table"].toInt());
    const Tensor &oc = s[0], &w = s[4];
    const int64_t B = oc.size(0), S = oc.size(1), H = oc.size(2), dv = oc.size(3);
    auto dy = grads[0].to(oc.scalar_type()).reshape({B * S, w.size(0)});
    auto o = mix_rows(tab, oc, s[1], s[2], s[3]);
    auto dw = at::mm(dy.t(), o.view({B * S, H * dv}));
    auto dmix = at::mm(dy, w).view({B, S, H, dv});
    auto d = mix_rows_backward(tab, oc, s[1], s[2], s[3], dmix);
    return {d[0], d[1], d[2], d[3], dw, Tensor()};
  }
};

// The operands of the gated sum, as both entry points take them (the Rust callers check the
// same and say more).
void check_mix_operands(const at::Tensor* oc, const at::Tensor* os, const at::Tensor* ow,
                        const at::Tensor* g, const NsaPointwiseTable* table) {
  TORCH_CHECK(table != nullptr, "fused gate mix: no kernel table");
  auto dt = oc->scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "fused gate mix: bf16 or fp32 only");
  for (const at::Tensor* t : {oc, os, ow, g}) {
    TORCH_CHECK(t->is_cuda() && t->device() == oc->device() && t->scalar_type() == dt &&
                    t->dim() == 4,
                "fused gate mix: 4-d CUDA tensors of one dtype on one device");
  }
  TORCH_CHECK(g->is_contiguous(), "fused gate mix: the gates must be contiguous");
  TORCH_CHECK(os->sizes() == oc->sizes() && ow->sizes() == oc->sizes() &&
                  g->sizes().slice(0, 3) == oc->sizes().slice(0, 3) && g->size(3) == 3,
              "fused gate mix: branch outputs [B, S, H, dv] and gates [B, S, H, 3]");
  TORCH_CHECK(oc->size(3) > 0 && oc->size(3) < (int64_t(1) << 31),
              "fused gate mix: dv out of range");
}

// Launches the blocks kernel (forward) into a new [B, Nc, G, L * D] tensor.
Tensor cmp_blocks(const NsaPointwiseTable* tab, const Tensor& x, const Tensor& pos, int64_t L,
                  int64_t stride) {
  const int64_t B = x.size(0), S = x.size(1), G = x.size(2), D = x.size(3);
  const int64_t Nc = (S - L) / stride + 1;
  auto out = at::empty({B, Nc, G, L * D}, x.options());
  const int per = 16 / int(x.element_size());
  const void* xp = x.data_ptr();
  const void* pp = pos.defined() ? pos.data_ptr() : nullptr;
  void* op = out.data_ptr();
  long long xb = x.stride(0), xs = x.stride(1), xg = x.stride(2);
  long long rows = B * Nc * G * L;
  int vec = vector_rows(per, D, {xb, xs, xg}, {xp, pp, op});
  int nc = int(Nc), g = int(G), l = int(L), d = int(D), st = int(stride);
  void* args[] = {&xp, &xb, &xs, &xg, &pp, &op, &nc, &g, &l, &d, &st, &rows, &vec};
  launch(tab, tab->blocks[fp32(x)], "nsa_cmp_blocks", vec ? rows * (D / per) : rows * D,
         x.device(), args);
  return out;
}

// The blocks' backward: {dx [B, S, G, D] (each token gathers what the blocks covering it
// received, in ascending block order), dpos [L, G, D] (undefined without has_pos)} from dblocks
// [B, Nc, G, L * D] (any float dtype and layout).
variable_list cmp_blocks_backward(const NsaPointwiseTable* tab, const Tensor& dout, int64_t S,
                                  int64_t L, int64_t stride, bool has_pos) {
  const int64_t B = dout.size(0), Nc = dout.size(1), G = dout.size(2), D = dout.size(3) / L;
  auto blocks = dout.contiguous().view({B, Nc, G, L, D});
  auto dx = at::empty({B, S, G, D}, blocks.options());
  const int per = 16 / int(blocks.element_size());
  const void* dp = blocks.data_ptr();
  void* xp = dx.data_ptr();
  long long rows = B * S * G;
  int vec = vector_rows(per, D, {}, {dp, xp});
  int s = int(S), nc = int(Nc), g = int(G), l = int(L), d = int(D), st = int(stride);
  void* args[] = {&dp, &xp, &s, &nc, &g, &l, &d, &st, &rows, &vec};
  launch(tab, tab->blocks_bwd[fp32(blocks)], "nsa_cmp_blocks_bwd",
         vec ? rows * (D / per) : rows * D, blocks.device(), args);
  Tensor dpos;
  // [G, L, D] summed over batch and blocks, laid out as pos [L, G, D].
  if (has_pos) dpos = blocks.sum(at::IntArrayRef{0, 1}).permute({1, 0, 2});
  return {dx, dpos};
}

struct CmpBlocksFused : public torch::autograd::Function<CmpBlocksFused> {
  // has_pos = 0: pos is an empty placeholder (autograd's inputs must be defined tensors).
  static Tensor forward(AutogradContext* ctx, Tensor x, Tensor pos, int64_t has_pos, int64_t L,
                        int64_t stride, int64_t table) {
    ctx->saved_data["table"] = table;
    ctx->saved_data["L"] = L;
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["S"] = x.size(1);
    ctx->saved_data["has_pos"] = has_pos;
    return cmp_blocks(table_of(table), x, has_pos != 0 ? pos : Tensor(), L, stride);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto d = cmp_blocks_backward(table_of(ctx->saved_data["table"].toInt()), grads[0],
                                 ctx->saved_data["S"].toInt(), ctx->saved_data["L"].toInt(),
                                 ctx->saved_data["stride"].toInt(),
                                 ctx->saved_data["has_pos"].toInt() != 0);
    return {d[0], d[1], Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// The blocks φ compresses and φ's first linear map in one: y = blocks · w1ᵀ (+ b1)
// [B, Nc, G, F] for w1 [F, L * D] (x's dtype, contiguous). The blocks (twice the raw keys or
// values at L = 2 · stride) are not kept for backward: it saves x (copied if it is a strided
// view, which would keep its whole parent alive) and gathers the blocks again for w1's
// gradient.
struct CmpBlocksLinearFused : public torch::autograd::Function<CmpBlocksLinearFused> {
  // has_pos = 0 / has_bias = 0: pos / b1 are empty placeholders.
  static Tensor forward(AutogradContext* ctx, Tensor x, Tensor pos, Tensor w1, Tensor b1,
                        int64_t has_pos, int64_t has_bias, int64_t L, int64_t stride,
                        int64_t table) {
    auto xs = x.is_contiguous() ? x : x.contiguous();
    ctx->save_for_backward({xs, pos, w1});
    ctx->saved_data["table"] = table;
    ctx->saved_data["L"] = L;
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["has_pos"] = has_pos;
    ctx->saved_data["has_bias"] = has_bias;
    auto blocks = cmp_blocks(table_of(table), xs, has_pos != 0 ? pos : Tensor(), L, stride);
    const int64_t B = blocks.size(0), Nc = blocks.size(1), G = blocks.size(2);
    auto flat = blocks.view({B * Nc * G, blocks.size(3)});
    auto y = has_bias != 0 ? at::addmm(b1, flat, w1.t()) : at::mm(flat, w1.t());
    return y.view({B, Nc, G, w1.size(0)});
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    const auto* tab = table_of(ctx->saved_data["table"].toInt());
    const Tensor &x = s[0], &pos = s[1], &w1 = s[2];
    const int64_t L = ctx->saved_data["L"].toInt(), stride = ctx->saved_data["stride"].toInt();
    const bool has_pos = ctx->saved_data["has_pos"].toInt() != 0;
    auto blocks = cmp_blocks(tab, x, has_pos ? pos : Tensor(), L, stride);
    const int64_t B = blocks.size(0), Nc = blocks.size(1), G = blocks.size(2);
    auto dy = grads[0].to(x.scalar_type()).reshape({B * Nc * G, w1.size(0)});
    auto dw1 = at::mm(dy.t(), blocks.view({B * Nc * G, blocks.size(3)}));
    Tensor db1;
    if (ctx->saved_data["has_bias"].toInt() != 0) db1 = dy.sum(0);
    auto dblocks = at::mm(dy, w1).view({B, Nc, G, blocks.size(3)});
    auto d = cmp_blocks_backward(tab, dblocks, x.size(1), L, stride, has_pos);
    return {d[0], d[1], dw1, db1, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// The checks both blocks entry points repeat from their Rust callers; pos (null for none) as
// the autograd functions take it: contiguous, or an empty placeholder.
Tensor checked_blocks_pos(const at::Tensor* x, const at::Tensor* pos, int64_t L, int64_t stride,
                          const NsaPointwiseTable* table) {
  TORCH_CHECK(table != nullptr, "fused cmp blocks: no kernel table");
  TORCH_CHECK(x->is_cuda() && x->dim() == 4 && x->stride(3) == 1,
              "fused cmp blocks: x must be a CUDA [B, S, G, D] tensor, last axis contiguous");
  auto dt = x->scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "fused cmp blocks: bf16 or fp32 only");
  TORCH_CHECK(L >= 1 && stride >= 1 && x->size(1) >= L,
              "fused cmp blocks: need 1 <= L <= S and stride >= 1");
  if (pos == nullptr) return at::empty({0}, x->options());
  TORCH_CHECK(pos->scalar_type() == dt && pos->device() == x->device() && pos->dim() == 3 &&
                  pos->size(0) == L && pos->size(1) == x->size(2) && pos->size(2) == x->size(3),
              "fused cmp blocks: pos must be [L, G, D] in x's dtype on x's device");
  return pos->contiguous();
}

}  // namespace

extern "C" {

// sizeof(NsaPointwiseTable), which nsa_sys::fused::pointwise compares with its mirror's before
// filling one: a field added on one side only would make every launch read the wrong function.
size_t nsa_pointwise_table_size() { return sizeof(NsaPointwiseTable); }

// Rotary embedding of x by the tables (shapes and dtypes checked by the Rust caller, repeated
// here): a new at::Tensor* (ownership to the caller), or nullptr with a message in err.
at::Tensor* nsa_fused_rope(const at::Tensor* x, const at::Tensor* cos_t, const at::Tensor* sin_t,
                           const NsaPointwiseTable* table, char* err, size_t err_len) {
  try {
    TORCH_CHECK(table != nullptr, "fused rope: no kernel table");
    TORCH_CHECK(x->is_cuda() && x->dim() == 4 && x->size(3) % 2 == 0 && x->stride(3) == 1,
                "fused rope: x must be a CUDA [B, S, X, dk] tensor, dk even, last axis contiguous");
    TORCH_CHECK(x->scalar_type() == at::kFloat || x->scalar_type() == at::kBFloat16,
                "fused rope: x must be bf16 or fp32");
    for (const at::Tensor* t : {cos_t, sin_t}) {
      TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 &&
                      t->size(0) >= x->size(1) && t->size(1) == x->size(3) / 2 &&
                      t->device() == x->device(),
                  "fused rope: tables must be contiguous fp32 [>= S, dk/2] on x's device");
    }
    auto out = RopeFused::apply(*x, *cos_t, *sin_t, reinterpret_cast<int64_t>(table));
    return new at::Tensor(std::move(out));
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
    return nullptr;
  }
}

// The gated sum of three branch outputs (same dtype, [B, S, H, dv], any strides) with gates
// [B, S, H, 3] (contiguous): a new at::Tensor* (ownership to the caller), or nullptr with a
// message in err.
at::Tensor* nsa_fused_gate_mix(const at::Tensor* oc, const at::Tensor* os, const at::Tensor* ow,
                               const at::Tensor* g, const NsaPointwiseTable* table, char* err,
                               size_t err_len) {
  try {
    check_mix_operands(oc, os, ow, g, table);
    auto out = GateMixFused::apply(rows_readable(*oc), rows_readable(*os), rows_readable(*ow),
                                   *g, reinterpret_cast<int64_t>(table));
    return new at::Tensor(std::move(out));
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
    return nullptr;
  }
}

// The gated sum and W_o in one (see GateMixProjFused): branch outputs and gates as
// nsa_fused_gate_mix takes them, w [dim, H * dv] contiguous in their dtype: a new
// at::Tensor* [B, S, dim] (ownership to the caller), or nullptr with a message in err.
at::Tensor* nsa_fused_gate_mix_project(const at::Tensor* oc, const at::Tensor* os,
                                       const at::Tensor* ow, const at::Tensor* g,
                                       const at::Tensor* w, const NsaPointwiseTable* table,
                                       char* err, size_t err_len) {
  try {
    check_mix_operands(oc, os, ow, g, table);
    TORCH_CHECK(w->is_cuda() && w->device() == oc->device() &&
                    w->scalar_type() == oc->scalar_type() && w->dim() == 2 &&
                    w->is_contiguous() && w->size(1) == oc->size(2) * oc->size(3),
                "fused gate mix + projection: w must be a contiguous [dim, H * dv] CUDA tensor "
                "in the branch outputs' dtype");
    auto out = GateMixProjFused::apply(rows_readable(*oc), rows_readable(*os),
                                       rows_readable(*ow), *g, *w,
                                       reinterpret_cast<int64_t>(table));
    return new at::Tensor(std::move(out));
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
    return nullptr;
  }
}

// The blocks φ compresses (see CmpBlocksFused; shapes and dtypes checked by the Rust caller,
// repeated here): a new at::Tensor* (ownership to the caller), or nullptr with a message in err.
// pos may be null (no position embedding).
at::Tensor* nsa_fused_cmp_blocks(const at::Tensor* x, const at::Tensor* pos, int64_t L,
                                 int64_t stride, const NsaPointwiseTable* table, char* err,
                                 size_t err_len) {
  try {
    Tensor p = checked_blocks_pos(x, pos, L, stride, table);
    int64_t has_pos = pos != nullptr ? 1 : 0;
    auto out =
        CmpBlocksFused::apply(*x, p, has_pos, L, stride, reinterpret_cast<int64_t>(table));
    return new at::Tensor(std::move(out));
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
    return nullptr;
  }
}

// The blocks and φ's first linear map (see CmpBlocksLinearFused): as nsa_fused_cmp_blocks, with
// w1 [F, L * D] contiguous in x's dtype and b1 [F] (null for none): a new at::Tensor*
// [B, Nc, G, F], or nullptr with a message in err.
at::Tensor* nsa_fused_cmp_blocks_linear(const at::Tensor* x, const at::Tensor* pos,
                                        const at::Tensor* w1, const at::Tensor* b1, int64_t L,
                                        int64_t stride, const NsaPointwiseTable* table,
                                        char* err, size_t err_len) {
  try {
    Tensor p = checked_blocks_pos(x, pos, L, stride, table);
    TORCH_CHECK(w1->scalar_type() == x->scalar_type() && w1->device() == x->device() &&
                    w1->dim() == 2 && w1->is_contiguous() && w1->size(1) == L * x->size(3),
                "fused cmp blocks + linear: w1 must be a contiguous [F, L * D] tensor in x's "
                "dtype on x's device");
    Tensor b = at::empty({0}, x->options());
    if (b1 != nullptr) {
      TORCH_CHECK(b1->scalar_type() == x->scalar_type() && b1->device() == x->device() &&
                      b1->dim() == 1 && b1->size(0) == w1->size(0),
                  "fused cmp blocks + linear: b1 must be [F] in x's dtype on x's device");
      b = *b1;
    }
    auto out = CmpBlocksLinearFused::apply(*x, p, *w1, b, pos != nullptr ? 1 : 0,
                                           b1 != nullptr ? 1 : 0, L, stride,
                                           reinterpret_cast<int64_t>(table));
    return new at::Tensor(std::move(out));
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
    return nullptr;
  }
}

}  // extern "C"
