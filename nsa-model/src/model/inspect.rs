//! [`Model::inspect`]: one forward that keeps what every NSA block's attention computed — its
//! queries and compressed keys, each branch's output, the gates and the selection — for
//! diagnostics such as `nsa-train eval --inspect` (where the branches look, and how much each
//! one contributes), not for training.
use nsa_attn::{BranchOutputs, ForwardOpts};
use tch::Tensor;

use super::Model;
use crate::config::ModelError;

/// What one NSA block's attention computed in [`Model::inspect`].
#[derive(Debug)]
pub struct LayerInspection {
    /// The block's index in the stack (0-based).
    pub block: usize,
    /// The branch outputs before gating, the gates, the selected blocks, the output, and the
    /// queries and every branch's keys and values they attended (after RoPE and compression).
    pub branches: BranchOutputs,
}

impl Model {
    /// The forward of `tokens` int64 `[B, S]` (as [`Model::forward`] takes them) with every NSA
    /// block's [`LayerInspection`]: returns the logits `[B, S, V]` and one inspection per NSA
    /// block in stack order (none for a dense model). The residual adds run as in decoding
    /// ([`Model::forward_with_blocks`]), so logits may differ from [`Model::forward`]'s in the
    /// last bits. Holds every block's projections and branch outputs at once: call it on
    /// few sequences, without gradients.
    pub fn inspect(
        &self,
        tokens: &Tensor,
        opts: &ForwardOpts,
    ) -> Result<(Tensor, Vec<LayerInspection>), ModelError> {
        let (h, rope) = self.embed_and_rope(tokens, opts)?;
        let mut layers = Vec::new();
        let logits = self.forward_in_decode_order(h, rope.as_ref(), opts, |block, attn, x| {
            let branches = attn.forward_branches(x, opts)?;
            let output = branches.output.shallow_clone();
            layers.push(LayerInspection { block, branches });
            Ok(output)
        })?;
        Ok((logits, layers))
    }
}

#[cfg(test)]
mod tests {
    use nsa_attn::ForwardOpts;
    use tch::{nn, Device, Kind, Tensor};

    use crate::config::{AttentionKind, ModelConfig};
    use crate::Model;

    /// The inspected forward gives the forward's logits, and one inspection per NSA block whose
    /// shapes are the layer's and whose gated sum, projected, is the block's attention output.
    #[test]
    fn inspect_gives_the_forward_and_each_nsa_blocks_branches() {
        for attention in [AttentionKind::Nsa, AttentionKind::Dense] {
            let cfg = ModelConfig::preset("tiny")
                .unwrap()
                .with_attention(attention);
            let vs = nn::VarStore::new(Device::Cpu);
            let model = Model::new(&vs.root(), &cfg).unwrap();
            let (b, s) = (2, 75);
            let tokens = Tensor::randint(cfg.vocab_size, [b, s], (Kind::Int64, Device::Cpu));
            let opts = ForwardOpts::default();
            let want = model.forward(&tokens, &opts).unwrap();
            let (logits, layers) = model.inspect(&tokens, &opts).unwrap();
            let err = (&logits - &want).abs().max().double_value(&[]);
            assert!(err < 1e-5, "{attention:?}: logits differ by {err}");
            if attention == AttentionKind::Dense {
                assert!(layers.is_empty());
                continue;
            }
            assert_eq!(layers.len(), cfg.n_layers as usize);
            let h = cfg.n_heads;
            for (i, layer) in layers.iter().enumerate() {
                assert_eq!(layer.block, i);
                assert_eq!(
                    layer.branches.projections.q.size(),
                    [b, s, h, cfg.head_dim_k]
                );
                let g = &layer.branches.gates;
                assert_eq!(g.size(), [b, s, h, 3]);
                let (lo, hi) = (g.min().double_value(&[]), g.max().double_value(&[]));
                assert!(lo > 0.0 && hi < 1.0, "sigmoid gates in ({lo}, {hi})");
                let br = &layer.branches;
                let mixed = (br.compressed.shallow_clone() * g.narrow(3, 0, 1)
                    + br.selected.shallow_clone() * g.narrow(3, 1, 1)
                    + br.window.shallow_clone() * g.narrow(3, 2, 1))
                .reshape([b, s, -1]);
                let wo = &vs.variables()[&format!("blocks.{i}.attn.wo.weight")];
                let out = mixed.matmul(&wo.tr());
                let err = (out - &br.output).abs().max().double_value(&[]);
                assert!(err < 1e-5, "block {i}: W_o(Σ g·o) differs by {err}");
            }
        }
    }
}
