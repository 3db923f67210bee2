"""Prototype: the sliding-window branch on cuDNN's fused attention, timed against libtorch's
flash kernel with its window parameters (what nsa-sys's WindowFlash runs).

"band": queries [0, w) are plain causal attention over keys [0, w); queries [w, S) in chunks of
b rows, each over the overlapping key span [c*b, c*b + w + b) (a strided view of k and v, no
copy) with a broadcast [b, w + b] bias that is 0 inside the band (query i sees span keys
i + 1 ..= i + w) and -inf outside. dK/dV come back per chunk and are summed over the spans.
"rev": (timed without its copies) causal w x w chunks plus the chunk before each, reversed.
Usage: python window_cudnn_proto.py   (prints a table; exits 1 on a mismatch)
"""
import math
import sys

import torch

A = torch.ops.aten
dev = "cuda"


def timed(fn, reps=10, warm=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(True), torch.cuda.Event(True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    ts.sort()
    return ts[len(ts) // 2], ts[0], ts[-1]


def flash_fwd(q, k, v, w, scale):
    S = q.shape[1]
    r = A._flash_attention_forward(q, k, v, None, None, S, S, 0.0, True, False, scale=scale,
                                   window_size_left=w - 1, window_size_right=0)
    return r


def flash_bwd(do, q, k, v, fw, w, scale):
    S = q.shape[1]
    out, lse, rng, unused = fw[0], fw[1], fw[2], fw[3]
    return A._flash_attention_backward(do, q, k, v, out, lse, None, None, S, S, 0.0, True, rng,
                                       unused, scale=scale, window_size_left=w - 1,
                                       window_size_right=0)


def band_bias(b, w, dtype):
    i = torch.arange(b, device=dev)[:, None]
    s = torch.arange(w + b, device=dev)[None, :]
    ok = (s >= i + 1) & (s <= i + w)
    bias = torch.zeros(b, w + b, device=dev, dtype=dtype)
    bias.masked_fill_(~ok, float("-inf"))
    return bias.view(1, 1, b, w + b)


def spans(x, bi, C, b, w):
    # x [B, S, Hk, d] -> batch bi's overlapping spans [C, Hk, w + b, d] (a view).
    _, S, Hk, d = x.shape
    xb = x[bi]
    return xb.as_strided((C, Hk, w + b, d), (b * Hk * d, d, Hk * d, 1))


def band_fwd(q, k, v, w, b, scale, bias):
    B, S, H, dk = q.shape
    dv = v.shape[3]
    hw = min(w, S)
    out = torch.empty(B, S, H, dv, device=dev, dtype=q.dtype)
    saved = []
    r = A._scaled_dot_product_cudnn_attention(q[:, :hw].transpose(1, 2), k[:, :hw].transpose(1, 2),
                                               v[:, :hw].transpose(1, 2), None, True, 0.0, True,
                                               False, scale=scale)
    out[:, :hw] = r[0].transpose(1, 2)
    saved.append(r)
    if S > w:
        C = (S - w) // b
        for bi in range(B):
            qb = q[bi, w:].view(C, b, H, dk).transpose(1, 2)
            r = A._scaled_dot_product_cudnn_attention(qb, spans(k, bi, C, b, w),
                                                       spans(v, bi, C, b, w), bias, True, 0.0,
                                                       False, False, scale=scale)
            out[bi, w:] = r[0].transpose(1, 2).reshape(S - w, H, dv)
            saved.append(r)
    return out, saved


def band_bwd(do, q, k, v, out, saved, w, b, scale, bias):
    B, S, H, dk = q.shape
    Hk, dv = k.shape[2], v.shape[3]
    hw = min(w, S)
    dq = torch.empty_like(q)
    dk_ = torch.zeros(B, S, Hk, dk, device=dev, dtype=torch.float32 if q.dtype != torch.float64 else q.dtype)
    dv_ = torch.zeros(B, S, Hk, dv, device=dev, dtype=dk_.dtype)
    r = saved[0]
    g = A._scaled_dot_product_cudnn_attention_backward(
        do[:, :hw].transpose(1, 2), q[:, :hw].transpose(1, 2), k[:, :hw].transpose(1, 2),
        v[:, :hw].transpose(1, 2), out[:, :hw].transpose(1, 2), r[1], r[6], r[7], None, None,
        None, hw, hw, 0.0, True, scale=scale)
    dq[:, :hw] = g[0].transpose(1, 2)
    dk_[:, :hw] += g[1].transpose(1, 2)
    dv_[:, :hw] += g[2].transpose(1, 2)
    if S > w:
        C = (S - w) // b
        n = (w + b) // b
        for bi in range(B):
            r = saved[1 + bi]
            view = lambda x, d: x[bi, w:].view(C, b, H, d).transpose(1, 2)
            g = A._scaled_dot_product_cudnn_attention_backward(
                view(do, dv), view(q, dk), spans(k, bi, C, b, w), spans(v, bi, C, b, w),
                view(out, dv), r[1], r[6], r[7], bias, None, None, b, w + b, 0.0, False,
                scale=scale)
            dq[bi, w:] = g[0].transpose(1, 2).reshape(S - w, H, dk)
            gk = g[1].reshape(C, Hk, n, b, dk)
            gv = g[2].reshape(C, Hk, n, b, dv)
            dkb = dk_[bi].view(S // b, b, Hk, dk)
            dvb = dv_[bi].view(S // b, b, Hk, dv)
            for j in range(n):
                dkb[j:j + C] += gk[:, :, j].transpose(1, 2)
                dvb[j:j + C] += gv[:, :, j].transpose(1, 2)
    return dq, dk_.to(q.dtype), dv_.to(q.dtype)


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def run(name, B, S, H, Hk, dk, dv, w, chunks, reps):
    torch.manual_seed(0)
    scale = 1.0 / math.sqrt(dk)
    bf = torch.bfloat16
    q = torch.randn(B, S, H, dk, device=dev, dtype=bf)
    k = torch.randn(B, S, Hk, dk, device=dev, dtype=bf)
    v = torch.randn(B, S, Hk, dv, device=dev, dtype=bf)
    do = torch.randn(B, S, H, dv, device=dev, dtype=bf)
    d = max(dk, dv)
    pad = lambda t: torch.nn.functional.pad(t, (0, d - t.shape[3])).contiguous()
    qp, kp, vp, dop = pad(q), pad(k), pad(v), pad(do)
    rows = []
    fw = flash_fwd(qp, kp, vp, w, scale)
    ref_o = fw[0][..., :dv]
    ref_g = flash_bwd(dop, qp, kp, vp, fw, w, scale)
    ref_g = (ref_g[0][..., :dk], ref_g[1][..., :dk], ref_g[2][..., :dv])
    f_fwd = timed(lambda: flash_fwd(qp, kp, vp, w, scale), reps)
    f_bwd = timed(lambda: flash_bwd(dop, qp, kp, vp, fw, w, scale), reps)
    rows.append((name, f"flash d={d}", f_fwd, f_bwd, "", ""))
    ok = True
    for b in chunks:
        bias = band_bias(b, w, bf)
        out, saved = band_fwd(q, k, v, w, b, scale, bias)
        g = band_bwd(do, q, k, v, out, saved, w, b, scale, bias)
        eo = rel(out, ref_o)
        eg = max(rel(g[i], ref_g[i]) for i in range(3))
        ok = ok and eo < 2e-2 and eg < 2e-2
        t_f = timed(lambda: band_fwd(q, k, v, w, b, scale, bias), reps)
        t_b = timed(lambda: band_bwd(do, q, k, v, out, saved, w, b, scale, bias), reps)
        rows.append((name, f"band b={b}", t_f, t_b, f"{eo:.1e}", f"{eg:.1e}"))
    # rev: its cuDNN calls alone (inputs already laid out), S % w == 0.
    C = S // w
    qa = q.view(B * C, w, H, dk).transpose(1, 2)
    ka = k.view(B * C, w, Hk, dk).transpose(1, 2)
    va = v.view(B * C, w, Hk, dv).transpose(1, 2)
    qb = q[:, : (C - 1) * (w - 1)].reshape(B * (C - 1), w - 1, H, dk).transpose(1, 2)
    kb = k[:, : (C - 1) * (w - 1)].reshape(B * (C - 1), w - 1, Hk, dk).transpose(1, 2)
    vb = v[:, : (C - 1) * (w - 1)].reshape(B * (C - 1), w - 1, Hk, dv).transpose(1, 2)
    call = lambda q_, k_, v_: A._scaled_dot_product_cudnn_attention(q_, k_, v_, None, True, 0.0,
                                                                    True, False, scale=scale)
    ra, rb = call(qa, ka, va), call(qb, kb, vb)
    doa = do.view(B * C, w, H, dv).transpose(1, 2)
    dob = do[:, : (C - 1) * (w - 1)].reshape(B * (C - 1), w - 1, H, dv).transpose(1, 2)
    bw = lambda d_, q_, k_, v_, r, n: A._scaled_dot_product_cudnn_attention_backward(
        d_, q_, k_, v_, r[0], r[1], r[6], r[7], None, None, None, n, n, 0.0, True, scale=scale)
    t_f = timed(lambda: (call(qa, ka, va), call(qb, kb, vb)), reps)
    t_b = timed(lambda: (bw(doa, qa, ka, va, ra, w), bw(dob, qb, kb, vb, rb, w - 1)), reps)
    rows.append((name, "rev (cuDNN only)", t_f, t_b, "", ""))
    # FLOPs of the window itself (every query sees min(t + 1, w) keys).
    keys = sum(min(t + 1, w) for t in range(S))
    fl = 2 * B * H * keys * (dk + dv)
    for r in rows:
        print(f"{r[0]:6} {r[1]:18} fwd {r[2][0]:8.3f} ({r[2][1]:.3f}-{r[2][2]:.3f}) ms "
              f"{fl / r[2][0] / 1e9:6.1f} TF/s  bwd {r[3][0]:8.3f} ({r[3][1]:.3f}-{r[3][2]:.3f}) ms "
              f"{2.5 * fl / r[3][0] / 1e9:6.1f} TF/s  err o {r[4]} g {r[5]}", flush=True)
    return ok


def main():
    print(torch.__version__, torch.backends.cudnn.version(), torch.cuda.get_device_name())
    ok = run("125m", 4, 8192, 12, 4, 64, 64, 512, [64, 128, 256], 20)
    ok &= run("125m", 1, 32768, 12, 4, 64, 64, 512, [128], 20)
    ok &= run("paper", 1, 65536, 64, 4, 192, 128, 512, [64, 128, 256], 10)
    ok &= run("paper", 1, 8192, 64, 4, 192, 128, 512, [128], 10)
    print("OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
