use super::*;

fn tiny(attention: AttentionKind) -> ModelConfig {
    ModelConfig::preset("tiny")
        .unwrap()
        .with_attention(attention)
}

/// `tiny`: D = 64, L = 2, H = 4, Hkv = 2, dk = dv = 16, F = 176, V = 256; NSA l = 8, d = 4,
/// l' = 16, n = 4, w = 32, MLP φ of 32, gate of 16, separate K/V pairs.
#[test]
fn tiny_matrix_weights_by_hand() {
    // Per block: wq 64·64 = 4096, one K/V pair 64·2·(16 + 16) = 4096, wo 64·64 = 4096, MLP
    // 3·64·176 = 33792; the head 256·64 = 16384.
    let dense = 2 * (4096 + 4096 + 4096 + 33792) + 16384;
    assert_eq!(dense, 108_544);
    assert_eq!(matrix_weights(&tiny(AttentionKind::Dense)), dense);
    // NSA: three K/V pairs and the gate 64·16 + 16·12 = 1216.
    let nsa = 2 * (4096 + 3 * 4096 + 4096 + 1216 + 33792) + 16384;
    assert_eq!(nsa, 127_360);
    assert_eq!(matrix_weights(&tiny(AttentionKind::Nsa)), nsa);
    // The dense count is the model's parameter count less its norms (5 of width 64), which
    // no matrix product touches: a check against nsa-model's closed form.
    assert_eq!(
        tiny(AttentionKind::Dense).num_params(),
        dense + 5 * 64,
        "dense tiny parameters"
    );
}

/// At S = 128, by position t = 0..128:
/// - compressed tokens visible: ⌊(t − 7)/4⌋ + 1 for t ≥ 7; over u = t − 7 = 0..=120 that is
///   4·(1 + … + 30) + 31 = 1891;
/// - selected keys: t + 1 while t < 64 (at most 4 blocks of 16), 2080 in all; then
///   3·16 + (t mod 16) + 1, 64·49 + 4·(0 + … + 15) = 3616; 5696 in all;
/// - window: min(32, t + 1): 528 + 96·32 = 3600.
///
/// 11187 keys over 128 queries. Dense: 1 + … + 128 = 8256.
#[test]
fn tiny_attended_keys_by_hand() {
    let nsa = mean_attended_keys(&tiny(AttentionKind::Nsa), 128);
    assert_eq!(nsa, 11187.0 / 128.0);
    let dense = mean_attended_keys(&tiny(AttentionKind::Dense), 128);
    assert_eq!(dense, 8256.0 / 128.0);
    assert_eq!(
        mean_attended_keys(&tiny(AttentionKind::Dense), 2047),
        1024.0
    );
    assert_eq!(mean_attended_keys(&tiny(AttentionKind::Nsa), 0), 0.0);
}

#[test]
fn tiny_flops_per_token_by_hand() {
    // φ at S = 128: (128 − 8)/4 + 1 = 31 compressed tokens, each for 2 key heads
    // (8·16 + 16)·32 = 4608 multiply-adds for the key and as many for the value.
    assert_eq!(
        compression_macs_per_sequence(&tiny(AttentionKind::Nsa), 128),
        31 * 2 * 2 * 4608
    );
    // 6 FLOPs per multiply-add, 2 layers, over 128 tokens: 6·2·571392/128 = 53568.
    // Attention: 6·L·H·(dk + dv) = 6·2·4·32 = 1536 FLOPs per attended key.
    let nsa = flops_per_token(&tiny(AttentionKind::Nsa), 128);
    assert_eq!(nsa.matrices, 6.0 * 127_360.0);
    assert_eq!(nsa.compression, 53_568.0);
    assert_eq!(nsa.attention, 1536.0 * 11187.0 / 128.0);
    assert_eq!(nsa.total(), 764_160.0 + 53_568.0 + 134_244.0);
    let dense = flops_per_token(&tiny(AttentionKind::Dense), 128);
    assert_eq!(dense.compression, 0.0);
    assert_eq!(dense.total(), 651_264.0 + 99_072.0);
}

#[test]
fn phi_variants_and_shared_kv() {
    let mut m = tiny(AttentionKind::Nsa);
    m.nsa.phi = Phi::Mean;
    assert_eq!(compression_macs_per_sequence(&m, 128), 0);
    m.nsa.phi = Phi::Linear;
    // 31 tokens · 2 heads · (8·16·16 + 8·16·16).
    assert_eq!(compression_macs_per_sequence(&m, 128), 31 * 2 * 4096);
    assert_eq!(
        compression_macs_per_sequence(&m, 7),
        0,
        "no block has ended"
    );
    // The mean's additions are not MACs: mean + MLP counts as the MLP.
    m.nsa.phi = Phi::Mlp;
    let mlp = compression_macs_per_sequence(&m, 128);
    m.nsa.phi = Phi::MeanMlp;
    assert_eq!(compression_macs_per_sequence(&m, 128), mlp);
    m.nsa.phi = Phi::Linear;
    m.nsa.shared_kv = true;
    assert_eq!(matrix_weights(&m), 127_360 - 2 * 2 * 4096);
}

#[test]
fn peaks_by_device_and_config() {
    let h200 = peak(None, Some("NVIDIA H200"), true).unwrap();
    assert_eq!(h200.tflops, 989.0);
    assert_eq!(h200.source, "NVIDIA H200 bf16 dense spec");
    assert_eq!(
        peak(None, Some("NVIDIA H100 PCIe"), true).unwrap().tflops,
        756.0
    );
    assert_eq!(
        peak(None, Some("NVIDIA H100 80GB HBM3"), false)
            .unwrap()
            .tflops,
        67.0
    );
    assert_eq!(peak(None, None, false), None, "CPU: MFU omitted");
    assert_eq!(peak(None, Some("Some Future GPU"), true), None);
    let set = peak(Some(123.0), None, false).unwrap();
    assert_eq!(
        (set.tflops, set.source.as_str()),
        (123.0, "run.peak_tflops")
    );
}

#[test]
fn mfu_of_a_hand_example() {
    // 1e9 FLOPs per token at 1e5 tokens/s is 1e14 FLOP/s; two devices of 100 TFLOP/s: 50 %.
    assert_eq!(mfu(1e9, 1e5, 100.0, 2), 0.5);
}
