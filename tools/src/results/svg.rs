//! `comparison.svg`: bars per metric per implementation (one panel per metric), and a per-pCPU exit heatmap.

use crate::results::metrics::find;
use crate::results::Results;
use anyhow::{anyhow, Result};
use plotters::prelude::{
    ChartBuilder, Color, IntoDrawingArea, IntoFont, IntoLogRange, Palette, Palette99, RGBColor,
    Rectangle, SVGBackend, Text, BLACK, WHITE,
};
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{FontTransform, TextStyle};

/// The metrics drawn as bar panels, in order, when any run reports them.
pub const PICTURED: [&str; 14] = [
    "exits",
    "exits_per_demand_fault",
    "faults_fixed",
    "emulated_writes",
    "shadow_pages_peak",
    "server.shadow_pages_created",
    "server.shadow_pages_freed",
    "zaps",
    "server.flush_obligations",
    "shootdown_ipis",
    "pcpus_flushed",
    "server.flush_cpus",
    "instructions_per_forwarded_exit",
    "instructions_per_server_request",
];

const PANEL_W: u32 = 640;
const PANEL_H: u32 = 320;
const COLUMNS: u32 = 2;

/// The metrics of [`PICTURED`] that some workload of some run reports
/// above 0 (a panel of nothing but zeros says nothing on a log scale).
pub fn pictured(results: &Results) -> Vec<&'static str> {
    PICTURED
        .iter()
        .copied()
        .filter(|k| {
            results
                .runs
                .iter()
                .flat_map(|r| &r.report.workloads)
                .any(|w| w.metrics.get(*k).is_some_and(|v| v.as_f64() > 0.0))
        })
        .collect()
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing comparison.svg: {e:?}")
}

/// The picture of `results` as SVG text.
pub fn render(results: &Results) -> Result<String> {
    let metrics = pictured(results);
    let panel_rows = (metrics.len() as u32).div_ceil(COLUMNS).max(1);
    let heat_h = 120 + 28 * results.runs.len() as u32;
    let legend_h = 40;
    let (w, h) = (PANEL_W * COLUMNS, legend_h + PANEL_H * panel_rows + heat_h);
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (legend, rest) = root.split_vertically(legend_h);
        let (bars, heat) = rest.split_vertically(PANEL_H * panel_rows);
        draw_legend(&legend, results)?;
        let panels = bars.split_evenly((panel_rows as usize, COLUMNS as usize));
        for (area, key) in panels.iter().zip(&metrics) {
            draw_bars(area, results, key)?;
        }
        draw_heatmap(&heat, results)?;
        root.present().map_err(err)?;
    }
    Ok(out)
}

type Area<'a> = plotters::drawing::DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

/// `12000` -> `12k`, `0.5` -> `0.5`, `3` -> `3`: axis labels.
fn short_number(v: f64) -> String {
    if v >= 1e6 {
        format!("{}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{}k", v / 1e3)
    } else if v >= 1.0 {
        format!("{}", v.round())
    } else {
        format!("{v:.2}")
    }
}

fn colour(i: usize) -> RGBColor {
    let (r, g, b) = Palette99::COLORS[i % Palette99::COLORS.len()];
    RGBColor(r, g, b)
}

fn draw_legend(area: &Area, results: &Results) -> Result<()> {
    let style = TextStyle::from(("sans-serif", 15).into_font());
    let mut x = 10;
    for (i, run) in results.runs.iter().enumerate() {
        area.draw(&Rectangle::new([(x, 12), (x + 16, 28)], colour(i).filled()))
            .map_err(err)?;
        area.draw(&Text::new(run.label.clone(), (x + 22, 13), style.clone()))
            .map_err(err)?;
        x += 40 + 8 * run.label.len() as i32;
    }
    Ok(())
}

/// One panel: workloads along x, one bar per run in each group, log y.
fn draw_bars(area: &Area, results: &Results, key: &str) -> Result<()> {
    let names = results.workload_names();
    let value = |run: usize, w: &str| {
        results.runs[run]
            .report
            .workloads
            .iter()
            .find(|x| x.name == w)
            .and_then(|x| x.metrics.get(key))
            .map(|v| v.as_f64())
    };
    let values: Vec<f64> = (0..results.runs.len())
        .flat_map(|r| names.iter().filter_map(move |w| value(r, w)))
        .filter(|v| *v > 0.0)
        .collect();
    let hi = values.iter().copied().fold(1.0, f64::max) * 2.0;
    let lo = values.iter().copied().fold(1.0, f64::min) / 2.0;
    let title = find(key).map(|m| m.label).unwrap_or(key);
    let n = names.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(format!("{title} (log scale)"), ("sans-serif", 16))
        .margin(6)
        .x_label_area_size(70)
        .y_label_area_size(56)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), (lo..hi).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&|_| String::new())
        .y_labels(6)
        .y_label_formatter(&|v| short_number(*v))
        .draw()
        .map_err(err)?;
    // Workload names under their groups, written downwards from the axis
    // (plotters centres rotated tick labels on the tick, over the bars).
    let label_style = TextStyle::from(("sans-serif", 12).into_font())
        .transform(FontTransform::Rotate90)
        .pos(Pos::new(HPos::Left, VPos::Center));
    let (bx, by) = area.get_base_pixel();
    for (i, name) in names.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(i as f64, lo));
        area.draw(&Text::new(
            name.clone(),
            (px - bx, py - by + 6),
            label_style.clone(),
        ))
        .map_err(err)?;
    }
    let runs = results.runs.len().max(1);
    let slot = 0.8 / runs as f64;
    for r in 0..results.runs.len() {
        let bars = names.iter().enumerate().filter_map(|(i, w)| {
            let v = value(r, w).filter(|v| *v > 0.0)?;
            let x0 = i as f64 - 0.4 + slot * r as f64;
            Some(Rectangle::new(
                [(x0, lo), (x0 + slot * 0.9, v)],
                colour(r).filled(),
            ))
        });
        chart.draw_series(bars).map_err(err)?;
    }
    Ok(())
}

/// Runs along y, pCPUs along x, shade and number = exits on that pCPU.
fn draw_heatmap(area: &Area, results: &Results) -> Result<()> {
    let ncpu = results
        .runs
        .iter()
        .flat_map(|r| &r.report.pcpus)
        .map(|p| p.cpu + 1)
        .max()
        .unwrap_or(1);
    let nruns = results.runs.len().max(1);
    let max = results
        .runs
        .iter()
        .flat_map(|r| &r.report.pcpus)
        .map(|p| p.total_exits())
        .max()
        .unwrap_or(1)
        .max(1);
    let labels: Vec<String> = results.runs.iter().map(|r| r.label.clone()).collect();
    let mut chart = ChartBuilder::on(area)
        .caption("exits per pCPU (all reasons)", ("sans-serif", 16))
        .margin(6)
        .x_label_area_size(30)
        .y_label_area_size(140)
        .build_cartesian_2d(-0.5f64..(ncpu as f64 - 0.5), -0.5f64..(nruns as f64 - 0.5))
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(ncpu as usize + 1)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                format!("cpu {i}")
            } else {
                String::new()
            }
        })
        .y_labels(nruns + 1)
        .y_label_formatter(&|y| {
            let i = y.round();
            if (y - i).abs() < 1e-6 && i >= 0.0 {
                // Row 0 at the top.
                (nruns as f64 - 1.0 - i)
                    .ge(&0.0)
                    .then(|| labels.get(nruns - 1 - i as usize).cloned())
                    .flatten()
                    .unwrap_or_default()
            } else {
                String::new()
            }
        })
        .draw()
        .map_err(err)?;
    let centre =
        TextStyle::from(("sans-serif", 12).into_font()).pos(Pos::new(HPos::Center, VPos::Center));
    for (r, run) in results.runs.iter().enumerate() {
        for p in &run.report.pcpus {
            let v = p.total_exits();
            let t = v as f64 / max as f64;
            let shade = RGBColor(255, (255.0 * (1.0 - t)) as u8, (255.0 * (1.0 - t)) as u8);
            let (x, y) = (p.cpu as f64, (nruns - 1 - r) as f64);
            chart
                .draw_series([Rectangle::new(
                    [(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)],
                    shade.filled(),
                )])
                .map_err(err)?;
            let ink = if t > 0.6 { WHITE } else { BLACK };
            chart
                .draw_series([Text::new(v.to_string(), (x, y), centre.color(&ink))])
                .map_err(err)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{pictured, render};
    use crate::results::test_data::two_runs;

    #[test]
    fn the_picture_has_a_panel_per_metric_bars_per_run_and_the_heatmap() {
        let results = two_runs();
        let svg = render(&results).unwrap();
        if let Some(path) = std::env::var_os("UMBRA_SVG_OUT") {
            std::fs::write(path, &svg).unwrap();
        }
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        for key in pictured(&results) {
            let label = crate::results::metrics::find(key).unwrap().label;
            assert!(svg.contains(label), "no panel titled {label}");
        }
        assert!(svg.contains("exits per pCPU"));
        // The heatmap prints each pCPU's total; pCPU 3 of the second run has one more.
        let p3 = results.runs[0].report.pcpus[3].total_exits();
        assert!(svg.contains(&format!(">\n{p3}\n<")), "no cell {p3}");
        assert!(
            svg.contains(&format!(">\n{}\n<", p3 + 1)),
            "no cell {}",
            p3 + 1
        );
        for run in &results.runs {
            assert!(svg.contains(&run.label));
        }
    }

    #[test]
    fn runs_without_reports_still_draw() {
        let mut results = crate::results::Results::new("run");
        assert!(render(&results).is_ok());
        let mut run = two_runs().runs.remove(0);
        run.report = crate::results::Report::default();
        results.runs.push(run);
        let svg = render(&results).unwrap();
        assert!(roxmltree::Document::parse(&svg).is_ok());
        assert!(pictured(&results).is_empty());
    }

    #[test]
    fn the_picture_is_well_formed_svg_with_a_bar_per_nonzero_value() {
        let results = two_runs();
        let svg = render(&results).unwrap();
        let doc = roxmltree::Document::parse(&svg).expect("comparison.svg is XML");
        let root = doc.root_element();
        assert_eq!(root.tag_name().name(), "svg");
        assert!(root.attribute("width").is_some() && root.attribute("height").is_some());
        // Filled rectangles: the background, the legend swatches, one bar
        // per value above 0 of each pictured metric, one heatmap cell per pCPU.
        let bars: usize = pictured(&results)
            .iter()
            .map(|k| {
                results
                    .runs
                    .iter()
                    .flat_map(|r| &r.report.workloads)
                    .filter(|w| w.metrics.get(*k).is_some_and(|v| v.as_f64() > 0.0))
                    .count()
            })
            .sum();
        let cells: usize = results.runs.iter().map(|r| r.report.pcpus.len()).sum();
        let filled = doc
            .descendants()
            .filter(|n| n.has_tag_name("rect"))
            .filter(|n| n.attribute("fill").is_some_and(|f| f != "none"))
            .count();
        assert_eq!(filled, 1 + results.runs.len() + bars + cells);
    }
}
