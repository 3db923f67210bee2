# Prototype harness for nsa_window_fwd (window_fwd.cu): correctness vs an fp32 reference,
# flash backward on its out/lse, and timing vs libtorch's flash forward with a window.
import ctypes, sys, math, statistics, torch
torch.manual_seed(0)
dev = torch.device("cuda")
torch.zeros(1, device=dev)
cu = ctypes.CDLL("libcuda.so.1")
ctx = ctypes.c_void_p(); cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0); cu.cuCtxSetCurrent(ctx)
img = open(sys.argv[1], "rb").read()
mod = ctypes.c_void_p()
assert cu.cuModuleLoadData(ctypes.byref(mod), img) == 0
class Args(ctypes.Structure):
    _fields_ = [("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("o", ctypes.c_void_p), ("lse", ctypes.c_void_p),
                ("q_batch", ctypes.c_longlong), ("k_batch", ctypes.c_longlong), ("v_batch", ctypes.c_longlong), ("o_batch", ctypes.c_longlong)] + \
               [(n, ctypes.c_int) for n in ["q_row","k_row","v_row","o_row","q_head","k_head","v_head","o_head","S","H","Hkv","window","pad"]] + [("scale_log2", ctypes.c_float)]
funcs = {}
def func(dk, dv, name=None):
    name = name or f"nsa_window_fwd_dk{dk}_dv{dv}"
    if name not in funcs:
        f = ctypes.c_void_p()
        assert cu.cuModuleGetFunction(ctypes.byref(f), mod, name.encode()) == 0
        assert cu.cuFuncSetAttribute(f, 8, 232448 - 1024) == 0  # max dynamic smem
        funcs[name] = f
    return funcs[name]
def smem(dk, dv, bn=None):
    bn = bn or (64 if (dk, dv) == (64, 64) else 128 if dk + dv <= 320 else 64)
    return 128 * dk * 2 + 2 * bn * dk * 2 + 2 * bn * dv * 2 + 1024
def ours(q, k, v, w, dv, scale, name=None, bn=None):
    B, S, H, D = q.shape; Hkv = k.shape[2]
    o = torch.full((B, S, H, D), float("nan"), device=dev, dtype=torch.bfloat16)
    lse = torch.full((B, H, S), float("nan"), device=dev, dtype=torch.float32)
    a = Args(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(),
             q.stride(0), k.stride(0), v.stride(0), o.stride(0), q.stride(1), k.stride(1), v.stride(1), o.stride(1),
             q.stride(2), k.stride(2), v.stride(2), o.stride(2), S, H, Hkv, w, D - dv, scale * 1.4426950408889634)
    args = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.pointer(a), ctypes.c_void_p))
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    r = cu.cuLaunchKernel(func(D, dv, name), (S + 127) // 128, H, B, 256, 1, 1, smem(D, dv, bn), stream, args, None)
    assert r == 0, r
    return o, lse
def reference(q, k, v, w, dv, scale):
    B, S, H, D = q.shape; Hkv = k.shape[2]; G = H // Hkv
    qf = q.float().transpose(1, 2); kf = k.float().repeat_interleave(G, 2).transpose(1, 2); vf = v[..., :dv].float().repeat_interleave(G, 2).transpose(1, 2)
    s = qf @ kf.transpose(-1, -2) * scale
    t = torch.arange(S, device=dev)
    mask = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - w)
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    o = torch.softmax(s, -1) @ vf
    return o.transpose(1, 2), lse
fails = 0
cases = []
for (dk, dv) in [(64, 64), (128, 64), (128, 128), (192, 64), (192, 128), (192, 192)]:
    for (B, S, H, Hkv, w) in [(2, 300, 6, 2, 64), (1, 1, 4, 4, 512), (2, 777, 6, 3, 512), (1, 1100, 4, 1, 17), (1, 700, 2, 2, 1), (1, 2049, 16, 1, 600)]:
        cases.append((dk, dv, B, S, H, Hkv, w, None, None))
X = [("x_alt64_dk192_dv128", 192, 128, 64), ("x_ser64_dk192_dv128", 192, 128, 64), ("x_alt128_dk64_dv64", 64, 64, 128), ("x_ser128_dk64_dv64", 64, 64, 128), ("x_ser64_dk64_dv64", 64, 64, 64), ("x_alt64_dk128_dv128", 128, 128, 64)]
for (name, dk, dv, bn) in X:
    for (B, S, H, Hkv, w) in [(2, 300, 6, 2, 64), (1, 1, 4, 4, 512), (2, 777, 6, 3, 512), (1, 1100, 4, 1, 17), (1, 700, 2, 2, 1), (1, 2049, 16, 1, 600), (1, 130, 2, 1, 1000)]:
        cases.append((dk, dv, B, S, H, Hkv, w, name, bn))
for (dk, dv, B, S, H, Hkv, w, name, bn) in cases:
    q = torch.randn(B, S, H, dk, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, S, Hkv, dk, device=dev, dtype=torch.bfloat16)
    v = torch.randn(B, S, Hkv, dk, device=dev, dtype=torch.bfloat16)
    v[..., dv:] = 0
    scale = 1 / math.sqrt(dk)
    o, lse = ours(q, k, v, w, dv, scale, name, bn)
    ro, rl = reference(q, k, v, w, dv, scale)
    err = ((o[..., :dv].float() - ro).abs().max() / ro.abs().max()).item()
    lerr = (lse - rl).abs().max().item()
    padok = bool((o[..., dv:] == 0).all()) if dv < dk else True
    ok = err <= 1e-2 and lerr <= 1e-2 and padok and not math.isnan(err)
    fails += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {name or 'main'} dk={dk} dv={dv} B={B} S={S} H={H} Hkv={Hkv} w={w}: out rel {err:.2e} lse abs {lerr:.2e} pad {padok}")
# flash backward on our out/lse vs on flash's own forward
for (dk, dv, B, S, H, Hkv, w) in [(192, 128, 1, 4096, 8, 2, 512), (64, 64, 2, 3000, 6, 2, 512)]:
    q = torch.randn(B, S, H, dk, device=dev, dtype=torch.bfloat16); k = torch.randn(B, S, Hkv, dk, device=dev, dtype=torch.bfloat16)
    v = torch.randn(B, S, Hkv, dk, device=dev, dtype=torch.bfloat16); v[..., dv:] = 0
    scale = 1 / math.sqrt(dk)
    fo, flse, seed, off, _ = torch.ops.aten._flash_attention_forward(q, k, v, None, None, S, S, 0.0, True, False, scale=scale, window_size_left=w - 1, window_size_right=0)
    o, lse = ours(q, k, v, w, dv, scale)
    do = torch.randn_like(fo); do[..., dv:] = 0
    g1 = torch.ops.aten._flash_attention_backward(do, q, k, v, fo, flse, None, None, S, S, 0.0, True, seed, off, scale=scale, window_size_left=w - 1, window_size_right=0)
    e = torch.empty((), dtype=torch.long)
    g2 = torch.ops.aten._flash_attention_backward(do, q, k, v, o, lse, None, None, S, S, 0.0, True, e, e, scale=scale, window_size_left=w - 1, window_size_right=0)
    errs = [((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(g2[:3], g1[:3])]
    oe = ((o.float() - fo.float()).abs().max() / fo.float().abs().max()).item(); le = (lse - flse).abs().max().item()
    ok = max(errs) <= 1e-2 and oe <= 1e-2
    fails += not ok
    print(f"{'ok  ' if ok else 'FAIL'} flash bwd on ours dk={dk} dv={dv} S={S}: vs flash fwd out {oe:.2e} lse {le:.2e}; dq dk dv {errs[0]:.2e} {errs[1]:.2e} {errs[2]:.2e}")
print("FAILS", fails)
def bench(fn, reps=10):
    fn(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts), min(ts), max(ts)
print(f"{'shape':8} {'S':>6} {'B':>2} {'kernel':24} {'ms (min-max)':>24} {'vs flash':>8} {'TFLOP/s':>8}")
for name, B, S, H, Hkv, dk, dv in [("paper", 1, 16384, 64, 4, 192, 128), ("paper", 1, 65536, 64, 4, 192, 128), ("125m", 4, 8192, 12, 4, 64, 64), ("125m", 1, 32768, 12, 4, 64, 64)]:
    w = 512
    q = torch.randn(B, S, H, dk, device=dev, dtype=torch.bfloat16); k = torch.randn(B, S, Hkv, dk, device=dev, dtype=torch.bfloat16)
    v = torch.randn(B, S, Hkv, dk, device=dev, dtype=torch.bfloat16); v[..., dv:] = 0
    scale = 1 / math.sqrt(dk)
    pairs = B * H * (S * w - w * (w - 1) // 2)
    f = bench(lambda: torch.ops.aten._flash_attention_forward(q, k, v, None, None, S, S, 0.0, True, False, scale=scale, window_size_left=w - 1, window_size_right=0))
    print(f"{name:8} {S:>6} {B:>2} {'flash':24} {f[0]:8.3f} ({f[1]:.3f}-{f[2]:.3f}) {1:8.2f} {pairs * 2 * (dk + dv) / (f[0] * 1e-3) / 1e12:8.1f}")
    for kname, kdk, kdv, bn in [(None, dk, dv, None)] + [x[:] for x in X]:
        if (kdk, kdv) != (dk, dv): continue
        o = bench(lambda: ours(q, k, v, w, dv, scale, kname, bn))
        print(f"{name:8} {S:>6} {B:>2} {kname or 'main':24} {o[0]:8.3f} ({o[1]:.3f}-{o[2]:.3f}) {f[0]/o[0]:8.2f} {pairs * 2 * (dk + dv) / (o[0] * 1e-3) / 1e12:8.1f}")
