//! Unit tests of the fused module's host-side rules.

use std::sync::Arc;

use super::{cubin, FusedOptions, SelectedDq, SelectedForward};

/// `Auto` by shape: the paper's group of 16 runs token warps; from 256 selection blocks on (128
/// in a batch of 512 or more), the `125m` preset's group of 3 runs key-outer while one
/// sequence's partials stay under the bound (larger batches run in chunks); short
/// sequences of small groups, groups between 9 and 15 or above 16 and oversized partials run
/// union tiles; an explicit choice is kept.
#[test]
fn auto_forward_follows_group_and_partial_size() {
    let auto = SelectedForward::Auto;
    // 125m: H 12, Hkv 4, dk = dv = 64, l' 64, n 16. Partials at 64k: 1.66 GB a sequence.
    let m125 = |b, s| auto.resolve([b, s, 12, 64], 4, 64, 16, 64);
    assert_eq!(m125(1, 8192), SelectedForward::UnionTiles);
    assert_eq!(m125(1, 16320), SelectedForward::UnionTiles);
    assert_eq!(m125(1, 16384), SelectedForward::KeyOuter);
    assert_eq!(m125(1, 65536), SelectedForward::KeyOuter);
    assert_eq!(m125(2, 65536), SelectedForward::KeyOuter);
    assert_eq!(m125(4, 32768), SelectedForward::KeyOuter);
    assert_eq!(m125(1, 131072), SelectedForward::UnionTiles);
    // Batched: 128 blocks a sequence and 512 over the batch (the 8k training shape).
    assert_eq!(m125(2, 8192), SelectedForward::UnionTiles);
    assert_eq!(m125(3, 8192), SelectedForward::UnionTiles);
    assert_eq!(m125(4, 8192), SelectedForward::KeyOuter);
    assert_eq!(m125(4, 8128), SelectedForward::UnionTiles);
    assert_eq!(m125(8, 4096), SelectedForward::UnionTiles);
    assert_eq!(m125(16, 2048), SelectedForward::UnionTiles);
    // The paper's shape: G = 16.
    let paper = |s| auto.resolve([1, s, 64, 192], 4, 128, 16, 64);
    assert_eq!(paper(100), SelectedForward::TokenWarps);
    assert_eq!(paper(8192), SelectedForward::TokenWarps);
    assert_eq!(paper(131072), SelectedForward::TokenWarps);
    assert_eq!(
        auto.resolve([1, 65536, 48, 192], 4, 128, 16, 64),
        SelectedForward::UnionTiles
    );
    assert_eq!(
        auto.resolve([1, 65536, 128, 192], 4, 128, 16, 64),
        SelectedForward::UnionTiles
    );
    // G = 8 is the largest group run key-outer (G = 16 runs token warps); l' = 128 doubles the
    // partials.
    assert_eq!(
        auto.resolve([1, 16384, 32, 64], 4, 64, 16, 64),
        SelectedForward::KeyOuter
    );
    assert_eq!(
        auto.resolve([1, 16384, 64, 64], 4, 64, 16, 64),
        SelectedForward::TokenWarps
    );
    assert_eq!(
        auto.resolve([1, 65536, 12, 64], 4, 64, 16, 128),
        SelectedForward::UnionTiles
    );
    for explicit in [
        SelectedForward::UnionTiles,
        SelectedForward::KeyOuter,
        SelectedForward::TokenWarps,
    ] {
        assert_eq!(explicit.resolve([1, 8192, 12, 64], 4, 64, 16, 64), explicit);
    }
}

/// dQ `Auto`: key-outer for small groups with l' <= 64 while the partials (B·S·H·n·dk·2 bytes)
/// fit the bound, whatever the forward other than token warps; query-outer after token warps,
/// for groups above 8, for l' = 128 and past the bound; an explicit choice is kept.
#[test]
fn auto_dq_follows_forward_group_and_partial_size() {
    let auto = SelectedDq::Auto;
    let union = SelectedForward::UnionTiles;
    // 125m: H 12, Hkv 4, dk 64, l' 64, n 16. Partials at B·S = 32k: 0.81 GB; one sequence of
    // 64k (1.61 GB) fits the 2 GiB bound, one of 128k does not.
    let m125 = |fwd, b, s| auto.resolve(fwd, [b, s, 12, 64], 4, 16, 64);
    assert_eq!(m125(union, 4, 8192), SelectedDq::KeyOuter);
    assert_eq!(
        m125(SelectedForward::KeyOuter, 1, 32768),
        SelectedDq::KeyOuter
    );
    assert_eq!(m125(union, 1, 65536), SelectedDq::KeyOuter);
    assert_eq!(m125(union, 1, 131072), SelectedDq::QueryOuter);
    assert_eq!(m125(union, 4, 32768), SelectedDq::KeyOuter);
    assert_eq!(m125(union, 16, 8192), SelectedDq::KeyOuter);
    assert_eq!(
        m125(SelectedForward::TokenWarps, 1, 8192),
        SelectedDq::QueryOuter
    );
    assert_eq!(
        auto.resolve(union, [1, 8192, 12, 64], 4, 16, 128),
        SelectedDq::QueryOuter
    );
    assert_eq!(
        auto.resolve(union, [1, 8192, 64, 64], 4, 16, 64),
        SelectedDq::QueryOuter
    );
    for explicit in [SelectedDq::QueryOuter, SelectedDq::KeyOuter] {
        assert_eq!(
            explicit.resolve(SelectedForward::TokenWarps, [1, 8192, 12, 64], 4, 16, 64),
            explicit
        );
    }
}

/// Sequences per key-outer launch under the default 2 GiB bound: all of a batch whose partials
/// fit, else the most that do, at least one (a sequence over the bound alone runs alone).
#[test]
fn key_outer_batches_split_into_chunks_that_fit_the_bound() {
    use super::selected_order::{dq_partial_bytes, forward_partial_bytes, key_outer_batch_chunk};
    // 125m at 8k: forward 208 MB, dQ 201 MB a sequence.
    let fwd = forward_partial_bytes(8192, 12, 64, 16, 64);
    let dq = dq_partial_bytes(8192, 12, 64, 16);
    assert_eq!(fwd, 8192 * 12 * 16 * 132);
    assert_eq!(dq, 8192 * 12 * 16 * 64 * 2);
    assert_eq!(key_outer_batch_chunk(4, fwd), 4);
    assert_eq!(key_outer_batch_chunk(16, fwd), 10);
    assert_eq!(key_outer_batch_chunk(16, dq), 10);
    // 32k, batch 4: 830 MB a sequence, two per launch; l' = 128 doubles the forward's.
    let fwd32 = forward_partial_bytes(32768, 12, 64, 16, 64);
    assert_eq!(key_outer_batch_chunk(4, fwd32), 2);
    assert_eq!(forward_partial_bytes(32768, 12, 64, 16, 128), 2 * fwd32);
    assert_eq!(key_outer_batch_chunk(3, 5 << 30), 1);
    assert_eq!(key_outer_batch_chunk(0, 1), 1);
}

/// The selected / compressed kernel table has one layout in the glue and in Rust.
#[test]
fn the_glue_reads_the_selected_table_rust_fills() {
    // SAFETY: a pure function of the C++ struct's layout.
    let glue = unsafe { super::nsa_slc_table_size() };
    assert_eq!(glue, std::mem::size_of::<super::SlcTable>());
}

/// A family built by one thread is the image every other caller gets: two threads asking for
/// the same family at once share one build (one file in the cache, one image in memory), and a
/// later call is served from memory.
#[test]
fn concurrent_callers_share_one_build() {
    crate::cuda::load_backend().expect("libtorch backend query");
    let scratch = tempfile::tempdir().unwrap();
    let opts = FusedOptions {
        cache_dir: Some(scratch.path().join("cache")),
    };
    // An architecture no other test builds in this process, so the slot starts empty.
    let arch = (8, 6);
    let images: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| s.spawn(|| cubin(&crate::nvrtc::POINTWISE, arch, &opts).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(Arc::ptr_eq(&images[0], &images[1]));
    assert!(!images[0].cached, "the first build compiles");
    let files = std::fs::read_dir(scratch.path().join("cache"))
        .unwrap()
        .count();
    assert_eq!(files, 1);
    let again = cubin(&crate::nvrtc::POINTWISE, arch, &opts).unwrap();
    assert!(Arc::ptr_eq(&again, &images[0]));
}

/// `finish_prebuilds` returns only once every background build is done: the family's file is in
/// the cache when it returns (a compile takes seconds, so a return that did not wait finds no
/// file), no build thread is left to join, and the image is served from memory afterwards.
#[test]
fn finish_prebuilds_waits_for_the_background_builds() {
    crate::cuda::load_backend().expect("libtorch backend query");
    let scratch = tempfile::tempdir().unwrap();
    let cache = scratch.path().join("cache");
    let opts = FusedOptions {
        cache_dir: Some(cache.clone()),
    };
    // An architecture no other test builds in this process, so the build really compiles.
    let arch = (8, 9);
    super::prebuild::spawn_builds(arch, &[crate::nvrtc::POINTWISE], &opts).unwrap();
    super::finish_prebuilds();
    let files: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].starts_with("pointwise-sm_89-") && files[0].ends_with(".cubin"));
    // Nothing left to wait for.
    let start = std::time::Instant::now();
    super::finish_prebuilds();
    assert!(start.elapsed() < std::time::Duration::from_secs(1));
    let image = cubin(&crate::nvrtc::POINTWISE, arch, &opts).unwrap();
    assert!(
        !image.cached,
        "built by the background thread, kept in memory"
    );
}

/// SDPA without cuDNN is libtorch's SDPA (on the CPU, where cuDNN plays no part, the same
/// bits), with GQA and with a mask; libtorch's errors come back typed; and libtorch's cuDNN
/// switch is on again after every call, a failed one included.
#[test]
fn sdpa_without_cudnn_is_sdpa_and_restores_the_switch() {
    use tch::{Device, Kind, Tensor};
    let o = (Kind::Float, Device::Cpu);
    let q = Tensor::randn([2, 6, 1, 16], o);
    let k = Tensor::randn([2, 2, 37, 16], o);
    let v = Tensor::randn([2, 2, 37, 8], o);
    let mask = Tensor::rand([2, 1, 1, 37], o).ge(0.3);
    assert!(super::sdpa_cudnn_enabled());
    for m in [None, Some(&mask)] {
        let want = Tensor::scaled_dot_product_attention(&q, &k, &v, m, 0.0, false, None, true);
        let got = super::sdpa_without_cudnn(&q, &k, &v, m, true).unwrap();
        assert!(got.equal(&want));
        assert!(super::sdpa_cudnn_enabled());
    }
    // 6 query heads over 4 key heads: no grouping fits.
    let bad_k = Tensor::randn([2, 4, 37, 16], o);
    let bad_v = Tensor::randn([2, 4, 37, 8], o);
    assert!(matches!(
        super::sdpa_without_cudnn(&q, &bad_k, &bad_v, None, true),
        Err(super::FusedError::Glue(_))
    ));
    assert!(super::sdpa_cudnn_enabled());
}
