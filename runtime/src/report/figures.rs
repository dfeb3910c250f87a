//! The four figures, each drawn once per format (PNG through plotters' bitmap backend, SVG
//! through its SVG backend) at [`FIGURE_SIZE`]:
//! - [`Figure::LatencyCdf`]: the end-to-end latency CDF of every run (a line per level when a
//!   run has several), log-scaled latency;
//! - [`Figure::StageBreakdown`]: a stacked bar per run and level of the mean time in each
//!   stage (client->server, queue, decode, preprocess, infer, reply), runs side by side;
//! - [`Figure::ThroughputP99`]: throughput against p99 latency across the load levels, a line
//!   per run;
//! - [`Figure::CpuPerRequest`]: CPU-seconds per 1000 requests of the load generator (client)
//!   and the server, a pair of bars per run and level.
//!
//! A figure whose data no run has is skipped with the reason, not drawn empty.

use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::folder::{Run, STAGES};
use super::font::FAMILY;
use super::ReportError;

/// Every figure's size in pixels (PNG) and user units (SVG).
pub const FIGURE_SIZE: (u32, u32) = (1200, 800);

/// Points per CDF line at most (quantiles evenly spaced in rank), to keep SVGs small.
const CDF_POINTS: usize = 400;

/// Series colours (Okabe-Ito, distinguishable with colour-blindness).
const COLORS: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(230, 159, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
    RGBColor(213, 94, 0),
    RGBColor(120, 120, 120),
    RGBColor(0, 0, 0),
];

fn color(i: usize) -> RGBColor {
    COLORS[i % COLORS.len()]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Png,
    Svg,
}

impl Format {
    pub fn ext(self) -> &'static str {
        match self {
            Format::Png => "png",
            Format::Svg => "svg",
        }
    }

    /// `png,svg` (either or both, any order).
    pub fn parse_list(s: &str) -> Result<Vec<Format>, ReportError> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let f = match part {
                "png" => Format::Png,
                "svg" => Format::Svg,
                other => {
                    return Err(ReportError::Usage(format!(
                        "--format takes png, svg or png,svg, not {other:?}"
                    )))
                }
            };
            if !out.contains(&f) {
                out.push(f);
            }
        }
        if out.is_empty() {
            return Err(ReportError::Usage("--format names no format".into()));
        }
        Ok(out)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Figure {
    LatencyCdf,
    StageBreakdown,
    ThroughputP99,
    CpuPerRequest,
}

impl Figure {
    pub const ALL: [Figure; 4] = [
        Figure::LatencyCdf,
        Figure::StageBreakdown,
        Figure::ThroughputP99,
        Figure::CpuPerRequest,
    ];

    /// The files' name without extension.
    pub fn stem(self) -> &'static str {
        match self {
            Figure::LatencyCdf => "latency_cdf",
            Figure::StageBreakdown => "stage_breakdown",
            Figure::ThroughputP99 => "throughput_p99",
            Figure::CpuPerRequest => "cpu_per_request",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Figure::LatencyCdf => "End-to-end latency CDF",
            Figure::StageBreakdown => "Per-stage latency breakdown (mean)",
            Figure::ThroughputP99 => "Throughput vs p99 latency",
            Figure::CpuPerRequest => "CPU-seconds per request",
        }
    }

    /// Why it is skipped when no run has its data.
    fn absent(self) -> &'static str {
        match self {
            Figure::LatencyCdf => "no folder has per-request rows (requests.csv or client_*.csv with successful requests)",
            Figure::StageBreakdown => "no folder has per-stage times (load_summary.csv, requests.csv or client_*.csv)",
            Figure::ThroughputP99 => "no folder has throughput and p99 per load level (load_summary.csv or multi_client_summary.csv)",
            Figure::CpuPerRequest => "no folder has CPU-seconds per request (load_summary.csv's cpu columns, or a server's resources.csv with run.json's finished_requests)",
        }
    }
}

/// What happened to one figure.
#[derive(Debug, Clone)]
pub enum Outcome {
    Drawn {
        figure: Figure,
        files: Vec<PathBuf>,
        /// Lines or bars drawn.
        series: usize,
    },
    Skipped {
        figure: Figure,
        reason: &'static str,
    },
}

/// One bar (stacked or side by side): its x position, tick label and values.
struct Bar {
    x: f64,
    tick: String,
    values: Vec<Option<f64>>,
}

/// A run of several bars: its first and last bar's x and its label (drawn under the ticks).
type RunSpan = (f64, f64, String);

/// A line through (x, y, point tag) points, and its legend label.
type TaggedLine = (String, Vec<(f64, f64, String)>);

/// A figure's data, ready to draw on any backend.
enum Plot {
    Cdf {
        lines: Vec<(String, Vec<(f64, f64)>)>,
        x: (f64, f64),
    },
    Bars {
        title: &'static str,
        y_desc: &'static str,
        keys: Vec<&'static str>,
        bars: Vec<Bar>,
        runs: Vec<RunSpan>,
        stacked: bool,
    },
    Lines {
        lines: Vec<TaggedLine>,
    },
}

/// A CDF line of sorted latencies: at most [`CDF_POINTS`] (latency, fraction) points.
fn cdf_points(sorted: &[f64]) -> Vec<(f64, f64)> {
    let n = sorted.len();
    if n <= CDF_POINTS {
        return sorted
            .iter()
            .enumerate()
            .map(|(i, &v)| (v, (i + 1) as f64 / n as f64))
            .collect();
    }
    (1..=CDF_POINTS)
        .map(|k| {
            let rank = (k * n).div_ceil(CDF_POINTS);
            (sorted[rank - 1], rank as f64 / n as f64)
        })
        .collect()
}

/// Bar positions: runs side by side, a run's levels next to each other, a gap between runs.
/// A run of one bar has its label as the tick; a run of several has its levels' tags as
/// ticks and its label under them.
fn bar_slots<'a>(
    runs: &'a [Run],
    pick: impl Fn(&'a super::Group) -> Option<Vec<Option<f64>>>,
) -> (Vec<Bar>, Vec<RunSpan>) {
    let (mut bars, mut spans) = (Vec::new(), Vec::new());
    let mut x = 0.0;
    for run in runs {
        let picked: Vec<_> = run
            .groups
            .iter()
            .filter_map(|g| Some((g, pick(g)?)))
            .collect();
        if picked.is_empty() {
            continue;
        }
        let first = x;
        let single = picked.len() == 1;
        for (g, values) in picked {
            let tick = if single { run.group_label(g) } else { g.tag() };
            bars.push(Bar { x, tick, values });
            x += 1.0;
        }
        if !single {
            spans.push((first, x - 1.0, run.label.clone()));
        }
        x += 0.5;
    }
    (bars, spans)
}

fn plan(figure: Figure, runs: &[Run]) -> Option<Plot> {
    match figure {
        Figure::LatencyCdf => {
            let mut lines = Vec::new();
            let (mut lo, mut hi) = (f64::INFINITY, 0f64);
            for run in runs {
                for g in run.groups.iter().filter(|g| !g.e2e_us.is_empty()) {
                    lo = lo.min(g.e2e_us[0]);
                    hi = hi.max(g.e2e_us[g.e2e_us.len() - 1]);
                    lines.push((run.group_label(g), cdf_points(&g.e2e_us)));
                }
            }
            if lines.is_empty() {
                return None;
            }
            // Log axis: keep it positive and a little wider than the data.
            let lo = (lo * 0.8).max(0.1);
            let hi = (hi * 1.25).max(lo * 10.0);
            Some(Plot::Cdf { lines, x: (lo, hi) })
        }
        Figure::StageBreakdown => {
            let (bars, runs) = bar_slots(runs, |g| {
                g.stages_us
                    .map(|st| st.iter().map(|&v| Some(v.max(0.0))).collect())
            });
            (!bars.is_empty()).then(|| Plot::Bars {
                title: figure.title(),
                y_desc: "mean time per request (us)",
                keys: STAGES.to_vec(),
                bars,
                runs,
                stacked: true,
            })
        }
        Figure::ThroughputP99 => {
            let lines: Vec<_> = runs
                .iter()
                .filter_map(|run| {
                    let pts: Vec<(f64, f64, String)> = run
                        .groups
                        .iter()
                        .filter_map(|g| Some((g.throughput_rps?, g.p99_us?, g.tag())))
                        .collect();
                    (!pts.is_empty()).then(|| (run.label.clone(), pts))
                })
                .collect();
            (!lines.is_empty()).then_some(Plot::Lines { lines })
        }
        Figure::CpuPerRequest => {
            let (bars, runs) = bar_slots(runs, |g| {
                (g.client_cpu_s_per_1000.is_some() || g.server_cpu_s_per_1000.is_some())
                    .then(|| vec![g.client_cpu_s_per_1000, g.server_cpu_s_per_1000])
            });
            (!bars.is_empty()).then(|| Plot::Bars {
                title: "CPU-seconds per request (per 1000 requests)",
                y_desc: "CPU-seconds per 1000 requests",
                keys: vec!["client (load generator)", "server"],
                bars,
                runs,
                stacked: false,
            })
        }
    }
}

/// A linear x axis whose ticks are exactly the bars' positions (one label per bar).
struct Slots {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Ranged for Slots {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let t = (v - self.lo) / (self.hi - self.lo);
        limit.0 + (f64::from(limit.1 - limit.0) * t).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}

type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

/// Shortens `s` to `max` characters (an ellipsis marks the cut).
fn fit(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// Axis numbers: no needless decimals.
fn num(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

impl Plot {
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
        figure: Figure,
    ) -> DrawResult<DB> {
        root.fill(&WHITE)?;
        match self {
            Plot::Cdf { lines, x } => {
                let mut chart = ChartBuilder::on(root)
                    .caption(figure.title(), (FAMILY, 30))
                    .margin(24)
                    .x_label_area_size(60)
                    .y_label_area_size(80)
                    .build_cartesian_2d((x.0..x.1).log_scale(), 0f64..1.0)?;
                chart
                    .configure_mesh()
                    .x_desc("end-to-end latency (us, log scale)")
                    .y_desc("fraction of requests")
                    .label_style((FAMILY, 16))
                    .axis_desc_style((FAMILY, 20))
                    .x_label_formatter(&|v| num(*v))
                    .draw()?;
                for (i, (label, pts)) in lines.iter().enumerate() {
                    let c = color(i);
                    chart
                        .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(3)))?
                        .label(label.as_str())
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3))
                        });
                }
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::LowerRight)
                    .background_style(WHITE.mix(0.9))
                    .border_style(BLACK)
                    .label_font((FAMILY, 16))
                    .draw()?;
            }
            Plot::Bars {
                title,
                y_desc,
                keys,
                bars,
                runs,
                stacked,
            } => {
                let top = bars
                    .iter()
                    .map(|b| {
                        let v = b.values.iter().map(|v| v.unwrap_or(0.0));
                        if *stacked {
                            v.sum()
                        } else {
                            v.fold(0.0, f64::max)
                        }
                    })
                    .fold(0.0, f64::max);
                // Head room for the legend (upper right) over the tallest bar.
                let top = if top > 0.0 { top * 1.45 } else { 1.0 };
                let last = bars.last().map_or(0.0, |b| b.x);
                let ticks: Vec<f64> = bars.iter().map(|b| b.x).collect();
                // Characters that fit in `units` of x at 14 px (about 7.5 px a character
                // over the ~1060 px plot).
                let room = |units: f64| ((units * 1060.0 / (last + 1.2)) / 7.5) as usize;
                let labels: Vec<(f64, String)> = bars
                    .iter()
                    .map(|b| (b.x, fit(&b.tick, room(1.0).max(6))))
                    .collect();
                let mut chart = ChartBuilder::on(root)
                    .caption(*title, (FAMILY, 30))
                    .margin(24)
                    .x_label_area_size(if runs.is_empty() { 50 } else { 80 })
                    .y_label_area_size(90)
                    .build_cartesian_2d(
                        Slots {
                            lo: -0.6,
                            hi: last + 0.6,
                            ticks,
                        },
                        0f64..top,
                    )?;
                chart
                    .configure_mesh()
                    .disable_x_mesh()
                    .y_desc(*y_desc)
                    .label_style((FAMILY, 16))
                    .x_label_style((FAMILY, 14))
                    .axis_desc_style((FAMILY, 20))
                    .y_label_formatter(&|v| num(*v))
                    .x_label_formatter(&|v| {
                        labels
                            .iter()
                            .find(|(x, _)| (x - v).abs() < 0.01)
                            .map(|(_, l)| l.clone())
                            .unwrap_or_default()
                    })
                    .draw()?;
                let width = if *stacked { 0.7 } else { 0.38 };
                for (k, key) in keys.iter().enumerate() {
                    let c = color(k);
                    let rects = bars.iter().filter_map(|b| {
                        let v = b.values[k]?;
                        let (x0, y0) = if *stacked {
                            let base: f64 = b.values[..k].iter().map(|v| v.unwrap_or(0.0)).sum();
                            (b.x - width / 2.0, base)
                        } else {
                            (b.x - width + k as f64 * width, 0.0)
                        };
                        Some(Rectangle::new([(x0, y0), (x0 + width, y0 + v)], c.filled()))
                    });
                    chart.draw_series(rects)?.label(*key).legend(move |(x, y)| {
                        Rectangle::new([(x, y - 7), (x + 16, y + 7)], c.filled())
                    });
                }
                // A run of several bars: its label centred under their ticks.
                let under = TextStyle::from((FAMILY, 16).into_font())
                    .pos(Pos::new(HPos::Center, VPos::Top));
                for (first, end, label) in runs {
                    let (x0, y) = chart.backend_coord(&((first + end) / 2.0, 0.0));
                    root.draw(&Text::new(
                        fit(label, room(end - first + 1.0).max(6)),
                        (x0, y + 30),
                        under.clone(),
                    ))?;
                }
                // The value above each bar: the stack's total, or each bar's own.
                let style = TextStyle::from((FAMILY, 14).into_font())
                    .pos(Pos::new(HPos::Center, VPos::Bottom));
                for b in bars {
                    if *stacked {
                        let total: f64 = b.values.iter().map(|v| v.unwrap_or(0.0)).sum();
                        chart.draw_series(std::iter::once(Text::new(
                            num(total),
                            (b.x, total),
                            style.clone(),
                        )))?;
                    } else {
                        for (k, v) in b.values.iter().enumerate() {
                            if let Some(v) = v {
                                let x = b.x - width / 2.0 + k as f64 * width;
                                chart.draw_series(std::iter::once(Text::new(
                                    num(*v),
                                    (x, *v),
                                    style.clone(),
                                )))?;
                            }
                        }
                    }
                }
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::UpperRight)
                    .background_style(WHITE.mix(0.9))
                    .border_style(BLACK)
                    .label_font((FAMILY, 16))
                    .draw()?;
            }
            Plot::Lines { lines } => {
                let xmax = lines
                    .iter()
                    .flat_map(|(_, p)| p.iter().map(|p| p.0))
                    .fold(0.0, f64::max);
                let ymax = lines
                    .iter()
                    .flat_map(|(_, p)| p.iter().map(|p| p.1))
                    .fold(0.0, f64::max);
                let xmax = if xmax > 0.0 { xmax * 1.15 } else { 1.0 };
                let ymax = if ymax > 0.0 { ymax * 1.2 } else { 1.0 };
                let mut chart = ChartBuilder::on(root)
                    .caption(figure.title(), (FAMILY, 30))
                    .margin(24)
                    .x_label_area_size(60)
                    .y_label_area_size(90)
                    .build_cartesian_2d(0f64..xmax, 0f64..ymax)?;
                chart
                    .configure_mesh()
                    .x_desc("throughput (requests/s)")
                    .y_desc("p99 latency (us)")
                    .label_style((FAMILY, 16))
                    .axis_desc_style((FAMILY, 20))
                    .x_label_formatter(&|v| num(*v))
                    .y_label_formatter(&|v| num(*v))
                    .draw()?;
                let tag = TextStyle::from((FAMILY, 14).into_font())
                    .pos(Pos::new(HPos::Left, VPos::Bottom));
                for (i, (label, pts)) in lines.iter().enumerate() {
                    let c = color(i);
                    chart
                        .draw_series(LineSeries::new(
                            pts.iter().map(|p| (p.0, p.1)),
                            c.stroke_width(3),
                        ))?
                        .label(label.as_str())
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3))
                        });
                    chart
                        .draw_series(pts.iter().map(|p| Circle::new((p.0, p.1), 5, c.filled())))?;
                    chart.draw_series(
                        pts.iter()
                            .map(|p| Text::new(format!(" {}", p.2), (p.0, p.1), tag.clone())),
                    )?;
                }
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::UpperLeft)
                    .background_style(WHITE.mix(0.9))
                    .border_style(BLACK)
                    .label_font((FAMILY, 16))
                    .draw()?;
            }
        }
        Ok(())
    }

    fn series(&self) -> usize {
        match self {
            Plot::Cdf { lines, .. } => lines.len(),
            Plot::Bars { bars, .. } => bars.len(),
            Plot::Lines { lines } => lines.len(),
        }
    }
}

fn draw_error(file: &Path, e: impl std::fmt::Display) -> ReportError {
    ReportError::Draw {
        file: file.to_path_buf(),
        what: e.to_string(),
    }
}

/// Draws `plot` into `out/<stem>.<ext>` for every format.
fn render(
    plot: &Plot,
    figure: Figure,
    out: &Path,
    formats: &[Format],
) -> Result<Vec<PathBuf>, ReportError> {
    let mut files = Vec::new();
    for f in formats {
        let file = out.join(format!("{}.{}", figure.stem(), f.ext()));
        match f {
            Format::Png => {
                let root = BitMapBackend::new(&file, FIGURE_SIZE).into_drawing_area();
                plot.draw(&root, figure).map_err(|e| draw_error(&file, e))?;
                root.present().map_err(|e| draw_error(&file, e))?;
            }
            Format::Svg => {
                let root = SVGBackend::new(&file, FIGURE_SIZE).into_drawing_area();
                plot.draw(&root, figure).map_err(|e| draw_error(&file, e))?;
                root.present().map_err(|e| draw_error(&file, e))?;
            }
        }
        files.push(file);
    }
    Ok(files)
}

/// Draws every figure some run has data for into `out` (created), in `formats`.
pub fn draw_all(runs: &[Run], out: &Path, formats: &[Format]) -> Result<Vec<Outcome>, ReportError> {
    std::fs::create_dir_all(out).map_err(|source| ReportError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    let mut outcomes = Vec::new();
    for figure in Figure::ALL {
        match plan(figure, runs) {
            Some(plot) => {
                let files = render(&plot, figure, out, formats)?;
                outcomes.push(Outcome::Drawn {
                    figure,
                    files,
                    series: plot.series(),
                });
            }
            None => outcomes.push(Outcome::Skipped {
                figure,
                reason: figure.absent(),
            }),
        }
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdf_points_are_capped_and_end_at_one() {
        let v: Vec<f64> = (1..=10_000).map(f64::from).collect();
        let p = cdf_points(&v);
        assert_eq!(p.len(), CDF_POINTS);
        assert_eq!(p.last(), Some(&(10_000.0, 1.0)));
        assert_eq!(p[0], (25.0, 0.0025));
        assert_eq!(cdf_points(&[3.0, 4.0]), vec![(3.0, 0.5), (4.0, 1.0)]);
    }

    #[test]
    fn formats_and_fitting() {
        assert_eq!(
            Format::parse_list("svg, png,svg").unwrap(),
            vec![Format::Svg, Format::Png]
        );
        assert!(Format::parse_list("jpg").is_err());
        assert!(Format::parse_list("").is_err());
        assert_eq!(fit("abcdef", 4), "abc…");
        assert_eq!(fit("abc", 4), "abc");
    }
}
