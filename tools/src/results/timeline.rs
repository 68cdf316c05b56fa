//! `timeline-<label>.svg`: a run's scheduler trace, one row per pCPU, one rectangle per slice coloured by vCPU.

use crate::results::sched::{vcpu_name, Sched};
use crate::results::Run;
use anyhow::{anyhow, Result};
use plotters::prelude::{
    ChartBuilder, Color, IntoDrawingArea, IntoFont, Palette, Palette99, RGBColor, Rectangle,
    SVGBackend, Text, WHITE,
};
use plotters::style::TextStyle;

/// Picture width, pixels.
const WIDTH: u32 = 1200;
/// Height of one pCPU row, pixels.
const ROW_H: u32 = 36;
/// Legend entries per legend line.
const LEGEND_COLUMNS: u32 = 6;
/// Height of one legend line, pixels.
const LEGEND_LINE_H: u32 = 24;

/// The colour of vCPU `id`: the same in every picture.
pub fn vcpu_colour(id: u32) -> RGBColor {
    let (r, g, b) = Palette99::COLORS[id as usize % Palette99::COLORS.len()];
    RGBColor(r, g, b)
}

/// The vCPUs of a trace, each once, sorted by id, with their domain and
/// (when a `sched:` line named it) workload.
pub fn legend(sched: &Sched) -> Vec<(u32, u32, Option<String>)> {
    let mut out: Vec<(u32, u32, Option<String>)> = Vec::new();
    for s in &sched.trace {
        if !out.iter().any(|(v, _, _)| *v == s.vcpu) {
            let workload = sched
                .vcpus
                .iter()
                .find(|v| v.vcpu == s.vcpu)
                .map(|v| v.workload.clone());
            out.push((s.vcpu, s.domain, workload));
        }
    }
    out.sort_by_key(|(v, _, _)| *v);
    out
}

/// The picture's title: policy, MMU server, and the run's label.
pub fn title(run: &Run, sched: &Sched) -> String {
    let policy = sched
        .policy
        .clone()
        .or_else(|| run.selectors.sched.clone())
        .unwrap_or_else(|| "?".into());
    let server = match (&run.report.server, run.selectors.mmu.as_str()) {
        (Some(s), _) => s.clone(),
        (None, "") => "none".into(),
        (None, m) => m.to_string(),
    };
    format!(
        "vCPU timeline: policy {policy}, MMU server {server} ({})",
        run.label
    )
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing the timeline: {e:?}")
}

/// The timeline of `run` as SVG text; `None` when it has no trace.
/// Filled rectangles: one background, one per slice, one legend swatch
/// per vCPU.
pub fn render(run: &Run) -> Result<Option<String>> {
    let Some(sched) = run.report.sched.as_ref().filter(|s| !s.trace.is_empty()) else {
        return Ok(None);
    };
    let ncpu = sched
        .trace
        .iter()
        .map(|s| s.pcpu + 1)
        .chain(sched.pcpus.iter().map(|p| p.pcpu + 1))
        .max()
        .unwrap_or(1);
    let end_ms = sched.trace.iter().map(|s| s.end_us).max().unwrap_or(0) as f64 / 1000.0;
    let end_ms = if end_ms > 0.0 { end_ms } else { 1.0 };
    let vcpus = legend(sched);
    let legend_lines = (vcpus.len() as u32).div_ceil(LEGEND_COLUMNS).max(1);
    let chart_h = 90 + ROW_H * ncpu;
    let legend_h = 16 + LEGEND_LINE_H * legend_lines;
    let mut out = String::new();
    {
        let root =
            SVGBackend::with_string(&mut out, (WIDTH, chart_h + legend_h)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (top, bottom) = root.split_vertically(chart_h);
        let mut chart = ChartBuilder::on(&top)
            .caption(title(run, sched), ("sans-serif", 18))
            .margin(8)
            .x_label_area_size(36)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..end_ms, 0f64..ncpu as f64)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .label_style(("sans-serif", 13))
            .x_desc("time since the run began, ms")
            .y_labels(ncpu as usize * 2 + 1)
            .y_label_formatter(&|y| {
                // Row p spans [ncpu-1-p, ncpu-p); label its middle, row 0 on top.
                let f = y.fract();
                if (f - 0.5).abs() < 1e-6 {
                    format!("pCPU {}", ncpu - 1 - y.floor() as u32)
                } else {
                    String::new()
                }
            })
            .draw()
            .map_err(err)?;
        chart
            .draw_series(sched.trace.iter().map(|s| {
                let y = f64::from(ncpu - 1 - s.pcpu);
                Rectangle::new(
                    [
                        (s.start_us as f64 / 1000.0, y + 0.12),
                        (s.end_us as f64 / 1000.0, y + 0.88),
                    ],
                    vcpu_colour(s.vcpu).filled(),
                )
            }))
            .map_err(err)?;
        let style = TextStyle::from(("sans-serif", 13).into_font());
        let cell_w = (WIDTH - 20) / LEGEND_COLUMNS;
        for (i, (vcpu, domain, workload)) in vcpus.iter().enumerate() {
            let i = i as u32;
            let x = (10 + cell_w * (i % LEGEND_COLUMNS)) as i32;
            let y = (8 + LEGEND_LINE_H * (i / LEGEND_COLUMNS)) as i32;
            bottom
                .draw(&Rectangle::new(
                    [(x, y), (x + 14, y + 14)],
                    vcpu_colour(*vcpu).filled(),
                ))
                .map_err(err)?;
            let name = match workload {
                Some(w) => format!("{} {w}", vcpu_name(*domain, *vcpu)),
                None => vcpu_name(*domain, *vcpu),
            };
            bottom
                .draw(&Text::new(name, (x + 20, y + 1), style.clone()))
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::{legend, render, vcpu_colour};
    use crate::results::test_data::{sched_runs, two_runs};
    use std::collections::BTreeMap;

    /// `#RRGGBB` as plotters writes fills.
    fn hex(id: u32) -> String {
        let c = vcpu_colour(id);
        format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2)
    }

    #[test]
    fn the_timeline_is_svg_with_one_rect_per_slice_and_a_swatch_per_vcpu() {
        let results = sched_runs();
        let run = &results.runs[0];
        let sched = run.report.sched.as_ref().unwrap();
        let svg = render(run).unwrap().expect("a traced run has a timeline");
        if let Some(path) = std::env::var_os("UMBRA_TIMELINE_OUT") {
            std::fs::write(path, &svg).unwrap();
        }
        let doc = roxmltree::Document::parse(&svg).expect("the timeline is XML");
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        let filled: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("rect"))
            .filter(|n| n.attribute("fill").is_some_and(|f| f != "none"))
            .collect();
        let vcpus = legend(sched);
        assert_eq!(vcpus.len(), 6);
        // The background, one per slice, one legend swatch per vCPU.
        assert_eq!(filled.len(), 1 + sched.trace.len() + vcpus.len());
        // Each vCPU's colour fills its slices and its swatch, nothing else.
        let mut by_fill: BTreeMap<String, usize> = BTreeMap::new();
        for r in &filled[1..] {
            *by_fill
                .entry(r.attribute("fill").unwrap().to_uppercase())
                .or_default() += 1;
        }
        for (id, _, _) in &vcpus {
            let slices = sched.trace.iter().filter(|s| s.vcpu == *id).count();
            assert_eq!(by_fill.get(&hex(*id)), Some(&(slices + 1)), "vCPU {id}");
        }
        // Slices are as wide as they are long: vCPU 4's 20 ms slices are
        // twice vCPU 0's 10 ms ones.
        let width = |id: u32| {
            filled[1..]
                .iter()
                .filter(|r| r.attribute("fill").unwrap().to_uppercase() == hex(id))
                .map(|r| r.attribute("width").unwrap().parse::<f64>().unwrap())
                .fold(0.0, f64::max)
        };
        let ratio = width(4) / width(0);
        assert!((ratio - 2.0).abs() < 0.05, "{ratio}");
        // The title names the policy and the server; the legend names each vCPU.
        let text: String = doc
            .descendants()
            .filter(|n| n.is_text())
            .filter_map(|n| n.text())
            .collect();
        assert!(
            text.contains("policy credit, MMU server reference"),
            "{text}"
        );
        assert!(text.contains("d2/v4 sched-weighted"));
        assert!(text.contains("pCPU 0") && text.contains("pCPU 1"));
        let pinned = render(&results.runs[1]).unwrap().unwrap();
        assert!(pinned.contains("policy pinned"));
    }

    #[test]
    fn runs_without_a_trace_have_no_timeline() {
        let plain = two_runs();
        assert!(render(&plain.runs[0]).unwrap().is_none());
        let mut run = sched_runs().runs.remove(0);
        run.report.sched.as_mut().unwrap().trace.clear();
        assert!(render(&run).unwrap().is_none());
        // A trace of zero-length slices at time 0 still draws.
        let mut run = sched_runs().runs.remove(0);
        for s in &mut run.report.sched.as_mut().unwrap().trace {
            (s.start_us, s.end_us) = (0, 0);
        }
        let svg = render(&run).unwrap().unwrap();
        assert!(roxmltree::Document::parse(&svg).is_ok());
    }
}
