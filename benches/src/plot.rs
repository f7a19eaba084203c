//! Plots as hand-written SVG.
//!
//! - [`percentile_svg`]: percentile curves in the style of HdrHistogram's plotter: the x axis is
//!   `1 / (1 - percentile)` on a log scale (0%, 90%, 99%, 99.9%, ...), so the tail gets as much
//!   room as the median. The y axis (one-way latency) is log-scale too, so a single slow outlier
//!   does not flatten the curve.
//! - [`throughput_svg`]: GB/s by message size, both axes log-scale (size in doublings), one line
//!   per family with a marker and the value at each point.
//!
//! Every series is one `<polyline>` (legend samples are `<line>`s), styled by [`style`]: ten
//! colours and four dash patterns, so up to 20 series stay distinguishable. The legend sits right
//! of the plot and the document grows to fit its longest label.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

/// Left margin (y tick labels and axis title).
const LEFT: f64 = 80.0;
/// Top margin (title).
const TOP: f64 = 40.0;
/// Bottom margin (x tick labels and axis title).
const BOTTOM: f64 = 50.0;
/// Plot area (inside the frame), before growing for a long legend.
const PLOT_W: f64 = 570.0;
const PLOT_H: f64 = 370.0;
/// Legend: gap after the frame, sample line length, gap before the text, row height.
const LEGEND_GAP: f64 = 14.0;
const LEGEND_LINE: f64 = 30.0;
const LEGEND_TEXT_GAP: f64 = 6.0;
const LEGEND_ROW: f64 = 18.0;
/// A generous average glyph width of 12 px sans-serif, to size the legend column.
const CHAR_W: f64 = 7.0;
/// Right end of the percentile x axis: 99.9999th percentile.
const X_DECADES: f64 = 6.0;
/// Tableau 10.
const COLORS: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];
/// Solid, dashed, dotted, dash-dot (`stroke-dasharray`).
const DASHES: [&str; 4] = ["", "7 3", "2 2", "9 3 2 3"];
/// Throughput plot: padding left and right of the outermost sizes, in doublings.
const X_PAD_DOUBLINGS: f64 = 1.0;
/// Throughput plot: least vertical distance between two value labels at one size.
const LABEL_GAP: f64 = 13.0;

/// Stroke colour and dash pattern (`""`: solid) of series `i`. The pair is distinct for the
/// first 20 series (colour cycles by 10, dash by 4).
pub fn style(i: usize) -> (&'static str, &'static str) {
    (COLORS[i % COLORS.len()], DASHES[i % DASHES.len()])
}

fn dash_attr(dash: &str) -> String {
    if dash.is_empty() {
        String::new()
    } else {
        format!(r#" stroke-dasharray="{dash}""#)
    }
}

fn x_of(quantile: f64) -> f64 {
    let tail = (1.0 - quantile).max(10f64.powf(-X_DECADES));
    (1.0 / tail).log10().clamp(0.0, X_DECADES)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The layout of one plot: a frame of `pw` x `ph` at (`LEFT`, `TOP`), the legend right of it.
struct Frame {
    w: f64,
    h: f64,
    pw: f64,
    ph: f64,
}

impl Frame {
    /// Sized so that every legend label fits, in width and in height.
    fn new(labels: &[&str]) -> Frame {
        let longest = labels.iter().map(|l| l.chars().count()).max().unwrap_or(0);
        let legend_w = LEGEND_GAP + LEGEND_LINE + LEGEND_TEXT_GAP + longest as f64 * CHAR_W + 16.0;
        let ph = PLOT_H.max(LEGEND_ROW * labels.len() as f64 + 20.0);
        Frame {
            w: (LEFT + PLOT_W + legend_w).ceil(),
            h: TOP + ph + BOTTOM,
            pw: PLOT_W,
            ph,
        }
    }

    /// Opening tag, background, title, frame and axis titles.
    fn open(&self, s: &mut String, title: &str, x_title: &str, y_title: &str) {
        let (w, h, pw, ph) = (self.w, self.h, self.pw, self.ph);
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
            LEFT + pw / 2.0,
            esc(title)
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            LEFT + pw / 2.0,
            h - 10.0,
            esc(x_title)
        );
        let _ = writeln!(
            s,
            r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">{}</text>"#,
            TOP + ph / 2.0,
            TOP + ph / 2.0,
            esc(y_title)
        );
    }

    /// The frame, drawn after the grid so that it is on top.
    fn border(&self, s: &mut String) {
        let _ = writeln!(
            s,
            r##"<rect x="{LEFT}" y="{TOP}" width="{:.1}" height="{:.1}" fill="none" stroke="#444"/>"##,
            self.pw, self.ph
        );
    }

    fn x_grid(&self, s: &mut String, x: f64, label: Option<&str>) {
        let (stroke, bottom) = (
            if label.is_some() { "#ddd" } else { "#f0f0f0" },
            TOP + self.ph,
        );
        let _ = write!(
            s,
            r#"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{bottom:.1}" stroke="{stroke}"/>"#
        );
        if let Some(label) = label {
            let _ = write!(
                s,
                r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                bottom + 18.0,
                esc(label)
            );
        }
        s.push('\n');
    }

    fn y_grid(&self, s: &mut String, y: f64, label: Option<&str>) {
        let (stroke, right) = (
            if label.is_some() { "#ddd" } else { "#f0f0f0" },
            LEFT + self.pw,
        );
        let _ = write!(
            s,
            r#"<line x1="{LEFT}" y1="{y:.1}" x2="{right:.1}" y2="{y:.1}" stroke="{stroke}"/>"#
        );
        if let Some(label) = label {
            let _ = write!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                LEFT - 6.0,
                y + 4.0,
                esc(label)
            );
        }
        s.push('\n');
    }

    /// Legend entry `i`: a sample of the series' stroke, then the label.
    fn legend(&self, s: &mut String, i: usize, label: &str) {
        let (color, dash) = style(i);
        let ly = TOP + 10.0 + LEGEND_ROW * i as f64;
        let lx = LEFT + self.pw + LEGEND_GAP;
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"{}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + LEGEND_LINE,
            dash_attr(dash),
            lx + LEGEND_LINE + LEGEND_TEXT_GAP,
            ly + 4.0,
            esc(label)
        );
    }
}

/// One series' line (the polyline is written even for fewer than two points, so that there is
/// exactly one per series).
fn polyline(s: &mut String, i: usize, pts: &[(f64, f64)]) {
    let (color, dash) = style(i);
    let path: Vec<String> = pts.iter().map(|&(x, y)| format!("{x:.1},{y:.1}")).collect();
    let _ = writeln!(
        s,
        r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" stroke-linejoin="round"{} points="{}"/>"#,
        dash_attr(dash),
        path.join(" ")
    );
}

/// Log-scale decade bounds `(10^floor(log10 lo), 10^ceil(log10 hi))`, at least one decade apart.
fn decades(lo: f64, hi: f64) -> (f64, f64) {
    let a = lo.log10().floor();
    let b = hi.log10().ceil().max(a + 1.0);
    (10f64.powf(a), 10f64.powf(b))
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
    let (y_min, y_max) = decades(lo, hi);
    let labels: Vec<&str> = series.iter().map(|(l, _)| l.as_str()).collect();
    let f = Frame::new(&labels);
    let (pw, ph) = (f.pw, f.ph);
    let px = |x: f64| LEFT + x / X_DECADES * pw;
    let py = |y: f64| TOP + ph - (y.log10() - y_min.log10()) / (y_max.log10() - y_min.log10()) * ph;

    let mut s = String::new();
    f.open(&mut s, title, "percentile", "one-way latency");
    // x grid: one line per decade.
    let x_labels = ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%", "99.9999%"];
    for (i, label) in x_labels.iter().enumerate() {
        f.x_grid(&mut s, px(i as f64), Some(label));
    }
    // y grid: one line per decade.
    let mut y = y_min;
    while y <= y_max * 1.0001 {
        f.y_grid(&mut s, py(y), Some(&fmt_ns_tick(y)));
        y *= 10.0;
    }
    f.border(&mut s);
    for (i, pts) in points.iter().enumerate() {
        let pts: Vec<(f64, f64)> = pts.iter().map(|&(x, y)| (px(x), py(y))).collect();
        polyline(&mut s, i, &pts);
    }
    for (i, label) in labels.iter().enumerate() {
        f.legend(&mut s, i, label);
    }
    s.push_str("</svg>\n");
    s
}

/// A nanosecond tick value in the largest unit it is a whole number of (the ticks are
/// decades): "100 ns", "1 us", "10 ms", "2 s".
fn fmt_ns_tick(ns: f64) -> String {
    let (div, unit) = match ns {
        v if v >= 1e9 => (1e9, "s"),
        v if v >= 1e6 => (1e6, "ms"),
        v if v >= 1e3 => (1e3, "us"),
        _ => (1.0, "ns"),
    };
    format!("{} {unit}", fmt_tick(ns / div))
}

/// "64 B", "4 KiB", "64 KiB", "1 MiB".
fn bytes_label(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

/// A GB/s figure with three significant digits (at least the integer part): "0.0123", "1.23",
/// "12.3", "123".
fn fmt_gbps(v: f64) -> String {
    let decimals = (2.0 - v.abs().log10().floor()).clamp(0.0, 6.0) as usize;
    format!("{v:.decimals$}")
}

/// A log-axis tick value without float noise: "0.01", "0.5", "2", "100".
fn fmt_tick(v: f64) -> String {
    let decimals = (-v.log10().floor()).clamp(0.0, 9.0) as usize;
    format!("{v:.decimals$}")
}

/// Baseline offset of a value label from its marker (labels sit right of the marker): centred
/// on the last point of a line, below where the line leaves rising, above otherwise.
fn label_offset(value: f64, next: Option<f64>) -> f64 {
    match next {
        None => 4.0,
        Some(n) if n > value => 16.0,
        Some(_) => -7.0,
    }
}

/// Moves the label baselines `ys` (one column of labels, in the order of `keys`: their markers'
/// heights) apart to at least [`LABEL_GAP`], then the whole column down below `top` or up
/// above `bottom` if it ran past either. Returns the new positions in the input order.
fn spread_labels(ys: &[f64], keys: &[f64], top: f64, bottom: f64) -> Vec<f64> {
    let mut order: Vec<usize> = (0..ys.len()).collect();
    order.sort_by(|&a, &b| keys[a].total_cmp(&keys[b]));
    let mut out = ys.to_vec();
    for w in 1..order.len() {
        let (prev, cur) = (order[w - 1], order[w]);
        out[cur] = out[cur].max(out[prev] + LABEL_GAP);
    }
    if let (Some(&first), Some(&last)) = (order.first(), order.last()) {
        let shift = if out[first] < top {
            top - out[first]
        } else {
            (bottom - out[last]).min(0.0)
        };
        for y in &mut out {
            *y += shift;
        }
    }
    out
}

/// An SVG document plotting throughput by message size: each `(label, points)` is one line
/// through `(size in bytes, GB/s)` points, with a marker and the value at each point. Both axes
/// are log-scale; the x axis is labelled at every size that occurs. Points that cannot go on a
/// log axis (zero, negative, not finite) are left out.
pub fn throughput_svg(title: &str, series: &[(String, Vec<(usize, f64)>)]) -> String {
    let points: Vec<Vec<(usize, f64)>> = series
        .iter()
        .map(|(_, pts)| {
            let mut v: Vec<(usize, f64)> = pts
                .iter()
                .copied()
                .filter(|&(b, g)| b > 0 && g.is_finite() && g > 0.0)
                .collect();
            v.sort_by_key(|&(b, _)| b);
            v
        })
        .collect();
    let mut sizes: Vec<usize> = points.iter().flatten().map(|&(b, _)| b).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let log2 = |b: usize| (b as f64).log2();
    let (x_lo, x_hi) = match (sizes.first(), sizes.last()) {
        (Some(&a), Some(&b)) => (log2(a), log2(b)),
        _ => (6.0, 16.0),
    };
    let (x_min, x_max) = (x_lo - X_PAD_DOUBLINGS, x_hi + X_PAD_DOUBLINGS);
    let values = points.iter().flatten().map(|&(_, g)| g);
    let lo = values.clone().fold(f64::INFINITY, f64::min);
    let hi = values.fold(f64::NEG_INFINITY, f64::max);
    let (y_min, y_max) = if lo.is_finite() {
        decades(lo, hi)
    } else {
        (0.1, 10.0)
    };
    let labels: Vec<&str> = series.iter().map(|(l, _)| l.as_str()).collect();
    let f = Frame::new(&labels);
    let (pw, ph) = (f.pw, f.ph);
    let px = |b: usize| LEFT + (log2(b) - x_min) / (x_max - x_min) * pw;
    let py = |g: f64| TOP + ph - (g.log10() - y_min.log10()) / (y_max.log10() - y_min.log10()) * ph;

    let mut s = String::new();
    f.open(&mut s, title, "message size", "GB/s");
    // x grid: a faint line per doubling, a labelled one per size that occurs.
    for k in (x_min.ceil() as u32)..=(x_max.floor() as u32) {
        let b = 1usize << k;
        if !sizes.contains(&b) {
            f.x_grid(&mut s, px(b), None);
        }
    }
    for &b in &sizes {
        f.x_grid(&mut s, px(b), Some(&bytes_label(b)));
    }
    // y grid: labelled decades; over at most two decades also 2x and 5x, labelled.
    let few = y_max / y_min <= 100.0 * 1.0001;
    let mut d = y_min;
    while d <= y_max * 1.0001 {
        f.y_grid(&mut s, py(d), Some(&fmt_tick(d)));
        for m in [2.0, 5.0] {
            let v = d * m;
            if v < y_max {
                f.y_grid(&mut s, py(v), few.then(|| fmt_tick(v)).as_deref());
            }
        }
        d *= 10.0;
    }
    f.border(&mut s);
    for (i, pts) in points.iter().enumerate() {
        let line: Vec<(f64, f64)> = pts.iter().map(|&(b, g)| (px(b), py(g))).collect();
        polyline(&mut s, i, &line);
    }
    // Markers, then the value labels, spread apart within each size's column.
    for (i, pts) in points.iter().enumerate() {
        let (color, _) = style(i);
        for &(b, g) in pts {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{color}" stroke="white" stroke-width="1"/>"#,
                px(b),
                py(g)
            );
        }
    }
    for &b in &sizes {
        // Labels of a line's first point go left of the marker (nothing comes in from there),
        // the others right, off the line that leaves them (see `label_offset`).
        // (series, value, label left, baseline offset)
        let column: Vec<(usize, f64, bool, f64)> = points
            .iter()
            .enumerate()
            .filter_map(|(i, pts)| {
                let j = pts.iter().position(|p| p.0 == b)?;
                let (g, next) = (pts[j].1, pts.get(j + 1).map(|p| p.1));
                Some(if j == 0 && next.is_some() {
                    (i, g, true, 4.0)
                } else {
                    (i, g, false, label_offset(g, next))
                })
            })
            .collect();
        for left in [true, false] {
            let side: Vec<&(usize, f64, bool, f64)> =
                column.iter().filter(|c| c.2 == left).collect();
            let ys: Vec<f64> = side.iter().map(|c| py(c.1) + c.3).collect();
            let keys: Vec<f64> = side.iter().map(|c| py(c.1)).collect();
            let ys = spread_labels(&ys, &keys, TOP + 12.0, TOP + ph - 2.0);
            let (x, anchor) = if left {
                (px(b) - 7.0, "end")
            } else {
                (px(b) + 7.0, "start")
            };
            for (&&(i, g, _, _), y) in side.iter().zip(ys) {
                let _ = writeln!(
                    s,
                    r#"<text x="{x:.1}" y="{y:.1}" text-anchor="{anchor}" fill="{}" stroke="white" stroke-width="3" paint-order="stroke">{}</text>"#,
                    style(i).0,
                    fmt_gbps(g)
                );
            }
        }
    }
    for (i, label) in labels.iter().enumerate() {
        f.legend(&mut s, i, label);
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `(x, y)` points of every polyline of `svg`, in order.
    fn polylines(svg: &str) -> Vec<Vec<(f64, f64)>> {
        svg.split("<polyline")
            .skip(1)
            .map(|p| {
                let pts = p
                    .split("points=\"")
                    .nth(1)
                    .unwrap()
                    .split('"')
                    .next()
                    .unwrap();
                pts.split_whitespace()
                    .map(|xy| {
                        let (x, y) = xy.split_once(',').unwrap();
                        (x.parse().unwrap(), y.parse().unwrap())
                    })
                    .collect()
            })
            .collect()
    }

    /// The value of the first `name="..."` attribute of the root element.
    fn root_attr(svg: &str, name: &str) -> f64 {
        let head = svg.split('>').next().unwrap();
        head.split(&format!(" {name}=\""))
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

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

    #[test]
    fn styles_stay_distinct_past_six_series() {
        let styles: Vec<_> = (0..20).map(style).collect();
        for (i, a) in styles.iter().enumerate() {
            for b in &styles[i + 1..] {
                assert_ne!(a, b, "series {i} shares its style");
            }
        }
        // The first ten differ in colour alone, so nothing relies on dashes up to there.
        let colors: std::collections::HashSet<_> = styles[..10].iter().map(|s| s.0).collect();
        assert_eq!(colors.len(), 10);
    }

    #[test]
    fn many_series_get_distinct_strokes_and_a_legend_that_fits() {
        let hs: Vec<Histogram<u64>> = (0..8u64)
            .map(|i| {
                let mut h = crate::measure::new_histogram();
                for v in 0..1_000 {
                    h.record(100 * (i + 1) + v % 50).unwrap();
                }
                h
            })
            .collect();
        let long = "membus-client-pingpong-64k-with-a-long-name";
        let series: Vec<(String, &Histogram<u64>)> = hs
            .iter()
            .enumerate()
            .map(|(i, h)| {
                (
                    if i == 3 {
                        long.to_owned()
                    } else {
                        format!("s{i}")
                    },
                    h,
                )
            })
            .collect();
        let svg = percentile_svg("many", &series);
        assert_eq!(svg.matches("<polyline").count(), 8);
        let strokes: std::collections::HashSet<&str> = svg
            .split("<polyline")
            .skip(1)
            .map(|p| p.split(" points=").next().unwrap())
            .collect();
        assert_eq!(strokes.len(), 8, "every curve styled differently");
        // The longest label, at a generous glyph width, ends inside the document.
        let w = root_attr(&svg, "width");
        let text_x = LEFT + PLOT_W + LEGEND_GAP + LEGEND_LINE + LEGEND_TEXT_GAP;
        assert!(
            text_x + long.len() as f64 * CHAR_W <= w,
            "legend clipped at {w}"
        );
        // 25 series: the legend is taller than the default plot, so the plot grows.
        let many: Vec<(String, &Histogram<u64>)> =
            (0..25).map(|i| (format!("s{i}"), &hs[i % 8])).collect();
        let svg = percentile_svg("more", &many);
        let h = root_attr(&svg, "height");
        assert!(
            TOP + 10.0 + LEGEND_ROW * 24.0 + 4.0 <= h - BOTTOM,
            "legend past the frame"
        );
    }

    #[test]
    fn throughput_points_on_log_axes() {
        let series = vec![
            ("a".to_owned(), vec![(4096, 10.0), (64, 1.0), (65536, 20.0)]),
            ("b & c".to_owned(), vec![(64, 0.01)]),
            ("zero dropped".to_owned(), vec![(64, 0.0), (4096, 2.0)]),
        ];
        let svg = throughput_svg("t", &series);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("b &amp; c"));
        let lines = polylines(&svg);
        assert_eq!(
            lines.len(),
            3,
            "one polyline per series, even with one point"
        );
        assert_eq!([lines[0].len(), lines[1].len(), lines[2].len()], [3, 1, 1]);
        assert_eq!(svg.matches("<circle").count(), 5, "a marker per point");
        // Sorted by size; 64 B -> 4 KiB is six doublings, 4 KiB -> 64 KiB four.
        let a = &lines[0];
        let (d1, d2) = (a[1].0 - a[0].0, a[2].0 - a[1].0);
        assert!(d1 > 0.0 && d2 > 0.0);
        assert!((d1 / d2 - 1.5).abs() < 0.01, "log2 x spacing: {d1} {d2}");
        // Up is faster, one decade (1 -> 10 GB/s) as tall as 0.01 -> 0.1 would be: log y.
        assert!(a[1].1 < a[0].1 && a[2].1 < a[1].1);
        let decade = a[0].1 - a[1].1;
        let b = lines[1][0];
        assert!(
            (b.1 - a[0].1 - 2.0 * decade).abs() < 0.2,
            "log y: {b:?} {a:?}"
        );
        for label in [
            "64 B", "4 KiB", "64 KiB", ">0.01<", ">1.00<", ">20.0<", ">0.0100<",
        ] {
            assert!(svg.contains(label), "{label} missing");
        }
    }

    #[test]
    fn throughput_with_nothing_is_still_a_document() {
        let svg = throughput_svg("empty", &[("a".to_owned(), vec![])]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }

    #[test]
    fn labels_in_a_column_do_not_overlap() {
        let ys = [100.0, 101.0, 50.0, 102.0];
        let out = spread_labels(&ys, &ys, 0.0, 1000.0);
        let mut sorted = out.clone();
        sorted.sort_by(f64::total_cmp);
        for w in sorted.windows(2) {
            assert!(w[1] - w[0] >= LABEL_GAP - 1e-9, "{out:?}");
        }
        assert_eq!(out[2], 50.0, "a label far from the others stays put");
        assert_eq!(out[0], 100.0);
        // Order kept: 100 above 101 above 102.
        assert!(out[0] < out[1] && out[1] < out[3]);
        // Ordered by the markers, not by where the labels wanted to go.
        let out = spread_labels(&[116.0, 112.0], &[100.0, 108.0], 0.0, 1000.0);
        assert!(out[1] - out[0] >= LABEL_GAP - 1e-9, "{out:?}");
        // Pushed past the bottom: the column moves back up; past the top: down.
        let out = spread_labels(&[200.0, 200.0], &[0.0, 1.0], 0.0, 205.0);
        assert!(out.iter().all(|&y| y <= 205.0) && (out[1] - out[0] - LABEL_GAP).abs() < 1e-9);
        let out = spread_labels(&[5.0, 40.0], &[5.0, 40.0], 12.0, 205.0);
        assert_eq!(out, vec![12.0, 47.0]);
    }

    #[test]
    fn value_labels_keep_off_the_line() {
        // Last point: centred; rising: below (larger y); flat or falling: above.
        assert_eq!(label_offset(1.0, None), 4.0);
        assert!(label_offset(1.0, Some(2.0)) > 10.0);
        assert!(label_offset(1.0, Some(1.0)) < 0.0);
        assert!(label_offset(2.0, Some(1.0)) < 0.0);
        let svg = throughput_svg(
            "t",
            &[("a".to_owned(), vec![(64, 2.0), (4096, 3.0), (65536, 5.0)])],
        );
        // The `<text ...>` tag of the label `text`.
        let tag_of = |text: &str| -> String {
            let before = svg.split(&format!(">{text}</text>")).next().unwrap();
            before.rsplit("<text").next().unwrap().to_owned()
        };
        let attr = |tag: &str, name: &str| -> String {
            let v = tag.split(&format!(" {name}=\"")).nth(1).unwrap();
            v.split('"').next().unwrap().to_owned()
        };
        let y_of = |text: &str| -> f64 { attr(&tag_of(text), "y").parse().unwrap() };
        let x_of = |text: &str| -> f64 { attr(&tag_of(text), "x").parse().unwrap() };
        let line = &polylines(&svg)[0];
        // First point: left of the marker, centred.
        assert_eq!(attr(&tag_of("2.00"), "text-anchor"), "end");
        assert!(x_of("2.00") < line[0].0);
        assert!((y_of("2.00") - line[0].1 - 4.0).abs() < 0.1);
        // Middle, rising: right and below.
        assert!(x_of("3.00") > line[1].0);
        assert!(
            y_of("3.00") > line[1].1 + 10.0,
            "rising: label below the marker"
        );
        // Last: right, centred.
        assert_eq!(attr(&tag_of("5.00"), "text-anchor"), "start");
        assert!(
            (y_of("5.00") - line[2].1 - 4.0).abs() < 0.1,
            "last: centred"
        );
    }

    #[test]
    fn number_formats() {
        assert_eq!(fmt_gbps(0.01234), "0.0123");
        assert_eq!(fmt_gbps(1.234), "1.23");
        assert_eq!(fmt_gbps(12.34), "12.3");
        assert_eq!(fmt_gbps(123.4), "123");
        assert_eq!(fmt_tick(0.01), "0.01");
        assert_eq!(fmt_tick(0.5), "0.5");
        assert_eq!(fmt_tick(100.0), "100");
        assert_eq!(fmt_ns_tick(100.0), "100 ns");
        assert_eq!(fmt_ns_tick(1_000.0), "1 us");
        assert_eq!(fmt_ns_tick(100_000_000.0), "100 ms");
        assert_eq!(fmt_ns_tick(1e10), "10 s");
        assert_eq!(bytes_label(65536), "64 KiB");
        assert_eq!(bytes_label(1 << 20), "1 MiB");
    }
}
