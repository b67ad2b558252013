//! The report of a run: a timeline of load, latency and replicas, drawn as
//! an SVG (three stacked panels sharing the time axis) and kept as CSV so
//! that tests and people can check what the picture shows.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

/// One point of the timeline (one control-loop tick).
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct TimelinePoint {
    /// Seconds since the start of the run.
    pub t: f64,
    /// Arrivals per second at the proxy (panic window).
    pub rps: f64,
    /// TTFT p90 over the panic window, milliseconds (NaN-free: 0 when none).
    pub ttft_p90_ms: f64,
    /// Requests waiting in the proxy's queue.
    pub queue: f64,
    /// Requests in flight.
    pub in_flight: f64,
    /// Replicas the scaler asked for.
    pub desired: u32,
    /// Replicas ready to serve.
    pub ready: u32,
    pub panic: bool,
}

/// Why a report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("{path}: {message}")]
    Write { path: String, message: String },
}

fn write_error(path: &Path, e: impl std::fmt::Display) -> PlotError {
    PlotError::Write {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Writes the timeline as CSV.
pub fn write_timeline_csv(points: &[TimelinePoint], path: &Path) -> Result<(), PlotError> {
    let mut s = String::from("t,rps,ttft_p90_ms,queue,in_flight,desired,ready,panic\n");
    for p in points {
        let _ = writeln!(
            s,
            "{:.3},{:.3},{:.3},{:.3},{:.3},{},{},{}",
            p.t, p.rps, p.ttft_p90_ms, p.queue, p.in_flight, p.desired, p.ready, p.panic
        );
    }
    std::fs::write(path, s).map_err(|e| write_error(path, e))
}

/// Draws load (rps, queue), TTFT p90 and replicas (desired, ready, panic
/// shaded) over time.
pub fn write_timeline_svg(
    points: &[TimelinePoint],
    title: &str,
    path: &Path,
) -> Result<(), PlotError> {
    let root = SVGBackend::new(path, (1000, 900)).into_drawing_area();
    let thinned = thin(points, MAX_PLOTTED);
    draw(&root, &thinned, title).map_err(|e| write_error(path, e))?;
    root.present().map_err(|e| write_error(path, e))
}

type DrawResult<T> = Result<T, Box<dyn std::error::Error>>;

/// More points than this are merged before plotting: a day at one point
/// per 2 s tick is 43,200 points, far more than 1,000 pixels show, and
/// made a 2 MB SVG.
const MAX_PLOTTED: usize = 2000;

/// `points` merged in runs of equal length down to at most `max`, each run
/// keeping its first time and the largest value of every series (a spike
/// stays visible), and panic if any point had it.
fn thin(points: &[TimelinePoint], max: usize) -> Vec<TimelinePoint> {
    if points.len() <= max || max == 0 {
        return points.to_vec();
    }
    let run = points.len().div_ceil(max);
    points
        .chunks(run)
        .filter_map(|c| {
            let first = c.first()?;
            Some(c.iter().fold(*first, |a, p| TimelinePoint {
                t: a.t,
                rps: a.rps.max(p.rps),
                ttft_p90_ms: a.ttft_p90_ms.max(p.ttft_p90_ms),
                queue: a.queue.max(p.queue),
                in_flight: a.in_flight.max(p.in_flight),
                desired: a.desired.max(p.desired),
                ready: a.ready.max(p.ready),
                panic: a.panic || p.panic,
            }))
        })
        .collect()
}

/// A series with the points inside flat stretches left out: each kept
/// point is the first or last of the series, or has a neighbour of
/// another value, so the lines drawn between kept points are the same.
fn changes(series: &[(f64, u32)]) -> Vec<(f64, u32)> {
    let n = |i: usize| series.get(i).map(|p| p.1);
    series
        .iter()
        .enumerate()
        .filter(|&(i, &(_, v))| {
            i == 0 || i + 1 == series.len() || n(i - 1) != Some(v) || n(i + 1) != Some(v)
        })
        .map(|(_, p)| *p)
        .collect()
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    points: &[TimelinePoint],
    title: &str,
) -> DrawResult<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 22))?;
    let panels = root.split_evenly((3, 1));
    let t_max = points.last().map_or(1.0, |p| p.t).max(1.0);
    let max_of = |f: &dyn Fn(&TimelinePoint) -> f64| points.iter().map(f).fold(0.0f64, f64::max);

    // Load.
    let load_max = max_of(&|p| p.rps.max(p.queue).max(p.in_flight)).max(1.0) * 1.1;
    let mut chart = ChartBuilder::on(&panels[0])
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .caption("load at the proxy", ("sans-serif", 16))
        .build_cartesian_2d(0.0..t_max, 0.0..load_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("requests")
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            points.iter().map(|p| (p.t, p.rps)),
            BLUE.stroke_width(2),
        ))?
        .label("arrivals/s")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(LineSeries::new(
            points.iter().map(|p| (p.t, p.in_flight)),
            GREEN,
        ))?
        .label("in flight")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN));
    chart
        .draw_series(LineSeries::new(points.iter().map(|p| (p.t, p.queue)), RED))?
        .label("queued")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;

    // Latency.
    let ttft_max = max_of(&|p| p.ttft_p90_ms).max(1.0) * 1.1;
    let mut chart = ChartBuilder::on(&panels[1])
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .caption("TTFT p90 (ms)", ("sans-serif", 16))
        .build_cartesian_2d(0.0..t_max, 0.0..ttft_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("ms")
        .draw()?;
    chart.draw_series(LineSeries::new(
        points.iter().map(|p| (p.t, p.ttft_p90_ms)),
        MAGENTA.stroke_width(2),
    ))?;

    // Replicas, with panic shaded.
    let rep_max = points
        .iter()
        .map(|p| p.desired.max(p.ready))
        .max()
        .unwrap_or(1)
        .max(1) as f64
        + 1.0;
    let mut chart = ChartBuilder::on(&panels[2])
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .caption("replicas (panic shaded)", ("sans-serif", 16))
        .build_cartesian_2d(0.0..t_max, 0.0..rep_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("replicas")
        .draw()?;
    let step = points
        .windows(2)
        .map(|w| w[1].t - w[0].t)
        .fold(0.0f64, f64::max)
        .max(0.5);
    chart.draw_series(points.iter().filter(|p| p.panic).map(|p| {
        Rectangle::new(
            [(p.t, 0.0), ((p.t + step).min(t_max), rep_max)],
            RGBColor(255, 200, 200).filled(),
        )
    }))?;
    chart
        .draw_series(LineSeries::new(
            points.iter().map(|p| (p.t, f64::from(p.desired))),
            BLACK.stroke_width(2),
        ))?
        .label("desired")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    chart
        .draw_series(LineSeries::new(
            points.iter().map(|p| (p.t, f64::from(p.ready))),
            CYAN.stroke_width(2),
        ))?
        .label("ready")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], CYAN));
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    Ok(())
}

/// Draws replica counts over time as step lines, one per named series
/// (an algorithm's ready replicas next to the oracle's schedule).
pub fn write_replicas_svg(
    series: &[(&str, Vec<(f64, u32)>)],
    title: &str,
    path: &Path,
) -> Result<(), PlotError> {
    let root = SVGBackend::new(path, (1000, 400)).into_drawing_area();
    let steps: Vec<(&str, Vec<(f64, u32)>)> =
        series.iter().map(|(name, s)| (*name, changes(s))).collect();
    draw_replicas(&root, &steps, title).map_err(|e| write_error(path, e))?;
    root.present().map_err(|e| write_error(path, e))
}

fn draw_replicas<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    series: &[(&str, Vec<(f64, u32)>)],
    title: &str,
) -> DrawResult<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let points = || series.iter().flat_map(|(_, s)| s.iter());
    let t_max = points().map(|p| p.0).fold(1.0f64, f64::max);
    let n_max = f64::from(points().map(|p| p.1).max().unwrap_or(1)) + 1.0;
    let mut chart = ChartBuilder::on(root)
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .caption(title, ("sans-serif", 18))
        .build_cartesian_2d(0.0..t_max, 0.0..n_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("replicas")
        .draw()?;
    let colors = [BLACK, RED, BLUE, GREEN, MAGENTA, CYAN];
    for (i, (name, s)) in series.iter().enumerate() {
        let color = colors[i % colors.len()];
        // A step line: each count holds until the next point.
        let mut steps = Vec::with_capacity(s.len() * 2);
        for w in s.windows(2) {
            steps.push((w[0].0, f64::from(w[0].1)));
            steps.push((w[1].0, f64::from(w[0].1)));
        }
        if let Some(&(t, n)) = s.last() {
            steps.push((t, f64::from(n)));
        }
        chart
            .draw_series(LineSeries::new(
                steps,
                color.stroke_width(if i == 0 { 2 } else { 1 }),
            ))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn burst() -> Vec<TimelinePoint> {
        (0..60)
            .map(|i| {
                let t = f64::from(i) * 2.0;
                let hot = (30.0..70.0).contains(&t);
                TimelinePoint {
                    t,
                    rps: if hot { 40.0 } else { 2.0 },
                    ttft_p90_ms: if hot { 900.0 } else { 150.0 },
                    queue: if hot { 5.0 } else { 0.0 },
                    in_flight: if hot { 30.0 } else { 2.0 },
                    desired: if hot { 6 } else { 1 },
                    ready: if t > 36.0 && t < 80.0 { 6 } else { 1 },
                    panic: hot,
                }
            })
            .collect()
    }

    #[test]
    fn svg_and_csv_are_written() {
        let dir = std::env::temp_dir().join(format!("scalecar-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let svg = dir.join("timeline.svg");
        let csv = dir.join("timeline.csv");
        let points = burst();
        write_timeline_svg(&points, "burst", &svg).unwrap();
        write_timeline_csv(&points, &csv).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.starts_with("<svg"), "{}", &text[..80.min(text.len())]);
        // One polyline per series: rps, in flight, queued, ttft, desired, ready.
        assert!(
            text.matches("<polyline").count() >= 6,
            "{}",
            text.matches("<polyline").count()
        );
        assert!(text.contains("replicas (panic shaded)"));
        let rows = std::fs::read_to_string(&csv).unwrap();
        assert_eq!(rows.lines().count(), 61);
        assert!(
            rows.lines().nth(20).unwrap().ends_with(",6,6,true"),
            "{}",
            rows.lines().nth(20).unwrap()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn long_runs_are_thinned_keeping_spikes_and_steps_keep_their_changes() {
        let points: Vec<TimelinePoint> = (0..10_000)
            .map(|i| TimelinePoint {
                t: f64::from(i) * 2.0,
                rps: if i == 4321 { 99.0 } else { 1.0 },
                ttft_p90_ms: 0.0,
                queue: 0.0,
                in_flight: 0.0,
                desired: 1,
                ready: 1,
                panic: i == 777,
            })
            .collect();
        let thinned = thin(&points, 2000);
        assert_eq!(thinned.len(), 2000);
        assert_eq!(thinned[0].t, 0.0);
        assert!(thinned.iter().any(|p| p.rps == 99.0));
        assert_eq!(thinned.iter().filter(|p| p.panic).count(), 1);
        assert_eq!(thin(&points[..10], 2000).len(), 10);
        let steps = changes(&[(0.0, 1), (1.0, 1), (2.0, 1), (4.0, 3), (6.0, 3), (8.0, 3)]);
        assert_eq!(steps, vec![(0.0, 1), (2.0, 1), (4.0, 3), (8.0, 3)]);
        assert!(changes(&[]).is_empty());
    }

    #[test]
    fn replicas_are_drawn_per_series() {
        let dir = std::env::temp_dir().join(format!("scalecar-replicas-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let svg = dir.join("replicas.svg");
        let a = vec![(0.0, 1), (10.0, 4), (20.0, 2)];
        let b = vec![(0.0, 1), (10.0, 3)];
        write_replicas_svg(&[("slo", a), ("oracle", b)], "replicas", &svg).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.contains("slo") && text.contains("oracle"));
        assert!(text.matches("<polyline").count() >= 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unwritable_path_is_an_error_not_a_panic() {
        let bad = Path::new("/nonexistent-dir/x/timeline.csv");
        let err = write_timeline_csv(&burst(), bad).unwrap_err().to_string();
        assert!(
            err.starts_with("/nonexistent-dir/x/timeline.csv: "),
            "{err}"
        );
    }
}
