//! The one plot the benchmarks draw: dirty pages left after each pass, a panel per scenario, a
//! line per run (log scale: a converging migration falls by orders of magnitude).

use std::path::Path;

use serde_json::Value;

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

/// Draws `panels` side by side into an SVG at `path`.
pub fn dirty_per_pass(path: &Path, panels: Vec<Panel>) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1600, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((1, panels.len().max(1)));
    let colors = [RED, BLUE, GREEN, MAGENTA, BLACK, CYAN];
    for (area, panel) in areas.iter().zip(panels) {
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
            let color = colors[i % colors.len()];
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
            chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // Each text element's content is a line of its own.
        for text in ["left", "right", "dirty pages left", "a", "b"] {
            assert!(svg.lines().any(|l| l.trim() == text), "no {text:?} in the plot");
        }
        assert_eq!(points(&serde_json::json!([0, 5])), vec![(0, 1), (1, 5)], "zero is drawn at 1 (log scale)");
    }
}
