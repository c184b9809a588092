//! The configurations an eval runs: adapter stacks × γ × mode × uncond source × condition
//! placement × rule for client system messages, expanded into distinct points.

use crate::engine::prompt::{Placement, SystemMessages};
use crate::guidance::GuidanceMode;
use serde::Serialize;
use std::path::PathBuf;

/// A γ in a list: a number, `off` (no conditions at all: plain serving) or `default` (the
/// stack's adapter profile γ; `off` without a profile).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GammaSpec {
    Off,
    Default,
    Value(f32),
}

impl std::str::FromStr for GammaSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "off" => Ok(Self::Off),
            "default" => Ok(Self::Default),
            t => match t.parse::<f32>() {
                Ok(g) if g.is_finite() && g >= 0.0 => Ok(Self::Value(g)),
                _ => Err(format!("invalid γ {t:?}: a number ≥ 0, `off` or `default`")),
            },
        }
    }
}

/// Parses a comma-separated γ list.
pub fn parse_gammas(s: &str) -> Result<Vec<GammaSpec>, String> {
    let v: Vec<GammaSpec> = s.split(',').filter(|t| !t.trim().is_empty()).map(str::parse).collect::<Result<_, _>>()?;
    if v.is_empty() {
        return Err("empty γ list".into());
    }
    Ok(v)
}

/// An adapter stack: `NAME=DIR[+DIR…][@γ,…]` (no DIR = the base model; the optional γ list
/// replaces `--gammas` for this stack).
#[derive(Debug, Clone, PartialEq)]
pub struct StackSpec {
    pub name: String,
    pub dirs: Vec<PathBuf>,
    pub gammas: Option<Vec<GammaSpec>>,
}

impl std::str::FromStr for StackSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, rest) =
            s.split_once('=').ok_or_else(|| format!("invalid stack {s:?}: expected NAME=DIR[+DIR…][@γ,…]"))?;
        let name = name.trim();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(format!("invalid stack name {name:?}: letters, digits, - _ ."));
        }
        let (dirs, gammas) = match rest.split_once('@') {
            Some((d, g)) => (d, Some(parse_gammas(g).map_err(|e| format!("stack {name}: {e}"))?)),
            None => (rest, None),
        };
        let dirs = dirs.split('+').map(str::trim).filter(|d| !d.is_empty()).map(PathBuf::from).collect();
        Ok(Self { name: name.to_string(), dirs, gammas })
    }
}

/// How the uncond row is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UncondKind {
    NegativeCondition,
    LastToken,
}

impl std::str::FromStr for UncondKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "negative_condition" => Ok(Self::NegativeCondition),
            "last_token" => Ok(Self::LastToken),
            _ => Err(format!("unknown uncond source {s:?} (negative_condition, last_token)")),
        }
    }
}

impl UncondKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NegativeCondition => "negative_condition",
            Self::LastToken => "last_token",
        }
    }
}

/// Where conditions go: fixed, or `auto` (the stack's adapter profile, else `system`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlacementSpec {
    Auto,
    Fixed(Placement),
}

impl std::str::FromStr for PlacementSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" { Ok(Self::Auto) } else { s.parse().map(Self::Fixed) }
    }
}

/// The axes of a grid.
#[derive(Debug, Clone)]
pub struct Axes {
    pub gammas: Vec<GammaSpec>,
    pub modes: Vec<GuidanceMode>,
    pub unconds: Vec<UncondKind>,
    pub placements: Vec<PlacementSpec>,
    pub system_messages: Vec<SystemMessages>,
}

/// What a stack brings to the grid: its profile's γ, mode and placement.
#[derive(Debug, Clone, Default)]
pub struct StackDefaults {
    pub gamma: Option<f32>,
    pub mode: Option<GuidanceMode>,
    pub placement: Option<Placement>,
}

/// Guidance of one point (absent = no conditions at all).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PointGuidance {
    pub gamma: f32,
    pub mode: GuidanceMode,
    pub uncond: UncondKind,
    pub placement: Placement,
    pub system_messages: SystemMessages,
}

/// One configuration of the grid.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Point {
    /// Index into the stacks.
    pub stack: usize,
    pub stack_name: String,
    pub guidance: Option<PointGuidance>,
}

impl Point {
    /// A short label: `forget γ=3 prob` (+ the non-default axes).
    pub fn label(&self) -> String {
        match &self.guidance {
            None => format!("{} off", self.stack_name),
            Some(g) => {
                let mut s = format!("{} γ={}", self.stack_name, g.gamma);
                if g.gamma != 1.0 {
                    s.push_str(&format!(" {}", g.mode.as_str()));
                    if g.uncond == UncondKind::LastToken {
                        s.push_str(" last_token");
                    }
                }
                if g.placement != Placement::System {
                    s.push_str(&format!(" {}", g.placement.as_str()));
                }
                if g.system_messages != SystemMessages::Demote {
                    s.push_str(&format!(" sys:{}", g.system_messages.as_str()));
                }
                s
            }
        }
    }
}

/// Expands the grid for each stack (in order), dropping duplicates: at γ = 1 the mode and the
/// uncond source change nothing, so they collapse to the first of each.
pub fn expand(stacks: &[(String, Option<Vec<GammaSpec>>, StackDefaults)], axes: &Axes) -> Vec<Point> {
    let mut out: Vec<Point> = Vec::new();
    for (si, (name, own, defaults)) in stacks.iter().enumerate() {
        let gammas = own.as_ref().unwrap_or(&axes.gammas);
        for g in gammas {
            let (gamma, modes) = match g {
                GammaSpec::Off => (None, vec![]),
                GammaSpec::Value(v) => (Some(*v), axes.modes.clone()),
                GammaSpec::Default => match defaults.gamma {
                    None => (None, vec![]),
                    Some(v) => (Some(v), vec![defaults.mode.unwrap_or(axes.modes[0])]),
                },
            };
            let mut push = |guidance: Option<PointGuidance>| {
                let p = Point { stack: si, stack_name: name.clone(), guidance };
                if !out.contains(&p) {
                    out.push(p);
                }
            };
            let Some(gamma) = gamma else {
                push(None);
                continue;
            };
            for &mode in &modes {
                for &uncond in &axes.unconds {
                    for &pl in &axes.placements {
                        for &sm in &axes.system_messages {
                            let identity = gamma == 1.0;
                            let placement = match pl {
                                PlacementSpec::Fixed(p) => p,
                                PlacementSpec::Auto => defaults.placement.unwrap_or_default(),
                            };
                            push(Some(PointGuidance {
                                gamma,
                                mode: if identity { modes[0] } else { mode },
                                uncond: if identity { axes.unconds[0] } else { uncond },
                                placement,
                                system_messages: sm,
                            }));
                        }
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gamma_lists_parse_and_junk_is_refused() {
        assert_eq!(
            parse_gammas("off,1, 2.5,default").unwrap(),
            vec![GammaSpec::Off, GammaSpec::Value(1.0), GammaSpec::Value(2.5), GammaSpec::Default]
        );
        for bad in ["1,x", "-1", "nan", "inf", ""] {
            assert!(parse_gammas(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stacks_parse() {
        let s: StackSpec = "forget=out/plant+out/forget@off,3".parse().unwrap();
        assert_eq!(s.name, "forget");
        assert_eq!(s.dirs, vec![PathBuf::from("out/plant"), PathBuf::from("out/forget")]);
        assert_eq!(s.gammas, Some(vec![GammaSpec::Off, GammaSpec::Value(3.0)]));
        let base: StackSpec = "base=".parse().unwrap();
        assert!(base.dirs.is_empty() && base.gammas.is_none());
        assert!("noequals".parse::<StackSpec>().is_err());
        assert!("a b=x".parse::<StackSpec>().is_err());
        assert!("a=x@1,zz".parse::<StackSpec>().is_err());
    }

    #[test]
    fn identity_points_collapse() {
        let axes = Axes {
            gammas: vec![GammaSpec::Off, GammaSpec::Value(1.0), GammaSpec::Value(3.0), GammaSpec::Default],
            modes: vec![GuidanceMode::Log, GuidanceMode::Prob],
            unconds: vec![UncondKind::NegativeCondition, UncondKind::LastToken],
            placements: vec![PlacementSpec::Auto],
            system_messages: vec![SystemMessages::Demote],
        };
        let stacks = vec![
            ("base".to_string(), Some(vec![GammaSpec::Off, GammaSpec::Default]), StackDefaults::default()),
            (
                "forget".to_string(),
                None,
                StackDefaults { gamma: Some(3.0), mode: Some(GuidanceMode::Prob), placement: None },
            ),
        ];
        let pts = expand(&stacks, &axes);
        let labels: Vec<String> = pts.iter().map(Point::label).collect();
        assert_eq!(
            labels,
            vec![
                "base off",
                "forget off",
                "forget γ=1",
                "forget γ=3 log",
                "forget γ=3 log last_token",
                "forget γ=3 prob",
                "forget γ=3 prob last_token"
            ]
        );
    }
}
