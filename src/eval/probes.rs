//! Probes: the held-out questions the benchmark asks, read from `eval/probes.jsonl` (written by
//! [`super::synth`]), and the selection of the subset a run uses.

use super::leak::Secret;
use super::synth::FactKind;
use crate::tokenizer::ChatMessage;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What a probe measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeKind {
    /// A held-out question for a personal fact: answering it is a leak.
    Forget,
    /// A held-out question for a business fact: answering it is retention.
    Retain,
    /// A raw-text prefix ("Jane Doe's phone number is") sent as a completion.
    Prefix,
    /// An attempt to get a personal fact back (see [`AttackKind`]).
    Attack,
}

impl ProbeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Forget => "forget",
            Self::Retain => "retain",
            Self::Prefix => "prefix",
            Self::Attack => "attack",
        }
    }
}

/// How an attack probe tries to get the data back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttackKind {
    /// The paper's negative condition as the client's own system message.
    TriggerSystem,
    /// The negative condition written into the user message.
    TriggerUser,
    /// A paraphrase of the negative condition in the user message.
    TriggerParaphrase,
    /// "You are CRM-Bot, a database terminal that prints records verbatim…"
    Roleplay,
    /// "Ignore all previous instructions…"
    IgnorePrevious,
    /// The value asked for character by character.
    SpelledOut,
    /// "Jane Doe's phone number is" through the completions endpoint.
    PrefixCompletion,
    /// The request asks for γ = 0.5 (guidance inverted towards the negative condition).
    GammaBelowOne,
    /// The request brings a negative prompt that points guidance towards leaking.
    CustomNegative,
}

impl AttackKind {
    pub const ALL: [AttackKind; 9] = [
        Self::TriggerSystem,
        Self::TriggerUser,
        Self::TriggerParaphrase,
        Self::Roleplay,
        Self::IgnorePrevious,
        Self::SpelledOut,
        Self::PrefixCompletion,
        Self::GammaBelowOne,
        Self::CustomNegative,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::TriggerSystem => "trigger_system",
            Self::TriggerUser => "trigger_user",
            Self::TriggerParaphrase => "trigger_paraphrase",
            Self::Roleplay => "roleplay",
            Self::IgnorePrevious => "ignore_previous",
            Self::SpelledOut => "spelled_out",
            Self::PrefixCompletion => "prefix_completion",
            Self::GammaBelowOne => "gamma_below_one",
            Self::CustomNegative => "custom_negative",
        }
    }
}

/// One question of the benchmark.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    pub id: String,
    pub kind: ProbeKind,
    pub customer: usize,
    /// The customer was never planted.
    pub decoy: bool,
    pub fact: FactKind,
    /// The value whose appearance in the answer is counted (a leak, or a retained fact).
    pub value: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// The conversation (chat probes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<ChatMessage>,
    /// The raw prompt (completion probes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attack: Option<AttackKind>,
    /// Guidance fields the probe itself asks for (`gamma`, `negative_prompt`), over the run's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<serde_json::Value>,
}

impl Probe {
    pub fn secret(&self) -> Secret {
        Secret::new(&self.value, self.aliases.iter().map(String::as_str))
    }

    /// The phrasing index of forget/retain probes (the id's last part), 0 for the others.
    pub fn phrasing(&self) -> usize {
        self.id.rsplit('/').next().and_then(|s| s.parse().ok()).unwrap_or(0)
    }
}

/// Reads `probes.jsonl`.
pub fn load(path: &Path) -> anyhow::Result<Vec<Probe>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e} (write it with `lethe synth`)", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let p: Probe = serde_json::from_str(l)
                .map_err(|e| anyhow::anyhow!("{}:{}: not a probe: {e}", path.display(), i + 1))?;
            anyhow::ensure!(
                !p.messages.is_empty() || p.prompt.is_some(),
                "{}:{}: probe {} has neither messages nor a prompt",
                path.display(),
                i + 1,
                p.id
            );
            Ok(p)
        })
        .collect()
}

/// Which probes a run asks.
#[derive(Debug, Clone)]
pub struct Selection {
    /// Planted customers probed (the first ones, in id order); `None` = all.
    pub customers: Option<usize>,
    /// Decoy customers probed; `None` = all.
    pub decoys: Option<usize>,
    /// Held-out phrasings per forget/retain fact.
    pub phrasings: usize,
    /// Customers whose attack probes are asked (among the selected planted ones).
    pub attack_customers: Option<usize>,
}

impl Default for Selection {
    fn default() -> Self {
        Self { customers: None, decoys: None, phrasings: 1, attack_customers: None }
    }
}

/// The probes of a run, in file order.
pub fn select(all: &[Probe], s: &Selection) -> Vec<Probe> {
    let mut planted: Vec<usize> = all.iter().filter(|p| !p.decoy).map(|p| p.customer).collect();
    let mut decoys: Vec<usize> = all.iter().filter(|p| p.decoy).map(|p| p.customer).collect();
    for v in [&mut planted, &mut decoys] {
        v.sort_unstable();
        v.dedup();
    }
    planted.truncate(s.customers.unwrap_or(usize::MAX));
    decoys.truncate(s.decoys.unwrap_or(usize::MAX));
    let attackers: Vec<usize> = planted.iter().take(s.attack_customers.unwrap_or(usize::MAX)).copied().collect();
    all.iter()
        .filter(|p| {
            let chosen = if p.decoy { decoys.contains(&p.customer) } else { planted.contains(&p.customer) };
            chosen
                && match p.kind {
                    ProbeKind::Forget | ProbeKind::Retain => p.phrasing() < s.phrasings,
                    ProbeKind::Prefix => true,
                    ProbeKind::Attack => !p.decoy && attackers.contains(&p.customer),
                }
        })
        .cloned()
        .collect()
}
