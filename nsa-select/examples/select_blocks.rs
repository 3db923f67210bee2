//! Block selection on its own: from queries and compressed keys to the blocks and token ranges
//! each query reads, with both implementations, on the CPU or the first GPU.
//!
//! Run: `cargo run -p nsa-select --example select_blocks` (add `-- cuda` for the GPU).
use nsa_select::{select_for_sequence, SelectConfig, SelectImpl};
use tch::{Device, Kind, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Load libtorch's CUDA backend before any other libtorch call (even manual_seed): a CUDA
    // query made earlier makes ATen remember "no CUDA" for the whole process.
    let gpu = nsa_sys::cuda::load_backend()?.has_gpu() && std::env::args().any(|a| a == "cuda");
    let device = if gpu { Device::Cuda(0) } else { Device::Cpu };
    tch::manual_seed(0);

    // Small lengths so the output fits a screen: compressed tokens of l = 8 with stride d = 4,
    // selection blocks of l' = 8, n = 4 blocks per query of which block 0 and the 2 newest are
    // forced.
    let cfg = SelectConfig::new(8, 4, 8, 4, 2)?;
    let (batch, seq, heads, kv_heads, dk) = (1, 64, 4, 2, 16);
    let q = Tensor::f_randn([batch, seq, heads, dk], (Kind::Float, device))?;
    // In a real layer these come from φ over the keys; here any values will do.
    let k_cmp = Tensor::f_randn(
        [batch, cfg.num_compressed(seq), kv_heads, dk],
        (Kind::Float, device),
    )?;

    let fast = select_for_sequence(&q, &k_cmp, 16, &cfg, SelectImpl::Vectorized)?;
    let slow = select_for_sequence(&q, &k_cmp, 16, &cfg, SelectImpl::Reference)?;
    assert!(fast.blocks.equal(&slow.blocks) && fast.ranges.equal(&slow.ranges));

    let blocks = Vec::<i64>::try_from(fast.blocks.f_to_device(Device::Cpu)?.f_flatten(0, -1)?)?;
    let ranges = Vec::<i64>::try_from(fast.ranges.f_to_device(Device::Cpu)?.f_flatten(0, -1)?)?;
    let n = cfg.top_n as usize;
    println!("device {device:?}; {cfg:?}");
    println!("query t, group 0: selected blocks (−1 = unused) → token ranges [start, end)");
    for t in [0usize, 9, 23, 40, 63] {
        let row = t * kv_heads as usize; // group 0 of query t
        let ids = &blocks[row * n..row * n + n];
        let spans: Vec<String> = ranges[row * n * 2..(row + 1) * n * 2]
            .chunks(2)
            .filter(|r| r[1] > r[0])
            .map(|r| format!("[{}, {})", r[0], r[1]))
            .collect();
        println!("t = {t:2}: {ids:?} → {}", spans.join(" "));
    }
    println!("reference and vectorized selections are identical");
    Ok(())
}
