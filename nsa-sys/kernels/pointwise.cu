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
//
// nsa_ce_rows_{bf16, f32}: the cross-entropy of each row of the logits z [R, V] (contiguous,
//   type T) against target[r] (int64; a row whose target equals `ignore` is not scored), and
//   the gradient of the mean loss written over the logits (glue/loss.cpp, one chunk of rows of
//   the output head at a time):
//     lse_r = log sum_j exp(z[r, j]),   loss[r] = keep_r ? lse_r - z[r, target_r] : 0 (fp32)
//     z[r, j] <- keep_r * inv_count * (exp(z[r, j] - lse_r) - [j == target_r])   (rounded to T)
//   inv_count (1 / the scored rows of the whole batch) is read on the device, so no host
//   synchronisation. A scored target outside 0..V gives a NaN loss and no one-hot term.
//   One CTA of NSA_POINTWISE_THREADS per row, two passes over it: the first keeps a running
//   maximum and sum of exponentials per thread (online softmax) merged by a butterfly in each
//   warp and then across warps in warp order by one thread (deterministic); the second writes
//   the gradient. 16-byte loads and stores when the row is 16-byte aligned and V a multiple
//   of the vector (8 bf16, 4 fp32), element loads otherwise. A row of the `125m` head (50,304
//   bf16 logits) is 98 KB, so the second pass mostly hits L2: DRAM sees about one read and one
//   write of the logits, against libtorch's chain (cast to fp32, logsumexp, exp, one-hot,
//   scale, cast back), which writes and reads the fp32 logits five times over.
//
// nsa_rms_norm_{IN}_{A}_{OUT} and nsa_rms_norm_bwd_{IN}_{A}_{OUT} (each in bf16, f32): RMSNorm
//   of the rows of x [R, D] (IN, contiguous), or, with a [R, D] (A) given, of the residual sum
//   x + a, stored to sum (IN, rounded once, as libtorch's add) and normed as stored; weight w
//   [D] (fp32):
//     rstd[r] = 1 / sqrt(mean_j x[r, j]^2 + eps),   y[r, j] = (x[r, j] * rstd[r]) * w[j]
//   in fp32 in that order (nsa-model's operator path), y rounded once to OUT, rstd kept (fp32)
//   for the backward. Backward for dy [R, D] (OUT): with xh = x * rstd and gw = dy * w,
//     dx[r, j] = rstd[r] * (gw[r, j] - xh[r, j] * mean_k gw[r, k] * xh[r, k])   (IN)
//     dw_part[c, j] = sum over the rows of CTA c of dy[r, j] * xh[r, j]           (fp32)
//   and the host sums dw_part over c (the partials of a fixed grid: deterministic). With the
//   residual sum, dx also adds dres (IN, the sum's gradient from its other use) and is written
//   again to da in A: the gradients of x and a. One warp
//   per row (rows strided over the grid's warps in a fixed order), lanes striding over D, so
//   loads and stores are coalesced; the row sums are warp butterflies. Each warp accumulates
//   its rows' dw in its own slice of shared memory ([warps][D] fp32, only its lanes touch it),
//   summed over the warps in warp order at the end. Both kernels read each row twice (the
//   second time from L1/L2): DRAM sees one read of x (and dy) and one write of y (dx).
//
// nsa_swiglu_{bf16, f32} and nsa_swiglu_bwd_{bf16, f32}: the SwiGLU of the MLP on the output
//   of its stacked gate and up projections, ab [R, 2H] (type T, contiguous): with a = ab[r, j]
//   and b = ab[r, H + j],
//     o[r, j] = silu(a) * b = a * sigmoid(a) * b                                  (T, [R, H])
//   Backward for dout [R, H] (T), into dab [R, 2H] (T):
//     dab[r, j] = dout * b * sigmoid(a) * (1 + a * (1 - sigmoid(a))),   dab[r, H + j] = dout * silu(a)
//   fp32 arithmetic, one rounding per stored element. Each thread takes 16 bytes of a row
//   (8 bf16 or 4 fp32 elements, grid-stride) when H is a multiple of that and the rows are
//   16-byte aligned (vec = 1), one element otherwise. libtorch runs this as silu, mul (two
//   kernels, an intermediate written) forward and three backward (two muls and
//   silu_backward), plus the add of the two projections' input gradients that the stacked
//   projection's single matmul makes unnecessary.
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

// Adds x to a running (maximum m, sum s of exp(. - m)); -inf adds nothing.
__device__ __forceinline__ void max_sum_add(float& m, float& s, float x) {
  if (x > m) {
    s = s * expf(m - x) + 1.f;
    m = x;
  } else if (x != -INFINITY) {
    s += expf(x - m);
  }
}

// Merges (m2, s2) into (m, s).
__device__ __forceinline__ void max_sum_merge(float& m, float& s, float m2, float s2) {
  const float mm = fmaxf(m, m2);
  if (mm == -INFINITY) return;
  s = s * expf(m - mm) + s2 * expf(m2 - mm);
  m = mm;
}

template <typename T>
__device__ __forceinline__ void ce_rows(T* __restrict__ z, const long long* __restrict__ target,
                                        long long ignore, const float* __restrict__ inv_count,
                                        float* __restrict__ loss, int V) {
  constexpr int W = 16 / sizeof(T);
  __shared__ float warp_m[32], warp_s[32], row_lse;
  T* row = z + (long long)blockIdx.x * V;
  const bool vec = V % W == 0 && reinterpret_cast<unsigned long long>(row) % 16 == 0;
  float m = -INFINITY, s = 0.f;
  if (vec) {
    const uint4* rv = reinterpret_cast<const uint4*>(row);
    for (int i = threadIdx.x; i < V / W; i += blockDim.x) {
      const uint4 pack = rv[i];
      const T* e = reinterpret_cast<const T*>(&pack);
#pragma unroll
      for (int k = 0; k < W; ++k) max_sum_add(m, s, to_f(e[k]));
    }
  } else {
    for (int j = threadIdx.x; j < V; j += blockDim.x) max_sum_add(m, s, to_f(row[j]));
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, off);
    max_sum_merge(m, s, m2, s2);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    warp_m[warp] = m;
    warp_s[warp] = s;
  }
  __syncthreads();
  const long long t = target[blockIdx.x];
  const bool keep = t != ignore;
  const bool in_range = t >= 0 && t < V;
  if (threadIdx.x == 0) {
    float mm = warp_m[0], ss = warp_s[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); ++w) max_sum_merge(mm, ss, warp_m[w], warp_s[w]);
    const float lse = mm + logf(ss);
    row_lse = lse;
    // The target's logit is read before the second pass overwrites it.
    loss[blockIdx.x] = !keep ? 0.f : in_range ? lse - to_f(row[t]) : __int_as_float(0x7fc00000);
  }
  __syncthreads();
  const float lse = row_lse;
  const float scale = keep ? *inv_count : 0.f;
  const int hot = keep && in_range ? (int)t : -1;
  if (vec) {
    uint4* rv = reinterpret_cast<uint4*>(row);
    for (int i = threadIdx.x; i < V / W; i += blockDim.x) {
      uint4 pack = rv[i];
      T* e = reinterpret_cast<T*>(&pack);
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const float p = expf(to_f(e[k]) - lse);
        e[k] = from_f<T>(scale * (i * W + k == hot ? p - 1.f : p));
      }
      rv[i] = pack;
    }
  } else {
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
      const float p = expf(to_f(row[j]) - lse);
      row[j] = from_f<T>(scale * (j == hot ? p - 1.f : p));
    }
  }
}

template <typename In, typename A, typename Out>
__device__ __forceinline__ void rms_norm(const In* __restrict__ x, const A* __restrict__ a,
                                         In* __restrict__ sum, const float* __restrict__ w,
                                         float eps, Out* __restrict__ y,
                                         float* __restrict__ rstd, int D, long long rows) {
  const int lane = threadIdx.x & 31;
  const long long warps = (long long)gridDim.x * (blockDim.x / 32);
  for (long long r = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; r < rows;
       r += warps) {
    const In* xr = x + r * D;
    float ss = 0.f;
    if (a != nullptr) {
      const A* ar = a + r * D;
      In* sr = sum + r * D;
#pragma unroll 4
      for (int j = lane; j < D; j += 32) {
        const In s = from_f<In>(to_f(xr[j]) + to_f(ar[j]));
        sr[j] = s;
        ss += to_f(s) * to_f(s);
      }
      xr = sr;  // the norm reads the sum as stored (read back by the same lane)
    } else {
#pragma unroll 4
      for (int j = lane; j < D; j += 32) {
        const float v = to_f(xr[j]);
        ss += v * v;
      }
    }
    ss = warp_sum(ss);
    const float rs = rsqrtf(ss / (float)D + eps);
    Out* yr = y + r * D;
#pragma unroll 4
    for (int j = lane; j < D; j += 32) yr[j] = from_f<Out>((to_f(xr[j]) * rs) * w[j]);
    if (lane == 0) rstd[r] = rs;
  }
}

template <typename In, typename A, typename Out>
__device__ __forceinline__ void rms_norm_bwd(const In* __restrict__ x,
                                             const float* __restrict__ w,
                                             const float* __restrict__ rstd,
                                             const Out* __restrict__ dy,
                                             const In* __restrict__ dres, In* __restrict__ dx,
                                             A* __restrict__ da, float* __restrict__ dw_part,
                                             int D, long long rows) {
  extern __shared__ float dw_warp[];  // [warps][D]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  float* acc = dw_warp + (long long)warp * D;
  for (int j = lane; j < D; j += 32) acc[j] = 0.f;
  const long long warps = (long long)gridDim.x * nwarps;
  for (long long r = (long long)blockIdx.x * nwarps + warp; r < rows; r += warps) {
    const In* xr = x + r * D;
    const Out* gr = dy + r * D;
    const float rs = rstd[r];
    float dot = 0.f;
#pragma unroll 4
    for (int j = lane; j < D; j += 32) dot += (to_f(gr[j]) * w[j]) * (to_f(xr[j]) * rs);
    const float c = warp_sum(dot) / (float)D;
    In* dr = dx + r * D;
    const In* rr = dres == nullptr ? nullptr : dres + r * D;
    A* ad = da == nullptr ? nullptr : da + r * D;
#pragma unroll 4
    for (int j = lane; j < D; j += 32) {
      const float g = to_f(gr[j]), xh = to_f(xr[j]) * rs;
      float d = rs * (g * w[j] - xh * c);
      if (rr != nullptr) d += to_f(rr[j]);
      dr[j] = from_f<In>(d);
      if (ad != nullptr) ad[j] = from_f<A>(d);
      acc[j] += g * xh;
    }
  }
  __syncthreads();
  for (int j = threadIdx.x; j < D; j += blockDim.x) {
    float s = 0.f;
    for (int k = 0; k < nwarps; ++k) s += dw_warp[(long long)k * D + j];
    dw_part[(long long)blockIdx.x * D + j] = s;
  }
}

__device__ __forceinline__ float sigmoid_f(float a) { return 1.f / (1.f + expf(-a)); }

// Calls f(r, j) for each thread's pieces of rows x H: 16 bytes of type T (j a multiple of
// 16 / sizeof(T)) when vec, one element otherwise; grid-stride.
template <typename T, typename F>
__device__ __forceinline__ void for_each_piece(int H, long long rows, int vec, F f) {
  const int per = vec ? 16 / (int)sizeof(T) : 1;
  const long long chunks = rows * (H / per);
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x; c < chunks; c += stride) {
    const long long r = c / (H / per);
    f(r, (int)(c - r * (H / per)) * per);
  }
}

template <typename T>
__device__ __forceinline__ void swiglu(const T* __restrict__ ab, T* __restrict__ o, int H,
                                       long long rows, int vec) {
  constexpr int W = 16 / sizeof(T);
  for_each_piece<T>(H, rows, vec, [&](long long r, int j) {
    const T* ar = ab + r * 2 * H + j;
    T* orow = o + r * H + j;
    if (vec) {
      uint4 pa = *reinterpret_cast<const uint4*>(ar);
      const uint4 pb = *reinterpret_cast<const uint4*>(ar + H);
      T* ea = reinterpret_cast<T*>(&pa);
      const T* eb = reinterpret_cast<const T*>(&pb);
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const float a = to_f(ea[k]);
        ea[k] = from_f<T>(a * sigmoid_f(a) * to_f(eb[k]));
      }
      *reinterpret_cast<uint4*>(orow) = pa;
    } else {
      const float a = to_f(ar[0]);
      orow[0] = from_f<T>(a * sigmoid_f(a) * to_f(ar[H]));
    }
  });
}

template <typename T>
__device__ __forceinline__ void swiglu_bwd(const T* __restrict__ ab, const T* __restrict__ dout,
                                           T* __restrict__ dab, int H, long long rows,
                                           int vec) {
  constexpr int W = 16 / sizeof(T);
  for_each_piece<T>(H, rows, vec, [&](long long r, int j) {
    const T* ar = ab + r * 2 * H + j;
    const T* gr = dout + r * H + j;
    T* dr = dab + r * 2 * H + j;
    if (vec) {
      uint4 pa = *reinterpret_cast<const uint4*>(ar);
      uint4 pb = *reinterpret_cast<const uint4*>(ar + H);
      const uint4 pg = *reinterpret_cast<const uint4*>(gr);
      T* ea = reinterpret_cast<T*>(&pa);
      T* eb = reinterpret_cast<T*>(&pb);
      const T* eg = reinterpret_cast<const T*>(&pg);
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const float a = to_f(ea[k]), b = to_f(eb[k]), g = to_f(eg[k]);
        const float sg = sigmoid_f(a);
        ea[k] = from_f<T>(g * b * sg * (1.f + a * (1.f - sg)));
        eb[k] = from_f<T>(g * a * sg);
      }
      *reinterpret_cast<uint4*>(dr) = pa;
      *reinterpret_cast<uint4*>(dr + H) = pb;
    } else {
      const float a = to_f(ar[0]), b = to_f(ar[H]), g = to_f(gr[0]);
      const float sg = sigmoid_f(a);
      dr[0] = from_f<T>(g * b * sg * (1.f + a * (1.f - sg)));
      dr[H] = from_f<T>(g * a * sg);
    }
  });
}

}  // namespace nsa

#define NSA_SWIGLU(SUFFIX, T)                                                                  \
  extern "C" __global__ void __launch_bounds__(NSA_POINTWISE_THREADS) nsa_swiglu_##SUFFIX(    \
      const T* ab, T* o, int H, long long rows, int vec) {                                     \
    nsa::swiglu<T>(ab, o, H, rows, vec);                                                       \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(NSA_POINTWISE_THREADS) nsa_swiglu_bwd_##SUFFIX( \
      const T* ab, const T* dout, T* dab, int H, long long rows, int vec) {                    \
    nsa::swiglu_bwd<T>(ab, dout, dab, H, rows, vec);                                           \
  }
NSA_SWIGLU(bf16, __nv_bfloat16)
NSA_SWIGLU(f32, float)

#define NSA_RMS_NORM(SUFFIX, IN, A, OUT)                                                       \
  extern "C" __global__ void __launch_bounds__(NSA_POINTWISE_THREADS) nsa_rms_norm_##SUFFIX(  \
      const IN* x, const A* a, IN* sum, const float* w, float eps, OUT* y, float* rstd, int D,  \
      long long rows) {                                                                        \
    nsa::rms_norm<IN, A, OUT>(x, a, sum, w, eps, y, rstd, D, rows);                            \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(NSA_POINTWISE_THREADS)                          \
      nsa_rms_norm_bwd_##SUFFIX(const IN* x, const float* w, const float* rstd, const OUT* dy, \
                                const IN* dres, IN* dx, A* da, float* dw_part, int D,          \
                                long long rows) {                                              \
    nsa::rms_norm_bwd<IN, A, OUT>(x, w, rstd, dy, dres, dx, da, dw_part, D, rows);             \
  }
// Suffix: x (and the sum), the added a, y.
NSA_RMS_NORM(bf16_bf16_bf16, __nv_bfloat16, __nv_bfloat16, __nv_bfloat16)
NSA_RMS_NORM(bf16_bf16_f32, __nv_bfloat16, __nv_bfloat16, float)
NSA_RMS_NORM(bf16_f32_bf16, __nv_bfloat16, float, __nv_bfloat16)
NSA_RMS_NORM(bf16_f32_f32, __nv_bfloat16, float, float)
NSA_RMS_NORM(f32_bf16_bf16, float, __nv_bfloat16, __nv_bfloat16)
NSA_RMS_NORM(f32_bf16_f32, float, __nv_bfloat16, float)
NSA_RMS_NORM(f32_f32_bf16, float, float, __nv_bfloat16)
NSA_RMS_NORM(f32_f32_f32, float, float, float)

#define NSA_CE_ROWS(SUFFIX, T)                                                                 \
  extern "C" __global__ void __launch_bounds__(NSA_POINTWISE_THREADS) nsa_ce_rows_##SUFFIX(   \
      T* z, const long long* target, long long ignore, const float* inv_count, float* loss,    \
      int V) {                                                                                 \
    nsa::ce_rows<T>(z, target, ignore, inv_count, loss, V);                                    \
  }
NSA_CE_ROWS(bf16, __nv_bfloat16)
NSA_CE_ROWS(f32, float)

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
