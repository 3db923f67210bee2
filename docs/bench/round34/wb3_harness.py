# Round 34 harness for x_window_bwd_dq.cu (prepared, not run): the dQ kernel with more
# warpgroups a CTA (x_dq<WGS>_bn<BN>_dk*_dv*) against the landed nsa_window_bwd_dq_* of
# window_bwd.cu, both from NVRTC cubins through the driver, each launched with its exact shared
# memory (round 33's harness gave every launch 227 KB, which shrinks L1).
#   python wb3_harness.py <window_bwd cubin> <x cubin> check|bench
# check: fresh random inputs, dq and delta poisoned with NaN; the x dQ kernel, then the landed
# dK/dV kernel on its delta; dq, dk, dv and delta against an fp32 autograd reference (errors
# relative to max(|reference|, 1e-3): at S = 1 the reference's dq and dk are exactly 0).
# bench: median (min-max) of 7 runs, the landed dQ against each variant at the benchmark shapes.
import ctypes, sys, math, os, statistics, torch
dev = torch.device("cuda")
torch.zeros(1, device=dev)
cu = ctypes.CDLL("libcuda.so.1")
ctx = ctypes.c_void_p(); cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0); cu.cuCtxSetCurrent(ctx)
mods = []
for path in sys.argv[1:3]:
    m = ctypes.c_void_p()
    assert cu.cuModuleLoadData(ctypes.byref(m), open(path, "rb").read()) == 0, path
    mods.append(m)
mode = sys.argv[3]
class Args(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in ["q", "k", "v", "o", "dout", "lse", "delta", "dq", "dk", "dv"]] + \
               [(n, ctypes.c_int) for n in ["S", "H", "Hkv", "window"]] + [("scale", ctypes.c_float), ("scale_log2", ctypes.c_float)]
# (name, dk, dv, BN, WGS)
X = [("x_dq3_bn32_dk192_dv128", 192, 128, 32, 3), ("x_dq2_bn32_dk192_dv128", 192, 128, 32, 2),
     ("x_dq3_bn32_dk128_dv128", 128, 128, 32, 3), ("x_dq3_bn64_dk64_dv64", 64, 64, 64, 3),
     ("x_dq4_bn64_dk64_dv64", 64, 64, 64, 4), ("x_dq4_bn32_dk64_dv64", 64, 64, 32, 4)]
funcs = {}
def func(mod, name, smem):
    key = (mod, name)
    if key not in funcs:
        f = ctypes.c_void_p()
        assert cu.cuModuleGetFunction(ctypes.byref(f), mods[mod], name.encode()) == 0, name
        assert cu.cuFuncSetAttribute(f, 8, smem) == 0
        funcs[key] = (f, smem)
    return funcs[key][0]
def landed_smem(d, dv):  # glue/window.cpp's wgmma_backward
    return 2 * (128 * d + 128 * dv + 2 * 64 * d + 2 * 64 * dv) + 2048
def x_smem(d, dv, bn, wgs):
    bm = 64 * wgs
    return 2 * (bm * d + bm * dv + 2 * bn * (d + dv)) + 4 * bm + 1024
def launch(mod, name, smem, grid, threads, q, k, v, o, lse, do, w, scale, outs):
    B, S, H, D = q.shape; Hkv = k.shape[2]
    dq, dk, dvv, delta = outs
    a = Args(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), do.data_ptr(), lse.data_ptr(), delta.data_ptr(),
             dq.data_ptr(), dk.data_ptr(), dvv.data_ptr(), S, H, Hkv, min(w, S), scale, scale * 1.4426950408889634)
    args = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.pointer(a), ctypes.c_void_p))
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    assert cu.cuLaunchKernel(func(mod, name, smem), *grid, threads, 1, 1, smem, stream, args, None) == 0
def dq_landed(q, k, v, o, lse, do, w, dv, scale, outs):
    B, S, H, D = q.shape
    launch(0, f"nsa_window_bwd_dq_dk{D}_dv{dv}", landed_smem(D, dv), ((S + 127) // 128, H, B), 256, q, k, v, o, lse, do, w, scale, outs)
def dkdv_landed(q, k, v, o, lse, do, w, dv, scale, outs):
    B, S, H, D = q.shape; Hkv = k.shape[2]
    launch(0, f"nsa_window_bwd_dkdv_dk{D}_dv{dv}", landed_smem(D, dv), ((S + 127) // 128, Hkv, B), 256, q, k, v, o, lse, do, w, scale, outs)
def dq_x(x, q, k, v, o, lse, do, w, scale, outs):
    name, D, dv, bn, wgs = x
    B, S, H, _ = q.shape
    launch(1, name, x_smem(D, dv, bn, wgs), ((S + 64 * wgs - 1) // (64 * wgs), H, B), 128 * wgs, q, k, v, o, lse, do, w, scale, outs)
def flash_fwd(q, k, v, w, scale):
    S = q.shape[1]
    return torch.ops.aten._flash_attention_forward(q, k, v, None, None, S, S, 0.0, True, False, scale=scale, window_size_left=w - 1, window_size_right=0)
def reference(q, k, v, do, w, dv, scale):
    B, S, H, D = q.shape; Hkv = k.shape[2]; G = H // Hkv
    qf = q.float().requires_grad_(); kf = k.float().requires_grad_(); vf = v.float().requires_grad_()
    kk = kf.repeat_interleave(G, 2).transpose(1, 2); vv = vf[..., :dv].repeat_interleave(G, 2).transpose(1, 2)
    s = qf.transpose(1, 2) @ kk.transpose(-1, -2) * scale
    t = torch.arange(S, device=dev)
    mask = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - w)
    o = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ vv
    o.transpose(1, 2).backward(do[..., :dv].float())
    return qf.grad, kf.grad, vf.grad
def err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-3)).item()
def inputs(B, S, H, Hkv, dk, dv):
    q = torch.randn(B, S, H, dk, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, S, Hkv, dk, device=dev, dtype=torch.bfloat16)
    v = torch.randn(B, S, Hkv, dk, device=dev, dtype=torch.bfloat16); v[..., dv:] = 0
    return q, k, v
def bench(fn, reps=7):
    fn(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts), min(ts), max(ts)
if mode == "check":
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    geo = [(2, 300, 6, 2, 64), (1, 1, 4, 4, 512), (2, 777, 6, 3, 512), (1, 1100, 4, 1, 17), (1, 700, 2, 2, 2),
           (1, 2049, 16, 1, 600), (1, 130, 2, 1, 1000), (2, 1000, 8, 2, 512), (1, 193, 3, 1, 40)]
    fails = n = 0
    for x in X:
        _, dk, dv, _, _ = x
        for (B, S, H, Hkv, w) in geo:
            q, k, v = inputs(B, S, H, Hkv, dk, dv)
            scale = 1 / math.sqrt(dk)
            o, lse = flash_fwd(q, k, v, w, scale)[:2]
            do = torch.randn_like(o); do[..., dv:] = 0
            outs = [torch.full_like(q, float("nan")), torch.full_like(k, float("nan")), torch.full_like(v, float("nan")),
                    torch.full((B, H, S), float("nan"), device=dev)]
            dq_x(x, q, k, v, o, lse, do, w, scale, outs)
            dkdv_landed(q, k, v, o, lse, do, w, dv, scale, outs)
            torch.cuda.synchronize()
            rq, rk, rv = reference(q, k, v, do, w, dv, scale)
            dref = (do[..., :dv].float() * o[..., :dv].float()).sum(-1).transpose(1, 2)
            e = [err(outs[0], rq), err(outs[1], rk), err(outs[2][..., :dv], rv[..., :dv]), err(outs[3], dref)]
            ok = max(e[:3]) <= 1e-2 and e[3] <= 1e-3 and not any(math.isnan(y) for y in e)
            fails += not ok; n += 1
            print(f"{'ok  ' if ok else 'FAIL'} {x[0]} B={B} S={S} H={H} Hkv={Hkv} w={w}: dq {e[0]:.2e} dk {e[1]:.2e} dv {e[2]:.2e} delta {e[3]:.1e}")
    print("FAILS", fails, "of", n)
if mode == "bench":
    torch.manual_seed(0)
    print(f"{'shape':6} {'S':>6} {'B':>2} {'kernel':24} {'ms median (min-max)':>22} {'vs landed':>9} {'TFLOP/s':>8}")
    for shp, B, S, H, Hkv, dk, dv in [("paper", 1, 16384, 64, 4, 192, 128), ("paper", 1, 65536, 64, 4, 192, 128),
                                      ("d128", 1, 65536, 16, 1, 128, 128), ("125m", 4, 8192, 12, 4, 64, 64), ("125m", 1, 32768, 12, 4, 64, 64)]:
        w = 512
        q, k, v = inputs(B, S, H, Hkv, dk, dv)
        scale = 1 / math.sqrt(dk)
        o, lse = flash_fwd(q, k, v, w, scale)[:2]
        do = torch.randn_like(o); do[..., dv:] = 0
        pairs = B * H * (S * w - w * (w - 1) // 2)
        flops = pairs * 2 * (2 * dk + dv)
        ref = [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty(B, H, S, device=dev)]
        t0 = bench(lambda: dq_landed(q, k, v, o, lse, do, w, dv, scale, ref))
        print(f"{shp:6} {S:>6} {B:>2} {'landed dq':24} {t0[0]:9.3f} ({t0[1]:.3f}-{t0[2]:.3f}) {1:9.2f} {flops / (t0[0] * 1e-3) / 1e12:8.1f}")
        for x in X:
            if (x[1], x[2]) != (dk, dv):
                continue
            outs = [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty(B, H, S, device=dev)]
            t = bench(lambda: dq_x(x, q, k, v, o, lse, do, w, scale, outs))
            torch.cuda.synchronize()
            print(f"{shp:6} {S:>6} {B:>2} {x[0]:24} {t[0]:9.3f} ({t[1]:.3f}-{t[2]:.3f}) {t0[0] / t[0]:9.2f} {flops / (t[0] * 1e-3) / 1e12:8.1f}"
                  f"  vs landed dq {err(outs[0], ref[0]):.1e}")
