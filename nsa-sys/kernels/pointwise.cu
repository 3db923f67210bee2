// Pointwise work of the NSA layer around the attention kernels, one pass over memory each
// where libtorch's elementwise operators take several (their forward and their autograd
// backward each launch one kernel per mul / add / cat and write every intermediate).
//
// nsa_rope_{IN}_{OUT} (IN, OUT in bf16, f32): rotary position embedding, rotate-half form
//   (nsa-attn's rope.rs): for each row (b, s, h) of x [B, S, X, dk] and each pair
//   (i, i + dk/2), i < dk/2,
//     y[i]        = x[i] * cos[s, i] - x[i + dk/2] * sign * sin[s, i]
//     y[i + dk/2] = x[i + dk/2] * cos[s, i] + x[i] * sign * sin[s, i]
//   in fp32, written rounded to OUT. sign = +1 rotates (forward); sign = -1 rotates back by the
//   same angle, which is the transpose of the rotation, so the backward is the same kernel on
//   the output gradient. x may be a strided view (strides xb, xs, xh in elements; the last axis
//   contiguous): a slice of a stacked projection is read in place. y is contiguous
//   [B, S, X, dk]; cos and sin are fp32 [S, dk/2]. One thread per (row, pair): a warp reads 32
//   consecutive pairs' two halves, so every load and store is coalesced. No shared memory;
//   the kernel is bound by DRAM bandwidth (2 reads + 2 writes of the element size per pair,
//   plus the tables, which stay in L2).
//
// nsa_gate_mix_{bf16, f32} and nsa_gate_mix_bwd_{bf16, f32}: the gated sum of the three
//   branches (Eq. 5), o[r, :] = g[r, 0] * oc[r, :] + g[r, 1] * os[r, :] + g[r, 2] * ow[r, :]
//   for rows r = (b, s, h) of oc, os, ow, o [R, dv] and gates g [R, 3] (cmp, slc, win), one
//   type T. o and g are contiguous; row r of oc, os, ow starts at r * rc, r * rs, r * rw
//   (row strides >= dv: the window branch's output arrives as a narrowed view of a wider one,
//   read in place rather than copied). Forward: one thread per element, fp32 arithmetic in
//   that order.
//   Backward for dout [R, dv]: doc = g0 * dout, dos = g1 * dout, dow = g2 * dout (T), and
//   dg [R, 3] (T) = the row sums over dv of oc * dout, os * dout, ow * dout in fp32, one warp
//   per row, lanes striding over dv and a fixed butterfly: deterministic.
#include "common.cuh"

#define NSA_POINTWISE_THREADS 256

namespace nsa {

template <typename In, typename Out>
__device__ __forceinline__ void rope(const In* __restrict__ x, long long xb, long long xs,
                                     long long xh, const float* __restrict__ cos_t,
                                     const float* __restrict__ sin_t, float sign,
                                     Out* __restrict__ y, int S, int X, int half,
                                     long long pairs) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x; p < pairs; p += stride) {
    const int i = (int)(p % half);
    const long long row = p / half;
    const int h = (int)(row % X);
    const long long bs = row / X;
    const int s = (int)(bs % S);
    const long long b = bs / S;
    const In* xr = x + b * xb + (long long)s * xs + (long long)h * xh;
    const float x1 = to_f(xr[i]), x2 = to_f(xr[i + half]);
    const float c = cos_t[(long long)s * half + i];
    const float sn = sign * sin_t[(long long)s * half + i];
    Out* yr = y + row * 2 * half;
    yr[i] = from_f<Out>(x1 * c - x2 * sn);
    yr[i + half] = from_f<Out>(x2 * c + x1 * sn);
  }
}

template <typename T>
__device__ __forceinline__ void gate_mix(const T* __restrict__ oc, const T* __restrict__ os,
                                         const T* __restrict__ ow, const T* __restrict__ g,
                                         T* __restrict__ o, int dv, long long n,
                                         long long rc, long long rs, long long rw) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += stride) {
    const long long r = e / dv, d = e - r * dv;
    const float v = to_f(g[3 * r]) * to_f(oc[r * rc + d]) +
                    to_f(g[3 * r + 1]) * to_f(os[r * rs + d]) +
                    to_f(g[3 * r + 2]) * to_f(ow[r * rw + d]);
    o[e] = from_f<T>(v);
  }
}

template <typename T>
__device__ __forceinline__ void gate_mix_bwd(const T* __restrict__ oc, const T* __restrict__ os,
                                             const T* __restrict__ ow, const T* __restrict__ g,
                                             const T* __restrict__ dout, T* __restrict__ doc,
                                             T* __restrict__ dos, T* __restrict__ dow,
                                             T* __restrict__ dg, int dv, long long rows,
                                             long long rc, long long rs, long long rw) {
  const int lane = threadIdx.x & 31;
  const long long warps = (long long)gridDim.x * (blockDim.x / 32);
  for (long long r = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; r < rows;
       r += warps) {
    const float g0 = to_f(g[3 * r]), g1 = to_f(g[3 * r + 1]), g2 = to_f(g[3 * r + 2]);
    float sc = 0.f, ss = 0.f, sw = 0.f;
    for (int d = lane; d < dv; d += 32) {
      const long long e = r * dv + d;
      const float go = to_f(dout[e]);
      sc += to_f(oc[r * rc + d]) * go;
      ss += to_f(os[r * rs + d]) * go;
      sw += to_f(ow[r * rw + d]) * go;
      doc[e] = from_f<T>(g0 * go);
      dos[e] = from_f<T>(g1 * go);
      dow[e] = from_f<T>(g2 * go);
    }
    sc = warp_sum(sc);
    ss = warp_sum(ss);
    sw = warp_sum(sw);
    if (lane == 0) {
      dg[3 * r] = from_f<T>(sc);
      dg[3 * r + 1] = from_f<T>(ss);
      dg[3 * r + 2] = from_f<T>(sw);
    }
  }
}

}  // namespace nsa

#define NSA_ROPE(NAME, IN, OUT)                                                                \
  extern "C" __global__ void __launch_bounds__(NSA_POINTWISE_THREADS)                          \
      NAME(const IN* x, long long xb, long long xs, long long xh, const float* cos_t,          \
           const float* sin_t, float sign, OUT* y, int S, int X, int half, long long pairs) {  \
    nsa::rope<IN, OUT>(x, xb, xs, xh, cos_t, sin_t, sign, y, S, X, half, pairs);             \
  }
NSA_ROPE(nsa_rope_bf16_bf16, __nv_bfloat16, __nv_bfloat16)
NSA_ROPE(nsa_rope_f32_f32, float, float)
NSA_ROPE(nsa_rope_f32_bf16, float, __nv_bfloat16)
NSA_ROPE(nsa_rope_bf16_f32, __nv_bfloat16, float)

#define NSA_GATE_MIX(SUFFIX, T)                                                                 \
  extern "C" __global__ void __launch_bounds__(NSA_POINTWISE_THREADS) nsa_gate_mix_##SUFFIX(   \
      const T* oc, const T* os, const T* ow, const T* g, T* o, int dv, long long n,             \
      long long rc, long long rs, long long rw) {                                               \
    nsa::gate_mix<T>(oc, os, ow, g, o, dv, n, rc, rs, rw);                                      \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(NSA_POINTWISE_THREADS)                           \
      nsa_gate_mix_bwd_##SUFFIX(const T* oc, const T* os, const T* ow, const T* g,              \
                                const T* dout, T* doc, T* dos, T* dow, T* dg, int dv,           \
                                long long rows, long long rc, long long rs, long long rw) {     \
    nsa::gate_mix_bwd<T>(oc, os, ow, g, dout, doc, dos, dow, dg, dv, rows, rc, rs, rw);         \
  }
NSA_GATE_MIX(bf16, __nv_bfloat16)
NSA_GATE_MIX(f32, float)
