//! Inline SVG for the run report: line charts with axes, and a per-worker timeline of marks.
//! Plain text output, no script; every mark carries its kind and time as attributes and a
//! `<title>` tooltip with its text.

use std::fmt::Write;

const WIDTH: f64 = 760.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 190.0;

/// One line (or set of dots) on a chart.
pub struct Series {
    pub name: String,
    pub color: &'static str,
    pub points: Vec<(f64, f64)>,
    /// Dots at the points, without a line (sparse series, such as evaluations).
    pub dots: bool,
}

/// A chart of `series` against shared axes.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let (height, top, bottom) = (260.0, 30.0, 45.0);
    let points = || series.iter().flat_map(|s| s.points.iter().copied());
    let mut svg = open(height, title);
    let Some((x0, x1)) = range(points().map(|p| p.0)) else {
        svg.push_str(&text(LEFT, height / 2.0, "no data", "start"));
        return svg + "</svg>";
    };
    let (y0, y1) = range(points().map(|p| p.1)).expect("points have both coordinates");
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = height - top - bottom;
    let x = |v: f64| LEFT + (v - x0) / (x1 - x0) * plot_w;
    let y = |v: f64| top + plot_h - (v - y0) / (y1 - y0) * plot_h;
    axes(&mut svg, (x0, x1), (y0, y1), &x, &y, (top, top + plot_h));
    svg.push_str(&text(LEFT + plot_w / 2.0, height - 8.0, x_label, "middle"));
    let _ = write!(
        svg,
        r#"<text x="14" y="{:.1}" transform="rotate(-90 14 {:.1})" text-anchor="middle">{}</text>"#,
        top + plot_h / 2.0,
        top + plot_h / 2.0,
        escape(y_label)
    );
    for (i, s) in series.iter().enumerate() {
        draw_series(&mut svg, s, &x, &y);
        let ly = top + 14.0 + 18.0 * i as f64;
        let _ = write!(
            svg,
            r#"<rect x="{:.1}" y="{:.1}" width="12" height="4" fill="{}"/>"#,
            WIDTH - RIGHT + 12.0,
            ly - 4.0,
            s.color
        );
        svg.push_str(&text(WIDTH - RIGHT + 30.0, ly, &s.name, "start"));
    }
    svg + "</svg>"
}

fn draw_series(svg: &mut String, s: &Series, x: &dyn Fn(f64) -> f64, y: &dyn Fn(f64) -> f64) {
    let finite: Vec<(f64, f64)> = s
        .points
        .iter()
        .copied()
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    if s.dots || finite.len() == 1 {
        for &(px, py) in &finite {
            let _ = write!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{}"><title>{}: {px} → {py}</title></circle>"#,
                x(px),
                y(py),
                s.color,
                escape(&s.name)
            );
        }
        return;
    }
    let path: Vec<String> = finite
        .iter()
        .map(|&(px, py)| format!("{:.1},{:.1}", x(px), y(py)))
        .collect();
    let _ = write!(
        svg,
        r#"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"><title>{}</title></polyline>"#,
        s.color,
        path.join(" "),
        escape(&s.name)
    );
}

/// A lane per worker (and one for the run): when each was in the run, and marks at times.
pub struct Timeline {
    pub lanes: Vec<String>,
    /// Per lane, the intervals it was live.
    pub spans: Vec<Vec<(f64, f64)>>,
    pub marks: Vec<Mark>,
    pub end_s: f64,
}

/// Something that happened at `t` seconds, on lane `lane`.
pub struct Mark {
    pub t: f64,
    pub lane: usize,
    pub kind: String,
    pub text: String,
}

/// Colour and shape of a mark by its kind: faults red, guard actions orange, votes and audits
/// purple, membership green.
fn style(kind: &str) -> (&'static str, bool) {
    match kind {
        "joined" => ("#2a9d3a", false),
        "removed" | "run_unstable" | "divergence" => ("#d62728", true),
        "attempt_aborted" | "guard_skip" | "guard_rollback" | "rollback" | "skip" | "stop"
        | "slow_worker" => ("#ff7f0e", true),
        "corruption" | "contribution_outlier" | "audit" => ("#9467bd", true),
        "rounds_voided" | "rewound" | "batches_skipped" => ("#8c564b", true),
        _ => ("#7f7f7f", false),
    }
}

pub fn timeline(title: &str, t: &Timeline) -> String {
    let (lane_h, top) = (26.0, 30.0);
    let height = top + lane_h * t.lanes.len() as f64 + 40.0;
    let mut svg = open(height, title);
    let plot_w = WIDTH - LEFT - RIGHT;
    let end = t.end_s.max(1e-9);
    let x = |v: f64| LEFT + v.clamp(0.0, end) / end * plot_w;
    for (i, (name, spans)) in t.lanes.iter().zip(&t.spans).enumerate() {
        let y = top + lane_h * i as f64;
        svg.push_str(&text(LEFT - 6.0, y + 16.0, name, "end"));
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#ddd"/>"##,
            LEFT + plot_w,
            y + 12.0,
            y + 12.0
        );
        for &(from, to) in spans {
            let _ = write!(
                svg,
                r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="8" fill="#c6dbef"/>"##,
                x(from),
                y + 8.0,
                (x(to) - x(from)).max(1.0)
            );
        }
    }
    for m in &t.marks {
        let (color, fault) = style(&m.kind);
        let (cx, cy) = (x(m.t), top + lane_h * m.lane as f64 + 12.0);
        let shape = if fault {
            format!(
                r#"<path d="M{:.1} {:.1} l6 6 l-6 6 l-6 -6 z" fill="{color}"/>"#,
                cx,
                cy - 6.0
            )
        } else {
            format!(r#"<circle cx="{cx:.1}" cy="{cy:.1}" r="4" fill="{color}"/>"#)
        };
        let _ = write!(
            svg,
            r#"<g class="mark" data-kind="{}" data-t="{:.3}">{shape}<title>{:.1} s, {}: {}</title></g>"#,
            escape(&m.kind),
            m.t,
            m.t,
            escape(&m.kind),
            escape(&m.text)
        );
    }
    let axis_y = top + lane_h * t.lanes.len() as f64;
    for tick in ticks(0.0, end) {
        svg.push_str(&text(x(tick), axis_y + 16.0, &number(tick), "middle"));
    }
    svg.push_str(&text(
        LEFT + plot_w / 2.0,
        axis_y + 34.0,
        "seconds since the run started",
        "middle",
    ));
    svg + "</svg>"
}

fn open(height: f64, title: &str) -> String {
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12"><text x="{LEFT}" y="18" font-weight="bold">{}</text>"#,
        escape(title)
    )
}

fn axes(
    svg: &mut String,
    (x0, x1): (f64, f64),
    (y0, y1): (f64, f64),
    x: &dyn Fn(f64) -> f64,
    y: &dyn Fn(f64) -> f64,
    (top, base): (f64, f64),
) {
    let right = WIDTH - RIGHT;
    let _ = write!(
        svg,
        r##"<rect x="{LEFT}" y="{top}" width="{:.1}" height="{:.1}" fill="none" stroke="#999"/>"##,
        right - LEFT,
        base - top
    );
    for tick in ticks(x0, x1) {
        svg.push_str(&text(x(tick), base + 16.0, &number(tick), "middle"));
    }
    for tick in ticks(y0, y1) {
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" x2="{right}" y1="{:.1}" y2="{:.1}" stroke="#eee"/>"##,
            y(tick),
            y(tick)
        );
        svg.push_str(&text(LEFT - 6.0, y(tick) + 4.0, &number(tick), "end"));
    }
}

/// The finite values' range, widened when it is a single value.
fn range(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold(None, |r: Option<(f64, f64)>, v| {
            Some(r.map_or((v, v), |(lo, hi)| (lo.min(v), hi.max(v))))
        })?;
    if hi > lo {
        Some((lo, hi))
    } else {
        let pad = lo.abs().max(1.0) * 0.5;
        Some((lo - pad, hi + pad))
    }
}

/// About five round-numbered ticks within `lo..=hi`.
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let raw = (hi - lo) / 5.0;
    if !(raw.is_finite() && raw > 0.0) {
        return vec![lo];
    }
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * magnitude);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|k| k as f64 * step).collect()
}

/// A tick label: short, without float noise.
fn number(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{}M", short(v / 1e6))
    } else if a >= 1e4 {
        format!("{}k", short(v / 1e3))
    } else {
        short(v)
    }
}

/// `v` with at most three decimals, trailing zeros dropped.
pub fn short(v: f64) -> String {
    let text = format!("{v:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" {
        "0".into()
    } else {
        text.into()
    }
}

fn text(x: f64, y: f64, s: &str, anchor: &str) -> String {
    format!(
        r#"<text x="{x:.1}" y="{y:.1}" text-anchor="{anchor}">{}</text>"#,
        escape(s)
    )
}

/// Text safe inside an element or a double-quoted attribute.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_inside_the_range() {
        assert_eq!(ticks(0.0, 10.0), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        let labels: Vec<String> = ticks(0.13, 0.61).into_iter().map(number).collect();
        assert_eq!(labels, ["0.2", "0.3", "0.4", "0.5", "0.6"]);
        assert_eq!(
            [number(250_000.0), number(1.5e6), number(-0.0)],
            ["250k", "1.5M", "0"]
        );
        assert_eq!(ticks(3.0, 3.0), vec![3.0]);
    }

    #[test]
    fn a_chart_without_points_says_so_and_text_is_escaped() {
        let empty = line_chart("<loss>", "x", "y", &[]);
        assert!(empty.contains("no data") && empty.contains("&lt;loss&gt;"));
        let one = Series {
            name: "a \"b\"".into(),
            color: "red",
            points: vec![(1.0, f64::NAN), (2.0, 3.0)],
            dots: false,
        };
        let chart = line_chart("t", "x", "y", &[one]);
        assert!(chart.contains("a &quot;b&quot;") && !chart.contains("NaN"));
    }
}
