//! The figure of `infonce sweep --plot`, drawn with `plotters` (PNG or SVG).
//!
//! Text uses DejaVu Sans embedded in the binary (assets/fonts, Bitstream Vera licence) and
//! registered with `plotters::style::register_font`, so no system font is needed (plotters' `ttf`
//! feature, which looks fonts up through font-kit, is off).

use super::Report;
use fused_infonce::{Error, Result, Temperature};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

const FONT: &str = "sans-serif";
/// "DySTreSS" as drawn: plotters' ab_glyph text drops each glyph's left bearing, so the
/// negative T–r kerning pulls the "r" under the "T"; a hair space (U+200A) between them
/// keeps the word readable.
const DYSTRESS: &str = "DyST\u{200A}reSS";
static DEJAVU_SANS: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/assets/fonts/DejaVuSans.ttf"
));

/// Registers the embedded font once; an error (never a panic) if it cannot be parsed.
fn register_font() -> Result<()> {
    static RESULT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *RESULT.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, DEJAVU_SANS).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(Error::Input(
            "plot: the embedded font could not be loaded".into(),
        ))
    }
}

/// The image format, from the file extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A PNG bitmap.
    Png,
    /// An SVG drawing.
    Svg,
}

impl Format {
    /// `.png` or `.svg` (case-insensitive); anything else is an error.
    pub fn from_path(p: &Path) -> Result<Self> {
        match p
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref()
        {
            Some("png") => Ok(Format::Png),
            Some("svg") => Ok(Format::Svg),
            _ => Err(Error::parameter(
                "--plot",
                p.display(),
                "the file name must end in .png or .svg",
            )),
        }
    }
}

/// One curve of the penalty histogram.
pub struct Curve {
    label: String,
    color: RGBColor,
    dystress: bool,
    x_tau: f64,
    mass: Vec<f64>,
}

/// One temperature's trained metrics.
pub struct TrainPoint {
    x_tau: f64,
    dystress: bool,
    label: String,
    color: RGBColor,
    uniformity: f64,
    tolerance: f64,
    knn: f64,
}

/// Everything the figure shows.
pub struct Figure {
    title: String,
    centers: Vec<f64>,
    curves: Vec<Curve>,
    train: Option<(String, Vec<TrainPoint>)>,
}

fn color_for(t: &Temperature, fixed: &[f64], dystress_index: usize) -> RGBColor {
    match *t {
        Temperature::Fixed(x) | Temperature::Learnable(x) => {
            let (lo, hi) = fixed
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
                    (a.min(v), b.max(v))
                });
            let f = if hi > lo {
                (x.ln() - lo.ln()) / (hi.ln() - lo.ln())
            } else {
                0.0
            };
            // Low τ violet-blue, high τ red.
            let h = 0.72 * (1.0 - f);
            let c = HSLColor(h, 0.85, 0.45).to_rgba();
            RGBColor(c.0, c.1, c.2)
        }
        Temperature::Dystress { .. } => {
            const D: [RGBColor; 4] = [
                RGBColor(0, 0, 0),
                RGBColor(110, 110, 110),
                RGBColor(0, 110, 60),
                RGBColor(150, 90, 0),
            ];
            D[dystress_index % D.len()]
        }
    }
}

fn x_tau(t: &Temperature) -> f64 {
    match *t {
        Temperature::Fixed(x) | Temperature::Learnable(x) => x,
        Temperature::Dystress {
            tau_min, tau_max, ..
        } => (tau_min * tau_max).sqrt(),
    }
}

impl Figure {
    /// The figure of a sweep report; `temps` in the report's order.
    pub fn from_report(report: &Report, temps: &[Temperature]) -> Self {
        let fixed: Vec<f64> = temps
            .iter()
            .filter_map(|t| match *t {
                Temperature::Fixed(x) | Temperature::Learnable(x) => Some(x),
                _ => None,
            })
            .collect();
        let mut d = 0;
        let colors: Vec<RGBColor> = temps
            .iter()
            .map(|t| {
                let c = color_for(t, &fixed, d);
                if matches!(t, Temperature::Dystress { .. }) {
                    d += 1;
                }
                c
            })
            .collect();
        let label = |t: &Temperature| match *t {
            Temperature::Dystress {
                tau_min, tau_max, ..
            } => format!("{DYSTRESS} τ(s) ∈ [{tau_min}, {tau_max}]"),
            Temperature::Fixed(x) | Temperature::Learnable(x) => format!("τ = {x}"),
        };
        let centers = report
            .bin_edges
            .windows(2)
            .map(|w| 0.5 * (w[0] + w[1]))
            .collect();
        let curves = report
            .temperatures
            .iter()
            .zip(temps)
            .zip(&colors)
            .map(|((r, t), c)| Curve {
                label: label(t),
                color: *c,
                dystress: matches!(t, Temperature::Dystress { .. }),
                x_tau: x_tau(t),
                mass: r.histogram.clone(),
            })
            .collect();
        let train = report.train.as_ref().map(|tr| {
            let pts = tr
                .results
                .iter()
                .zip(temps)
                .zip(&colors)
                .map(|((r, t), c)| TrainPoint {
                    x_tau: x_tau(t),
                    dystress: matches!(t, Temperature::Dystress { .. }),
                    label: label(t),
                    color: *c,
                    uniformity: r.result.after.uniformity,
                    tolerance: r.result.after.tolerance,
                    knn: r.result.after.knn_accuracy,
                })
                .collect();
            (
                format!(
                    "trained linear encoder {}→{}, {} steps",
                    fused_infonce::train::TrainConfig::default().data.dim,
                    tr.out_dim,
                    tr.steps
                ),
                pts,
            )
        });
        Figure {
            title: format!("infonce sweep: {}", report.data),
            centers,
            curves,
            train,
        }
    }
}

/// Draws `fig` to `path`. Errors (never panics) on a drawing or file error.
pub fn draw(fig: &Figure, path: &Path, format: Format) -> Result<()> {
    register_font()?;
    let size = if fig.train.is_some() {
        (1500, 900)
    } else {
        (1000, 650)
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match format {
        Format::Png => {
            let root = BitMapBackend::new(path, size).into_drawing_area();
            draw_on(fig, &root).and_then(|_| root.present().map_err(|e| e.to_string()))
        }
        Format::Svg => {
            let root = SVGBackend::new(path, size).into_drawing_area();
            draw_on(fig, &root).and_then(|_| root.present().map_err(|e| e.to_string()))
        }
    }));
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::Input(format!(
            "plot: cannot draw {}: {e}",
            path.display()
        ))),
        Err(_) => Err(Error::Input(format!(
            "plot: the plotting library failed while drawing {}",
            path.display()
        ))),
    }
}

type DrawResult = std::result::Result<(), String>;

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

fn draw_on<DB: DrawingBackend>(fig: &Figure, root: &DrawingArea<DB, Shift>) -> DrawResult {
    root.fill(&WHITE).map_err(err)?;
    let body = root
        .titled(&fig.title, (FONT, 26).into_font().color(&BLACK))
        .map_err(err)?;
    match &fig.train {
        None => histogram(fig, &body),
        Some((subtitle, pts)) => {
            let w = body.dim_in_pixel().0;
            let (left, right) = body.split_horizontally((w as f64 * 0.56) as u32);
            histogram(fig, &left)?;
            let right = right
                .titled(subtitle, (FONT, 18).into_font().color(&BLACK))
                .map_err(err)?;
            let areas = right.split_evenly((3, 1));
            against_tau(
                &areas[0],
                pts,
                "uniformity (lower = more uniform)",
                |p| p.uniformity,
                false,
            )?;
            against_tau(
                &areas[1],
                pts,
                "tolerance (mean same-label similarity)",
                |p| p.tolerance,
                false,
            )?;
            against_tau(&areas[2], pts, "k-NN accuracy (k = 5)", |p| p.knn, true)
        }
    }
}

fn histogram<DB: DrawingBackend>(fig: &Figure, area: &DrawingArea<DB, Shift>) -> DrawResult {
    let ymax = fig
        .curves
        .iter()
        .flat_map(|c| c.mass.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    let ymax = if ymax > 0.0 { ymax * 1.08 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(
            "penalty histogram: where the negatives' gradient goes",
            (FONT, 20),
        )
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(-1.0f64..1.0f64, 0.0f64..ymax)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("similarity s of a negative to its anchor")
        .y_desc("share of the negatives' gradient, H_b")
        .axis_desc_style((FONT, 16))
        .label_style((FONT, 14))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(err)?;
    let mut curves: Vec<&Curve> = fig.curves.iter().collect();
    curves.sort_by(|a, b| {
        a.dystress
            .cmp(&b.dystress)
            .then(a.x_tau.total_cmp(&b.x_tau))
    });
    for c in curves {
        let color = c.color;
        let pts: Vec<(f64, f64)> = fig
            .centers
            .iter()
            .copied()
            .zip(c.mass.iter().copied())
            .collect();
        let width = if c.dystress { 3 } else { 2 };
        if c.dystress {
            chart
                .draw_series(DashedLineSeries::new(
                    pts.clone(),
                    8,
                    5,
                    color.stroke_width(width),
                ))
                .map_err(err)?
                .label(c.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
                });
        } else {
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(width)))
                .map_err(err)?
                .label(c.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
                });
        }
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    Ok(())
}

fn against_tau<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    pts: &[TrainPoint],
    what: &str,
    value: impl Fn(&TrainPoint) -> f64,
    legend: bool,
) -> DrawResult {
    let finite: Vec<&TrainPoint> = pts
        .iter()
        .filter(|p| value(p).is_finite() && p.x_tau.is_finite() && p.x_tau > 0.0)
        .collect();
    let (xlo, xhi) = finite.iter().fold((f64::INFINITY, 0.0f64), |(a, b), p| {
        (a.min(p.x_tau), b.max(p.x_tau))
    });
    let (xlo, xhi) = if finite.is_empty() {
        (0.01, 1.0)
    } else {
        (xlo / 1.3, xhi * 1.3)
    };
    let (ylo, yhi) = finite
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(value(p)), b.max(value(p)))
        });
    let (ylo, yhi) = if finite.is_empty() {
        (0.0, 1.0)
    } else {
        let pad = ((yhi - ylo) * 0.12).max(1e-3);
        (ylo - pad, yhi + pad)
    };
    // Ticks at the swept temperatures (fixed ones; all of them when there are none).
    let mut ticks: Vec<f64> = finite
        .iter()
        .filter(|p| !p.dystress || finite.iter().all(|q| q.dystress))
        .map(|p| p.x_tau)
        .collect();
    ticks.sort_by(f64::total_cmp);
    ticks.dedup();
    let digits = if yhi - ylo < 0.05 { 3 } else { 2 };
    let mut chart = ChartBuilder::on(area)
        .margin(8)
        .x_label_area_size(38)
        .y_label_area_size(65)
        .build_cartesian_2d((xlo..xhi).log_scale().with_key_points(ticks), ylo..yhi)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(format!(
            "temperature τ (log scale; {DYSTRESS} at √(τmin·τmax))"
        ))
        .y_desc(what)
        .axis_desc_style((FONT, 14))
        .label_style((FONT, 13))
        .x_label_formatter(&|x| format!("{x}"))
        .y_label_formatter(&|y| format!("{y:.digits$}"))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(err)?;
    let mut line: Vec<(f64, f64)> = finite
        .iter()
        .filter(|p| !p.dystress)
        .map(|p| (p.x_tau, value(p)))
        .collect();
    line.sort_by(|a, b| a.0.total_cmp(&b.0));
    chart
        .draw_series(LineSeries::new(line, BLACK.mix(0.5).stroke_width(2)))
        .map_err(err)?;
    for p in &finite {
        let c = p.color;
        let xy = (p.x_tau, value(p));
        if p.dystress {
            let s = chart
                .draw_series(std::iter::once(TriangleMarker::new(xy, 8, c.filled())))
                .map_err(err)?;
            if legend {
                s.label(p.label.clone())
                    .legend(move |(x, y)| TriangleMarker::new((x + 10, y), 6, c.filled()));
            }
        } else {
            chart
                .draw_series(std::iter::once(Circle::new(xy, 5, c.filled())))
                .map_err(err)?;
        }
    }
    if legend && finite.iter().any(|p| p.dystress) {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font((FONT, 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
    }
    Ok(())
}
