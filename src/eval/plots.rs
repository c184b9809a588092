//! PNG plots of a report, drawn with plotters into a pixel buffer and encoded with `png`. Text
//! uses DejaVu Sans compiled into the binary, so no system font (or fontconfig) is needed.

use super::runner::{PointReport, Report};
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

const W: u32 = 900;
const H: u32 = 540;
const FONT: &str = "sans-serif";

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
    });
}

type DrawResult<T> = Result<T, Box<dyn std::error::Error>>;

/// A series of a line chart: a name and `(x, y)` points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Bars in groups: `groups[i]` is the label under group i, `values[s][i]` bar s of group i.
pub struct Bars {
    pub groups: Vec<String>,
    pub series: Vec<String>,
    pub values: Vec<Vec<f64>>,
}

fn color(i: usize) -> RGBColor {
    const C: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    C[i % C.len()]
}

fn save_png(buf: &[u8], path: &Path) -> DrawResult<()> {
    let f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut enc = png::Encoder::new(f, W, H);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()?.write_image_data(buf)?;
    Ok(())
}

/// A line chart of `series` (y in percent when `percent`).
pub fn line_chart(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series]) -> DrawResult<()> {
    register_font();
    let mut buf = vec![255u8; (W * H * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (W, H)).into_drawing_area();
        root.fill(&WHITE)?;
        let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
        let ys = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
        let (x0, x1) = bounds(xs, 0.0);
        let (_, y1) = bounds(ys, 0.0);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, 0.0..y1 * 1.1 + 1e-9)?;
        chart.configure_mesh().x_desc(x_label).y_desc(y_label).label_style((FONT, 14)).draw()?;
        for (i, s) in series.iter().enumerate() {
            let c = color(i);
            chart
                .draw_series(LineSeries::new(s.points.clone(), c.stroke_width(2)))?
                .label(s.name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
            chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 4, c.filled())))?;
        }
        if series.iter().any(|s| !s.name.is_empty()) {
            chart
                .configure_series_labels()
                .label_font((FONT, 14))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperRight)
                .draw()?;
        }
        root.present()?;
    }
    save_png(&buf, path)
}

/// A grouped bar chart.
pub fn bar_chart(path: &Path, title: &str, y_label: &str, bars: &Bars) -> DrawResult<()> {
    register_font();
    let mut buf = vec![255u8; (W * H * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (W, H)).into_drawing_area();
        root.fill(&WHITE)?;
        let n = bars.groups.len().max(1);
        let (_, y1) = bounds(bars.values.iter().flatten().copied(), 0.0);
        let groups = bars.groups.clone();
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, 22))
            .margin(12)
            .x_label_area_size(60)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..n as f64, 0.0..y1 * 1.15 + 1e-9)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - i as f64 - 0.5).abs() < 1e-6 && i < groups.len() { groups[i].clone() } else { String::new() }
            })
            .y_desc(y_label)
            .label_style((FONT, 13))
            .draw()?;
        let k = bars.series.len().max(1) as f64;
        let width = 0.8 / k;
        for (s, name) in bars.series.iter().enumerate() {
            let c = color(s);
            let rects = bars.values[s].iter().enumerate().map(move |(g, &v)| {
                let x = g as f64 + 0.1 + s as f64 * width;
                Rectangle::new([(x, 0.0), (x + width * 0.92, v)], c.filled())
            });
            chart
                .draw_series(rects)?
                .label(name.clone())
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
        }
        chart
            .configure_series_labels()
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
        root.present()?;
    }
    save_png(&buf, path)
}

fn bounds(v: impl Iterator<Item = f64>, floor: f64) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for x in v.filter(|x| x.is_finite()) {
        lo = lo.min(x);
        hi = hi.max(x);
    }
    if !lo.is_finite() {
        return (floor, floor + 1.0);
    }
    if hi - lo < 1e-9 {
        return (lo - 0.5, hi + 0.5);
    }
    (lo, hi)
}

/// The point each stack is summarised by in bar charts: its adapter profile's default (γ and
/// mode) if the grid has it, else its unguided point, else its first.
fn headline(report: &Report) -> Vec<&PointReport> {
    let mut out = Vec::new();
    let mut names: Vec<&str> = report.points.iter().map(|p| p.point.stack_name.as_str()).collect();
    names.dedup();
    for name in names {
        let of_stack: Vec<&PointReport> = report.points.iter().filter(|p| p.point.stack_name == name).collect();
        let profile = report.stacks.iter().find(|s| s.name == name).and_then(|s| s.profile.as_ref());
        let pick = profile
            .and_then(|pr| {
                of_stack.iter().find(|p| {
                    p.point.guidance.is_some_and(|g| Some(g.gamma) == pr.gamma && pr.mode.is_none_or(|m| m == g.mode))
                })
            })
            .or_else(|| of_stack.iter().find(|p| p.point.guidance.is_none()))
            .or(of_stack.first());
        out.extend(pick.copied());
    }
    out
}

fn pct(r: &super::metrics::Rate) -> f64 {
    100.0 * r.rate.unwrap_or(0.0)
}

/// Writes every plot of the report into `dir`; returns the file names.
pub fn write_all(report: &Report, dir: &Path) -> anyhow::Result<Vec<String>> {
    let err = |e: Box<dyn std::error::Error>| anyhow::anyhow!("plotting: {e}");
    let mut written = Vec::new();
    // Leak rate and utility vs γ: one line per (stack, mode, uncond, placement, system rule).
    let mut lines: Vec<(String, Vec<&PointReport>)> = Vec::new();
    for p in &report.points {
        let Some(g) = p.point.guidance else { continue };
        let mut key = format!("{} {}", p.point.stack_name, g.mode.as_str());
        if g.uncond != super::grid::UncondKind::NegativeCondition {
            key.push_str(" last_token");
        }
        if g.placement != Default::default() {
            key.push_str(&format!(" {}", g.placement.as_str()));
        }
        if g.system_messages != Default::default() {
            key.push_str(&format!(" sys:{}", g.system_messages.as_str()));
        }
        match lines.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(p),
            None => lines.push((key, vec![p])),
        }
    }
    // γ = 1 points belong to every mode's line of their stack.
    for (key, pts) in lines.iter_mut() {
        let stack = key.split(' ').next().unwrap_or_default().to_string();
        for p in &report.points {
            if p.point.stack_name == stack
                && p.point.guidance.is_some_and(|g| g.gamma == 1.0)
                && !pts.iter().any(|q| std::ptr::eq(*q, p))
            {
                pts.push(p);
            }
        }
        pts.sort_by(|a, b| gamma(a).total_cmp(&gamma(b)));
    }
    // Unguided points (no conditions) are drawn as flat lines across the γ range.
    let (g0, g1) = bounds(report.points.iter().filter(|p| p.point.guidance.is_some()).map(gamma), 1.0);
    let series = |f: &dyn Fn(&PointReport) -> Option<f64>| -> Vec<Series> {
        let mut out: Vec<Series> = lines
            .iter()
            .map(|(k, pts)| Series {
                name: k.clone(),
                points: pts.iter().filter_map(|p| f(p).map(|y| (gamma(p), y))).collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect();
        for p in report.points.iter().filter(|p| p.point.guidance.is_none()) {
            if let Some(y) = f(p) {
                out.push(Series { name: format!("{} (flat: no conditions)", p.label), points: vec![(g0, y), (g1, y)] });
            }
        }
        out
    };
    let leak = series(&|p| Some(pct(&p.leak)));
    if !leak.is_empty() {
        line_chart(&dir.join("leak_vs_gamma.png"), "Leak rate vs guidance scale", "γ", "leak rate (%)", &leak)
            .map_err(err)?;
        written.push("leak_vs_gamma.png".into());
    }
    let ppl = series(&|p| p.utility.perplexity);
    if !ppl.is_empty() {
        line_chart(&dir.join("perplexity_vs_gamma.png"), "Perplexity on general text vs γ", "γ", "perplexity", &ppl)
            .map_err(err)?;
        written.push("perplexity_vs_gamma.png".into());
    }
    let mmlu = series(&|p| p.utility.mmlu_accuracy.map(|a| 100.0 * a));
    if !mmlu.is_empty() {
        line_chart(&dir.join("mmlu_vs_gamma.png"), "Multiple-choice accuracy vs γ", "γ", "accuracy (%)", &mmlu)
            .map_err(err)?;
        written.push("mmlu_vs_gamma.png".into());
    }
    let heads = headline(report);
    let series_names: Vec<String> = heads.iter().map(|p| p.label.clone()).collect();
    let mut kinds: Vec<&str> = heads.iter().flat_map(|p| p.leak_per_type.keys().copied()).collect();
    kinds.sort();
    kinds.dedup();
    if !kinds.is_empty() {
        let bars = Bars {
            groups: kinds.iter().map(|k| k.to_string()).collect(),
            series: series_names.clone(),
            values: heads
                .iter()
                .map(|p| kinds.iter().map(|k| p.leak_per_type.get(k).map_or(0.0, pct)).collect())
                .collect(),
        };
        bar_chart(&dir.join("leak_per_type.png"), "Leak rate per type of personal data", "leak rate (%)", &bars)
            .map_err(err)?;
        written.push("leak_per_type.png".into());
    }
    let mut attacks: Vec<&str> = heads.iter().flat_map(|p| p.attacks.keys().copied()).collect();
    attacks.sort();
    attacks.dedup();
    if !attacks.is_empty() {
        let bars = Bars {
            groups: attacks.iter().map(|a| a.replace('_', " ")).collect(),
            series: series_names,
            values: heads
                .iter()
                .map(|p| attacks.iter().map(|a| p.attacks.get(a).map_or(0.0, |r| pct(&r.leak))).collect())
                .collect(),
        };
        bar_chart(&dir.join("attacks.png"), "Leak rate per attack", "leak rate (%)", &bars).map_err(err)?;
        written.push("attacks.png".into());
    }
    Ok(written)
}

fn gamma(p: &PointReport) -> f64 {
    p.point.guidance.map_or(0.0, |g| f64::from(g.gamma))
}
