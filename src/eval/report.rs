//! `report.md`: the report's numbers as tables.

use super::metrics::Rate;
use super::runner::Report;
use std::fmt::Write;

fn pct(r: &Rate) -> String {
    match r.rate {
        Some(x) => format!("{:.1} %", 100.0 * x),
        None => "–".into(),
    }
}

fn num(x: Option<f64>, digits: usize) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v:.digits$}"),
        _ => "–".into(),
    }
}

pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# lethe eval report\n");
    let _ = writeln!(
        s,
        "Model `{}`{} ({}), lethe {}, {} points, {} requests in {:.0} s (generation {:.0} s, utility {:.0} s).\n",
        r.model,
        r.model_sha256.as_ref().map(|h| format!(" sha256 `{}`", &h[..12])).unwrap_or_default(),
        r.target,
        r.lethe_version,
        r.points.len(),
        r.timing.get("requests").copied().unwrap_or(0.0),
        r.timing.get("total_s").copied().unwrap_or(0.0),
        r.timing.get("generation_s").copied().unwrap_or(0.0),
        r.timing.get("utility_s").copied().unwrap_or(0.0),
    );
    for st in &r.stacks {
        let adapters: Vec<String> = st
            .adapters
            .iter()
            .map(|a| format!("`{}` ({})", a.dir, &a.content_hash[..12.min(a.content_hash.len())]))
            .collect();
        let _ = writeln!(
            s,
            "- stack **{}**: {}{}",
            st.name,
            if adapters.is_empty() { "base model".into() } else { adapters.join(" + ") },
            st.profile
                .as_ref()
                .map(|p| format!(", profile γ={:?} mode={:?}", p.gamma, p.mode.map(|m| m.as_str())))
                .unwrap_or_default()
        );
    }
    let counts: Vec<String> = r.probes.iter().map(|(k, v)| format!("{v} {k}")).collect();
    let _ = writeln!(s, "\nProbes: {} (file sha256 `{}`).\n", counts.join(", "), &r.probes_sha256[..12]);
    let _ = writeln!(s, "## Leakage, retention, utility\n");
    let _ = writeln!(
        s,
        "| point | leak | decoy leak | prefix leak | retention | decoy retention | worst attack | perplexity | KL | MMLU | membership AUC |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
    for p in &r.points {
        let worst = p
            .attacks
            .iter()
            .max_by(|a, b| a.1.leak.rate.unwrap_or(0.0).total_cmp(&b.1.leak.rate.unwrap_or(0.0)))
            .map(|(k, a)| format!("{} {k}", pct(&a.leak)))
            .unwrap_or_else(|| "–".into());
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            p.label,
            pct(&p.leak),
            pct(&p.decoy_leak),
            pct(&p.prefix_leak),
            pct(&p.retention),
            pct(&p.decoy_retention),
            worst,
            num(p.utility.perplexity, 2),
            num(p.utility.kl_from_reference, 4),
            p.utility.mmlu_accuracy.map_or("–".into(), |a| format!("{:.1} %", 100.0 * a)),
            num(p.membership.as_ref().and_then(|m| m.auc), 3),
        );
    }
    let n = |p: &super::runner::PointReport| p.leak.n;
    if let Some(first) = r.points.first() {
        let _ = writeln!(
            s,
            "\nLeak: exact value (normalised) in the first 200 characters, over {} answers to held-out questions per point; \
             decoys are customers never planted (the guessing rate).",
            n(first)
        );
    }
    let mut kinds: Vec<&str> = r.points.iter().flat_map(|p| p.leak_per_type.keys().copied()).collect();
    kinds.sort();
    kinds.dedup();
    if !kinds.is_empty() {
        let _ = writeln!(s, "\n## Leak per type of personal data\n");
        let _ = writeln!(s, "| point | {} |", kinds.join(" | "));
        let _ = writeln!(s, "|---|{}", "---|".repeat(kinds.len()));
        for p in &r.points {
            let cells: Vec<String> = kinds.iter().map(|k| p.leak_per_type.get(k).map_or("–".into(), pct)).collect();
            let _ = writeln!(s, "| {} | {} |", p.label, cells.join(" | "));
        }
    }
    let mut attacks: Vec<&str> = r.points.iter().flat_map(|p| p.attacks.keys().copied()).collect();
    attacks.sort();
    attacks.dedup();
    if !attacks.is_empty() {
        let _ = writeln!(s, "\n## Attacks (leak rate; refused requests in brackets)\n");
        let _ = writeln!(s, "| point | {} |", attacks.join(" | "));
        let _ = writeln!(s, "|---|{}", "---|".repeat(attacks.len()));
        for p in &r.points {
            let cells: Vec<String> = attacks
                .iter()
                .map(|k| match p.attacks.get(k) {
                    Some(a) if a.refused > 0 => format!("{} ({} refused)", pct(&a.leak), a.refused),
                    Some(a) => pct(&a.leak),
                    None => "–".into(),
                })
                .collect();
            let _ = writeln!(s, "| {} | {} |", p.label, cells.join(" | "));
        }
    }
    let problems: Vec<String> = r
        .points
        .iter()
        .filter(|p| p.failed > 0 || p.refused > 0)
        .map(|p| format!("{}: {} failed, {} refused", p.label, p.failed, p.refused))
        .collect();
    if !problems.is_empty() {
        let _ = writeln!(s, "\n**Requests that did not answer** (outside attacks): {}", problems.join("; "));
    }
    if !r.not_measured.is_empty() {
        let _ = writeln!(s, "\n## Not measured\n");
        for m in &r.not_measured {
            let _ = writeln!(s, "- {m}");
        }
    }
    s
}
