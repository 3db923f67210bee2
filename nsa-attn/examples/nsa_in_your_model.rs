//! An NSA layer inside your own tch model: built in your `VarStore`, trained with your
//! optimizer, on the CPU or the first GPU.
//!
//! The toy model is `embedding → NSA attention → linear head`, trained for a few steps to copy
//! the token 4 positions back (a task that needs attention). Run:
//! `cargo run --release -p nsa-attn --example nsa_in_your_model` (add `-- cuda` for the GPU).
use nsa_attn::{AttnPath, ForwardOpts, LeanOpts, NsaAttention, NsaConfig, NsaParams, SelectConfig};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// Your model: any tch module can hold an `NsaAttention`.
#[derive(Debug)]
struct TinyModel {
    embed: nn::Embedding,
    attn: NsaAttention,
    head: nn::Linear,
}

impl TinyModel {
    fn new(vs: &nn::Path<'_>, vocab: i64, cfg: NsaConfig) -> Result<Self, nsa_attn::AttnError> {
        Ok(Self {
            embed: nn::embedding(vs / "embed", vocab, cfg.dim, Default::default()),
            // The layer's variables live under `attn.` in the same VarStore, so your optimizer,
            // checkpoints (`vs.save`) and device moves cover them.
            attn: NsaAttention::new(&(vs / "attn"), cfg)?,
            head: nn::linear(vs / "head", cfg.dim, vocab, Default::default()),
        })
    }

    fn forward(&self, tokens: &Tensor, opts: &ForwardOpts) -> Result<Tensor, nsa_attn::AttnError> {
        let h = self.embed.forward(tokens);
        let h = h.f_add(&self.attn.forward(&h, opts)?)?; // residual
        Ok(self.head.forward(&h))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // First, before any other libtorch call: load libtorch's CUDA backend (tch alone does not,
    // and an earlier CUDA query makes ATen remember "no CUDA" for the whole process).
    let backend = nsa_sys::cuda::load_backend()?;
    let want_gpu = std::env::args().nth(1).as_deref() == Some("cuda");
    let device = match (want_gpu, backend.has_gpu()) {
        (true, true) => Device::Cuda(0),
        (true, false) => return Err(format!("no GPU visible: {backend}").into()),
        (false, _) => Device::Cpu,
    };
    tch::manual_seed(0);

    // A small layer: 4 query heads in 2 KV groups; compressed tokens of 8 (stride 4), selection
    // blocks of 16, 4 selected blocks, a window of 32. The paper's lengths are
    // `NsaParams::paper()`; `NsaConfig::paper(dim)` is the paper's full layer shape.
    let cfg = NsaConfig {
        dim: 64,
        heads: 4,
        kv_heads: 2,
        head_dim_k: 16,
        head_dim_v: 16,
        rope_base: 10_000.0,
        nsa: NsaParams {
            select: SelectConfig::new(8, 4, 16, 4, 2)?,
            window: 32,
            gate_hidden: 16,
            phi_hidden: 32,
            ..NsaParams::paper()
        },
    };
    let (vocab, batch, seq, lag) = (16, 16, 64, 4);
    let vs = nn::VarStore::new(device);
    let model = TinyModel::new(&vs.root(), vocab, cfg)?;
    let mut opt = nn::Adam::default().build(&vs, 1e-2)?;
    // The lean path never allocates an [S, S] matrix; AttnPath::Reference is its readable twin.
    let opts = ForwardOpts {
        path: AttnPath::Lean(LeanOpts::default()),
        ..Default::default()
    };

    for step in 1..=100 {
        let tokens = Tensor::f_randint(vocab, [batch, seq], (Kind::Int64, device))?;
        let logits = model.forward(&tokens, &opts)?;
        // Predict the token `lag` positions back, from position `lag` on.
        let pred = logits.f_narrow(1, lag, seq - lag)?.f_reshape([-1, vocab])?;
        let target = tokens.f_narrow(1, 0, seq - lag)?.f_reshape([-1])?;
        let loss =
            pred.f_cross_entropy_loss::<Tensor>(&target, None, tch::Reduction::Mean, -100, 0.0)?;
        opt.zero_grad();
        loss.f_backward()?;
        opt.step();
        if step % 10 == 0 {
            println!("step {step:3}  loss {:.3}", loss.f_double_value(&[])?);
        }
    }
    println!(
        "chance level is ln {vocab} = {:.3}; {} NSA parameters on {device:?}",
        (vocab as f64).ln(),
        vs.variables()
            .iter()
            .filter(|(n, _)| n.starts_with("attn."))
            .map(|(_, t)| t.numel())
            .sum::<usize>()
    );
    Ok(())
}
