//! Input validation of the fused functions (runs on the CPU: every bad input is a typed error
//! before anything reaches a kernel), and, with a GPU, that the kernels load and a second load
//! of the same device is free.
use nsa_sys::fused::{self, FusedError};
use tch::{Device, Kind, Tensor};

fn backend() -> nsa_sys::cuda::CudaBackend {
    nsa_sys::cuda::load_backend().expect("libtorch backend")
}

fn is_input(r: Result<Tensor, FusedError>, what: &str) -> bool {
    match r {
        Err(FusedError::Input { what: w, .. }) => w.contains(what),
        _ => false,
    }
}

#[test]
fn bad_inputs_are_typed_errors() {
    let backend = backend();
    let dev = if backend.has_gpu() {
        Device::Cuda(0)
    } else {
        Device::Cpu
    };
    let o = (Kind::Float, dev);
    let (q, k, v) = (
        Tensor::zeros([1, 8, 4, 64], o),
        Tensor::zeros([1, 8, 2, 64], o),
        Tensor::zeros([1, 8, 2, 128], o),
    );
    let ids = Tensor::zeros([1, 8, 2, 3], (Kind::Int64, dev));
    let sel = |q: &Tensor, k: &Tensor, v: &Tensor, ids: &Tensor, l: i64| {
        fused::selected_attention(q, k, v, ids, l, 0.125)
    };
    if dev == Device::Cpu {
        // CPU tensors are refused by name.
        assert!(is_input(sel(&q, &k, &v, &ids, 4), "q"));
        assert!(is_input(fused::window_attention(&q, &k, &k, 4, 0.125), "q"));
        return;
    }
    assert!(is_input(sel(&q.to_kind(Kind::Half), &k, &v, &ids, 4), "q"));
    assert!(is_input(
        sel(&q, &k, &v, &ids.to_kind(Kind::Float), 4),
        "blocks"
    ));
    assert!(is_input(sel(&q, &k, &v, &ids.narrow(1, 0, 7), 4), "blocks"));
    assert!(is_input(
        sel(&q, &k.narrow(2, 0, 1).repeat([1, 1, 3, 1]), &v, &ids, 4),
        "k"
    ));
    assert!(is_input(sel(&q.transpose(1, 2), &k, &v, &ids, 4), "q"));
    assert!(is_input(sel(&q, &k, &v, &ids, 0), "block_len"));
    assert!(is_input(
        sel(&q, &k, &v, &ids.to_device(Device::Cpu), 4),
        "blocks"
    ));
    // fp32 window: not flash's dtype; dk != dv: not flash's shape.
    assert!(is_input(fused::window_attention(&q, &k, &k, 4, 0.125), "q"));
    let b = |t: &Tensor| t.to_kind(Kind::BFloat16);
    assert!(is_input(
        fused::window_attention(&b(&q), &b(&k), &b(&v), 4, 0.125),
        "q"
    ));
}

#[test]
#[ignore = "needs a CUDA device"]
fn kernels_load_once_per_device_through_the_cache() {
    assert!(backend().has_gpu());
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().to_path_buf();
    fused::configure(fused::FusedOptions {
        cache_dir: Some(dir.clone()),
    });
    let a = fused::kernels(0).expect("compile and load");
    let b = fused::kernels(0).unwrap();
    assert!(std::ptr::eq(a, b), "loaded once per device");
    assert!(a.max_shared_memory() >= 48 * 1024);
    assert!(
        std::fs::read_dir(&dir).unwrap().count() >= 2,
        "both families cached"
    );
}

fn host_i64(t: &Tensor) -> Vec<i64> {
    let t = t.to_kind(Kind::Int64).contiguous().view([-1]);
    let n = t.numel();
    let mut v = vec![0i64; n];
    t.copy_data(&mut v, n);
    v
}

/// The backward's inverse index (CPU; the same ATen code runs on the GPU): every segment
/// (b, g, j) lists exactly the tokens whose cleaned ids contain j, ascending, for random ids
/// with duplicates and out-of-range values.
#[test]
fn inverse_index_lists_each_blocks_tokens_in_order() {
    backend();
    for (seed, (b, s, g, n, l)) in [
        (1, 3, 1, 1, 1),
        (2, 37, 3, 4, 5),
        (1, 64, 2, 6, 16),
        (2, 9, 1, 3, 16),
    ]
    .into_iter()
    .enumerate()
    {
        tch::manual_seed(seed as i64);
        let nb = (s + l - 1) / l;
        let blocks = Tensor::randint_low(-3, nb + 3, [b, s, g, n], (Kind::Int64, Device::Cpu));
        let (tokens, starts) = fused::inverse_index(&blocks.to_kind(Kind::Int), l).unwrap();
        assert_eq!(tokens.kind(), Kind::Int);
        let (tokens, starts, ids) = (host_i64(&tokens), host_i64(&starts), host_i64(&blocks));
        assert_eq!(starts.len() as i64, b * g * nb + 1);
        assert_eq!(*starts.last().unwrap() as usize, tokens.len());
        for bi in 0..b {
            for gi in 0..g {
                for j in 0..nb {
                    let want: Vec<i64> = (0..s)
                        .filter(|&t| {
                            j <= t / l
                                && (0..n)
                                    .any(|k| ids[(((bi * s + t) * g + gi) * n + k) as usize] == j)
                        })
                        .collect();
                    let i = ((bi * g + gi) * nb + j) as usize;
                    let got = &tokens[starts[i] as usize..starts[i + 1] as usize];
                    assert_eq!(got, want.as_slice(), "b {bi} g {gi} block {j}");
                }
            }
        }
    }
    assert!(matches!(
        fused::inverse_index(&Tensor::zeros([2, 3], (Kind::Int64, Device::Cpu)), 4),
        Err(FusedError::Input { .. })
    ));
}

/// The dK/dV work plan (CPU): each segment's token range is cut into consecutive pieces of at
/// most `piece` tokens, in order; single-piece segments write directly (slot -1), split ones own
/// consecutive scratch slots listed once in the reduce arrays.
#[test]
fn dkdv_plan_cuts_every_segment_into_ordered_pieces() {
    backend();
    // Segment sizes 0, 1, 7, 3, 12, 0, 4 (starts are their prefix sums).
    let sizes = [0i64, 1, 7, 3, 12, 0, 4];
    let mut starts = vec![0i64];
    for s in sizes {
        starts.push(starts.last().unwrap() + s);
    }
    for piece in [1, 3, 4, 100] {
        let plan = fused::dkdv_plan(&Tensor::from_slice(&starts), piece).unwrap();
        let (seg, a, b, slot) = (
            host_i64(&plan.seg),
            host_i64(&plan.a),
            host_i64(&plan.b),
            host_i64(&plan.slot),
        );
        let (red_seg, red_slot0, red_count) = (
            host_i64(&plan.red_seg),
            host_i64(&plan.red_slot0),
            host_i64(&plan.red_count),
        );
        let mut w = 0;
        let mut next_slot = 0;
        let mut red = 0;
        for (s, &size) in sizes.iter().enumerate() {
            let pieces = ((size + piece - 1) / piece).max(1);
            let mut pos = starts[s];
            if pieces > 1 {
                assert_eq!(red_seg[red], s as i64, "piece {piece}");
                assert_eq!(red_slot0[red], next_slot);
                assert_eq!(red_count[red], pieces);
                red += 1;
            }
            for _ in 0..pieces {
                assert_eq!(seg[w], s as i64, "piece {piece} work {w}");
                assert_eq!(a[w], pos);
                assert!(b[w] - a[w] <= piece && b[w] <= starts[s + 1]);
                pos = b[w];
                if pieces > 1 {
                    assert_eq!(slot[w], next_slot);
                    next_slot += 1;
                } else {
                    assert_eq!(slot[w], -1);
                }
                w += 1;
            }
            assert_eq!(pos, starts[s + 1], "segment {s} covered");
        }
        assert_eq!(w, seg.len());
        assert_eq!(red, red_seg.len());
        assert_eq!(plan.slots, next_slot);
    }
    assert!(fused::dkdv_plan(&Tensor::from_slice(&starts), 0).is_err());
}
