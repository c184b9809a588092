//! What a tenant may do: which forget-adapters are on for it, and how guidance is applied.

use crate::engine::prompt::SystemMessages;
use crate::guidance::GuidanceMode;
use serde::{Deserialize, Serialize};

/// A tenant's policy. Requests may tune γ inside `[gamma_min, gamma_max]`, never switch off the
/// tenant's adapters, and change the guidance conditions (a negative prompt, the `last_token`
/// uncond source) only where the policy allows it and no forget-adapter is enabled.
///
/// The defaults are the safe ones (see docs/threat-model.md): γ never below 1 (γ < 1 moves
/// towards the *negative* condition, γ = 0 samples from it alone), no custom negative prompt, no
/// `last_token`, and client system messages demoted to the user turn when conditions apply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantPolicy {
    /// Adapters applied to every request of the tenant (both rows of a guided pair).
    #[serde(default)]
    pub adapters: Vec<String>,
    /// γ when the request does not choose one; `None` = the first enabled adapter's profile,
    /// else the server's default (1 = unguided).
    #[serde(default)]
    pub gamma: Option<f32>,
    /// Lower bound for γ (default 1: guidance can be turned off, never inverted). Below 1 only
    /// where an admin sets it explicitly.
    #[serde(default = "one")]
    pub gamma_min: f32,
    /// Upper bound for γ; `None` = the server's `max_gamma`.
    #[serde(default)]
    pub gamma_max: Option<f32>,
    /// Mixing mode when the request does not choose one; `None` as for `gamma`.
    #[serde(default)]
    pub mode: Option<GuidanceMode>,
    /// Whether requests may bring their own negative condition (`guidance.negative_prompt`);
    /// never while a forget-adapter is enabled (its conditions are fixed).
    #[serde(default)]
    pub allow_negative_prompt: bool,
    /// Whether requests may use the `last_token` uncond source (it drops the negative
    /// condition); never while a forget-adapter is enabled.
    #[serde(default)]
    pub allow_last_token: bool,
    /// What happens to a client's system messages when the prompt carries conditions.
    #[serde(default)]
    pub system_messages: SystemMessages,
    /// Requests of the tenant waiting at once (tokenizing or queued); more get 429 while other
    /// tenants are still served. `None`: the server's `tenant_max_waiting`.
    #[serde(default)]
    pub max_waiting: Option<usize>,
    /// Rows of the tenant running at once (a guided request takes 2); more wait. `None`: the
    /// server's `tenant_max_running_rows`.
    #[serde(default)]
    pub max_running_rows: Option<usize>,
    /// Share in fair admission relative to other tenants (default 1): rows go to the tenant
    /// running the fewest rows per unit of weight.
    #[serde(default)]
    pub weight: Option<u32>,
}

fn one() -> f32 {
    1.0
}

impl Default for TenantPolicy {
    fn default() -> Self {
        Self {
            adapters: Vec::new(),
            gamma: None,
            gamma_min: 1.0,
            gamma_max: None,
            mode: None,
            allow_negative_prompt: false,
            allow_last_token: false,
            system_messages: SystemMessages::default(),
            max_waiting: None,
            max_running_rows: None,
            weight: None,
        }
    }
}

impl TenantPolicy {
    /// The effective upper bound for γ.
    pub fn gamma_max(&self, server_max: f32) -> f32 {
        self.gamma_max.unwrap_or(server_max).min(server_max)
    }

    /// Checks the policy's own consistency (adapter existence is checked by the caller).
    pub fn validate(&self, server_max: f32) -> Result<(), String> {
        let finite =
            [self.gamma_min].iter().chain(self.gamma.iter()).chain(self.gamma_max.iter()).all(|g| g.is_finite());
        if !finite {
            return Err("gamma, gamma_min and gamma_max must be finite numbers".into());
        }
        let max = self.gamma_max.unwrap_or(server_max);
        if max > server_max {
            return Err(format!("gamma_max {max} is above the server's max_gamma {server_max}"));
        }
        if !(0.0 <= self.gamma_min && self.gamma_min <= max) {
            let which =
                if self.gamma_max.is_some() { "gamma_max" } else { "gamma_max (unset: the server's max_gamma)" };
            return Err(format!("need 0 ≤ gamma_min ≤ {which}, got {} and {max}", self.gamma_min));
        }
        if let Some(g) = self.gamma
            && !(self.gamma_min <= g && g <= max)
        {
            return Err(format!("gamma {g} is outside [gamma_min, gamma_max] = [{}, {max}]", self.gamma_min));
        }
        if let Some(n) = self.max_waiting
            && n == 0
        {
            return Err("max_waiting must be at least 1, got 0".into());
        }
        if let Some(n) = self.max_running_rows
            && n < 2
        {
            return Err(format!("max_running_rows must be at least 2 (a guided pair), got {n}"));
        }
        if let Some(w) = self.weight
            && !(1..=1000).contains(&w)
        {
            return Err(format!("weight must be within [1, 1000], got {w}"));
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = self.adapters.iter().find(|a| !seen.insert(*a)) {
            return Err(format!("adapter {dup:?} is listed twice"));
        }
        Ok(())
    }
}

/// Tenant names: path- and label-safe identifiers.
pub fn check_tenant_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok { Ok(()) } else { Err(format!("invalid tenant name {name:?}: 1-64 characters from A-Z a-z 0-9 - _ .")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_safe() {
        for p in [TenantPolicy::default(), serde_json::from_str::<TenantPolicy>("{}").unwrap()] {
            assert_eq!(p.gamma_min, 1.0);
            assert!(!p.allow_negative_prompt && !p.allow_last_token);
            assert_eq!(p.system_messages, SystemMessages::Demote);
        }
        let explicit: TenantPolicy = serde_json::from_str(r#"{"gamma_min": 0, "system_messages": "keep"}"#).unwrap();
        assert_eq!((explicit.gamma_min, explicit.system_messages), (0.0, SystemMessages::Keep));
        assert!(explicit.validate(20.0).is_ok());
    }

    #[test]
    fn bounds_are_checked() {
        assert!(TenantPolicy::default().validate(20.0).is_ok());
        let p = TenantPolicy { gamma: Some(3.0), gamma_min: 2.0, gamma_max: Some(4.0), ..Default::default() };
        assert!(p.validate(20.0).is_ok());
        assert!(TenantPolicy { gamma: Some(1.0), ..p.clone() }.validate(20.0).is_err());
        assert!(TenantPolicy { gamma_max: Some(30.0), ..p.clone() }.validate(20.0).is_err());
        assert!(TenantPolicy { adapters: vec!["a".into(), "a".into()], ..Default::default() }.validate(20.0).is_err());
        assert!(serde_json::from_str::<TenantPolicy>(r#"{"gama": 2}"#).is_err());
    }

    #[test]
    fn sharing_limits_are_optional_and_checked() {
        // A policy saved before the limits existed still reads, with no limits.
        let old: TenantPolicy = serde_json::from_str(r#"{"adapters": [], "gamma_min": 1}"#).unwrap();
        assert_eq!((old.max_waiting, old.max_running_rows, old.weight), (None, None, None));
        let p: TenantPolicy =
            serde_json::from_str(r#"{"max_waiting": 8, "max_running_rows": 4, "weight": 3}"#).unwrap();
        assert!(p.validate(20.0).is_ok());
        let e = TenantPolicy { max_running_rows: Some(1), ..Default::default() }.validate(20.0).unwrap_err();
        assert!(e.contains("got 1"), "{e}");
        assert!(TenantPolicy { max_waiting: Some(0), ..Default::default() }.validate(20.0).is_err());
        let e = TenantPolicy { weight: Some(0), ..Default::default() }.validate(20.0).unwrap_err();
        assert!(e.contains("got 0"), "{e}");
    }
}
