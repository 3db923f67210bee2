// Round 33's variants of the ping-pong window forward (window_fwd.cu), for the harness:
// other tile widths and load-ahead depths than its own instantiations, and a persistent form.
// Compiles against window-pingpong.diff applied to nsa-sys/kernels (not kept; BENCHMARKS.md,
// round 33).
#include "window_fwd.cu"
#define NSA_WINDOW_FWD_X(NAME, DK, DV, BN, LEAD)                                \
  extern "C" __global__ void __launch_bounds__(nsa::kWindowThreads, 1)         \
      NAME(nsa::WindowFwdArgs a) {                                              \
    nsa::window_fwd<DK, DV, BN, LEAD>(a);                                       \
  }
NSA_WINDOW_FWD_X(x_l1_dk192_dv128, 192, 128, 64, 1)
NSA_WINDOW_FWD_X(x_bn128_dk64_dv64, 64, 64, 128, 2)
NSA_WINDOW_FWD_X(x_bn128l1_dk128_dv128, 128, 128, 128, 1)

// A persistent form of the ping-pong forward: gridDim.x CTAs per sequence (blockIdx.y) walk
// its work units (128 tokens, head; tokens fastest) with a stride of gridDim.x. The K/V stages, their barriers and
// the turns carry over from unit to unit; the loads run LEAD tiles ahead across a unit's end
// (the next unit's Q into the other of two Q buffers, with its first tile), so a unit starts
// with its data in flight or landed. The output is staged in the unit's own Q buffer (the
// swizzled slab layout, which fits at DK = DV) and leaves in 16-byte chunks.
namespace nsa {

template <int N>
__device__ __forceinline__ void stage_acc_slab(unsigned dst, const float (&acc)[N / 64][32],
                                               int lr0, float s0, float s1, int t4) {
#pragma unroll
  for (int n = 0; n < N / 64; ++n) {
#pragma unroll
    for (int j8 = 0; j8 < 8; ++j8) {
      const unsigned c = (unsigned)(8 * n + j8);
      const unsigned a0 = dst + slab_offset(lr0, c, 128) + 4 * t4;
      const unsigned a1 = dst + slab_offset(lr0 + 8, c, 128) + 4 * t4;
      const unsigned x0 = pack_bf16(acc[n][4 * j8] * s0, acc[n][4 * j8 + 1] * s0);
      const unsigned x1 = pack_bf16(acc[n][4 * j8 + 2] * s1, acc[n][4 * j8 + 3] * s1);
      asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(a0), "r"(x0) : "memory");
      asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(a1), "r"(x1) : "memory");
    }
  }
}

template <int DK, int DV, int BN, int LEAD>
__device__ __forceinline__ void window_fwd_persistent(const WindowFwdArgs& a) {
  constexpr int BM = kWindowRows, NS = LEAD + 2, T = kWindowThreads;
  constexpr unsigned Q_BYTES = BM * DK * 2, K_BYTES = BN * DK * 2, V_BYTES = BN * DV * 2;
  extern __shared__ unsigned char smem_raw[];
  const unsigned base = (shared_addr(smem_raw) + 1023u) & ~1023u;
  const unsigned sq = base, sk = base + 2 * Q_BYTES, sv = sk + NS * K_BYTES;
  unsigned long long* full = reinterpret_cast<unsigned long long*>(
      smem_raw + (base - shared_addr(smem_raw)) + 2 * Q_BYTES + NS * (K_BYTES + V_BYTES));
  unsigned long long* empty = full + NS;

  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
  const int g = lane >> 2, t4 = lane & 3;
  const int S = a.S, w = a.window, H = a.H;
  const int nb = (S + BM - 1) / BM, units = nb * H;  // of sequence blockIdx.y
  const int lr0 = 64 * wg + 16 * warp + g;
  struct Unit {
    int t0, h, b, j0, n;
  };
  auto unit = [&](int k) {  // this CTA's k-th unit
    const int u = (int)blockIdx.x + k * (int)gridDim.x;
    Unit r;
    r.t0 = (u % nb) * BM;
    r.h = (u / nb) % H;
    r.b = (int)blockIdx.y;
    r.j0 = max(0, r.t0 - w + 1) / BN;
    r.n = min(S - 1, r.t0 + BM - 1) / BN - r.j0 + 1;
    return r;
  };
  const int my_units = ((int)blockIdx.x < units) ? (units - 1 - (int)blockIdx.x) / (int)gridDim.x + 1 : 0;

  if (tid == 0) {
    for (int st = 0; st < NS; ++st) {
      mbar_init(full + st, T);
      mbar_init(empty + st, T);
    }
    mbar_init_fence();
  }
  __syncthreads();

  // The loader: the next tile to load is tile li of unit lk, the lg-th of this CTA's walk.
  int lk = 0, li = 0, lg = 0;
  Unit lu = unit(0);
  auto load_until = [&](int target, int max_unit) {  // tiles lg .. target - 1
    while (lg < target && lk < my_units && lk <= max_unit) {
      const unsigned st = (unsigned)(lg % NS);
      if (lg >= NS) mbar_wait(empty + st, (unsigned)(lg / NS - 1) & 1u);
      const int kvh = lu.h / (H / a.Hkv);
      if (li == 0)
        load_slab_tile<BM, DK, T>(sq + (unsigned)(lk & 1) * Q_BYTES,
                                  a.q + lu.b * a.q_batch + (long long)lu.h * a.q_head, a.q_row,
                                  lu.t0, S, tid);
      load_slab_tile<BN, DK, T>(sk + st * K_BYTES, a.k + lu.b * a.k_batch + (long long)kvh * a.k_head,
                                a.k_row, (lu.j0 + li) * BN, S, tid);
      load_slab_tile<BN, DV, T>(sv + st * V_BYTES, a.v + lu.b * a.v_batch + (long long)kvh * a.v_head,
                                a.v_row, (lu.j0 + li) * BN, S, tid);
      cp_async_mbar_arrive(full + st);
      ++lg;
      if (++li == lu.n) {
        li = 0;
        ++lk;
        if (lk < my_units) lu = unit(lk);
      }
    }
  };

  int gbase = 0;
  for (int k = 0; k < my_units; ++k) {
    const Unit cu = unit(k);
    const int t0 = cu.t0, h = cu.h, b = cu.b, j0 = cu.j0, n = cu.n;
    const unsigned sqk = sq + (unsigned)(k & 1) * Q_BYTES;
    const int r_lo = t0 + 64 * wg, r_hi = min(r_lo + 63, S - 1);
    const int row0 = t0 + lr0, row1 = row0 + 8;
    auto active = [&](int j) { return r_lo < S && j * BN <= r_hi && j * BN + BN - 1 > r_lo - w; };
    load_until(gbase + LEAD, k + 1);

    float o[DV / 64][32];
#pragma unroll
    for (int nn = 0; nn < DV / 64; ++nn)
#pragma unroll
      for (int e = 0; e < 32; ++e) o[nn][e] = 0.f;
    RowState st{-INFINITY, -INFINITY, 0.f, 0.f};
    float s[BN / 2];
    unsigned pa[BN / 16][4];
    float al0, al1;

    if (wg == 1) named_bar_arrive(1, T);
    for (int i = 0; i <= n; ++i) {
      const int j = j0 + i, gi = gbase + i;
      const bool scores = i < n && active(j), values = i > 0 && active(j - 1);
      if (i < n) {
        mbar_wait(full + gi % NS, (unsigned)(gi / NS) & 1u);
        fence_proxy_async_shared();
      }
      named_bar_sync(1 + wg, T);
      const unsigned vst = sv + (unsigned)((gi + NS - 1) % NS) * V_BYTES;
      const unsigned kst = sk + (unsigned)(gi % NS) * K_BYTES;
      if (values && scores) {
        wgmma_fence();
        issue_frag_product<DV, BN>(o, pa, vst);
        issue_product<DK, BN, false>(s, sqk, BM, wg, kst);
        wgmma_commit();
      } else if (values) {
        wgmma_fence();
        issue_frag_product<DV, BN>(o, pa, vst);
        wgmma_commit();
      } else if (scores) {
        wgmma_fence();
        issue_product<DK, BN, false>(s, sqk, BM, wg, kst);
        wgmma_commit();
      }
      named_bar_arrive(2 - wg, T);
      wgmma_wait<0>();
      fence_regs(s);
      fence_acc<DV>(o);
      keep_frags<BN / 16>(pa);
      if (i > 0) mbar_arrive(empty + (gi - 1) % NS);
      load_until(gi + LEAD + 1, k + 1);
      if (scores) {
        softmax_step<BN>(s, pa, st, al0, al1, j * BN, row0, row1, r_lo, r_hi, w, a.scale_log2, t4);
        rescale<DV>(o, al0, al1);
      }
    }
    if (wg == 0) named_bar_sync(1, T);
    gbase += n;

    // Epilogue: rows normalised into this unit's Q buffer, lse, then out in 16-byte chunks.
#pragma unroll
    for (int x = 1; x < 4; x <<= 1) {
      st.l0 += __shfl_xor_sync(0xffffffffu, st.l0, x);
      st.l1 += __shfl_xor_sync(0xffffffffu, st.l1, x);
    }
    const float inv0 = st.l0 > 0.f ? 1.f / st.l0 : 0.f, inv1 = st.l1 > 0.f ? 1.f / st.l1 : 0.f;
    __syncthreads();
    stage_acc_slab<DV>(sqk, o, lr0, inv0, inv1, t4);
    if (t4 == 0) {
      float* lse = a.lse + ((long long)b * H + h) * S;
      if (row0 < S) lse[row0] = 0.69314718f * (st.m0 + __log2f(st.l0));
      if (row1 < S) lse[row1] = 0.69314718f * (st.m1 + __log2f(st.l1));
    }
    __syncthreads();
    __nv_bfloat16* out = a.o + b * a.o_batch + (long long)h * a.o_head;
    constexpr int CH = DV / 8;
    for (int e = tid; e < BM * CH; e += T) {
      const int r = e / CH, c = e % CH;
      if (t0 + r < S) {
        uint4 x;
        asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(x.x), "=r"(x.y), "=r"(x.z), "=r"(x.w)
                     : "r"(sqk + slab_offset(r, c, 128)));
        *reinterpret_cast<uint4*>(out + (long long)(t0 + r) * a.o_row + 8 * c) = x;
      }
    }
    for (int e = tid; e < BM * (a.pad / 8); e += T) {
      const int r = e / (a.pad / 8), c = e % (a.pad / 8);
      if (t0 + r < S)
        *reinterpret_cast<uint4*>(out + (long long)(t0 + r) * a.o_row + DV + 8 * c) =
            make_uint4(0u, 0u, 0u, 0u);
    }
    __syncthreads();
  }
}

}  // namespace nsa

#define NSA_WINDOW_FWD_P(NAME, DK, DV, BN, LEAD)                                \
  extern "C" __global__ void __launch_bounds__(nsa::kWindowThreads, 1)         \
      NAME(nsa::WindowFwdArgs a) {                                              \
    nsa::window_fwd_persistent<DK, DV, BN, LEAD>(a);                            \
  }
NSA_WINDOW_FWD_P(x_persist_dk192_dv128, 192, 128, 64, 1)
NSA_WINDOW_FWD_P(x_persist_dk64_dv64, 64, 64, 64, 2)
NSA_WINDOW_FWD_P(x_persist_dk128_dv128, 128, 128, 64, 2)
