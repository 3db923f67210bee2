//! Integration tests of the NSA layer (CPU, small shapes, fresh random inputs each run).
//!
//! Every test seeds libtorch from the clock and prints the seed in its failure message; run with
//! `NSA_TEST_SEED=<seed>` to replay a failing case.
use std::time::{SystemTime, UNIX_EPOCH};

use nsa_attn::{
    reference, AttnPath, Branch, BranchOutputs, CmpRope, ForwardOpts, GateOverride, LeanOpts,
    NsaAttention, NsaConfig, NsaParams, Phi,
};
use nsa_select::{SelectConfig, SelectImpl};
use tch::{nn, Device, Kind, Tensor};

/// A fresh seed from the clock (or `NSA_TEST_SEED` to replay a failure), applied to libtorch.
fn seed() -> i64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let s = std::env::var("NSA_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or((nanos % 1_000_000_007) as i64);
    // Load libtorch's CUDA backend before the first libtorch call: manual_seed asks whether
    // CUDA exists, and ATen caches a "no CUDA" answer for the whole process (tests run in
    // parallel threads of one process, so the CUDA test would lose its GPU).
    nsa_sys::cuda::load_backend().expect("loading libtorch's CUDA backend");
    tch::manual_seed(s);
    s
}

/// The MLP φ's hidden width in these tests.
const PHI_HIDDEN: i64 = 5;

/// A small, deterministic generator for choosing configs (independent of libtorch's RNG).
struct Pick(u64);
impl Pick {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
    fn of<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.next(xs.len() as u64) as usize]
    }
}

#[allow(clippy::too_many_arguments)]
fn config(
    heads: i64,
    kv_heads: i64,
    dk: i64,
    dv: i64,
    (l, d, l_sel): (i64, i64, i64),
    top_n: i64,
    window: i64,
    phi: Phi,
) -> NsaConfig {
    NsaConfig {
        dim: 12,
        heads,
        kv_heads,
        head_dim_k: dk,
        head_dim_v: dv,
        rope_base: 10_000.0,
        nsa: NsaParams {
            select: SelectConfig {
                block_len: l,
                stride: d,
                select_len: l_sel,
                top_n,
                n_local: 2,
            },
            window,
            phi,
            phi_hidden: PHI_HIDDEN,
            cmp_rope: CmpRope::Raw,
            shared_kv: false,
            gate_hidden: 5,
        },
    }
}

fn layer(cfg: NsaConfig, kind: Kind) -> (nn::VarStore, NsaAttention) {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let attn = NsaAttention::new(&(vs.root() / "attn"), cfg).expect("valid config");
    vs.set_kind(kind);
    (vs, attn)
}

fn lean(chunk: i64, window_chunk: i64) -> AttnPath {
    AttnPath::Lean(LeanOpts {
        query_chunk: chunk,
        window_chunk,
        // Differs from query_chunk so that the two chunkings are tested independently.
        select_chunk: chunk + 3,
    })
}

const PATHS: [AttnPath; 2] = [
    AttnPath::Reference,
    AttnPath::Lean(LeanOpts {
        query_chunk: 5,
        window_chunk: 7,
        select_chunk: 6,
    }),
];

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    if a.numel() == 0 {
        return 0.0;
    }
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// Max |a − b| / max(1, max|b|): absolute for values of order one, relative for larger ones
/// (gradients summed over many tokens).
fn scaled_diff(a: &Tensor, b: &Tensor) -> f64 {
    let scale = if b.numel() == 0 {
        1.0
    } else {
        b.abs().max().double_value(&[]).max(1.0)
    };
    max_abs_diff(a, b) / scale
}

fn host(t: &Tensor) -> Vec<f64> {
    let t = t.to_kind(Kind::Double).contiguous().view([-1]);
    let n = t.numel();
    let mut v = vec![0.0; n];
    t.copy_data(&mut v, n);
    v
}

fn host_i64(t: &Tensor) -> Vec<i64> {
    let t = t.contiguous().view([-1]);
    let n = t.numel();
    let mut v = vec![0i64; n];
    t.copy_data(&mut v, n);
    v
}

/// Dense causal attention with GQA by expanded heads: q `[B,S,H,dk]`, k/v `[B,S,G,d]`.
fn dense_causal(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    let h = q.size()[2] / k.size()[2];
    let ex = |t: &Tensor| t.repeat_interleave_self_int(h, 2, None).transpose(1, 2);
    Tensor::scaled_dot_product_attention(
        &q.transpose(1, 2),
        &ex(k),
        &ex(v),
        None::<Tensor>,
        0.0,
        true,
        None,
        false,
    )
    .transpose(1, 2)
}

#[test]
fn full_coverage_selected_branch_equals_dense_causal_attention() {
    let s0 = seed();
    // (H, Hkv, dk, dv): MHA, GQA 2, MQA, with dk != dv.
    for (h, g, dk, dv) in [(4, 4, 8, 8), (4, 2, 8, 6), (6, 1, 6, 10)] {
        let (s, l_sel) = (37, 8);
        // n·l' = 40 ≥ S: every block is selected.
        let cfg = config(h, g, dk, dv, (4, 2, l_sel), 5, 6, Phi::Mean);
        let (_vs, attn) = layer(cfg, Kind::Float);
        let x = Tensor::randn([2, s, cfg.dim], (Kind::Float, Device::Cpu));
        let p = attn.project(&x).unwrap();
        let dense = dense_causal(&p.q, &p.slc_k, &p.slc_v);
        for path in PATHS {
            let opts = ForwardOpts {
                path,
                gates: GateOverride::Only(Branch::Selected),
                ..Default::default()
            };
            let out = attn.forward_branches(&x, &opts).unwrap();
            let err = max_abs_diff(&out.selected, &dense);
            assert!(
                err < 1e-5,
                "seed {s0} H={h} G={g} {path:?}: selected vs dense {err}"
            );
            // The whole layer with the gate on the selected branch equals W_o(dense).
            let mut full = attn.forward_branches(&x, &opts).unwrap().output;
            let x_dense = dense.reshape([2, s, h * dv]);
            let wo = attn_wo(&_vs);
            let want = x_dense.matmul(&wo.tr());
            full = full.to_kind(Kind::Float);
            let err = max_abs_diff(&full, &want);
            assert!(
                err < 1e-5,
                "seed {s0} H={h} G={g} {path:?}: layer vs W_o(dense) {err}"
            );
        }
    }
}

fn attn_wo(vs: &nn::VarStore) -> Tensor {
    vs.variables()
        .remove("attn.wo.weight")
        .expect("attn.wo.weight exists")
}

#[test]
fn outputs_up_to_t_do_not_depend_on_later_tokens() {
    let s0 = seed();
    let cfg = config(4, 2, 8, 6, (4, 2, 4), 3, 5, Phi::Mlp);
    let (_vs, attn) = layer(cfg, Kind::Float);
    let s = 41;
    let x = Tensor::randn([2, s, cfg.dim], (Kind::Float, Device::Cpu));
    for t in [0, 3, 17, 39] {
        let x2 = x.copy();
        x2.narrow(1, t + 1, s - t - 1).copy_(&Tensor::randn(
            [2, s - t - 1, cfg.dim],
            (Kind::Float, Device::Cpu),
        ));
        for path in PATHS {
            let opts = ForwardOpts {
                path,
                gates: GateOverride::Learned,
                ..Default::default()
            };
            let a = attn.forward_branches(&x, &opts).unwrap();
            let b = attn.forward_branches(&x2, &opts).unwrap();
            let head = |o: &Tensor| o.narrow(1, 0, t + 1);
            for (name, u, v) in [
                ("compressed", &a.compressed, &b.compressed),
                ("selected", &a.selected, &b.selected),
                ("window", &a.window, &b.window),
                ("output", &a.output, &b.output),
            ] {
                let err = max_abs_diff(&head(u), &head(v));
                assert!(
                    err < 1e-6,
                    "seed {s0} t={t} {path:?} {name}: changed by {err}"
                );
            }
            assert_eq!(
                host_i64(&head(&a.blocks)),
                host_i64(&head(&b.blocks)),
                "seed {s0} t={t}"
            );
            // Later rows did change, so the comparison above is not vacuous.
            assert!(max_abs_diff(&a.output, &b.output) > 1e-4, "seed {s0} t={t}");
        }
    }
}

/// Softmax attention of one query over an explicit key list, in float64 on the host.
fn naive_row(q: &[f64], keys: &[(Vec<f64>, Vec<f64>)], dv: usize) -> Vec<f64> {
    if keys.is_empty() {
        return vec![0.0; dv];
    }
    let scale = 1.0 / (q.len() as f64).sqrt();
    let scores: Vec<f64> = keys
        .iter()
        .map(|(k, _)| k.iter().zip(q).map(|(a, b)| a * b).sum::<f64>() * scale)
        .collect();
    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
    let z: f64 = e.iter().sum();
    let mut out = vec![0.0; dv];
    for (w, (_, v)) in e.iter().zip(keys) {
        for (o, x) in out.iter_mut().zip(v) {
            *o += w / z * x;
        }
    }
    out
}

#[test]
fn each_branch_matches_a_naive_per_token_loop() {
    let s0 = seed();
    let (l, d, l_sel, n, w) = (4, 2, 4, 3, 6);
    let cfg = config(4, 2, 6, 4, (l, d, l_sel), n, w, Phi::Linear);
    let (_vs, attn) = layer(cfg, Kind::Float);
    let (l, d, l_sel, n, w) = (
        l as usize,
        d as usize,
        l_sel as usize,
        n as usize,
        w as usize,
    );
    let (bsz, s) = (2usize, 29usize);
    let x = Tensor::randn([bsz as i64, s as i64, cfg.dim], (Kind::Float, Device::Cpu));
    let p = attn.project(&x).unwrap();
    let (h, g, dk, dv) = (4usize, 2usize, 6usize, 4usize);
    let nc = p.cmp_k.size()[1] as usize;
    let (q, ck, cv) = (host(&p.q), host(&p.cmp_k), host(&p.cmp_v));
    let (sk, sv, wk, wv) = (
        host(&p.slc_k),
        host(&p.slc_v),
        host(&p.win_k),
        host(&p.win_v),
    );
    let row = |data: &[f64], len: usize, b: usize, t: usize, head: usize, heads: usize, dim| {
        data[((b * len + t) * heads + head) * dim..][..dim].to_vec()
    };
    for path in PATHS {
        let out = attn
            .forward_branches(
                &x,
                &ForwardOpts {
                    path,
                    gates: GateOverride::Learned,
                    ..Default::default()
                },
            )
            .unwrap();
        let blocks = host_i64(&out.blocks);
        let (oc, os, ow) = (
            host(&out.compressed),
            host(&out.selected),
            host(&out.window),
        );
        for b in 0..bsz {
            for t in 0..s {
                for head in 0..h {
                    let grp = head / (h / g);
                    let qr = row(&q, s, b, t, head, h, dk);
                    let kv = |kd: &[f64], vd: &[f64], len: usize, i: usize| {
                        (
                            row(kd, len, b, i, grp, g, dk),
                            row(vd, len, b, i, grp, g, dv),
                        )
                    };
                    // Compressed: tokens i with i·d + l − 1 ≤ t.
                    let keys: Vec<_> = (0..nc)
                        .filter(|i| i * d + l - 1 <= t)
                        .map(|i| kv(&ck, &cv, nc, i))
                        .collect();
                    let want_c = naive_row(&qr, &keys, dv);
                    // Window: t − w + 1 ..= t.
                    let keys: Vec<_> = (t.saturating_sub(w - 1)..=t)
                        .map(|i| kv(&wk, &wv, s, i))
                        .collect();
                    let want_w = naive_row(&qr, &keys, dv);
                    // Selected: keys ≤ t of the group's selected blocks.
                    let sel = &blocks[((b * s + t) * g + grp) * n..][..n];
                    let mut idx: Vec<usize> = sel
                        .iter()
                        .filter(|&&j| j >= 0)
                        .flat_map(|&j| j as usize * l_sel..(j as usize + 1) * l_sel)
                        .filter(|&i| i <= t)
                        .collect();
                    idx.sort_unstable();
                    idx.dedup();
                    assert!(!idx.is_empty(), "the current block is always selected");
                    assert!(sel.contains(&((t / l_sel) as i64)), "current block forced");
                    assert!(sel.contains(&0), "block 0 forced");
                    let keys: Vec<_> = idx.iter().map(|&i| kv(&sk, &sv, s, i)).collect();
                    let want_s = naive_row(&qr, &keys, dv);
                    for (name, got, want) in [
                        ("cmp", &oc, want_c),
                        ("slc", &os, want_s),
                        ("win", &ow, want_w),
                    ] {
                        let got = row(got, s, b, t, head, h, dv);
                        let err = got
                            .iter()
                            .zip(&want)
                            .map(|(a, b)| (a - b).abs())
                            .fold(0.0, f64::max);
                        assert!(
                            err < 1e-5,
                            "seed {s0} {path:?} {name} b={b} t={t} head={head}: {err}"
                        );
                    }
                }
            }
        }
    }
}

/// Mean φ: compressed keys average the RoPE'd raw keys of their block (no key-side position
/// embedding exists for mean φ), compressed values average `v + pos_v`.
#[test]
fn mean_compression_averages_rope_keys_and_embedded_values() {
    let s0 = seed();
    let cfg = config(2, 1, 4, 2, (4, 2, 4), 3, 4, Phi::Mean);
    let (vs, attn) = layer(cfg, Kind::Float);
    let x = Tensor::randn([1, 11, cfg.dim], (Kind::Float, Device::Cpu));
    let p = attn.project(&x).unwrap();
    let vars = vs.variables();
    assert!(
        !vars.contains_key("attn.cmp.pos_k"),
        "no key-side embedding with mean φ"
    );
    let pos_v = &vars["attn.cmp.pos_v"];
    let k = x
        .matmul(&vars["attn.cmp.wk.weight"].tr())
        .view([1, 11, 1, 4]);
    let v = x
        .matmul(&vars["attn.cmp.wv.weight"].tr())
        .view([1, 11, 1, 2]);
    // RoPE at position s: pairs (i, i + 2) rotated by s · base^(−2i/4), base = 10^4.
    let mut roped = Vec::new();
    for s in 0..11 {
        let ks = k.narrow(1, s, 1);
        let (x1, x2) = (ks.narrow(3, 0, 2), ks.narrow(3, 2, 2));
        let ang = Tensor::from_slice(&[1.0f32, 1.0 / 100.0]) * s as f64;
        let (c, sn) = (ang.cos(), ang.sin());
        roped.push(Tensor::cat(
            &[&x1 * &c - &x2 * &sn, &x2 * &c + &x1 * &sn],
            3,
        ));
    }
    let roped = Tensor::cat(&roped, 1);
    assert_eq!(p.cmp_k.size(), [1, 4, 1, 4], "Nc = (11 − 4)/2 + 1 = 4");
    for i in 0..4 {
        let want_k = roped
            .narrow(1, i * 2, 4)
            .squeeze_dim(0)
            .mean_dim(0, false, None);
        let err = max_abs_diff(&p.cmp_k.get(0).get(i), &want_k);
        assert!(err < 1e-5, "seed {s0}: compressed key {i}: {err}");
        let want_v = (v.narrow(1, i * 2, 4).squeeze_dim(0) + pos_v).mean_dim(0, false, None);
        let err = max_abs_diff(&p.cmp_v.get(0).get(i), &want_v);
        assert!(err < 1e-5, "seed {s0}: compressed value {i}: {err}");
    }
}

/// `cmp_rope = "compressed"`: φ (mean here) reads the unrotated keys and compressed key i is
/// rotated at position i·d + l − 1; the values are as with `"raw"`.
#[test]
fn compressed_keys_rotate_after_phi_at_their_blocks_last_token() {
    let s0 = seed();
    let mut cfg = config(2, 1, 4, 2, (4, 2, 4), 3, 4, Phi::Mean);
    cfg.nsa.cmp_rope = CmpRope::Compressed;
    let (vs, attn) = layer(cfg, Kind::Double);
    let x = Tensor::randn([1, 11, cfg.dim], (Kind::Double, Device::Cpu));
    let p = attn.project(&x).unwrap();
    let vars = vs.variables();
    let k = x
        .matmul(&vars["attn.cmp.wk.weight"].tr())
        .view([1, 11, 1, 4]);
    assert_eq!(p.cmp_k.size(), [1, 4, 1, 4], "Nc = (11 − 4)/2 + 1 = 4");
    for i in 0..4 {
        let mean = k.narrow(1, i * 2, 4).mean_dim(1, true, None);
        // RoPE at position i·d + l − 1 = 2i + 3: pairs (j, j + 2) by (2i + 3) · 10^(−2j).
        let (x1, x2) = (mean.narrow(3, 0, 2), mean.narrow(3, 2, 2));
        let ang = Tensor::from_slice(&[1.0f64, 1.0 / 100.0]) * (2 * i + 3) as f64;
        let (c, sn) = (ang.cos(), ang.sin());
        let want = Tensor::cat(&[&x1 * &c - &x2 * &sn, &x2 * &c + &x1 * &sn], 3);
        let err = max_abs_diff(&p.cmp_k.narrow(1, i, 1), &want);
        assert!(err < 1e-12, "seed {s0}: compressed key {i}: {err}");
    }
    // The same weights with "raw": the selected and window keys and the compressed values are
    // the same, the compressed keys are not.
    cfg.nsa.cmp_rope = CmpRope::Raw;
    let (mut vs_raw, attn_raw) = layer(cfg, Kind::Double);
    vs_raw.copy(&vs).unwrap();
    let q = attn_raw.project(&x).unwrap();
    assert!(max_abs_diff(&p.slc_k, &q.slc_k) == 0.0 && max_abs_diff(&p.win_k, &q.win_k) == 0.0);
    assert!(max_abs_diff(&p.cmp_v, &q.cmp_v) == 0.0);
    assert!(
        max_abs_diff(&p.cmp_k, &q.cmp_k) > 1e-6,
        "the rotation moved"
    );
}

/// With `cmp_rope = "compressed"` the compressed branch's logits q_t · k̃_i depend on the block's
/// content and on t − i·d only: the same tokens later in a sequence (by a multiple of d, so the
/// blocks align) give the same logits. With the MLP φ over rotated keys (`"raw"`) they do not.
#[test]
fn compressed_logits_see_distance_only_when_rotated_after_phi() {
    let s0 = seed();
    let (l, d, shift) = (4, 2, 6);
    for (cmp_rope, invariant) in [(CmpRope::Compressed, true), (CmpRope::Raw, false)] {
        let mut cfg = config(2, 1, 8, 2, (l, d, 4), 3, 4, Phi::Mlp);
        cfg.nsa.cmp_rope = cmp_rope;
        let (_vs, attn) = layer(cfg, Kind::Double);
        let x = Tensor::randn([1, 14, cfg.dim], (Kind::Double, Device::Cpu));
        let prefix = Tensor::randn([1, shift, cfg.dim], (Kind::Double, Device::Cpu));
        let later = Tensor::cat(&[&prefix, &x], 1);
        let logits = |x: &Tensor| {
            let p = attn.project(x).unwrap();
            // [B, S, H, dk] · [B, Nc, Hkv = 1, dk] → [S, H, Nc]
            p.q.squeeze_dim(0)
                .matmul(&p.cmp_k.squeeze_dim(0).squeeze_dim(1).tr())
        };
        let a = logits(&x);
        let b = logits(&later)
            .narrow(0, shift, 14)
            .narrow(2, shift / d, a.size()[2]);
        let err = max_abs_diff(&a, &b);
        match invariant {
            true => assert!(err < 1e-10, "seed {s0}: {cmp_rope}: {err}"),
            false => assert!(err > 1e-4, "seed {s0}: {cmp_rope}: {err}"),
        }
    }
}

/// Every parameter group and the input get float64 finite-difference checks on tiny shapes.
#[test]
fn gradients_match_finite_differences_in_float64() {
    let s0 = seed();
    for (phi, shared, cmp_rope) in [
        (Phi::Linear, false, CmpRope::Raw),
        (Phi::Mlp, true, CmpRope::Raw),
        (Phi::Mean, false, CmpRope::Raw),
        (Phi::Mlp, false, CmpRope::Compressed),
        (Phi::Mlp, true, CmpRope::Compressed),
        (Phi::MeanMlp, false, CmpRope::Raw),
    ] {
        let mut cfg = config(2, 1, 4, 2, (4, 2, 4), 3, 3, phi);
        cfg.dim = 6;
        cfg.nsa.shared_kv = shared;
        cfg.nsa.cmp_rope = cmp_rope;
        let (vs, attn) = layer(cfg, Kind::Double);
        let x = Tensor::randn([1, 13, 6], (Kind::Double, Device::Cpu)).set_requires_grad(true);
        let r = Tensor::randn([1, 13, 6], (Kind::Double, Device::Cpu));
        // Fix the discrete selection so that the loss is smooth in every parameter.
        let blocks = attn
            .forward_branches(&x, &ForwardOpts::default())
            .unwrap()
            .blocks;
        for path in [AttnPath::Reference, lean(4, 5)] {
            let opts = ForwardOpts {
                path,
                gates: GateOverride::Learned,
                ..Default::default()
            };
            let loss = || {
                let out = attn
                    .forward_branches_with_blocks(&x, &blocks, &opts)
                    .unwrap();
                (out.output * &r).sum(Kind::Double)
            };
            let mut params: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
            params.sort_by(|a, b| a.0.cmp(&b.0));
            params.push(("x".into(), x.shallow_clone()));
            let tensors: Vec<&Tensor> = params.iter().map(|(_, t)| t).collect();
            let grads = Tensor::run_backward(&[loss()], &tensors, false, false);
            for ((name, param), grad) in params.iter().zip(&grads) {
                let flat_grad = host(grad);
                let numel = param.numel() as i64;
                // A few entries per tensor, spread over it.
                for e in [0, numel / 3, numel - 1] {
                    let mut p = param.view([-1]).get(e);
                    let orig = p.double_value(&[]);
                    let eps = 1e-6;
                    let f = |val: f64, p: &mut Tensor| {
                        tch::no_grad(|| {
                            let _ = p.fill_(val);
                        });
                        tch::no_grad(|| loss().double_value(&[]))
                    };
                    let up = f(orig + eps, &mut p);
                    let down = f(orig - eps, &mut p);
                    f(orig, &mut p);
                    let fd = (up - down) / (2.0 * eps);
                    let ad = flat_grad[e as usize];
                    assert!(
                        (fd - ad).abs() <= 1e-6 * (1.0 + ad.abs()),
                        "seed {s0} {phi:?} {path:?} {name}[{e}]: finite diff {fd} vs autograd {ad}"
                    );
                }
            }
        }
    }
}

#[test]
fn all_heads_of_a_group_read_only_the_group_selection() {
    let s0 = seed();
    // n·l' = 12 < t, so the selection excludes most keys.
    let (l_sel, n) = (4, 3);
    let cfg = config(6, 2, 4, 3, (4, 2, l_sel), n, 4, Phi::Mean);
    let (_vs, attn) = layer(cfg, Kind::Float);
    let s = 40;
    let x = Tensor::randn([1, s, cfg.dim], (Kind::Float, Device::Cpu));
    let p = attn.project(&x).unwrap();
    let blocks = attn
        .select(&p, AttnPath::Reference, SelectImpl::Vectorized)
        .unwrap();
    let t = s - 1;
    for grp in 0..2 {
        let sel: Vec<i64> = host_i64(&blocks.get(0).get(t).get(grp));
        let chosen = |i: i64| sel.contains(&(i / l_sel));
        let outside: Vec<i64> = (0..s).filter(|&i| !chosen(i)).collect();
        assert!(
            outside.len() > 20,
            "seed {s0}: selection should leave keys out"
        );
        // Replace the group's values and keys outside its selection with noise.
        let k2 = p.slc_k.copy();
        let v2 = p.slc_v.copy();
        for &i in &outside {
            k2.get(0)
                .get(i)
                .get(grp)
                .copy_(&Tensor::randn([4], (Kind::Float, Device::Cpu)));
            v2.get(0)
                .get(i)
                .get(grp)
                .copy_(&Tensor::randn([3], (Kind::Float, Device::Cpu)));
        }
        let ranges = nsa_attn::selection::ranges(&blocks, 0, &cfg, SelectImpl::Vectorized).unwrap();
        let before = reference::selected(&p.q, &p.slc_k, &p.slc_v, &ranges).unwrap();
        let after = reference::selected(&p.q, &k2, &v2, &ranges).unwrap();
        let lean_before =
            nsa_attn::lean::selected(&p.q, &p.slc_k, &p.slc_v, &blocks, &cfg, 8).unwrap();
        let lean_after = nsa_attn::lean::selected(&p.q, &k2, &v2, &blocks, &cfg, 8).unwrap();
        for head in grp * 3..grp * 3 + 3 {
            for (name, a, b) in [
                ("ref", &before, &after),
                ("lean", &lean_before, &lean_after),
            ] {
                let err = max_abs_diff(&a.get(0).get(t).get(head), &b.get(0).get(t).get(head));
                assert!(
                    err < 1e-6,
                    "seed {s0} {name} head {head} of group {grp} read outside: {err}"
                );
            }
        }
        // The other group's heads do read those keys (so the check above can fail).
        let other = (1 - grp) * 3;
        let err = max_abs_diff(
            &before.get(0).get(t).get(other),
            &after.get(0).get(t).get(other),
        );
        let other_sel: Vec<i64> = host_i64(&blocks.get(0).get(t).get(1 - grp));
        if other_sel != sel {
            assert!(
                err > 1e-6,
                "seed {s0}: the other group should see the noise"
            );
        }
    }
}

fn check_finite(name: &str, t: &Tensor, s0: i64) {
    let bad = t.isfinite().logical_not().any().int64_value(&[]);
    assert_eq!(bad, 0, "seed {s0}: {name} has non-finite values");
}

#[test]
fn shapes_dtypes_batches_and_short_sequences() {
    let s0 = seed();
    // S not a multiple of l' or d; S < l; S = 1; batch 3; bf16 and fp32.
    for (kind, bsz, s) in [
        (Kind::Float, 3, 45),
        (Kind::Float, 2, 3),
        (Kind::Float, 1, 1),
        (Kind::BFloat16, 2, 45),
        (Kind::BFloat16, 1, 5),
    ] {
        let cfg = config(4, 2, 8, 6, (4, 2, 8), 3, 6, Phi::Mlp);
        let (vs, attn) = layer(cfg, kind);
        let x = Tensor::randn([bsz, s, cfg.dim], (kind, Device::Cpu)).set_requires_grad(true);
        let mut outs: Vec<BranchOutputs> = Vec::new();
        for path in PATHS {
            let out = attn
                .forward_branches(
                    &x,
                    &ForwardOpts {
                        path,
                        ..Default::default()
                    },
                )
                .unwrap();
            assert_eq!(out.output.size(), [bsz, s, cfg.dim]);
            assert_eq!(out.output.kind(), kind);
            for o in [&out.compressed, &out.selected, &out.window] {
                assert_eq!(o.size(), [bsz, s, 4, 6]);
                assert_eq!(o.kind(), kind);
            }
            assert_eq!(out.gates.size(), [bsz, s, 4, 3]);
            assert_eq!(out.blocks.size(), [bsz, s, 2, 3]);
            if s < cfg.nsa.select.block_len {
                // No complete compression block: the compressed branch is zero.
                assert_eq!(
                    out.compressed.abs().max().double_value(&[]),
                    0.0,
                    "seed {s0}"
                );
            }
            let loss = out.output.to_kind(Kind::Float).square().sum(Kind::Float);
            let params: Vec<Tensor> = vs.trainable_variables();
            let mut all: Vec<&Tensor> = params.iter().collect();
            all.push(&x);
            for (i, g) in Tensor::run_backward(&[loss], &all, false, false)
                .iter()
                .enumerate()
            {
                check_finite(&format!("grad {i} {path:?} {kind:?} S={s}"), g, s0);
            }
            check_finite("output", &out.output, s0);
            outs.push(out);
        }
        // bf16 paths agree loosely (different rounding of the same math), fp32 tightly.
        let tol = if kind == Kind::BFloat16 { 5e-2 } else { 1e-5 };
        let err = scaled_diff(&outs[0].output, &outs[1].output);
        if outs[0].blocks.equal(&outs[1].blocks) {
            assert!(
                err < tol,
                "seed {s0} {kind:?} S={s}: lean vs reference {err}"
            );
        }
    }
}

#[test]
fn lean_path_matches_reference_on_random_configs() {
    let s0 = seed();
    let mut pick = Pick(s0 as u64);
    for case in 0..8 {
        let g = pick.of(&[1, 2, 3]);
        let h = g * pick.of(&[1, 2, 3]);
        let dk = pick.of(&[4, 8, 6]);
        let dv = pick.of(&[2, 4, 10]);
        let d = pick.of(&[1, 2, 4]);
        let l = d * pick.of(&[1, 2, 3]);
        let l_sel = d * pick.of(&[1, 2, 4]);
        let n_local = pick.of(&[1, 2]);
        let top_n = n_local + 1 + pick.of(&[0, 1, 3]) as i64;
        let w = pick.of(&[1, 3, 9]);
        let phi = pick.of(&[Phi::Mean, Phi::Linear, Phi::Mlp, Phi::MeanMlp]);
        let mut cfg = config(h as i64, g as i64, dk, dv, (l, d, l_sel), top_n, w, phi);
        cfg.nsa.select.n_local = n_local;
        cfg.nsa.shared_kv = pick.next(2) == 0;
        let bsz = pick.of(&[1, 2]);
        let s = 1 + pick.next(70) as i64;
        let chunk = pick.of(&[1, 3, 16, 64]);
        let wchunk = pick.of(&[2, 5, 32]);
        let what = format!("seed {s0} case {case}: {cfg:?} B={bsz} S={s} chunks={chunk}/{wchunk}");
        let (vs, attn) = layer(cfg, Kind::Float);
        let x =
            Tensor::randn([bsz, s, cfg.dim], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let r = Tensor::randn([bsz, s, cfg.dim], (Kind::Float, Device::Cpu));
        let mut params: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        params.push(("x".into(), x.shallow_clone()));
        let tensors: Vec<&Tensor> = params.iter().map(|(_, t)| t).collect();
        let refr = attn
            .forward_branches(
                &x,
                &ForwardOpts {
                    path: AttnPath::Reference,
                    ..Default::default()
                },
            )
            .unwrap();
        // The lean path selects chunk by chunk; it must pick the same blocks.
        let lean_opts = ForwardOpts {
            path: lean(chunk, wchunk),
            ..Default::default()
        };
        let own = attn.forward_branches(&x, &lean_opts).unwrap();
        assert!(
            own.blocks.equal(&refr.blocks),
            "{what}: lean selection differs"
        );
        // Compare the attention math on identical blocks (robust to near-ties in scores).
        let lean_out = attn
            .forward_branches_with_blocks(&x, &refr.blocks, &lean_opts)
            .unwrap();
        for (name, a, b) in [
            ("compressed", &lean_out.compressed, &refr.compressed),
            ("selected", &lean_out.selected, &refr.selected),
            ("window", &lean_out.window, &refr.window),
            ("output", &lean_out.output, &refr.output),
        ] {
            // Relative to the branch's largest value (at least 1): float32 sums in other
            // orders differ by a few ulps of the values, which can exceed 1 (seed 103771832
            // case 6: 1.3e-5 absolute).
            let err = scaled_diff(a, b);
            assert!(err < 1e-5, "{what}: {name} differs by {err} (scaled)");
        }
        let g_ref = Tensor::run_backward(
            &[(&refr.output * &r).sum(Kind::Float)],
            &tensors,
            false,
            false,
        );
        let g_lean = Tensor::run_backward(
            &[(&lean_out.output * &r).sum(Kind::Float)],
            &tensors,
            false,
            false,
        );
        // The same weights and input in float64, on the same blocks: the paths must agree to
        // float64 rounding, and the reference's own float32 rounding error is the noise floor
        // for float32 gradients that are (near) zero by cancellation (e.g. `cmp.pos_k` with
        // mean or linear φ, a shift of all compressed keys that cancels in the softmax).
        let mut vs = vs;
        vs.set_kind(Kind::Double);
        let x64 = x.detach().to_kind(Kind::Double).set_requires_grad(true);
        let r64 = r.to_kind(Kind::Double);
        let mut params64: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        params64.sort_by(|a, b| a.0.cmp(&b.0));
        params64.push(("x".into(), x64.shallow_clone()));
        let tensors64: Vec<&Tensor> = params64.iter().map(|(_, t)| t).collect();
        let ref_opts = ForwardOpts {
            path: AttnPath::Reference,
            ..Default::default()
        };
        let ref64 = attn
            .forward_branches_with_blocks(&x64, &refr.blocks, &ref_opts)
            .unwrap();
        let lean64 = attn
            .forward_branches_with_blocks(&x64, &refr.blocks, &lean_opts)
            .unwrap();
        let err = scaled_diff(&lean64.output, &ref64.output);
        assert!(err < 1e-10, "{what}: float64 outputs differ by {err}");
        let loss64 = |o: &Tensor| (o * &r64).sum(Kind::Double);
        let g_ref64 = Tensor::run_backward(&[loss64(&ref64.output)], &tensors64, false, false);
        let g_lean64 = Tensor::run_backward(&[loss64(&lean64.output)], &tensors64, false, false);
        for (i, (name, _)) in params.iter().enumerate() {
            let err64 = scaled_diff(&g_lean64[i], &g_ref64[i]);
            assert!(
                err64 < 1e-10,
                "{what}: float64 gradient of {name} differs by {err64}"
            );
            let err = max_abs_diff(&g_lean[i], &g_ref[i]);
            let scale = g_ref64[i].abs().max().double_value(&[]).max(1.0);
            let ref_noise = max_abs_diff(&g_ref[i], &g_ref64[i]);
            assert!(
                err < 1e-5 * scale || err <= 2.0 * ref_noise,
                "{what}: gradient of {name}: lean vs reference {err} (scale {scale}, \
                 reference float32 error {ref_noise})"
            );
        }
    }
}

#[test]
fn invalid_configs_name_the_field() {
    let base = config(4, 2, 8, 6, (4, 2, 8), 3, 6, Phi::Mean);
    type Spoil = fn(&mut NsaConfig);
    let cases: [(&str, Spoil); 7] = [
        ("kv_heads", |c| c.heads = 5),
        ("nsa.stride", |c| c.nsa.select.stride = 3),
        ("nsa.stride", |c| c.nsa.select.select_len = 9),
        ("nsa.window", |c| c.nsa.window = 0),
        ("head_dim_k", |c| c.head_dim_k = 7),
        ("nsa.top_n", |c| c.nsa.select.top_n = 2),
        ("nsa.phi_hidden", |c| {
            c.nsa.phi = Phi::Mlp;
            c.nsa.phi_hidden = 0;
        }),
    ];
    for (field, spoil) in cases {
        let mut cfg = base;
        spoil(&mut cfg);
        let vs = nn::VarStore::new(Device::Cpu);
        match NsaAttention::new(&vs.root(), cfg) {
            Err(nsa_attn::AttnError::Config { field: f, .. }) => assert_eq!(f, field, "{cfg:?}"),
            other => panic!("{cfg:?}: expected a config error on {field}, got {other:?}"),
        }
    }
}

#[test]
fn parameters_have_readable_names_and_audit_reports_kernels() {
    let cfg = config(4, 2, 8, 6, (4, 2, 8), 3, 6, Phi::Mlp);
    let (vs, attn) = layer(cfg, Kind::Float);
    let mut names: Vec<String> = vs.variables().into_keys().collect();
    names.sort();
    for want in [
        "attn.wq.weight",
        "attn.cmp.wk.weight",
        "attn.cmp.wv.weight",
        "attn.slc.wk.weight",
        "attn.slc.wv.weight",
        "attn.win.wk.weight",
        "attn.win.wv.weight",
        "attn.cmp.pos_k",
        "attn.cmp.pos_v",
        "attn.cmp.phi_k.w1.weight",
        "attn.cmp.phi_v.w2.bias",
        "attn.gate.w1.weight",
        "attn.gate.w2.bias",
        "attn.wo.weight",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "missing {want} in {names:?}"
        );
    }
    let audit = attn.audit(lean(16, 16), Device::Cpu, Kind::Float).unwrap();
    assert_eq!(audit.path, "lean");
    assert_eq!(audit.selected, nsa_attn::BranchKernel::ChunkedBlockGather);
    assert!(audit.to_string().contains("block-gather"));
    let audit = attn
        .audit(AttnPath::Reference, Device::Cpu, Kind::Float)
        .unwrap();
    assert_eq!(audit.window, nsa_attn::BranchKernel::ReferenceMasked);
}

/// The lean path's CUDA code (gathers, index_add_, chunking) against the reference, on a
/// mid-sized shape with the paper's block lengths. Needs a GPU: run with
/// `cargo test --release -p nsa-attn --test attn -- --ignored` on a CUDA machine.
#[test]
#[ignore = "needs a CUDA device"]
fn lean_matches_reference_on_cuda() {
    let backend = nsa_sys::cuda::load_backend().expect("libtorch CUDA backend");
    assert!(backend.has_gpu(), "no GPU visible: {backend}");
    let s0 = seed();
    let device = Device::Cuda(0);
    let cfg = NsaConfig {
        dim: 256,
        heads: 16,
        kv_heads: 4,
        head_dim_k: 48,
        head_dim_v: 32,
        rope_base: 10_000.0,
        nsa: NsaParams {
            select: SelectConfig {
                top_n: 8,
                ..SelectConfig::paper()
            },
            window: 256,
            phi: Phi::Mlp,
            phi_hidden: 64,
            cmp_rope: CmpRope::Raw,
            shared_kv: false,
            gate_hidden: 32,
        },
    };
    let mut vs = nn::VarStore::new(device);
    let attn = NsaAttention::new(&(vs.root() / "attn"), cfg).unwrap();
    vs.set_kind(Kind::Float);
    let (bsz, s) = (2, 1500);
    let x = Tensor::randn([bsz, s, cfg.dim], (Kind::Float, device)).set_requires_grad(true);
    let r = Tensor::randn([bsz, s, cfg.dim], (Kind::Float, device));
    let mut params: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    params.push(("x".into(), x.shallow_clone()));
    let tensors: Vec<&Tensor> = params.iter().map(|(_, t)| t).collect();
    let refr = attn.forward_branches(&x, &ForwardOpts::default()).unwrap();
    let lean_opts = ForwardOpts {
        path: lean(128, 256),
        ..Default::default()
    };
    let own = attn.forward_branches(&x, &lean_opts).unwrap();
    let same = own
        .blocks
        .eq_tensor(&refr.blocks)
        .to_kind(Kind::Float)
        .mean(Kind::Float);
    let same = same.double_value(&[]);
    assert!(
        same > 0.999,
        "seed {s0}: only {same} of the selected block ids agree"
    );
    let lean_out = attn
        .forward_branches_with_blocks(&x, &refr.blocks, &lean_opts)
        .unwrap();
    let err = scaled_diff(&lean_out.output, &refr.output);
    assert!(err < 1e-4, "seed {s0}: outputs differ by {err}");
    let g_ref = Tensor::run_backward(
        &[(&refr.output * &r).sum(Kind::Float)],
        &tensors,
        false,
        false,
    );
    let g_lean = Tensor::run_backward(
        &[(&lean_out.output * &r).sum(Kind::Float)],
        &tensors,
        false,
        false,
    );
    for ((name, _), (a, b)) in params.iter().zip(g_lean.iter().zip(&g_ref)) {
        let err = scaled_diff(a, b);
        eprintln!("cuda gradient {name}: scaled difference {err:.2e}");
        assert!(err < 1e-4, "seed {s0}: gradient of {name} differs by {err}");
    }
}

/// The layer's p_cmp (Eq. 8: `reference::masked_probs`, shared with its compressed branch) and
/// nsa-select's standalone `compressed_probs` are the same probabilities up to float rounding,
/// for chunks that start anywhere (including rows that see no compressed token yet).
#[test]
fn layer_p_cmp_matches_nsa_select() {
    let s0 = seed();
    // One KV group of three heads, l = 6 with stride 3: rows t < 5 see no compressed token.
    let (cfg, s) = (config(3, 1, 8, 6, (6, 3, 6), 3, 6, Phi::Linear), 37);
    let p = layer(cfg, Kind::Float)
        .1
        .project(&Tensor::randn([2, s, cfg.dim], (Kind::Float, Device::Cpu)))
        .unwrap();
    for t0 in [0, 2, 5, 20] {
        let q = p.q.narrow(1, t0, s - t0);
        let ours = nsa_attn::selection::compressed_probs(&q, &p.cmp_k, t0, &cfg).unwrap();
        let theirs = nsa_select::compressed_probs(&q, &p.cmp_k, t0, &cfg.select_config()).unwrap();
        assert_eq!(ours.size(), theirs.size());
        let err = max_abs_diff(&ours, &theirs);
        assert!(err < 1e-6, "seed {s0} t0 {t0}: {err}");
    }
}
