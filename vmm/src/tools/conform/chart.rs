//! SVG charts of a conformance run, written by hand (two small charts do not need a plotting
//! library): shared memory over time per policy for one workload, and the footprint vs
//! failures trade-off per policy.

use std::fmt::Write as _;

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
];

/// One named series of (x, y) points.
#[derive(Default)]
pub struct Series {
    /// Legend label (a policy name: its colour is the same in every chart).
    pub label: String,
    /// Points, in x order for lines.
    pub points: Vec<(f64, f64)>,
    /// A label per point, written beside it (empty: none).
    pub point_labels: Vec<String>,
}

/// The built-in policies, each with its own colour in every chart.
const POLICY_COLORS: [&str; 6] = [
    "legacy",
    "dynamic",
    "refill",
    "throttle",
    "aligned-2m",
    "adaptive",
];

/// The colour of a series: fixed per built-in policy, else from the label's bytes (so the
/// same label has the same colour in every chart).
fn color(label: &str) -> &'static str {
    let i = POLICY_COLORS
        .iter()
        .position(|p| *p == label)
        .unwrap_or_else(|| {
            POLICY_COLORS.len()
                + label.bytes().map(usize::from).sum::<usize>()
                    % (COLORS.len() - POLICY_COLORS.len())
        });
    COLORS[i % COLORS.len()]
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

struct Frame {
    x_max: f64,
    y_max: f64,
}

impl Frame {
    fn new(series: &[Series]) -> Self {
        let max = |f: fn(&(f64, f64)) -> f64| {
            series
                .iter()
                .flat_map(|s| s.points.iter().map(f))
                .fold(0.0f64, f64::max)
        };
        Self {
            x_max: nice(max(|p| p.0)),
            y_max: nice(max(|p| p.1)),
        }
    }
    fn x(&self, v: f64) -> f64 {
        LEFT + v / self.x_max * (WIDTH - LEFT - RIGHT)
    }
    fn y(&self, v: f64) -> f64 {
        HEIGHT - BOTTOM - v / self.y_max * (HEIGHT - TOP - BOTTOM)
    }
}

/// Rounds up to 1, 2 or 5 times a power of ten (at least 1).
fn nice(v: f64) -> f64 {
    if v <= 1.0 {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|c| *c >= v)
        .unwrap_or(10.0 * p)
}

fn axes(svg: &mut String, f: &Frame, title: &str, x_label: &str, y_label: &str) {
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>
"#,
        (WIDTH - RIGHT + LEFT) / 2.0,
        escape(title)
    );
    for i in 0..=5 {
        let fx = f.x_max * i as f64 / 5.0;
        let fy = f.y_max * i as f64 / 5.0;
        let _ = write!(
            svg,
            r##"<line x1="{x}" y1="{TOP}" x2="{x}" y2="{b}" stroke="#eee"/><text x="{x}" y="{ty}" text-anchor="middle">{fx}</text>
<line x1="{LEFT}" y1="{y}" x2="{r}" y2="{y}" stroke="#eee"/><text x="{tx}" y="{y4}" text-anchor="end">{fy}</text>
"##,
            x = f.x(fx),
            b = HEIGHT - BOTTOM,
            ty = HEIGHT - BOTTOM + 16.0,
            fx = trim(fx),
            y = f.y(fy),
            r = WIDTH - RIGHT,
            tx = LEFT - 6.0,
            y4 = f.y(fy) + 4.0,
            fy = trim(fy),
        );
    }
    let _ = write!(
        svg,
        r#"<line x1="{LEFT}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/><line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{b}" stroke="black"/>
<text x="{cx}" y="{xl}" text-anchor="middle">{}</text>
<text transform="translate(20,{cy}) rotate(-90)" text-anchor="middle">{}</text>
"#,
        escape(x_label),
        escape(y_label),
        b = HEIGHT - BOTTOM,
        r = WIDTH - RIGHT,
        cx = (WIDTH - RIGHT + LEFT) / 2.0,
        xl = HEIGHT - 18.0,
        cy = (HEIGHT - BOTTOM + TOP) / 2.0,
    );
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn point_labels(svg: &mut String, f: &Frame, s: &Series) {
    for ((x, y), label) in s.points.iter().zip(&s.point_labels) {
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" font-size="10" fill="{}">{}</text>"#,
            f.x(*x) + 8.0,
            f.y(*y) - 6.0,
            color(&s.label),
            escape(label)
        );
    }
}

fn legend(svg: &mut String, i: usize, label: &str) {
    let y = TOP + 10.0 + i as f64 * 20.0;
    let x = WIDTH - RIGHT + 15.0;
    let _ = writeln!(
        svg,
        r#"<rect x="{x}" y="{}" width="14" height="4" fill="{}"/><text x="{}" y="{}">{}</text>"#,
        y - 4.0,
        color(label),
        x + 20.0,
        y + 1.0,
        escape(label)
    );
}

/// A line chart (one polyline per series).
pub fn lines(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let f = Frame::new(series);
    let mut svg = String::new();
    axes(&mut svg, &f, title, x_label, y_label);
    for (i, s) in series.iter().enumerate() {
        let pts: Vec<String> = s
            .points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", f.x(*x), f.y(*y)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
            color(&s.label),
            pts.join(" ")
        );
        point_labels(&mut svg, &f, s);
        legend(&mut svg, i, &s.label);
    }
    svg.push_str("</svg>\n");
    svg
}

/// A scatter chart (one labelled marker per point).
pub fn scatter(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let f = Frame::new(series);
    let mut svg = String::new();
    axes(&mut svg, &f, title, x_label, y_label);
    for (i, s) in series.iter().enumerate() {
        for (x, y) in &s.points {
            let _ = writeln!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="6" fill="{}" fill-opacity="0.8"/>"#,
                f.x(*x),
                f.y(*y),
                color(&s.label)
            );
        }
        point_labels(&mut svg, &f, s);
        legend(&mut svg, i, &s.label);
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_well_formed_svg_with_every_series() {
        let series = vec![
            Series {
                label: "legacy".into(),
                points: vec![(0.0, 64.0), (10.0, 64.0)],
                point_labels: vec!["steady".into(), "burst".into()],
            },
            Series {
                label: "a<b".into(),
                points: vec![(0.0, 2.0), (7.5, 9.0)],
                ..Series::default()
            },
        ];
        for svg in [
            lines("t", "x", "y", &series),
            scatter("t", "x", "y", &series),
        ] {
            assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
            assert!(svg.contains("legacy") && svg.contains("a&lt;b"));
            assert!(!svg.contains("NaN"));
            assert!(svg.contains(">burst<"));
        }
        // One colour per policy, whatever the series order.
        assert_eq!(color("adaptive"), COLORS[5]);
        assert_eq!(color("legacy"), COLORS[0]);
        assert_eq!(color("plug-in"), color("plug-in"));
        assert_eq!(nice(0.3), 1.0);
        assert_eq!(nice(64.0), 100.0);
        assert_eq!(nice(17.0), 20.0);
    }
}
