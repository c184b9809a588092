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
}
