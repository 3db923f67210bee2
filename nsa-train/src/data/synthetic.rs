//! The synthetic long-context tasks (no files): `needle` — one (key, value) pair hidden at a
//! random depth in random filler, asked for at the end — and `recall` — multi-query associative
//! recall: many (key, value) pairs, then the keys again in another order. Both score only the
//! answer tokens, so the loss and the accuracy measure retrieval, which is what NSA's selected
//! branch is for.
//!
//! Recall with a distance (`data.recall_distance` > 0) puts a gap of filler between the block of
//! pairs and the block of queries, drawn uniformly from 0 to the largest gap (the distance,
//! capped by the context; a curriculum may grow it over the first steps), and takes keys,
//! values and filler from disjoint thirds of the free ids, so a key occurs once before it is
//! asked for and the answer is always the token after that occurrence. Training sequences put
//! the two blocks at a random depth; held-out ones end with the queries.
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
    /// Recall: the largest gap between the pairs and the queries (0: adjacent, original layout).
    pub(super) distance: usize,
    /// Recall with a distance: steps over which the largest gap grows from 0 to `distance`.
    pub(super) curriculum_steps: u64,
    /// Recall with a distance: the queries end the sequence (held-out batches: a generated
    /// evaluation then decodes only the queries, and the gap alone sets the distance).
    pub(super) queries_last: bool,
}

impl Synthetic {
    /// Keys and values come from disjoint halves of the free ids; filler from all free ids.
    /// With a recall distance: keys, values and filler from disjoint thirds (the third range
    /// returned; otherwise it is all free ids).
    fn ranges(&self) -> ((i64, i64), (i64, i64), (i64, i64)) {
        let free = self.vocab - FIRST_FREE;
        if self.task == Task::Recall && self.distance > 0 {
            let third = free / 3;
            let (k1, v1) = (FIRST_FREE + third, FIRST_FREE + 2 * third);
            return ((FIRST_FREE, k1), (k1, v1), (v1, self.vocab));
        }
        let half = free / 2;
        (
            (FIRST_FREE, FIRST_FREE + half),
            (FIRST_FREE + half, self.vocab),
            (FIRST_FREE, self.vocab),
        )
    }

    /// The largest gap at `step` (the curriculum's ramp, then `distance`), capped by `room`.
    fn max_gap(&self, step: u64, room: usize) -> usize {
        let full = self.distance.min(room);
        if self.curriculum_steps == 0 || step >= self.curriculum_steps {
            return full;
        }
        ((full as u128 * (step as u128 + 1)) / self.curriculum_steps as u128) as usize
    }

    fn sequence(
        &self,
        rng: &mut Rng,
        step: u64,
        s: usize,
        tokens: &mut [i64],
        target: &mut [i64],
    ) -> Result<()> {
        let ((k0, k1), (v0, v1), (f0, f1)) = self.ranges();
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
                // Filler before the pairs, so the pairs sit at a random depth; with a distance,
                // a gap of filler between pairs and queries too, and filler after them.
                let body = 4 * n;
                let room = s + 1 - body;
                let gap = if self.distance > 0 {
                    rng.below(self.max_gap(step, room) as u64 + 1) as usize
                } else {
                    0
                };
                let lead = if self.distance > 0 && !self.queries_last {
                    rng.below((room - gap) as u64 + 1) as usize
                } else {
                    room - gap
                };
                // (The original layout draws only the lead: its sequences stay as they were.)
                let filled = if self.distance > 0 { s + 1 } else { lead };
                for t in seq.iter_mut().take(filled) {
                    *t = draw(rng, f0, f1);
                }
                for i in 0..n {
                    seq[lead + 2 * i] = keys[i];
                    seq[lead + 2 * i + 1] = values[i];
                }
                let mut order: Vec<usize> = (0..n).collect();
                for i in (1..n).rev() {
                    order.swap(i, rng.below(i as u64 + 1) as usize);
                }
                let qbase = lead + 2 * n + gap;
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
                step,
                s,
                &mut tokens[b * s..(b + 1) * s],
                &mut target[b * s..(b + 1) * s],
            )?;
        }
        let shape = [batch as i64, s as i64];
        Ok(Batch {
            input: Tensor::f_from_slice(&tokens)?.f_view(shape)?,
            target: Tensor::f_from_slice(&target)?.f_view(shape)?,
        })
    }
    fn vocab_needed(&self) -> i64 {
        // Keys and values need at least pairs distinct ids each (and filler as many again when
        // the three are disjoint).
        let parts = if self.task == Task::Recall && self.distance > 0 {
            3
        } else {
            2
        };
        FIRST_FREE + parts * (self.pairs as i64).max(2)
    }
    fn describe(&self) -> String {
        match self.task {
            Task::Needle => format!("needle (vocab {})", self.vocab),
            Task::Recall if self.distance > 0 => format!(
                "recall, {} pairs, gap of 0 to {} filler tokens{} (vocab {})",
                self.pairs,
                self.distance,
                if self.curriculum_steps > 0 {
                    format!(", reached over {} steps", self.curriculum_steps)
                } else {
                    String::new()
                },
                self.vocab
            ),
            Task::Recall => format!("recall, {} pairs (vocab {})", self.pairs, self.vocab),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn recall(pairs: usize, distance: usize, curriculum_steps: u64) -> Synthetic {
        Synthetic {
            task: Task::Recall,
            vocab: 96,
            seed: 11,
            pairs,
            distance,
            curriculum_steps,
            queries_last: false,
        }
    }

    /// Each answer of a sequence: (position of the query's key, position of the pair's key).
    fn answers(seq: &[i64], target: &[i64]) -> Vec<(usize, usize)> {
        (0..seq.len())
            .filter(|&t| target[t] != IGNORE)
            .map(|t| {
                let key = seq[t];
                let earlier: Vec<usize> = (0..t).filter(|&p| seq[p] == key).collect();
                assert_eq!(
                    earlier.len(),
                    1,
                    "key {key} at {t} occurs {earlier:?} before"
                );
                assert_eq!(seq[earlier[0] + 1], target[t], "the answer follows the key");
                (t, earlier[0])
            })
            .collect()
    }

    proptest! {
        /// With a distance: every answer is the token after the key's one earlier occurrence,
        /// and the gap between the blocks never exceeds the curriculum's limit at that step.
        #[test]
        fn recall_at_a_distance_asks_for_the_one_earlier_occurrence(
            pairs in 1usize..8,
            s in 40usize..300,
            distance in 1usize..400,
            curriculum in 0u64..50,
            step in 0u64..80,
        ) {
            prop_assume!(s + 1 > 4 * pairs);
            let src = recall(pairs, distance, curriculum);
            let b = src.batch(step, 0, 3, s).unwrap();
            let seqs = Vec::<i64>::try_from(b.input.flatten(0, -1)).unwrap();
            let tgts = Vec::<i64>::try_from(b.target.flatten(0, -1)).unwrap();
            let limit = src.max_gap(step, s + 1 - 4 * pairs);
            for r in 0..3 {
                let found = answers(&seqs[r * s..(r + 1) * s], &tgts[r * s..(r + 1) * s]);
                // The last answer may fall on the sequence's final token (not an input).
                prop_assert!(found.len() + 1 >= pairs);
                let first_query = found.iter().map(|a| a.0).min().unwrap_or(0);
                let last_pair = found.iter().map(|a| a.1).max().unwrap_or(0);
                let gap = first_query - (last_pair + 2).min(first_query);
                // The gap sits between the last pair's value and the first query.
                prop_assert!(found.len() < pairs || gap <= limit, "gap {gap} > {limit}");
            }
        }
    }

    #[test]
    fn the_curriculum_grows_the_gap_and_held_out_batches_use_all_of_it() {
        let src = recall(4, 1000, 100);
        assert_eq!(src.max_gap(0, 500), 5);
        assert_eq!(src.max_gap(49, 500), 250);
        assert_eq!(src.max_gap(99, 500), 500);
        assert_eq!(src.max_gap(10_000, 2000), 1000);
        assert_eq!(recall(4, 1000, 0).max_gap(0, 500), 500);
        // Gaps drawn at the full distance reach far: some above half of it.
        let wide = recall(4, 400, 0);
        let b = wide.batch(0, 0, 64, 512).unwrap();
        let seqs = Vec::<i64>::try_from(b.input.flatten(0, -1)).unwrap();
        let tgts = Vec::<i64>::try_from(b.target.flatten(0, -1)).unwrap();
        let far = (0..64)
            .filter(|r| {
                let a = answers(&seqs[r * 512..(r + 1) * 512], &tgts[r * 512..(r + 1) * 512]);
                a.iter().map(|(q, p)| q - p).min().unwrap_or(0) > 200
            })
            .count();
        assert!(
            far > 10,
            "{far} of 64 sequences with every distance above 200"
        );
    }
}
