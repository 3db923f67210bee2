//! Sizes checked before anything is allocated: a config whose model, optimizer state or batch
//! cannot fit the device is a config error naming the keys and the bytes it would need, instead
//! of a panic inside tch's VarStore or an abort in the allocator.
use anyhow::{bail, Result};
use nsa_model::ModelConfig;
use tch::Device;

use crate::config::TrainConfig;

/// Bytes per parameter while training: fp32 weights, gradients and AdamW's two moments.
const TRAIN_BYTES_PER_PARAM: f64 = 16.0;

/// Memory of `device` in bytes, when it can be read (CPU: `/proc/meminfo`; CUDA: the driver).
pub fn device_memory(device: Device) -> Option<f64> {
    match device {
        Device::Cuda(i) => nsa_sys::driver::driver_info()
            .ok()?
            .devices
            .get(i)
            .map(|d| d.total_memory_bytes as f64),
        _ => {
            let text = std::fs::read_to_string("/proc/meminfo").ok()?;
            let kb: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()?;
            Some(kb * 1024.0)
        }
    }
}

fn gb(bytes: f64) -> String {
    format!("{:.1} GB", bytes / 1e9)
}

/// Fails when the model's training state or one batch's logits (the largest activation of a
/// small model) exceed `memory` bytes. Arithmetic in f64: no overflow for any config.
pub fn check(cfg: &TrainConfig, model: &ModelConfig, memory: Option<f64>) -> Result<()> {
    let params = model.num_params() as f64;
    let state = params * TRAIN_BYTES_PER_PARAM;
    let tokens = cfg.data.batch_size as f64 * cfg.data.seq_len as f64;
    // Token ids (int64, input and target) and the fp32 logits with their gradient.
    let batch = tokens * 16.0 + tokens * model.vocab_size as f64 * 8.0;
    let Some(memory) = memory else {
        return Ok(());
    };
    if state > memory {
        bail!(
            "the model has {params:.3e} parameters (model.vocab_size = {}, model.dim = {}, model.n_layers = {}, model.mlp_hidden = {}): its weights, gradients and AdamW state need {} but the device has {}",
            model.vocab_size,
            model.dim,
            model.n_layers,
            model.mlp_hidden,
            gb(state),
            gb(memory)
        );
    }
    if state + batch > memory {
        bail!(
            "one batch of data.batch_size = {} × data.seq_len = {} tokens needs {} for its ids and logits (vocab {}), on top of {} of training state; the device has {}",
            cfg.data.batch_size,
            cfg.data.seq_len,
            gb(batch),
            model.vocab_size,
            gb(state),
            gb(memory)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn impossible_sizes_name_their_keys() {
        let base = crate::config::resolve(None, &[], std::iter::empty()).unwrap();
        let model = crate::train::model_config(&base).unwrap();
        let mem = Some(24e9);
        check(&base, &model, mem).unwrap();
        let mut huge_vocab = model;
        huge_vocab.vocab_size = 1_000_000_000_000;
        let e = check(&base, &huge_vocab, mem).unwrap_err().to_string();
        assert!(e.contains("model.vocab_size = 1000000000000"), "{e}");
        let mut huge_dim = model;
        huge_dim.dim = 10_000_000_000;
        assert!(check(&base, &huge_dim, mem).is_err());
        let mut big_batch = base.clone();
        big_batch.data.batch_size = 1 << 62;
        let e = check(&big_batch, &model, mem).unwrap_err().to_string();
        assert!(e.contains("data.batch_size = 4611686018427387904"), "{e}");
        let mut long = base.clone();
        long.data.seq_len = 1_000_000_000_000;
        assert!(check(&long, &model, mem)
            .unwrap_err()
            .to_string()
            .contains("data.seq_len"));
    }
}
