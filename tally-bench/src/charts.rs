//! SVG charts drawn with plotters: requests/s per variant with min–max whiskers, and the
//! flush-interval curve.

use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;

use crate::report::Summary;
use crate::suite::RunRecord;

fn colour(variant: &str) -> RGBColor {
    if variant.starts_with("noop") {
        RGBColor(150, 150, 150)
    } else if variant.starts_with("sync") {
        RGBColor(214, 96, 77)
    } else if variant.ends_with("sqlite") {
        RGBColor(67, 147, 195)
    } else {
        RGBColor(90, 174, 97)
    }
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("cannot draw the chart: {e:?}")
}

/// One panel per workload: horizontal bars (mean) with min–max whiskers.
pub fn throughput(path: &Path, panels: &[(String, Vec<Summary>)]) -> anyhow::Result<()> {
    let rows: usize = panels.iter().map(|(_, s)| s.len() + 2).sum();
    let height = u32::try_from(rows * 34 + 40).unwrap_or(900);
    let root = SVGBackend::new(path, (960, height)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let weights: Vec<u32> = panels
        .iter()
        .map(|(_, s)| u32::try_from(s.len() + 2).unwrap_or(1) * 34)
        .collect();
    let mut area = root.clone();
    for ((title, data), h) in panels.iter().zip(weights) {
        let (panel, rest) = area.split_vertically(h);
        area = rest;
        let batch = title.starts_with("batch");
        let value = |s: &Summary| if batch { s.items } else { s.rps };
        let n = data.len();
        let xmax = data.iter().map(|s| value(s).max).fold(1.0f64, f64::max) * 1.18;
        // First variant on top: row i is drawn at y = n - 1 - i.
        let names: Vec<String> = data.iter().rev().map(|s| s.variant.clone()).collect();
        let mut chart = ChartBuilder::on(&panel)
            .caption(title, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(190)
            .build_cartesian_2d(0f64..xmax, -0.5f64..(n as f64 - 0.5))
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(n + 1)
            .y_label_formatter(&|y: &f64| {
                let r = y.round();
                if (y - r).abs() < 1e-6 && r >= 0.0 {
                    names.get(r as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .x_label_formatter(&|x: &f64| {
                if *x >= 1e6 {
                    format!("{:.1}M", x / 1e6)
                } else {
                    format!("{:.0}k", x / 1e3)
                }
            })
            .x_desc(if batch {
                "increments/s (mean of runs; whiskers: min–max)"
            } else {
                "requests/s (mean of runs; whiskers: min–max)"
            })
            .draw()
            .map_err(err)?;
        chart
            .draw_series(data.iter().enumerate().map(|(i, s)| {
                let y = (n - 1 - i) as f64;
                Rectangle::new(
                    [(0.0, y - 0.32), (value(s).mean, y + 0.32)],
                    colour(&s.variant).filled(),
                )
            }))
            .map_err(err)?;
        for (i, s) in data.iter().enumerate() {
            let y = (n - 1 - i) as f64;
            let v = value(s);
            let style = BLACK.stroke_width(2);
            chart
                .draw_series([
                    PathElement::new(vec![(v.min, y), (v.max, y)], style),
                    PathElement::new(vec![(v.min, y - 0.15), (v.min, y + 0.15)], style),
                    PathElement::new(vec![(v.max, y - 0.15), (v.max, y + 0.15)], style),
                ])
                .map_err(err)?;
            chart
                .draw_series([Text::new(
                    format!("{:.0}", v.mean),
                    (v.max + xmax * 0.01, y + 0.1),
                    ("sans-serif", 12),
                )])
                .map_err(err)?;
        }
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Throughput, PostgreSQL CPU and flush lag against the flush interval.
pub fn curve(path: &Path, points: &[RunRecord]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1200, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let panels = root.split_evenly((1, 3));
    let xs: Vec<f64> = points
        .iter()
        .map(|p| p.flush_interval_s.unwrap_or(0.0))
        .collect();
    let xmax = xs.iter().copied().fold(1.0, f64::max) * 1.1;
    let series: [(&str, &str, Vec<f64>); 3] = [
        (
            "throughput (req/s)",
            "req/s",
            points.iter().map(|p| p.requests_per_s).collect(),
        ),
        (
            "PostgreSQL backend CPU (cores busy)",
            "cores",
            points
                .iter()
                .map(|p| p.pg_cpu_per_s.unwrap_or(0.0))
                .collect(),
        ),
        (
            "flush lag: max commit gap (s); dashed = interval + 1 s",
            "seconds",
            points
                .iter()
                .map(|p| {
                    p.commit_gap_max_s
                        .unwrap_or(0.0)
                        .max(p.flush_lag_max_s.unwrap_or(0.0))
                })
                .collect(),
        ),
    ];
    for (panel, (title, unit, ys)) in panels.iter().zip(series.iter()) {
        let mut ymax = ys.iter().copied().fold(0.0f64, f64::max) * 1.2;
        if unit == &"seconds" {
            ymax = ymax.max(xmax + 1.0);
        }
        let ymax = if ymax <= 0.0 { 1.0 } else { ymax };
        let mut chart = ChartBuilder::on(panel)
            .caption(*title, ("sans-serif", 14))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..xmax, 0f64..ymax)
            .map_err(err)?;
        let per_s = unit == &"req/s";
        let cores = unit == &"cores";
        chart
            .configure_mesh()
            .x_desc("flush interval (s)")
            .y_desc(*unit)
            .y_label_formatter(&|y: &f64| {
                if per_s {
                    format!("{:.0}k", y / 1e3)
                } else if cores {
                    format!("{y:.2}")
                } else {
                    format!("{y:.1}")
                }
            })
            .draw()
            .map_err(err)?;
        let data: Vec<(f64, f64)> = xs.iter().copied().zip(ys.iter().copied()).collect();
        let green = RGBColor(90, 174, 97);
        chart
            .draw_series(LineSeries::new(data.clone(), green.stroke_width(2)))
            .map_err(err)?;
        chart
            .draw_series(data.iter().map(|&p| Circle::new(p, 4, green.filled())))
            .map_err(err)?;
        if unit == &"seconds" {
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(0.0, 1.0), (xmax, xmax + 1.0)],
                    6,
                    4,
                    BLACK.stroke_width(1),
                ))
                .map_err(err)?;
        }
    }
    root.present().map_err(err)?;
    Ok(())
}
