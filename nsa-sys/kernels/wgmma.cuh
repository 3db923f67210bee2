// Hopper (sm_90a) tensor-core building blocks: warpgroup MMA (wgmma) with operands in shared
// memory described by matrix descriptors, the 128-byte swizzled shared layout those
// descriptors read, and cp.async copies into it. Included only by families compiled for
// sm_90a (wgmma does not exist on sm_80 nor in sm_90 code without the "a" features).
//
// Shared layout ("slabs"): a tile of R rows by C bf16 columns (C a multiple of 64) is stored
// as C / 64 slabs of R rows x 128 bytes, slab s holding columns 64s .. 64s + 63; within a slab,
// the 16-byte chunk c (columns 8c .. 8c + 7) of row r sits at r * 128 + ((c ^ (r % 8)) * 16),
// so eight consecutive rows form one 1024-byte swizzle atom (slabs start 1024-byte aligned).
// This is the canonical 128B-swizzle layout of the PTX ISA's matrix descriptors for both
// operand majors: a K-major operand (the reduction index k along the 128-byte rows: Q and K
// for S = Q K^T) and an MN-major one (k along the rows: V for O += P V, read transposed).
//
// Descriptor (64 bits): start address >> 4 (bits 0-13), leading byte offset >> 4 (16-29),
// stride byte offset >> 4 (32-45), swizzle mode (62-63: 1 = 128B). K-major: one k16 step is
// 32 bytes inside the 128-byte row, so the step's descriptor starts 32 bytes further; row
// groups of 8 are 1024 bytes apart (stride offset); the leading offset is unused. MN-major with
// N = 64 (one slab): k16 covers two 8-row groups 1024 bytes apart and one 64-column group, so
// both offsets are set to 1024 and whichever the unit takes for the k groups is right.
//
// Register fragments (per warp w of the warpgroup, lane = 4 g + t): accumulator d of
// m64nN: d[4j + e] = D[16w + g][8j + 2t + e], d[4j + 2 + e] = D[16w + g + 8][8j + 2t + e]
// (e = 0, 1); an A operand from registers is the warp's 16 x 16 slice in mma.sync's A layout
// (mma.cuh), so two neighbouring n8 accumulator chunks packed to bf16 are the A fragment of the
// next product over those 16 columns, as with mma.sync.
#pragma once
#include "mma.cuh"

namespace nsa {

// Byte offset of chunk c (16 bytes) of row r in a slab tile of `rows` rows (see above).
__device__ __forceinline__ unsigned slab_offset(int r, int c, int rows) {
  return (unsigned)((c >> 3) * rows * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

// 16 bytes global -> shared address dst, asynchronously (mma.cuh's cp_async_commit / wait);
// bytes = 0 writes zeros instead (rows outside the tensor).
__device__ __forceinline__ void cp_async16_zfill(unsigned dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(bytes));
}

// Rows first .. first + ROWS - 1 (zeros outside 0 .. S - 1) of a [S][row_stride] bf16 matrix,
// columns 0 .. COLS - 1, into a slab tile at shared address dst; every one of the CTA's THREADS
// threads calls, tid its index; committed by the caller (cp_async_commit).
// Thread tid copies chunk tid % 8 of every slab in rows tid / 8 + k THREADS / 8: THREADS / 8 is
// a multiple of 8, so all its rows share one swizzle and its shared addresses are one register
// plus constants, and each row's validity and source address are computed once for all slabs
// (the loop over (row, chunk) pairs spent about nine instructions a copy on that arithmetic).
template <int ROWS, int COLS, int THREADS>
__device__ __forceinline__ void load_slab_tile(unsigned dst, const __nv_bfloat16* src,
                                               int row_stride, int first, int S, int tid) {
  constexpr int RSTEP = THREADS / 8;
  static_assert(COLS % 64 == 0 && RSTEP % 8 == 0 && ROWS % RSTEP == 0,
                "whole slabs, and rows a whole number of passes of THREADS / 8");
  const int c8 = tid & 7, r0 = tid >> 3;
  const unsigned base = dst + (unsigned)(r0 * 128 + ((c8 ^ (r0 & 7)) << 4));
#pragma unroll
  for (int k = 0; k < ROWS / RSTEP; ++k) {
    const int row = first + r0 + k * RSTEP;
    const bool ok = row >= 0 && row < S;
    const __nv_bfloat16* p = src + (long long)(ok ? row : 0) * row_stride + c8 * 8;
#pragma unroll
    for (int sl = 0; sl < COLS / 64; ++sl)
      cp_async16_zfill(base + (unsigned)(sl * ROWS * 128 + k * RSTEP * 128), p + sl * 64,
                       ok ? 16 : 0);
  }
}

// The top of a double-buffered loop's step: waits for this step's cp.async group (leaving the
// next step's, committed just before, in flight when `next_in_flight`), then makes the copies
// visible to wgmma (the async proxy) and to the whole CTA. Every thread calls.
__device__ __forceinline__ void stage_ready(bool next_in_flight) {
  if (next_in_flight)
    cp_async_wait<1>();
  else
    cp_async_wait<0>();
  fence_proxy_async_shared();
  __syncthreads();
}

__device__ __forceinline__ unsigned long long wgmma_desc(unsigned addr, unsigned lead,
                                                         unsigned stride) {
  return (unsigned long long)((addr & 0x3FFFF) >> 4) |
         ((unsigned long long)((lead >> 4) & 0x3FFF) << 16) |
         ((unsigned long long)((stride >> 4) & 0x3FFF) << 32) | (1ull << 62);
}
// A K-major operand whose k16 step starts at `addr` (slab base + 32 * (k16 index % 4)).
__device__ __forceinline__ unsigned long long desc_k_major(unsigned addr) {
  return wgmma_desc(addr, 16, 1024);
}
// An MN-major operand of N = 64 whose k16 step starts at `addr` (slab base + 2048 * k16 index).
__device__ __forceinline__ unsigned long long desc_mn_major64(unsigned addr) {
  return wgmma_desc(addr, 1024, 1024);
}

// Orders register accesses before the wgmmas that follow (accumulators or A fragments written
// by ordinary instructions since the last wgmma).
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Accumulator registers are tied to the asm statements below; the compiler must not move
// their reads or writes across the wait, so callers pass them through this after wgmma_wait.
template <int N> __device__ __forceinline__ void fence_regs(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// The wrappers' operand lists are mechanical (one "+f" per accumulator register).
// d (+)= A B for m64n64k16, A and B from shared memory by descriptor, both K-major.
__device__ __forceinline__ void wgmma_ss_n64(float (&d)[32], unsigned long long desc_a,
                                             unsigned long long desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// d (+)= A B for m64n128k16, A and B from shared memory by descriptor, both K-major.
__device__ __forceinline__ void wgmma_ss_n128(float (&d)[64], unsigned long long desc_a,
                                             unsigned long long desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// d += A B for m64n64k16, A from registers (a: the warp's 16 x 16 slice in mma.sync's A
// layout), B from shared memory by descriptor, MN-major (transposed).
__device__ __forceinline__ void wgmma_rs_n64_tb(float (&d)[32], const unsigned (&a)[4],
                                                unsigned long long desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
}

// Writes this thread's rows lr0 and lr0 + 8 of a warpgroup's 64 x N accumulator (N / 64
// m64n64 fragments, the layout above), times s0 and s1 respectively, as bf16 into the staging
// tile so (row stride OS elements; OS = N + 8 keeps the 4-byte stores free of bank conflicts).
template <int N, int OS>
__device__ __forceinline__ void stage_acc_rows(__nv_bfloat16* so, const float (&acc)[N / 64][32],
                                               int lr0, float s0, float s1, int t4) {
#pragma unroll
  for (int n = 0; n < N / 64; ++n) {
#pragma unroll
    for (int j8 = 0; j8 < 8; ++j8) {
      const int col = 64 * n + 8 * j8 + 2 * t4;
      *reinterpret_cast<unsigned*>(so + lr0 * OS + col) =
          pack_bf16(acc[n][4 * j8] * s0, acc[n][4 * j8 + 1] * s0);
      *reinterpret_cast<unsigned*>(so + (lr0 + 8) * OS + col) =
          pack_bf16(acc[n][4 * j8 + 2] * s1, acc[n][4 * j8 + 3] * s1);
    }
  }
}

// Copies rows 0 .. ROWS - 1, columns 0 .. N - 1 of the staging tile so (row stride OS) to rows
// t0 .. t0 + ROWS - 1 of dst (row stride `row` elements) in 16-byte chunks, skipping rows at or
// past S; every one of the CTA's THREADS threads calls, after a barrier that follows the
// staging writes.
template <int ROWS, int N, int OS, int THREADS>
__device__ __forceinline__ void copy_staged_rows(__nv_bfloat16* dst, int row,
                                                 const __nv_bfloat16* so, int t0, int S, int tid) {
  constexpr int CH = N / 8;  // 16-byte chunks of a row
  for (int e = tid; e < ROWS * CH; e += THREADS) {
    const int r = e / CH, c = e % CH;
    if (t0 + r < S)
      *reinterpret_cast<uint4*>(dst + (long long)(t0 + r) * row + 8 * c) =
          *reinterpret_cast<const uint4*>(so + r * OS + 8 * c);
  }
}

// d (+)= A B for m64nNk16 with N = BN (64 or 128), both operands from shared memory, K-major.
template <int BN>
__device__ __forceinline__ void wgmma_ss(float (&d)[BN / 2], unsigned long long da,
                                         unsigned long long db, int accumulate);
template <>
__device__ __forceinline__ void wgmma_ss<64>(float (&d)[32], unsigned long long da,
                                             unsigned long long db, int accumulate) {
  wgmma_ss_n64(d, da, db, accumulate);
}
template <>
__device__ __forceinline__ void wgmma_ss<128>(float (&d)[64], unsigned long long da,
                                              unsigned long long db, int accumulate) {
  wgmma_ss_n128(d, da, db, accumulate);
}

// The 64 x BN product of rows 64 wg .. 64 wg + 63 of slab tile sa (rows_a rows) with the
// BN-row slab tile sb over depth D, issued (not committed): d = A B^T, both K-major.
// OPAQUE_BASE passes sa through an opaque move so the descriptor arithmetic stays at each call
// instead of being hoisted out of the caller's loop (ptxas reports the same register counts
// either way, the code differs): window_bwd.cu was measured with it, window_fwd.cu without
// (BENCHMARKS.md, rounds 31 and 32).
template <int D, int BN, bool OPAQUE_BASE>
__device__ __forceinline__ void issue_product(float (&d)[BN / 2], unsigned sa, int rows_a, int wg,
                                              unsigned sb) {
  // No zeroing: the first step overwrites d (scale-d off), and an ordinary instruction that
  // defines accumulator registers inside a wgmma pipeline stage serialises it (ptxas C7515).
  if (OPAQUE_BASE) asm volatile("mov.u32 %0, %0;" : "+r"(sa));
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const unsigned pa = sa + (kk >> 2) * (rows_a * 128) + wg * (64 * 128) + (kk & 3) * 32;
    const unsigned pb = sb + (kk >> 2) * (BN * 128) + (kk & 3) * 32;
    wgmma_ss<BN>(d, desc_k_major(pa), desc_k_major(pb), kk > 0);
  }
}

// acc[n] += A T for the 64 x N result, A the warpgroup's bf16 fragments over R rows of the
// slab tile st (R x N, read transposed: MN-major, 64 columns a slab), issued (not committed).
template <int N, int R>
__device__ __forceinline__ void issue_frag_product(float (&acc)[N / 64][32],
                                                   const unsigned (&a)[R / 16][4], unsigned st) {
#pragma unroll
  for (int kk = 0; kk < R / 16; ++kk) {
#pragma unroll
    for (int n = 0; n < N / 64; ++n)
      wgmma_rs_n64_tb(acc[n], a[kk], desc_mn_major64(st + n * (R * 128) + kk * 2048), 1);
  }
}

template <int N> __device__ __forceinline__ void fence_acc(float (&acc)[N / 64][32]) {
#pragma unroll
  for (int n = 0; n < N / 64; ++n) fence_regs(acc[n]);
}

// Keeps A fragments allocated until the wait that completes the wgmmas reading them.
template <int K16> __device__ __forceinline__ void keep_frags(const unsigned (&a)[K16][4]) {
#pragma unroll
  for (int kk = 0; kk < K16; ++kk)
    asm volatile("" ::"r"(a[kk][0]), "r"(a[kk][1]), "r"(a[kk][2]), "r"(a[kk][3]));
}

}  // namespace nsa
