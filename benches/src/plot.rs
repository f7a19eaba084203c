//! Percentile-curve plots as hand-written SVG, in the style of HdrHistogram's plotter: the x axis
//! is `1 / (1 - percentile)` on a log scale (0%, 90%, 99%, 99.9%, ...), so the tail gets as much
//! room as the median. The y axis (one-way latency) is log-scale too, so a single slow outlier
//! does not flatten the curve.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

const W: f64 = 820.0;
const H: f64 = 460.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
/// Right end of the x axis: 99.9999th percentile.
const X_DECADES: f64 = 6.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

fn x_of(quantile: f64) -> f64 {
    let tail = (1.0 - quantile).max(10f64.powf(-X_DECADES));
    (1.0 / tail).log10().clamp(0.0, X_DECADES)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// An SVG document plotting each `(label, histogram)` as one percentile curve.
pub fn percentile_svg(title: &str, series: &[(String, &Histogram<u64>)]) -> String {
    let points: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|(_, h)| {
            h.iter_quantiles(4)
                .map(|v| {
                    (
                        x_of(v.quantile_iterated_to()),
                        v.value_iterated_to().max(1) as f64,
                    )
                })
                .collect()
        })
        .collect();
    let (mut lo, mut hi) = (f64::MAX, 1.0f64);
    for (_, y) in points.iter().flatten() {
        lo = lo.min(*y);
        hi = hi.max(*y);
    }
    if lo > hi {
        lo = 1.0;
    }
    let y_min = 10f64.powf(lo.log10().floor());
    let y_max = 10f64.powf(hi.log10().ceil().max(y_min.log10() + 1.0));
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let px = |x: f64| LEFT + x / X_DECADES * pw;
    let py = |y: f64| TOP + ph - (y.log10() - y_min.log10()) / (y_max.log10() - y_min.log10()) * ph;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        LEFT + pw / 2.0,
        esc(title)
    );
    // x grid: one line per decade.
    let labels = ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%", "99.9999%"];
    for (i, label) in labels.iter().enumerate() {
        let x = px(i as f64);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{label}</text>"##,
            TOP + ph,
            TOP + ph + 18.0
        );
    }
    // y grid: one line per decade.
    let mut y = y_min;
    while y <= y_max * 1.0001 {
        let yy = py(y);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + pw,
            LEFT - 6.0,
            yy + 4.0,
            crate::report::fmt_ns(y)
        );
        y *= 10.0;
    }
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{pw:.1}" height="{ph:.1}" fill="none" stroke="#444"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile</text>"#,
        LEFT + pw / 2.0,
        H - 10.0
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">one-way latency</text>"#,
        TOP + ph / 2.0,
        TOP + ph / 2.0
    );
    for (i, ((label, _), pts)) in series.iter().zip(&points).enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
            path.join(" ")
        );
        let ly = TOP + 10.0 + 18.0 * i as f64;
        let lx = LEFT + pw + 12.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 20.0,
            lx + 26.0,
            ly + 4.0,
            esc(label)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_has_a_curve_per_series() {
        let mut a = crate::measure::new_histogram();
        let mut b = crate::measure::new_histogram();
        for v in 1..10_000u64 {
            a.record(50 + v % 100).unwrap();
            b.record(70 + v % 300).unwrap();
        }
        let svg = percentile_svg("t <x>", &[("a".into(), &a), ("b".into(), &b)]);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("t &lt;x&gt;"));
    }

    #[test]
    fn x_axis_is_log_of_tail() {
        assert!((x_of(0.0) - 0.0).abs() < 1e-9);
        assert!((x_of(0.99) - 2.0).abs() < 1e-9);
        assert!((x_of(1.0) - X_DECADES).abs() < 1e-9);
    }
}
