//! The engine's token choice when the logits stay on the model's device (candle backend): every
//! group ready to sample is mixed and sampled by [`crate::device_sampling`] in one batched call,
//! and only the token ids come back.

use super::sequence::{Group, Row, RowLogits};
use crate::device_sampling::{Choice, choose_tokens};
use crate::model::DeviceLogits;
use candle_core::Tensor;

/// The next token of each group in `ready` (indices into `running`), in that order.
pub(super) fn choose(d: &DeviceLogits, running: &mut [Group], ready: &[usize]) -> candle_core::Result<Vec<u32>> {
    // Rows copied out while their partner still prefilled are appended after the step's rows.
    let base = d.logits.dim(0)?;
    let mut owned: Vec<f32> = Vec::new();
    let mut row_of = |r: &Row| -> usize {
        match r.logits.as_ref().expect("ready to sample") {
            RowLogits::InBatch(i) => d.last_row(*i),
            RowLogits::Owned(v) => {
                owned.extend_from_slice(v);
                base + owned.len() / d.vocab - 1
            }
        }
    };
    let mut groups: Vec<&mut Group> =
        running.iter_mut().enumerate().filter(|(i, _)| ready.contains(i)).map(|(_, g)| g).collect();
    // `ready` is ascending (the engine walks groups in order), so `groups` follows it.
    debug_assert!(ready.windows(2).all(|w| w[0] < w[1]));
    let rows: Vec<(usize, Option<usize>)> = groups
        .iter()
        .map(|g| {
            let cond = row_of(&g.rows[0]);
            let uncond = (g.req.is_pair() && g.req.guidance.is_some()).then(|| row_of(&g.rows[1]));
            (cond, uncond)
        })
        .collect();
    let logits = if owned.is_empty() {
        d.logits.clone()
    } else {
        let n = owned.len() / d.vocab;
        let extra = Tensor::from_vec(owned, (n, d.vocab), d.logits.device())?;
        Tensor::cat(&[&d.logits, &extra], 0)?
    };
    let mut choices: Vec<Choice> = groups
        .iter_mut()
        .zip(rows)
        .map(|(g, (cond, uncond))| Choice {
            cond,
            uncond,
            guidance: g.req.guidance,
            params: &g.req.sampling,
            rng: &mut g.rng,
        })
        .collect();
    choose_tokens(&logits, &mut choices)
}
