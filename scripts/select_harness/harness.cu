// Timing harness for the selection kernel (compressed.cu, nsa_cmp_select_*), outside the
// build: nvcc compiles it on the GPU machine against a staged copy of the kernel sources
// (prepare.py, run.sh), so versions can be compared without a release build.
//
// Inputs: q [B, S, 4 * G, dk] and compressed keys ck [B, Nc, 4, dk] (bf16, about N(0, 1) from a
// hash), the compressed branch's exact lse (fp32, a naive kernel), the paper's l = 32, d = 16,
// l' = 64, n = 16, 2 local blocks. Launch as glue/fused.cpp does (BQ = 16 * warps / G tokens per
// CTA, its shared-memory formula with SEL_TOKEN_INTS per-token words after the ring and the
// lists), 3 warm-up launches, then 10 timed by CUDA events: one line with the median, min and
// max. The block ids go to IDSFILE (int64, [B, S, 4, n]) for comparison.
//
// usage: harness B S G DK WARPS [IDSFILE]   (DK 64 or 192, WARPS 4 or 8)
#include <algorithm>
#include <cmath>
#include SEL_SRC
#include <cstdio>
#include <cstdlib>
#include <vector>

// A hash of (i, seed) mapped to [0, 1).
__device__ float hrand(unsigned long long i, unsigned seed) {
  unsigned long long x = i * 0x9E3779B97F4A7C15ull + seed * 0xBF58476D1CE4E5B9ull;
  x ^= x >> 31;
  x *= 0x94D049BB133111EBull;
  x ^= x >> 29;
  return (float)((x >> 40) & 0xffffff) / 16777216.f;
}

// p[i]: the sum of four uniforms, centred and scaled to unit variance (about N(0, 1)).
__global__ void fill(__nv_bfloat16* p, long long n, unsigned seed) {
  const long long step = (long long)gridDim.x * blockDim.x;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += step) {
    float s = -2.f;
    for (int k = 0; k < 4; ++k) s += hrand(4 * i + k, seed);
    p[i] = __float2bfloat16_rn(s * 1.7320508f);
  }
}

// lse of row (b, t, h) over its visible compressed tokens (Eq. 7), in fp32.
__global__ void lse_naive(const __nv_bfloat16* q, const __nv_bfloat16* ck, float* lse, int B,
                          int S, int Nc, int Hkv, int hpg, int cl, int cd, float scale, int dk) {
  const int H = Hkv * hpg;
  const long long row = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (row >= (long long)B * S * H) return;
  const int h = row % H, t = (row / H) % S, b = row / H / S, g = h / hpg;
  const nsa::KeySpec ks = nsa::compressed_keys(Nc, cl, cd);
  const int nv = nsa::num_visible_compressed(ks, t);
  float m = -INFINITY, l = 0.f;
  for (int i = 0; i < nv; ++i) {
    const __nv_bfloat16* k = ck + (((long long)b * Nc + i) * Hkv + g) * dk;
    float s = 0.f;
    for (int d = 0; d < dk; ++d) s += __bfloat162float(q[row * dk + d]) * __bfloat162float(k[d]);
    s *= scale;
    const float mn = fmaxf(m, s);
    l = l * __expf(m - mn) + __expf(s - mn);
    m = mn;
  }
  lse[row] = nv > 0 ? m + __logf(l) : INFINITY;
}

static int next_pow2(int x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

int main(int argc, char** argv) {
  if (argc < 6) {
    fprintf(stderr, "usage: harness B S G DK WARPS [IDSFILE]\n");
    return 2;
  }
  const int B = atoi(argv[1]), S = atoi(argv[2]);
  const int hpg = atoi(argv[3]), dk = atoi(argv[4]), warps = atoi(argv[5]);
  if (B < 1 || S < 1 || (dk != 64 && dk != 192) || (warps != 4 && warps != 8) || hpg < 1 ||
      hpg > 16 * warps) {
    fprintf(stderr, "B, S >= 1; DK 64 or 192; WARPS 4 or 8; 1 <= G <= 16 * WARPS\n");
    return 2;
  }
  const char* idsfile = argc > 6 ? argv[6] : nullptr;
  const int Hkv = 4, cl = 32, cd = 16, L = 64, n = 16, n_local = 2;
  const int H = Hkv * hpg, Nc = S >= cl ? (S - cl) / cd + 1 : 0, Nb = (S + L - 1) / L;
  const float scale = 1.f / sqrtf((float)dk);
  // SelectArgs as glue/fused.cpp fills them, Eq. 9's taps as nsa-select's overlap_taps.
  nsa::SelectArgs sa{};
  sa.L = L;
  sa.n = n;
  sa.n_local = n_local;
  sa.Nb = Nb;
  const int a = L / cd, bb = cl / cd;
  sa.taps.first = 1 - bb;
  sa.taps.step = a;
  sa.taps.count = a + bb - 1;
  for (int k = 0; k < a + bb - 1; ++k) sa.taps.w[k] = std::min(k + 1, a) - std::max(k - bb + 1, 0);
  sa.ring = next_pow2((63 + sa.taps.count + sa.taps.step - 1) / sa.taps.step);
  const int m = 16 * warps, bq = m / hpg;
  sa.bq = bq;
  const int pt = hpg == 16 ? 0 : m * 72;
  const long long smem = 2 * 64 * (dk + 8) * 2 +
                         4 * (m + pt + bq * 64 + bq * sa.ring + bq * 64 + SEL_TOKEN_INTS * bq);
  const long long nq = (long long)B * S * H, nk = (long long)B * Nc * Hkv;
  __nv_bfloat16 *q, *ck;
  float* lse;
  long long* ids;
  cudaMalloc(&q, nq * dk * 2);
  cudaMalloc(&ck, nk * dk * 2);
  cudaMalloc(&lse, nq * 4);
  cudaMalloc(&ids, (long long)B * S * Hkv * n * 8);
  fill<<<1024, 256>>>(q, nq * dk, 1);
  fill<<<1024, 256>>>(ck, nk * dk, 2);
  lse_naive<<<(nq + 127) / 128, 128>>>(q, ck, lse, B, S, Nc, Hkv, hpg, cl, cd, scale, dk);
  auto fn = dk == 64 ? (warps == 8 ? nsa_cmp_select_bf16_dk64_w8 : nsa_cmp_select_bf16_dk64)
                     : (warps == 8 ? nsa_cmp_select_bf16_dk192_w8 : nsa_cmp_select_bf16_dk192);
  cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  const dim3 grid((S + bq - 1) / bq, Hkv, B);
  const auto launch = [&] {
    fn<<<grid, 32 * warps, smem>>>(q, ck, lse, ids, S, Nc, Hkv, hpg, cl, cd, scale, sa);
  };
  for (int i = 0; i < 3; ++i) launch();
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  const int reps = 10;
  std::vector<float> ms(reps);
  for (int r = 0; r < reps; ++r) {
    cudaEventRecord(e0);
    launch();
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    cudaEventElapsedTime(&ms[r], e0, e1);
  }
  const cudaError_t err = cudaGetLastError();
  std::sort(ms.begin(), ms.end());
  printf("%s B %d S %d G %d dk %d warps %d smem %lld: median %.3f ms (min %.3f max %.3f) %s\n",
         SEL_NAME, B, S, hpg, dk, warps, smem, ms[reps / 2], ms[0], ms[reps - 1],
         cudaGetErrorString(err));
  if (idsfile) {
    std::vector<long long> h((long long)B * S * Hkv * n);
    cudaMemcpy(h.data(), ids, h.size() * 8, cudaMemcpyDeviceToHost);
    FILE* f = fopen(idsfile, "wb");
    fwrite(h.data(), 8, h.size(), f);
    fclose(f);
  }
  return err == cudaSuccess ? 0 : 1;
}
