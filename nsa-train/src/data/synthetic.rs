//! The synthetic long-context tasks (no files): `needle` — one (key, value) pair hidden at a
//! random depth in random filler, asked for at the end — and `recall` — multi-query associative
//! recall: many (key, value) pairs, then the keys again in another order. Both score only the
//! answer tokens, so the loss and the accuracy measure retrieval, which is what NSA's selected
//! branch is for.
use anyhow::{ensure, Context, Result};
use tch::Tensor;

use super::{Batch, Rng, TokenSource, IGNORE};

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Task {
    Needle,
    Recall,
}

/// Reserved token ids of the synthetic tasks.
pub(super) const NEEDLE: i64 = 1;
pub(super) const QUERY: i64 = 2;
const FIRST_FREE: i64 = 3;

#[derive(Debug)]
pub(super) struct Synthetic {
    pub(super) task: Task,
    pub(super) vocab: i64,
    pub(super) seed: u64,
    pub(super) pairs: usize,
}

impl Synthetic {
    /// Keys and values come from disjoint halves of the free ids; filler from all free ids.
    fn ranges(&self) -> ((i64, i64), (i64, i64)) {
        let free = self.vocab - FIRST_FREE;
        let half = free / 2;
        (
            (FIRST_FREE, FIRST_FREE + half),
            (FIRST_FREE + half, self.vocab),
        )
    }

    fn sequence(
        &self,
        rng: &mut Rng,
        s: usize,
        tokens: &mut [i64],
        target: &mut [i64],
    ) -> Result<()> {
        let ((k0, k1), (v0, v1)) = self.ranges();
        let draw = |rng: &mut Rng, lo: i64, hi: i64| lo + rng.below((hi - lo) as u64) as i64;
        // The sequence is seq_len + 1 tokens; input = [..s], target = [1..].
        let mut seq = vec![0i64; s + 1];
        let mut scored = vec![false; s + 1];
        match self.task {
            Task::Needle => {
                ensure!(s + 1 >= 8, "needle task needs seq_len >= 7");
                for t in seq.iter_mut() {
                    *t = draw(rng, FIRST_FREE, self.vocab);
                }
                let (key, value) = (draw(rng, k0, k1), draw(rng, v0, v1));
                // Needle somewhere in the first s - 4 tokens; the question at the very end.
                let at = rng.below((s + 1 - 6) as u64) as usize;
                seq[at..at + 3].copy_from_slice(&[NEEDLE, key, value]);
                let q = s + 1 - 3;
                seq[q..].copy_from_slice(&[QUERY, key, value]);
                scored[s] = true;
            }
            Task::Recall => {
                let n = self.pairs;
                ensure!(
                    (k1 - k0) as usize >= n,
                    "recall with {n} pairs needs at least {n} distinct keys: raise model.vocab_size"
                );
                ensure!(
                    s + 1 > 4 * n,
                    "recall with {n} pairs needs seq_len >= {}",
                    4 * n
                );
                // Distinct keys (partial Fisher-Yates over the key range).
                let mut keys: Vec<i64> = (k0..k1).collect();
                for i in 0..n {
                    let j = i + rng.below((keys.len() - i) as u64) as usize;
                    keys.swap(i, j);
                }
                let values: Vec<i64> = (0..n).map(|_| draw(rng, v0, v1)).collect();
                // Filler before the pairs, so the pairs sit at a random depth.
                let body = 4 * n;
                let lead = s + 1 - body;
                for t in seq.iter_mut().take(lead) {
                    *t = draw(rng, FIRST_FREE, self.vocab);
                }
                for i in 0..n {
                    seq[lead + 2 * i] = keys[i];
                    seq[lead + 2 * i + 1] = values[i];
                }
                let mut order: Vec<usize> = (0..n).collect();
                for i in (1..n).rev() {
                    order.swap(i, rng.below(i as u64 + 1) as usize);
                }
                let qbase = lead + 2 * n;
                for (j, &i) in order.iter().enumerate() {
                    seq[qbase + 2 * j] = keys[i];
                    seq[qbase + 2 * j + 1] = values[i];
                    scored[qbase + 2 * j + 1] = true;
                }
            }
        }
        tokens.copy_from_slice(&seq[..s]);
        for t in 0..s {
            target[t] = if scored[t + 1] { seq[t + 1] } else { IGNORE };
        }
        Ok(())
    }
}

impl TokenSource for Synthetic {
    fn batch(&self, step: u64, rank: u64, batch: usize, s: usize) -> Result<Batch> {
        let n = batch
            .checked_mul(s)
            .with_context(|| format!("data.batch_size {batch} × data.seq_len {s} overflows"))?;
        let mut tokens = vec![0i64; n];
        let mut target = vec![0i64; n];
        for b in 0..batch {
            let mut rng = Rng::new(&[self.seed, step, rank, b as u64]);
            self.sequence(
                &mut rng,
                s,
                &mut tokens[b * s..(b + 1) * s],
                &mut target[b * s..(b + 1) * s],
            )?;
        }
        let shape = [batch as i64, s as i64];
        Ok(Batch {
            input: Tensor::from_slice(&tokens).view(shape),
            target: Tensor::from_slice(&target).view(shape),
        })
    }
    fn vocab_needed(&self) -> i64 {
        // Keys and values need at least pairs distinct ids each.
        FIRST_FREE + 2 * (self.pairs as i64).max(2)
    }
    fn describe(&self) -> String {
        match self.task {
            Task::Needle => format!("needle (vocab {})", self.vocab),
            Task::Recall => format!("recall, {} pairs (vocab {})", self.pairs, self.vocab),
        }
    }
}
