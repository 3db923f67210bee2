# Round 33 harness for nsa_window_fwd (window_fwd.cu, the ping-pong kernel): parity with an fp32
# reference on fresh random inputs (outputs poisoned with NaN before the launch), flash's
# backward on its out/lse, and times against round 32's kernel (old cubin) and libtorch's flash
# forward with the same window.
#   python wf2_harness.py check|small|bench <new.cubin> <old.cubin> <x.cubin> [head]
# With "head", the new cubin has round 32's tiling (the tile loader of round 33's second part):
# it is launched with round 32's shared-memory sizes, and the x cubin is x_window_fwd_wg3.cu's
# (three warpgroups a CTA).
import ctypes, sys, math, statistics, torch
torch.manual_seed(int.from_bytes(open("/dev/urandom", "rb").read(4), "little"))
dev = torch.device("cuda")
torch.zeros(1, device=dev)
cu = ctypes.CDLL("libcuda.so.1")
ctx = ctypes.c_void_p(); cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0); cu.cuCtxSetCurrent(ctx)
mode = sys.argv[1]
mods = {}
for tag, path in zip(["new", "old", "x"], sys.argv[2:5]):
    m = ctypes.c_void_p()
    assert cu.cuModuleLoadData(ctypes.byref(m), open(path, "rb").read()) == 0, path
    mods[tag] = m
class Args(ctypes.Structure):
    _fields_ = [("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("o", ctypes.c_void_p), ("lse", ctypes.c_void_p),
                ("q_batch", ctypes.c_longlong), ("k_batch", ctypes.c_longlong), ("v_batch", ctypes.c_longlong), ("o_batch", ctypes.c_longlong)] + \
               [(n, ctypes.c_int) for n in ["q_row","k_row","v_row","o_row","q_head","k_head","v_head","o_head","S","H","Hkv","window","pad"]] + [("scale_log2", ctypes.c_float)]
NEW = {(64, 64): (64, 2), (128, 64): (64, 2), (128, 128): (64, 2), (192, 64): (64, 2), (192, 128): (64, 2), (192, 192): (64, 1)}
X = [("x_l1_dk192_dv128", 192, 128, 64, 1), ("x_bn128_dk64_dv64", 64, 64, 128, 2), ("x_bn128l1_dk128_dv128", 128, 128, 128, 1),
     ("x_persist_dk192_dv128", 192, 128, 64, 1), ("x_persist_dk64_dv64", 64, 64, 64, 2), ("x_persist_dk128_dv128", 128, 128, 64, 2)]
SMS = None
funcs = {}
def func(tag, name):
    if (tag, name) not in funcs:
        f = ctypes.c_void_p()
        assert cu.cuModuleGetFunction(ctypes.byref(f), mods[tag], name.encode()) == 0, name
        assert cu.cuFuncSetAttribute(f, 8, 232448 - 1024) == 0
        funcs[(tag, name)] = f
    return funcs[(tag, name)]
HEAD = "head" in sys.argv[5:]
def smem(tag, dk, dv, bn, lead, name=None):
    if tag == "old" or (tag == "new" and HEAD):
        bn = 64 if (dk, dv) == (64, 64) else 128 if dk + dv <= 320 else 64
        return 128 * dk * 2 + 2 * bn * dk * 2 + 2 * bn * dv * 2 + 1024
    ns = lead + 2
    if name and name.startswith("x_wg3"):
        return 2 * (192 * dk + 2 * bn * (dk + dv)) + 1024
    if name and name.startswith("x_persist"):
        return 2 * (2 * 128 * dk + ns * bn * (dk + dv)) + 16 * ns + 1024
    return 2 * (128 * dk + ns * bn * (dk + dv)) + 16 * ns + 1024
def ours(q, k, v, w, dv, scale, tag="new", name=None, bn=None, lead=None):
    B, S, H, D = q.shape; Hkv = k.shape[2]
    if name is None:
        name = f"nsa_window_fwd_dk{D}_dv{dv}"; bn, lead = NEW[(D, dv)]
    o = torch.full((B, S, H, D), float("nan"), device=dev, dtype=torch.bfloat16)
    lse = torch.full((B, H, S), float("nan"), device=dev, dtype=torch.float32)
    a = Args(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(),
             q.stride(0), k.stride(0), v.stride(0), o.stride(0), q.stride(1), k.stride(1), v.stride(1), o.stride(1),
             q.stride(2), k.stride(2), v.stride(2), o.stride(2), S, H, Hkv, min(w, S), D - dv, scale * 1.4426950408889634)
    args = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.pointer(a), ctypes.c_void_p))
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    grid, threads = ((S + 127) // 128, H, B), 256
    if name.startswith("x_wg3"):
        grid, threads = ((S + 191) // 192, H, B), 384
    if name.startswith("x_persist"):
        global SMS
        if SMS is None: SMS = torch.cuda.get_device_properties(0).multi_processor_count
        grid = (min(max(1, SMS // B), (S + 127) // 128 * H), B, 1)
    r = cu.cuLaunchKernel(func(tag, name), *grid, threads, 1, 1, smem(tag, D, dv, bn, lead, name), stream, args, None)
    assert r == 0, r
    return o, lse
def reference(q, k, v, w, dv, scale):
    B, S, H, D = q.shape; Hkv = k.shape[2]; G = H // Hkv
    qf = q.float().transpose(1, 2); kf = k.float().repeat_interleave(G, 2).transpose(1, 2); vf = v[..., :dv].float().repeat_interleave(G, 2).transpose(1, 2)
    s = qf @ kf.transpose(-1, -2) * scale
    t = torch.arange(S, device=dev)
    mask = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - w)
    s = s.masked_fill(~mask, float("-inf"))
    return (torch.softmax(s, -1) @ vf).transpose(1, 2), torch.logsumexp(s, -1)
def inputs(B, S, H, Hkv, dk, dv):
    q = torch.randn(B, S, H, dk, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, S, Hkv, dk, device=dev, dtype=torch.bfloat16)
    v = torch.randn(B, S, Hkv, dk, device=dev, dtype=torch.bfloat16)
    v[..., dv:] = 0
    return q, k, v
fails = 0
def parity(cases, kernels):
    global fails
    for (B, S, H, Hkv, w) in cases:
        for (tag, name, dk, dv, bn, lead) in kernels:
            q, k, v = inputs(B, S, H, Hkv, dk, dv)
            scale = 1 / math.sqrt(dk)
            o, lse = ours(q, k, v, w, dv, scale, tag, name, bn, lead)
            torch.cuda.synchronize()
            ro, rl = reference(q, k, v, w, dv, scale)
            err = ((o[..., :dv].float() - ro).abs().max() / ro.abs().max()).item()
            lerr = (lse - rl).abs().max().item()
            padok = bool((o[..., dv:] == 0).all()) if dv < dk else True
            ok = err <= 1e-2 and lerr <= 1e-2 and padok and not math.isnan(err) and not math.isnan(lerr)
            fails += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {tag} {name or 'main'} dk={dk} dv={dv} B={B} S={S} H={H} Hkv={Hkv} w={w}: out rel {err:.2e} lse abs {lerr:.2e} pad {padok}")
MAIN = [("new", None, dk, dv, None, None) for (dk, dv) in NEW]
if HEAD:
    X = [("x_wg3_dk192_dv128", 192, 128, 64, 0), ("x_wg3_dk64_dv64", 64, 64, 64, 0), ("x_wg3_dk128_dv128", 128, 128, 64, 0)]
XS = [("x", n, dk, dv, bn, lead) for (n, dk, dv, bn, lead) in X]
if mode == "small":
    parity([(2, 300, 6, 2, 64), (1, 777, 4, 1, 512)], MAIN + XS)
    print("FAILS", fails); sys.exit(0)
if mode == "check":
    cases = [(2, 300, 6, 2, 64), (1, 1, 4, 4, 512), (2, 777, 6, 3, 512), (1, 1100, 4, 1, 17), (1, 700, 2, 2, 1),
             (1, 2049, 16, 1, 600), (1, 130, 2, 1, 1000), (3, 64, 3, 1, 512), (1, 129, 8, 8, 128), (2, 1500, 16, 4, 512)]
    parity(cases, MAIN + XS)
    for (dk, dv, B, S, H, Hkv, w) in [(192, 128, 1, 4096, 8, 2, 512), (64, 64, 2, 3000, 6, 2, 512)]:
        q, k, v = inputs(B, S, H, Hkv, dk, dv)
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
    print("FAILS", fails); sys.exit(0)
def bench(fn, reps=7):
    fn(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts), min(ts), max(ts)
print(f"{'shape':8} {'S':>6} {'B':>2} {'kernel':24} {'ms (min-max)':>24} {'vs old':>7} {'TFLOP/s':>8}")
for sname, B, S, H, Hkv, dk, dv in [("paper", 1, 16384, 64, 4, 192, 128), ("paper", 1, 65536, 64, 4, 192, 128), ("125m", 4, 8192, 12, 4, 64, 64), ("125m", 1, 32768, 12, 4, 64, 64), ("d128", 1, 65536, 16, 2, 128, 128)]:
    w = 512
    q, k, v = inputs(B, S, H, Hkv, dk, dv)
    scale = 1 / math.sqrt(dk)
    pairs = B * H * (S * w - w * (w - 1) // 2)
    tf = lambda ms: pairs * 2 * (dk + dv) / (ms * 1e-3) / 1e12
    rows = [("flash", lambda: torch.ops.aten._flash_attention_forward(q, k, v, None, None, S, S, 0.0, True, False, scale=scale, window_size_left=w - 1, window_size_right=0)),
            ("old (round 32)", lambda: ours(q, k, v, w, dv, scale, "old", f"nsa_window_fwd_dk{dk}_dv{dv}", 0, 0)),
            ("new", lambda: ours(q, k, v, w, dv, scale))]
    for (n, xdk, xdv, bn, lead) in X:
        if (xdk, xdv) == (dk, dv): rows.append((n, lambda n=n, bn=bn, lead=lead: ours(q, k, v, w, dv, scale, "x", n, bn, lead)))
    base = None
    for (label, fn) in rows:
        m = bench(fn)
        if label.startswith("old"): base = m[0]
        rel = f"{base / m[0]:7.2f}" if base else "      -"
        print(f"{sname:8} {S:>6} {B:>2} {label:24} {m[0]:8.3f} ({m[1]:.3f}-{m[2]:.3f}) {rel} {tf(m[0]):8.1f}")
