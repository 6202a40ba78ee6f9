//! The plots emu draws, as SVG: dirty pages left after each pass of a migration (log scale: a
//! converging migration falls by orders of magnitude), a panel per scenario and a line per run for
//! the benchmarks (`emu-bench`), and for one migration beside its throughput per pass (`emu`'s
//! `x-migration-plot`). Its own crate so that the benchmarks and the emulator draw the same chart
//! without depending on each other.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value;

/// Why a plot was not written.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw {path}: {why}")]
pub struct PlotError {
    path: String,
    why: String,
}

/// One panel: its caption and its named series of (pass, dirty pages left).
pub struct Panel {
    pub caption: String,
    pub series: Vec<(String, Vec<(u32, u64)>)>,
}

/// The points of a `pass-dirty-pages` array (at least 1 each, for the log scale).
pub fn points(pass_dirty_pages: &Value) -> Vec<(u32, u64)> {
    pass_dirty_pages
        .as_array()
        .map(|a| a.iter().enumerate().map(|(i, v)| (i as u32, v.as_u64().unwrap_or(0).max(1))).collect())
        .unwrap_or_default()
}

const COLORS: [RGBColor; 6] = [RED, BLUE, GREEN, MAGENTA, BLACK, CYAN];

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn draw_dirty_panel(area: &DrawingArea<SVGBackend<'_>, Shift>, panel: Panel) -> DrawResult {
    let max_pass = panel.series.iter().map(|(_, p)| p.len() as u32).max().unwrap_or(1).max(2);
    let max_y = panel.series.iter().flat_map(|(_, p)| p.iter().map(|&(_, y)| y)).max().unwrap_or(10).max(10) * 2;
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.caption, ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(32)
        .y_label_area_size(56)
        .build_cartesian_2d(0u32..max_pass, (1u64..max_y).log_scale())?;
    chart.configure_mesh().x_desc("pass").y_desc("dirty pages left").draw()?;
    for (i, (name, pts)) in panel.series.into_iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    Ok(())
}

fn draw_throughput_panel(area: &DrawingArea<SVGBackend<'_>, Shift>, caption: &str, mib_s: &[(u32, f64)]) -> DrawResult {
    let max_pass = (mib_s.len() as u32).max(2);
    let max_y = mib_s.iter().map(|&(_, y)| y).fold(1.0, f64::max) * 1.2;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(32)
        .y_label_area_size(56)
        .build_cartesian_2d(0u32..max_pass, 0f64..max_y)?;
    chart.configure_mesh().x_desc("pass").y_desc("MiB/s sent").draw()?;
    let color = COLORS[1];
    chart.draw_series(LineSeries::new(mib_s.iter().copied(), color.stroke_width(2)))?;
    chart.draw_series(mib_s.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    Ok(())
}

fn draw(
    path: &Path,
    size: (u32, u32),
    f: impl FnOnce(&DrawingArea<SVGBackend<'_>, Shift>) -> DrawResult,
) -> Result<(), PlotError> {
    let fail = |e: &dyn std::fmt::Display| PlotError { path: path.display().to_string(), why: e.to_string() };
    let root = SVGBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    f(&root).map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))
}

/// Draws `panels` side by side into an SVG at `path`.
pub fn dirty_per_pass(path: &Path, panels: Vec<Panel>) -> Result<(), PlotError> {
    draw(path, (1600, 420), |root| {
        let areas = root.split_evenly((1, panels.len().max(1)));
        for (area, panel) in areas.iter().zip(panels) {
            draw_dirty_panel(area, panel)?;
        }
        Ok(())
    })
}

/// One pass of a migration, as the plot of it needs it.
#[derive(Clone, Copy, Debug)]
pub struct Pass {
    pub dirty_after: u64,
    /// Bytes sent in the pass, and the time it took.
    pub bytes: u64,
    pub seconds: f64,
}

/// One migration's passes: dirty pages left after each (log scale) beside the rate each was sent
/// at, into an SVG at `path`.
pub fn migration_passes(path: &Path, title: &str, passes: &[Pass]) -> Result<(), PlotError> {
    let dirty = Panel {
        caption: format!("{title}: dirty pages left after each pass"),
        series: vec![(
            "dirty pages left".to_string(),
            passes.iter().enumerate().map(|(i, p)| (i as u32, p.dirty_after.max(1))).collect(),
        )],
    };
    let mib_s: Vec<(u32, f64)> = passes
        .iter()
        .enumerate()
        .map(|(i, p)| (i as u32, if p.seconds > 0.0 { p.bytes as f64 / p.seconds / f64::from(1 << 20) } else { 0.0 }))
        .collect();
    draw(path, (1200, 420), |root| {
        let (left, right) = root.split_horizontally(600);
        draw_dirty_panel(&left, dirty)?;
        draw_throughput_panel(&right, &format!("{title}: throughput per pass"), &mib_s)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each text element's content is a line of its own in plotters' SVG.
    fn has_text(svg: &str, text: &str) -> bool {
        svg.lines().any(|l| l.trim() == text)
    }

    #[test]
    fn draws_every_panel_and_series() {
        let path = std::env::temp_dir().join(format!("emu-plot-{}.svg", std::process::id()));
        let panel = |c: &str| Panel {
            caption: c.to_string(),
            series: vec![
                ("a".to_string(), points(&serde_json::json!([65536, 4000, 12, 0]))),
                ("b".to_string(), points(&serde_json::json!([1000, 1000]))),
            ],
        };
        dirty_per_pass(&path, vec![panel("left"), panel("right")]).expect("draw");
        let svg = std::fs::read_to_string(&path).expect("the plot was written");
        let _ = std::fs::remove_file(&path);
        for text in ["left", "right", "dirty pages left", "a", "b"] {
            assert!(has_text(&svg, text), "no {text:?} in the plot");
        }
        assert_eq!(points(&serde_json::json!([0, 5])), vec![(0, 1), (1, 5)], "zero is drawn at 1 (log scale)");
    }

    #[test]
    fn draws_a_migrations_passes_and_says_why_it_cannot() {
        let path = std::env::temp_dir().join(format!("emu-plot-passes-{}.svg", std::process::id()));
        let p = |dirty_after, bytes| Pass { dirty_after, bytes, seconds: 0.5 };
        migration_passes(&path, "m1", &[p(5000, 512 << 20), p(40, 20 << 20), p(0, 160 << 10)]).expect("draw");
        let svg = std::fs::read_to_string(&path).expect("the plot was written");
        let _ = std::fs::remove_file(&path);
        for text in ["m1: dirty pages left after each pass", "m1: throughput per pass", "MiB/s sent", "pass"] {
            assert!(has_text(&svg, text), "no {text:?} in the plot");
        }
        // 512 MiB in half a second: the axis reaches past 1024 MiB/s
        assert!(has_text(&svg, "1000.0") || has_text(&svg, "1000"), "no 1000 MiB/s tick:\n{svg}");
        let e = migration_passes(Path::new("/nonexistent-dir/x.svg"), "m", &[p(1, 1)]).expect_err("no such dir");
        assert!(e.to_string().starts_with("cannot draw /nonexistent-dir/x.svg: "), "{e}");
    }
}
