//! A whole NSA decoder from a preset: build, count parameters, train a few steps of next-token
//! prediction on a repeating pattern, and compare with the dense baseline of the same shape.
//!
//! Run: `cargo run --release -p nsa-model --example tiny_decoder` (add `-- cuda` for the GPU).
use nsa_attn::ForwardOpts;
use nsa_model::{AttentionKind, Model, ModelConfig};
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// Trains `cfg` for `steps` steps on sequences that repeat a random 16-token motif, returning
/// the last loss.
fn train(
    cfg: &ModelConfig,
    device: Device,
    steps: usize,
) -> Result<f64, Box<dyn std::error::Error>> {
    let vs = nn::VarStore::new(device);
    let model = Model::new(&vs.root(), cfg)?;
    // The split an optimizer with parameter groups would use (tch's AdamW below decays all).
    let (decay, no_decay) = nsa_model::decay_groups(&vs);
    println!(
        "{cfg}\n  decay_groups: {} tensors to decay, {} not",
        decay.len(),
        no_decay.len()
    );
    let mut opt = nn::Adam::default().build(&vs, 1e-2)?;
    let (batch, seq, motif) = (8, 128, 16);
    let mut loss_value = f64::NAN;
    for step in 1..=steps {
        // Each row repeats its own motif: after the first repetition the next token is
        // predictable by looking 16 tokens back.
        let pattern = Tensor::f_randint(cfg.vocab_size, [batch, motif], (Kind::Int64, device))?;
        let tokens = pattern.f_repeat([1, seq / motif])?;
        let logits = model.forward(&tokens, &ForwardOpts::default())?;
        let pred = logits
            .f_narrow(1, 0, seq - 1)?
            .f_reshape([-1, cfg.vocab_size])?;
        let target = tokens.f_narrow(1, 1, seq - 1)?.f_reshape([-1])?;
        let loss =
            pred.f_cross_entropy_loss::<Tensor>(&target, None, tch::Reduction::Mean, -100, 0.0)?;
        opt.zero_grad();
        loss.f_backward()?;
        opt.step();
        loss_value = loss.f_double_value(&[])?;
        if step % 10 == 0 {
            println!("  step {step:3}  loss {loss_value:.3}");
        }
    }
    Ok(loss_value)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Before any other libtorch call: load libtorch's CUDA backend (see nsa_sys::cuda).
    let backend = nsa_sys::cuda::load_backend()?;
    // `-- cuda` asks for the first GPU; without a visible one the CPU runs it.
    let cuda = backend.has_gpu() && std::env::args().skip(1).any(|a| a == "cuda");
    tch::manual_seed(7);
    let device = if cuda { Device::Cuda(0) } else { Device::Cpu };
    // `tiny` scales NSA's lengths down (l = 8, d = 4, l' = 16, n = 4, w = 32) so that every
    // branch is active at S = 128; presets are a starting point, every field can be changed
    // (and is checked by `validate`, which names each bad field).
    let mut cfg = ModelConfig::preset("tiny")?;
    cfg.vocab_size = 64;
    cfg.validate()?;
    let nsa = train(&cfg, device, 100)?;
    let dense = train(&cfg.with_attention(AttentionKind::Dense), device, 100)?;
    println!(
        "last loss: NSA {nsa:.3}, dense {dense:.3} (chance: {:.3})",
        64f64.ln()
    );
    Ok(())
}
