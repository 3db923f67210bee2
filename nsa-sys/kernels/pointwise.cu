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
//   [B, S, X, dk]; cos and sin are fp32 [S, dk/2]. With vec (dk/2 a multiple of 8, x's strides
//   multiples of 8 elements, every pointer 16-byte aligned: the host checks) a thread takes 8
//   consecutive pairs of a row: one 16-byte load per half for bf16 (two for fp32), two
//   16-byte loads of each table, one index computation for the 8; otherwise one pair per
//   thread, where the 64-bit index arithmetic costs more than the memory traffic (round 12
//   measured the one-pair kernel at about a third of DRAM bandwidth). A warp covers
//   consecutive pieces of a row, so loads and stores are coalesced either way. No shared
//   memory; bound by DRAM bandwidth (2 reads + 2 writes of the element size per pair, plus
//   the tables, which stay in L2).
//
// nsa_cmp_blocks_{bf16, f32} and nsa_cmp_blocks_bwd_{bf16, f32}: the input of the compressed
//   branch's φ (nsa-attn's phi.rs, Eq. 7): the overlapping blocks of raw keys or values
//   x [B, S, G, D] (type T, strides xb, xs, xg in elements, the last axis contiguous: a
//   slice of the stacked projection is read in place) plus the intra-block position
//   embedding pos [L, G, D] (T, contiguous; or none), laid out per head as φ's linear maps
//   read them:
//     out[b, i, g, p, :] = x[b, i * stride + p, g, :] + pos[p, g, :]   (out [B, Nc, G, L, D])
//   for i < Nc, p < L, the sum in fp32 rounded once (libtorch's add of the two T tensors).
//   libtorch runs this as unfold (a view), an add that writes [B, Nc, L, G, D] and a copy
//   into φ's [B, Nc, G, L·D] layout.
//   Backward for dout [B, Nc, G, L, D] (T, contiguous): each token gathers what the blocks
//   covering it received, dx[b, s, g, :] = sum over i with i * stride <= s < i * stride + L
//   (ascending i) of dout[b, i, g, s - i * stride, :], in fp32, rounded once; tokens no
//   block covers get 0. A gather, not a scatter: no atomics, deterministic (libtorch's
//   unfold_backward writes the same sums through a zero-filled tensor). pos's gradient is a
//   libtorch sum over (b, i) in the glue.
//   Both: 16 bytes of D a thread (8 bf16, 4 fp32) with vec (D and every stride a multiple of
//   the vector, pointers 16-byte aligned: the host checks), one element otherwise.
//
// nsa_gate_mix_{bf16, f32} and nsa_gate_mix_bwd_{bf16, f32}: the gated sum of the three
//   branches (Eq. 5), o[r, :] = g[r, 0] * oc[r, :] + g[r, 1] * os[r, :] + g[r, 2] * ow[r, :]
//   for rows r = (b, s, h) of oc, os, ow, o [R, dv] and gates g [R, 3] (cmp, slc, win), one
//   type T. o and g are contiguous; row r of oc, os, ow starts at r * rc, r * rs, r * rw
//   (row strides >= dv: the window branch's output arrives as a narrowed view of a wider one,
//   read in place rather than copied). Forward: fp32 arithmetic in that order, each thread 16
//   bytes of a row (8 bf16, 4 fp32) with vec (dv and the row strides multiples of the vector,
//   pointers 16-byte aligned: the host checks), one element otherwise.
//   Backward for dout [R, dv]: doc = g0 * dout, dos = g1 * dout, dow = g2 * dout (T), and
//   dg [R, 3] (T) = the row sums over dv of oc * dout, os * dout, ow * dout in fp32, a fixed
//   butterfly over the row's lanes: deterministic. With vec, 8 lanes per row (a warp takes 4
//   rows) and 16 bytes a lane; otherwise one warp per row, lanes striding over dv.
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

// 8 consecutive elements of type T from (16-byte aligned) p, as floats.
__device__ __forceinline__ void load8(const __nv_bfloat16* __restrict__ p, float* f) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat16* e = reinterpret_cast<const __nv_bfloat16*>(&u);
#pragma unroll
  for (int k = 0; k < 8; ++k) f[k] = __bfloat162float(e[k]);
}
__device__ __forceinline__ void load8(const float* __restrict__ p, float* f) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  const float4 b = *reinterpret_cast<const float4*>(p + 4);
  f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}
// 8 floats rounded to T, stored at (16-byte aligned) p.
__device__ __forceinline__ void store8(__nv_bfloat16* __restrict__ p, const float* f) {
  uint4 u;
  __nv_bfloat16* e = reinterpret_cast<__nv_bfloat16*>(&u);
#pragma unroll
  for (int k = 0; k < 8; ++k) e[k] = __float2bfloat16(f[k]);
  *reinterpret_cast<uint4*>(p) = u;
}
__device__ __forceinline__ void store8(float* __restrict__ p, const float* f) {
  *reinterpret_cast<float4*>(p) = make_float4(f[0], f[1], f[2], f[3]);
  *reinterpret_cast<float4*>(p + 4) = make_float4(f[4], f[5], f[6], f[7]);
}

template <typename In, typename Out>
__device__ __forceinline__ void rope(const In* __restrict__ x, long long xb, long long xs,
                                     long long xh, const float* __restrict__ cos_t,
                                     const float* __restrict__ sin_t, float sign,
                                     Out* __restrict__ y, int S, int X, int half,
                                     long long pairs, int vec) {
  const int per = vec ? 8 : 1;  // pairs a thread takes at once
  const int pieces_per_row = half / per;
  const long long pieces = pairs / per;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x; p < pieces; p += stride) {
    const long long row = p / pieces_per_row;
    const int i = (int)(p - row * pieces_per_row) * per;
    const int h = (int)(row % X);
    const long long bs = row / X;
    const int s = (int)(bs % S);
    const long long b = bs / S;
    const In* xr = x + b * xb + (long long)s * xs + (long long)h * xh;
    const float* cr = cos_t + (long long)s * half + i;
    const float* sr = sin_t + (long long)s * half + i;
    Out* yr = y + row * 2 * half;
    if (vec) {
      float x1[8], x2[8], c[8], sn[8], y1[8], y2[8];
      load8(xr + i, x1);
      load8(xr + i + half, x2);
      load8(cr, c);
      load8(sr, sn);
#pragma unroll
      for (int k = 0; k < 8; ++k) rope_turn(x1[k], x2[k], c[k], sign * sn[k], y1[k], y2[k]);
      store8(yr + i, y1);
      store8(yr + i + half, y2);
    } else {
      float y1, y2;
      rope_turn(to_f(xr[i]), to_f(xr[i + half]), cr[0], sign * sr[0], y1, y2);
      yr[i] = from_f<Out>(y1);
      yr[i + half] = from_f<Out>(y2);
    }
  }
}

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

// Adds W floats from T's at p (vectorised when W > 1: 16 bytes) into acc.
template <int W, typename T>
__device__ __forceinline__ void add_piece(const T* __restrict__ p, float* acc) {
  if (W == 1) {
    acc[0] += to_f(p[0]);
  } else {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int k = 0; k < W; ++k) acc[k] += to_f(e[k]);
  }
}

// Stores W floats rounded to T at p (16 bytes when W > 1).
template <int W, typename T>
__device__ __forceinline__ void store_piece(T* __restrict__ p, const float* acc) {
  if (W == 1) {
    p[0] = from_f<T>(acc[0]);
  } else {
    uint4 u;
    T* e = reinterpret_cast<T*>(&u);
#pragma unroll
    for (int k = 0; k < W; ++k) e[k] = from_f<T>(acc[k]);
    *reinterpret_cast<uint4*>(p) = u;
  }
}

template <int W, typename T>
__device__ __forceinline__ void cmp_blocks_body(const T* __restrict__ x, long long xb,
                                                long long xs, long long xg,
                                                const T* __restrict__ pos, T* __restrict__ out,
                                                int Nc, int G, int L, int D, int stride,
                                                long long rows) {
  for_each_piece<T>(D, rows, W > 1, [&](long long r, int j) {
    // r = ((b * Nc + i) * G + g) * L + p
    const int p = (int)(r % L);
    const long long big = r / L;
    const int g = (int)(big % G);
    const long long bi = big / G;
    const int i = (int)(bi % Nc);
    const long long b = bi / Nc;
    float acc[W];
#pragma unroll
    for (int k = 0; k < W; ++k) acc[k] = 0.f;
    add_piece<W>(x + b * xb + ((long long)i * stride + p) * xs + (long long)g * xg + j, acc);
    if (pos != nullptr) add_piece<W>(pos + ((long long)p * G + g) * D + j, acc);
    store_piece<W>(out + r * D + j, acc);
  });
}

template <int W, typename T>
__device__ __forceinline__ void cmp_blocks_bwd_body(const T* __restrict__ dout,
                                                    T* __restrict__ dx, int S, int Nc, int G,
                                                    int L, int D, int stride, long long rows) {
  for_each_piece<T>(D, rows, W > 1, [&](long long r, int j) {
    // r = (b * S + s) * G + g
    const int g = (int)(r % G);
    const long long bs = r / G;
    const int s = (int)(bs % S);
    const long long b = bs / S;
    // Blocks i with i * stride <= s < i * stride + L, i < Nc.
    const int lo = s < L ? 0 : (s - L) / stride + 1;
    const int hi = min(Nc - 1, s / stride);
    float acc[W];
#pragma unroll
    for (int k = 0; k < W; ++k) acc[k] = 0.f;
    for (int i = lo; i <= hi; ++i) {
      const int p = s - i * stride;
      add_piece<W>(dout + ((((b * Nc + i) * G + g) * L + p) * (long long)D) + j, acc);
    }
    store_piece<W>(dx + r * D + j, acc);
  });
}

template <typename T>
__device__ __forceinline__ void cmp_blocks(const T* __restrict__ x, long long xb, long long xs,
                                           long long xg, const T* __restrict__ pos,
                                           T* __restrict__ out, int Nc, int G, int L, int D,
                                           int stride, long long rows, int vec) {
  constexpr int W = 16 / sizeof(T);
  if (vec) {
    cmp_blocks_body<W, T>(x, xb, xs, xg, pos, out, Nc, G, L, D, stride, rows);
  } else {
    cmp_blocks_body<1, T>(x, xb, xs, xg, pos, out, Nc, G, L, D, stride, rows);
  }
}

template <typename T>
__device__ __forceinline__ void cmp_blocks_bwd(const T* __restrict__ dout, T* __restrict__ dx,
                                               int S, int Nc, int G, int L, int D, int stride,
                                               long long rows, int vec) {
  constexpr int W = 16 / sizeof(T);
  if (vec) {
    cmp_blocks_bwd_body<W, T>(dout, dx, S, Nc, G, L, D, stride, rows);
  } else {
    cmp_blocks_bwd_body<1, T>(dout, dx, S, Nc, G, L, D, stride, rows);
  }
}

// W elements of type T at p as floats (16 bytes when W > 1).
template <int W, typename T>
__device__ __forceinline__ void load_piece(const T* __restrict__ p, float* f) {
#pragma unroll
  for (int k = 0; k < W; ++k) f[k] = 0.f;
  add_piece<W>(p, f);
}

template <int W, typename T>
__device__ __forceinline__ void gate_mix_body(const T* __restrict__ oc, const T* __restrict__ os,
                                              const T* __restrict__ ow, const T* __restrict__ g,
                                              T* __restrict__ o, int dv, long long rows,
                                              long long rc, long long rs, long long rw) {
  for_each_piece<T>(dv, rows, W > 1, [&](long long r, int d) {
    const float g0 = to_f(g[3 * r]), g1 = to_f(g[3 * r + 1]), g2 = to_f(g[3 * r + 2]);
    float c[W], sl[W], w[W];
    load_piece<W>(oc + r * rc + d, c);
    load_piece<W>(os + r * rs + d, sl);
    load_piece<W>(ow + r * rw + d, w);
#pragma unroll
    for (int k = 0; k < W; ++k) c[k] = g0 * c[k] + g1 * sl[k] + g2 * w[k];
    store_piece<W>(o + r * dv + d, c);
  });
}

template <typename T>
__device__ __forceinline__ void gate_mix(const T* __restrict__ oc, const T* __restrict__ os,
                                         const T* __restrict__ ow, const T* __restrict__ g,
                                         T* __restrict__ o, int dv, long long rows,
                                         long long rc, long long rs, long long rw, int vec) {
  if (vec) {
    gate_mix_body<16 / sizeof(T), T>(oc, os, ow, g, o, dv, rows, rc, rs, rw);
  } else {
    gate_mix_body<1, T>(oc, os, ow, g, o, dv, rows, rc, rs, rw);
  }
}

// The backward with LANES lanes per row (a warp takes 32 / LANES rows at once), each lane W
// consecutive elements at a time, the row sums a butterfly over the row's lanes.
template <int W, int LANES, typename T>
__device__ __forceinline__ void gate_mix_bwd_body(
    const T* __restrict__ oc, const T* __restrict__ os, const T* __restrict__ ow,
    const T* __restrict__ g, const T* __restrict__ dout, T* __restrict__ doc,
    T* __restrict__ dos, T* __restrict__ dow, T* __restrict__ dg, int dv, long long rows,
    long long rc, long long rs, long long rw) {
  constexpr int ROWS = 32 / LANES;
  const int lane = threadIdx.x & 31, sub = lane % LANES;
  const long long warps = (long long)gridDim.x * (blockDim.x / 32);
  // The loop bound is the same for the whole warp, so every lane reaches the shuffles.
  for (long long r0 = ((long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32) * ROWS;
       r0 < rows; r0 += warps * ROWS) {
    const long long r = r0 + lane / LANES;
    const bool live = r < rows;
    float sc = 0.f, ss = 0.f, sw = 0.f;
    if (live) {
      const float g0 = to_f(g[3 * r]), g1 = to_f(g[3 * r + 1]), g2 = to_f(g[3 * r + 2]);
      for (int d = sub * W; d < dv; d += LANES * W) {
        const long long e = r * dv + d;
        float go[W], c[W], sl[W], w[W];
        load_piece<W>(dout + e, go);
        load_piece<W>(oc + r * rc + d, c);
        load_piece<W>(os + r * rs + d, sl);
        load_piece<W>(ow + r * rw + d, w);
#pragma unroll
        for (int k = 0; k < W; ++k) {
          sc += c[k] * go[k];
          ss += sl[k] * go[k];
          sw += w[k] * go[k];
          c[k] = g0 * go[k];
          sl[k] = g1 * go[k];
          w[k] = g2 * go[k];
        }
        store_piece<W>(doc + e, c);
        store_piece<W>(dos + e, sl);
        store_piece<W>(dow + e, w);
      }
    }
#pragma unroll
    for (int off = LANES / 2; off > 0; off >>= 1) {
      sc += __shfl_xor_sync(0xffffffffu, sc, off);
      ss += __shfl_xor_sync(0xffffffffu, ss, off);
      sw += __shfl_xor_sync(0xffffffffu, sw, off);
    }
    if (live && sub == 0) {
      dg[3 * r] = from_f<T>(sc);
      dg[3 * r + 1] = from_f<T>(ss);
      dg[3 * r + 2] = from_f<T>(sw);
    }
  }
}

template <typename T>
__device__ __forceinline__ void gate_mix_bwd(const T* __restrict__ oc, const T* __restrict__ os,
                                             const T* __restrict__ ow, const T* __restrict__ g,
                                             const T* __restrict__ dout, T* __restrict__ doc,
                                             T* __restrict__ dos, T* __restrict__ dow,
                                             T* __restrict__ dg, int dv, long long rows,
                                             long long rc, long long rs, long long rw, int vec) {
  if (vec) {
    gate_mix_bwd_body<16 / sizeof(T), 8, T>(oc, os, ow, g, dout, doc, dos, dow, dg, dv, rows, rc,
                                            rs, rw);
  } else {
    gate_mix_bwd_body<1, 32, T>(oc, os, ow, g, dout, doc, dos, dow, dg, dv, rows, rc, rs, rw);
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
           const float* sin_t, float sign, OUT* y, int S, int X, int half, long long pairs,     \
           int vec) {                                                                          \
    nsa::rope<IN, OUT>(x, xb, xs, xh, cos_t, sin_t, sign, y, S, X, half, pairs, vec);        \
  }
NSA_ROPE(nsa_rope_bf16_bf16, __nv_bfloat16, __nv_bfloat16)
NSA_ROPE(nsa_rope_f32_f32, float, float)
NSA_ROPE(nsa_rope_f32_bf16, float, __nv_bfloat16)
NSA_ROPE(nsa_rope_bf16_f32, __nv_bfloat16, float)

#define NSA_GATE_MIX(SUFFIX, T)                                                                 \
  extern "C" __global__ void __launch_bounds__(NSA_POINTWISE_THREADS) nsa_gate_mix_##SUFFIX(   \
      const T* oc, const T* os, const T* ow, const T* g, T* o, int dv, long long rows,          \
      long long rc, long long rs, long long rw, int vec) {                                      \
    nsa::gate_mix<T>(oc, os, ow, g, o, dv, rows, rc, rs, rw, vec);                              \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(NSA_POINTWISE_THREADS)                           \
      nsa_gate_mix_bwd_##SUFFIX(const T* oc, const T* os, const T* ow, const T* g,              \
                                const T* dout, T* doc, T* dos, T* dow, T* dg, int dv,           \
                                long long rows, long long rc, long long rs, long long rw,       \
                                int vec) {                                                      \
    nsa::gate_mix_bwd<T>(oc, os, ow, g, dout, doc, dos, dow, dg, dv, rows, rc, rs, rw, vec);    \
  }
NSA_GATE_MIX(bf16, __nv_bfloat16)
NSA_GATE_MIX(f32, float)

#define NSA_CMP_BLOCKS(SUFFIX, T)                                                              \
  extern "C" __global__ void __launch_bounds__(NSA_POINTWISE_THREADS) nsa_cmp_blocks_##SUFFIX( \
      const T* x, long long xb, long long xs, long long xg, const T* pos, T* out, int Nc,      \
      int G, int L, int D, int stride, long long rows, int vec) {                              \
    nsa::cmp_blocks<T>(x, xb, xs, xg, pos, out, Nc, G, L, D, stride, rows, vec);               \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(NSA_POINTWISE_THREADS)                          \
      nsa_cmp_blocks_bwd_##SUFFIX(const T* dout, T* dx, int S, int Nc, int G, int L, int D,    \
                                  int stride, long long rows, int vec) {                       \
    nsa::cmp_blocks_bwd<T>(dout, dx, S, Nc, G, L, D, stride, rows, vec);                       \
  }
NSA_CMP_BLOCKS(bf16, __nv_bfloat16)
NSA_CMP_BLOCKS(f32, float)
