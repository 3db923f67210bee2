# Harness for window_bwd.cu (round 33, from round 32's wb_harness.py): the two backward kernels
# loaded from an NVRTC cubin through the driver; parity with an fp32 autograd reference on
# fresh random inputs (outputs poisoned with NaN first), beside flash's own backward; times
# against flash's backward and round 32's kernels (old cubin). Every launch gets the device's
# whole opt-in shared memory (the kernels' carve-ups differ; the glue sizes them exactly).
#   python wb2_harness.py <cubin> check|small|bench [<old cubin>]
import ctypes, sys, math, statistics, torch
dev = torch.device("cuda")
torch.zeros(1, device=dev)
cu = ctypes.CDLL("libcuda.so.1")
ctx = ctypes.c_void_p(); cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0); cu.cuCtxSetCurrent(ctx)
mod = ctypes.c_void_p()
assert cu.cuModuleLoadData(ctypes.byref(mod), open(sys.argv[1], "rb").read()) == 0
mode = sys.argv[2]
class Args(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in ["q", "k", "v", "o", "dout", "lse", "delta", "dq", "dk", "dv"]] + \
               [(n, ctypes.c_int) for n in ["S", "H", "Hkv", "window"]] + [("scale", ctypes.c_float), ("scale_log2", ctypes.c_float)]
omod = None
if len(sys.argv) > 3:
    omod = ctypes.c_void_p()
    assert cu.cuModuleLoadData(ctypes.byref(omod), open(sys.argv[3], "rb").read()) == 0
ofuncs = {}
def ofunc(name):
    if name not in ofuncs:
        f = ctypes.c_void_p()
        assert cu.cuModuleGetFunction(ctypes.byref(f), omod, name.encode()) == 0, name
        assert cu.cuFuncSetAttribute(f, 8, 227 * 1024) == 0
        ofuncs[name] = f
    return ofuncs[name]
funcs = {}
def func(name, smem):
    if name not in funcs:
        f = ctypes.c_void_p()
        assert cu.cuModuleGetFunction(ctypes.byref(f), mod, name.encode()) == 0, name
        assert cu.cuFuncSetAttribute(f, 8, 227 * 1024) == 0
        funcs[name] = f
    return funcs[name]
def smem(dk, dv):
    return 227 * 1024
def ours(q, k, v, o, lse, do, w, dv, scale, which=("dq", "dkdv"), outs=None, m=None):
    B, S, H, D = q.shape; Hkv = k.shape[2]
    if outs is None:
        outs = [torch.full_like(q, float("nan")), torch.full_like(k, float("nan")), torch.full_like(v, float("nan")),
                torch.full((B, H, S), float("nan"), device=dev)]
    dq, dk, dvv, delta = outs
    a = Args(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), do.data_ptr(), lse.data_ptr(), delta.data_ptr(),
             dq.data_ptr(), dk.data_ptr(), dvv.data_ptr(), S, H, Hkv, min(w, S), scale, scale * 1.4426950408889634)
    args = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.pointer(a), ctypes.c_void_p))
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    nb = (S + 127) // 128
    for kind in which:
        grid = (nb, H, B) if kind == "dq" else (nb, Hkv, B)
        f = func(f"nsa_window_bwd_{kind}_dk{D}_dv{dv}", smem(D, dv)) if m is None else ofunc(f"nsa_window_bwd_{kind}_dk{D}_dv{dv}")
        r = cu.cuLaunchKernel(f, *grid, 256, 1, 1, smem(D, dv), stream, args, None)
        assert r == 0, r
    return outs
def flash_fwd(q, k, v, w, scale):
    S = q.shape[1]
    return torch.ops.aten._flash_attention_forward(q, k, v, None, None, S, S, 0.0, True, False, scale=scale, window_size_left=w - 1, window_size_right=0)
def flash_bwd(do, q, k, v, o, lse, w, scale, seed, off):
    S = q.shape[1]
    return torch.ops.aten._flash_attention_backward(do, q, k, v, o, lse, None, None, S, S, 0.0, True, seed, off, scale=scale, window_size_left=w - 1, window_size_right=0)
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
def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
def inputs(B, S, H, Hkv, dk, dv):
    q = torch.randn(B, S, H, dk, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, S, Hkv, dk, device=dev, dtype=torch.bfloat16)
    v = torch.randn(B, S, Hkv, dk, device=dev, dtype=torch.bfloat16); v[..., dv:] = 0
    return q, k, v
SHAPES = [(64, 64), (128, 64), (128, 128), (192, 64), (192, 128)]
if mode in ("check", "small"):
    torch.manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    cases = []
    geo = [(2, 300, 6, 2, 64), (1, 1, 4, 4, 512), (2, 777, 6, 3, 512), (1, 1100, 4, 1, 17), (1, 700, 2, 2, 2), (1, 2049, 16, 1, 600), (1, 130, 2, 1, 1000), (2, 1000, 8, 2, 512)]
    if mode == "small":
        geo = [(2, 300, 6, 2, 64), (1, 200, 4, 1, 70)]
    for (dk, dv) in SHAPES:
        for g in geo:
            cases.append((dk, dv) + g)
    fails = 0
    for (dk, dv, B, S, H, Hkv, w) in cases:
        q, k, v = inputs(B, S, H, Hkv, dk, dv)
        scale = 1 / math.sqrt(dk)
        o, lse, seed, off, _ = flash_fwd(q, k, v, w, scale)
        do = torch.randn_like(o); do[..., dv:] = 0
        dq, dk_, dv_, delta = ours(q, k, v, o, lse, do, w, dv, scale)
        torch.cuda.synchronize()
        if mode == "small":
            print("ran", dk, dv, B, S, H, Hkv, w); continue
        rq, rk, rv = reference(q, k, v, do, w, dv, scale)
        fq, fk, fv = flash_bwd(do, q, k, v, o, lse, w, scale, seed, off)[:3]
        e = [rel(dq, rq), rel(dk_, rk), rel(dv_[..., :dv], rv[..., :dv])]
        fe = [rel(fq, rq), rel(fk, rk), rel(fv[..., :dv], rv[..., :dv])]
        dref = (do[..., :dv].float() * o[..., :dv].float()).sum(-1).transpose(1, 2)
        de = rel(delta, dref)
        padok = bool((dv_[..., dv:] == 0).all())
        ok = max(e) <= 1e-2 and de <= 1e-3 and padok and not any(math.isnan(x) for x in e + [de])
        fails += not ok
        print(f"{'ok  ' if ok else 'FAIL'} dk={dk} dv={dv} B={B} S={S} H={H} Hkv={Hkv} w={w}: dq {e[0]:.2e} dk {e[1]:.2e} dv {e[2]:.2e} delta {de:.1e} pad {padok} | flash {fe[0]:.2e} {fe[1]:.2e} {fe[2]:.2e}")
    print("FAILS", fails, "of", len(cases))
def bench(fn, reps=7):
    fn(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts), min(ts), max(ts)
if mode == "bench":
    torch.manual_seed(0)
    print(f"{'shape':6} {'S':>6} {'B':>2} {'kernel':12} {'ms median (min-max)':>24} {'vs flash':>8} {'TFLOP/s':>8}")
    for name, B, S, H, Hkv, dk, dv in [("paper", 1, 16384, 64, 4, 192, 128), ("paper", 1, 65536, 64, 4, 192, 128), ("125m", 4, 8192, 12, 4, 64, 64), ("125m", 1, 32768, 12, 4, 64, 64)]:
        w = 512
        q, k, v = inputs(B, S, H, Hkv, dk, dv)
        scale = 1 / math.sqrt(dk)
        o, lse, seed, off, _ = flash_fwd(q, k, v, w, scale)
        do = torch.randn_like(o); do[..., dv:] = 0
        pairs = B * H * (S * w - w * (w - 1) // 2)
        flops = pairs * 2 * (3 * dk + 2 * dv)  # dq, dk, S recompute at dk; dv, dP at dv
        f = bench(lambda: flash_bwd(do, q, k, v, o, lse, w, scale, seed, off))
        print(f"{name:6} {S:>6} {B:>2} {'flash':12} {f[0]:9.3f} ({f[1]:.3f}-{f[2]:.3f}) {1:8.2f} {flops / (f[0] * 1e-3) / 1e12:8.1f}")
        outs = [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty(B, H, S, device=dev)]
        ref = ours(q, k, v, o, lse, do, w, dv, scale, ("dq", "dkdv"), [torch.empty_like(x) for x in outs])
        for tag, m in [("new", None)] + ([("old", omod)] if omod else []):
            for which in [("dq", "dkdv"), ("dq",), ("dkdv",)]:
                t = bench(lambda: ours(q, k, v, o, lse, do, w, dv, scale, which, outs, m))
                fl = {"dq": pairs * 2 * (2 * dk + dv), "dkdv": pairs * 2 * (2 * dk + 2 * dv)}
                ff = sum(fl[x] for x in which)
                print(f"{name:6} {S:>6} {B:>2} {tag + ' ' + '+'.join(which):12} {t[0]:9.3f} ({t[1]:.3f}-{t[2]:.3f}) {f[0]/t[0]:8.2f} {ff / (t[0] * 1e-3) / 1e12:8.1f}")
            if m is not None:
                torch.cuda.synchronize()
                print(f"   old vs new: dq {rel(outs[0], ref[0]):.1e} dk {rel(outs[1], ref[1]):.1e} dv {rel(outs[2][..., :dv], ref[2][..., :dv]):.1e}")
if mode == "xbench":
    # argv[3]: the experimental cubin (x_window_bwd.cu): x_dq_<tag>_dk*_dv* and x_dkdv_<tag>_*.
    # Each variant's gradients against the landed kernels' (same inputs), then times.
    xmod = ctypes.c_void_p()
    assert cu.cuModuleLoadData(ctypes.byref(xmod), open(sys.argv[3], "rb").read()) == 0
    def xfunc(name):
        f = ctypes.c_void_p()
        assert cu.cuModuleGetFunction(ctypes.byref(f), xmod, name.encode()) == 0, name
        assert cu.cuFuncSetAttribute(f, 8, 227 * 1024) == 0
        return f
    def xrun(kind, name, smem_bytes, q, k, v, o, lse, do, w, scale, outs):
        B, S, H, D = q.shape; Hkv = k.shape[2]
        dq, dk, dvv, delta = outs
        a = Args(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), do.data_ptr(), lse.data_ptr(), delta.data_ptr(),
                 dq.data_ptr(), dk.data_ptr(), dvv.data_ptr(), S, H, Hkv, min(w, S), scale, scale * 1.4426950408889634)
        args = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.pointer(a), ctypes.c_void_p))
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        grid = ((S + 127) // 128, H, B) if kind == "dq" else ((S + 127) // 128, Hkv, B)
        assert cu.cuLaunchKernel(xfunc(name), *grid, 256, 1, 1, smem_bytes, stream, args, None) == 0
    torch.manual_seed(1)
    for shp, B, S, H, Hkv, dk, dv in [("paper", 1, 65536, 64, 4, 192, 128), ("paper", 1, 16384, 64, 4, 192, 128), ("125m", 4, 8192, 12, 4, 64, 64), ("d128", 1, 32768, 16, 2, 128, 64)]:
        w = 512
        q, k, v = inputs(B, S, H, Hkv, dk, dv)
        scale = 1 / math.sqrt(dk)
        o, lse, seed, off, _ = flash_fwd(q, k, v, w, scale)
        do = torch.randn_like(o); do[..., dv:] = 0
        ref = ours(q, k, v, o, lse, do, w, dv, scale)
        torch.cuda.synchronize()
        t = bench(lambda: ours(q, k, v, o, lse, do, w, dv, scale, ("dkdv",), ref))
        print(f"{shp:6} {S:>6} {B:>2} {'landed dkdv':28} {t[0]:8.3f} ({t[1]:.3f}-{t[2]:.3f})")
        for tag in ["pp", "pp3"]:
            name = f"x_dkdv_{tag}_dk{dk}_dv{dv}"
            outs = [torch.full_like(q, float("nan")), torch.full_like(k, float("nan")), torch.full_like(v, float("nan")), ref[3].clone()]
            xrun("dkdv", name, 227 * 1024, q, k, v, o, lse, do, w, scale, outs)
            torch.cuda.synchronize()
            diff = [rel(outs[1], ref[1]), rel(outs[2][..., :dv], ref[2][..., :dv])]
            t = bench(lambda: xrun("dkdv", name, 227 * 1024, q, k, v, o, lse, do, w, scale, outs))
            print(f"{shp:6} {S:>6} {B:>2} {name:28} {t[0]:8.3f} ({t[1]:.3f}-{t[2]:.3f}) vs landed dk dv {' '.join(f'{d:.1e}' for d in diff)}")
if mode == "xcheck":
    # The x dK/dV kernels against fp32 autograd (dq and delta by the landed dq kernel), the
    # outputs poisoned with NaN before each launch.
    xmod = ctypes.c_void_p()
    assert cu.cuModuleLoadData(ctypes.byref(xmod), open(sys.argv[3], "rb").read()) == 0
    torch.manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    fails = 0
    for (dk, dv) in SHAPES:
        for (B, S, H, Hkv, w) in [(2, 300, 6, 2, 64), (1, 1100, 4, 1, 17), (1, 700, 2, 2, 2), (1, 2049, 16, 1, 600), (1, 130, 2, 1, 1000), (2, 1000, 8, 2, 512), (1, 5, 3, 1, 512)]:
            q, k, v = inputs(B, S, H, Hkv, dk, dv)
            scale = 1 / math.sqrt(dk)
            o, lse, seed, off, _ = flash_fwd(q, k, v, w, scale)
            do = torch.randn_like(o); do[..., dv:] = 0
            rq, rk, rv = reference(q, k, v, do, w, dv, scale)
            for tag in ["pp", "pp3"]:
                dq, dk_, dv_, delta = ours(q, k, v, o, lse, do, w, dv, scale, ("dq",))
                f = ctypes.c_void_p()
                assert cu.cuModuleGetFunction(ctypes.byref(f), xmod, f"x_dkdv_{tag}_dk{dk}_dv{dv}".encode()) == 0
                assert cu.cuFuncSetAttribute(f, 8, 227 * 1024) == 0
                a = Args(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), do.data_ptr(), lse.data_ptr(), delta.data_ptr(),
                         dq.data_ptr(), dk_.data_ptr(), dv_.data_ptr(), S, H, Hkv, min(w, S), scale, scale * 1.4426950408889634)
                args = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.pointer(a), ctypes.c_void_p))
                assert cu.cuLaunchKernel(f, (S + 127) // 128, Hkv, B, 256, 1, 1, 227 * 1024, ctypes.c_void_p(torch.cuda.current_stream().cuda_stream), args, None) == 0
                torch.cuda.synchronize()
                e = [rel(dk_, rk), rel(dv_[..., :dv], rv[..., :dv])]
                padok = bool((dv_[..., dv:] == 0).all())
                ok = max(e) <= 1e-2 and padok and not any(math.isnan(x) for x in e)
                fails += not ok
                print(f"{'ok  ' if ok else 'FAIL'} x dkdv {tag} dk={dk} dv={dv} B={B} S={S} H={H} Hkv={Hkv} w={w}: dk {e[0]:.1e} dv {e[1]:.1e} pad {padok}")
    print("FAILS", fails)
