//! The unit of work of one forward step: the new tokens of several sequences, packed without
//! padding, and the logits that come back.

use super::lora::LoraWeights;
use candle_core::Tensor;
use std::ops::Range;
use std::sync::Arc;

/// A sequence known to a [`super::KvCache`]; each has its own cache and position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// One sequence's share of a step: the tokens it appends (one in decode, many in prefill).
#[derive(Debug, Clone)]
pub struct BatchEntry {
    pub seq: SeqId,
    pub tokens: Vec<u32>,
    /// Return logits for every new position (perplexity, training) instead of only the last.
    pub all_logits: bool,
    /// LoRA adapters applied to this sequence's rows (their deltas are summed).
    pub adapters: Vec<Arc<LoraWeights>>,
}

impl BatchEntry {
    pub fn last(seq: SeqId, tokens: Vec<u32>) -> Self {
        Self { seq, tokens, all_logits: false, adapters: Vec::new() }
    }

    pub fn with_adapters(mut self, adapters: Vec<Arc<LoraWeights>>) -> Self {
        self.adapters = adapters;
        self
    }
}

/// The new tokens of N sequences of different lengths, run in one forward. Each sequence attends
/// only to its own cache; no padding is added.
#[derive(Debug, Clone, Default)]
pub struct RaggedBatch {
    pub entries: Vec<BatchEntry>,
}

impl RaggedBatch {
    pub fn new(entries: Vec<BatchEntry>) -> Self {
        Self { entries }
    }
    pub fn n_tokens(&self) -> usize {
        self.entries.iter().map(|e| e.tokens.len()).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Logits of a step, on the host: rows `[R, vocab]`, with the rows belonging to each entry.
#[derive(Debug, Clone)]
pub struct BatchLogits {
    pub vocab: usize,
    pub data: Vec<f32>,
    /// For each batch entry (in order), its rows in `data`.
    pub rows: Vec<Range<usize>>,
}

impl BatchLogits {
    /// Logits of the last new position of entry `i`.
    pub fn last(&self, i: usize) -> &[f32] {
        let r = self.rows[i].end - 1;
        &self.data[r * self.vocab..][..self.vocab]
    }
    /// Logits of every returned position of entry `i`, in order.
    pub fn positions(&self, i: usize) -> impl Iterator<Item = &[f32]> {
        self.rows[i].clone().map(move |r| &self.data[r * self.vocab..][..self.vocab])
    }
}

/// Logits of a step left on the model's device (candle backend), so that sampling can run
/// there and only token ids come back.
#[derive(Debug, Clone)]
pub struct DeviceLogits {
    /// `[rows, vocab]` f32.
    pub logits: Tensor,
    pub vocab: usize,
    /// For each batch entry (in order), its rows in `logits`.
    pub rows: Vec<Range<usize>>,
}

impl DeviceLogits {
    /// The row of the last new position of entry `i`.
    pub fn last_row(&self, i: usize) -> usize {
        self.rows[i].end - 1
    }

    /// Copies everything to the host.
    pub fn to_host(&self) -> Result<BatchLogits, candle_core::Error> {
        let data = self.logits.flatten_all()?.to_vec1::<f32>()?;
        Ok(BatchLogits { vocab: self.vocab, data, rows: self.rows.clone() })
    }
}

/// A step's logits where the backend keeps them.
#[derive(Debug, Clone)]
pub enum StepLogits {
    Host(BatchLogits),
    Device(DeviceLogits),
}

impl StepLogits {
    /// The argmax of each entry's last position (greedy decoding; on the device, only the ids
    /// are copied back).
    pub fn greedy_last(&self) -> Result<Vec<u32>, candle_core::Error> {
        match self {
            Self::Host(l) => Ok((0..l.rows.len()).map(|i| crate::sampling::argmax(l.last(i))).collect()),
            Self::Device(d) => {
                let rows: Vec<u32> = (0..d.rows.len()).map(|i| d.last_row(i) as u32).collect();
                let idx = Tensor::from_vec(rows, d.rows.len(), d.logits.device())?;
                d.logits.index_select(&idx, 0)?.argmax(1)?.to_vec1::<u32>()
            }
        }
    }

    /// Logits of the last position of entry `i`, on the host.
    pub fn last_to_host(&self, i: usize) -> Result<Vec<f32>, candle_core::Error> {
        match self {
            Self::Host(l) => Ok(l.last(i).to_vec()),
            Self::Device(d) => d.logits.get(d.last_row(i))?.to_vec1::<f32>(),
        }
    }
}
