//! Charts (egui_plot): the four live training charts read from [`RunView`] (loss with its smoothed
//! curve and validation loss, learning rate, tokens/s, memory) and the dataset's token-length
//! histogram.

use eframe::egui;
use egui::{Color32, Ui};
use egui_plot::{Bar, BarChart, GridInput, GridMark, Legend, Line, Plot, PlotPoints, Points};

use super::run_view::RunView;
use crate::data::DatasetSummary;

/// Most points drawn per series; longer series are reduced by [`thin`] for drawing (the full
/// series stays in the [`RunView`] and goes to the CSV export).
pub const MAX_POINTS: usize = 2000;

const RAW_LOSS: Color32 = Color32::from_rgb(120, 160, 220);
const SMOOTH_LOSS: Color32 = Color32::from_rgb(30, 100, 220);
const VAL_LOSS: Color32 = Color32::from_rgb(230, 120, 30);
const LR: Color32 = Color32::from_rgb(40, 160, 90);
const TPS: Color32 = Color32::from_rgb(150, 90, 200);
const RSS: Color32 = Color32::from_rgb(200, 70, 90);
const DEVICE: Color32 = Color32::from_rgb(90, 90, 90);

/// At most [`MAX_POINTS`] of `series` for drawing: the series cut into `MAX_POINTS / 2` runs of
/// equal length, each drawn by its lowest and highest point in step order, so a spike (a loss
/// jump at one step of 100,000) still shows; the first and last points are always kept.
pub fn thin(series: &[[f64; 2]]) -> Vec<[f64; 2]> {
    if series.len() <= MAX_POINTS {
        return series.to_vec();
    }
    let buckets = (MAX_POINTS - 2) / 2;
    let run = series.len().div_ceil(buckets);
    let mut out = Vec::with_capacity(MAX_POINTS);
    for chunk in series.chunks(run) {
        let (mut lo, mut hi) = (0, 0);
        for (i, p) in chunk.iter().enumerate() {
            // NaN never wins a comparison, so it is never picked over a number.
            if p[1] < chunk[lo][1] {
                lo = i;
            }
            if p[1] > chunk[hi][1] {
                hi = i;
            }
        }
        let (a, b) = (lo.min(hi), lo.max(hi));
        out.push(chunk[a]);
        if b != a {
            out.push(chunk[b]);
        }
    }
    if let (Some(first), Some(kept)) = (series.first(), out.first()) {
        if first != kept {
            out.insert(0, *first);
        }
    }
    if let (Some(last), Some(kept)) = (series.last(), out.last()) {
        if last != kept {
            out.push(*last);
        }
    }
    out
}

/// Grid marks at 1-2-5 steps, about five per axis: egui_plot's default (powers of ten) leaves
/// a small count axis (0..80 records) with a single label.
pub fn nice_marks(input: GridInput) -> Vec<GridMark> {
    let (lo, hi) = input.bounds;
    let range = hi - lo;
    if !(range.is_finite() && range > 0.0) {
        return Vec::new();
    }
    let raw = range / 5.0;
    let pow = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * pow)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * pow);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last.min(first + 100))
        .map(|k| GridMark {
            // k·step rather than a running sum: labels stay round (60, not 60.000000001).
            value: k as f64 * step,
            step_size: step,
        })
        .collect()
}

fn line(name: &str, series: &[[f64; 2]], color: Color32) -> Line<'static> {
    Line::new(name, PlotPoints::from(thin(series))).color(color)
}

/// A chart over steps, fitted to the data so far (the progress bar shows the whole run).
fn plot(id: &str, height: f32) -> Plot<'static> {
    Plot::new(id)
        .height(height)
        .legend(Legend::default())
        .allow_scroll(false)
        .include_x(0.0)
        .include_x(1.0)
        .x_axis_label("step")
}

/// The four training charts in a 2 × 2 grid.
pub fn run_charts_ui(ui: &mut Ui, view: &RunView) {
    let height = ((ui.available_height() - 40.0) / 2.0).clamp(140.0, 260.0);
    ui.columns(2, |cols| {
        cols[0].strong("Loss");
        plot("chart-loss", height).show(&mut cols[0], |p| {
            p.line(line("train", &view.loss, RAW_LOSS).width(1.0));
            p.line(line("train (smoothed)", &view.loss_smooth, SMOOTH_LOSS).width(2.0));
            if !view.val_loss.is_empty() {
                p.line(line("validation", &view.val_loss, VAL_LOSS).width(2.0));
                p.add(
                    Points::new("", PlotPoints::from(thin(&view.val_loss)))
                        .color(VAL_LOSS)
                        .radius(3.0),
                );
            }
        });
        cols[1].strong("Learning rate");
        plot("chart-lr", height)
            .include_y(0.0)
            .show(&mut cols[1], |p| {
                p.line(line("learning rate", &view.lr, LR));
            });
    });
    ui.columns(2, |cols| {
        cols[0].strong("Throughput (tokens/s)");
        plot("chart-tps", height)
            .include_y(0.0)
            .show(&mut cols[0], |p| {
                p.line(line("tokens/s", &view.throughput, TPS));
            });
        cols[1].strong("Memory (MB)");
        plot("chart-mem", height)
            .include_y(0.0)
            .show(&mut cols[1], |p| {
                p.line(line("process (RSS)", &view.rss_mb, RSS));
                if !view.device_mb.is_empty() {
                    p.line(line("device", &view.device_mb, DEVICE));
                }
            });
    });
}

/// Records per token-length bucket.
pub fn histogram_ui(ui: &mut Ui, id: &str, summary: &DatasetSummary, max_seq_len: usize) {
    let width = summary
        .histogram
        .get(1)
        .map_or(1.0, |b| b.0 as f64)
        .max(1.0);
    let bars: Vec<Bar> = summary
        .histogram
        .iter()
        .map(|&(start, count)| {
            Bar::new(start as f64 + width / 2.0, count as f64)
                .width(width * 0.9)
                .name(format!("{start}–{} tokens", start as f64 + width - 1.0))
        })
        .collect();
    Plot::new(id)
        .height(170.0)
        .allow_scroll(false)
        .allow_drag(false)
        .allow_zoom(false)
        .include_y(0.0)
        .x_axis_label("tokens per record")
        .y_axis_label("records")
        .y_grid_spacer(nice_marks)
        .show(ui, |p| {
            p.add(BarChart::new("records", bars).color(Color32::from_rgb(30, 100, 220)));
            if max_seq_len > 0 && (max_seq_len as f64) <= summary.length_max as f64 * 1.5 {
                p.add(
                    egui_plot::VLine::new("max sequence length", max_seq_len as f64)
                        .color(VAL_LOSS),
                );
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_marks_step_by_1_2_5() {
        let values = |lo, hi| -> Vec<f64> {
            nice_marks(GridInput {
                bounds: (lo, hi),
                base_step_size: 0.1,
            })
            .iter()
            .map(|m| m.value)
            .collect()
        };
        assert_eq!(values(0.0, 85.0), vec![0.0, 20.0, 40.0, 60.0, 80.0]);
        assert_eq!(values(-3.0, 420.0), vec![0.0, 100.0, 200.0, 300.0, 400.0]);
        assert_eq!(values(0.0, 9.0), vec![0.0, 2.0, 4.0, 6.0, 8.0]);
        assert!(values(1.0, 1.0).is_empty());
    }

    #[test]
    fn thinning_keeps_short_series_and_the_last_point() {
        let short: Vec<[f64; 2]> = (0..10).map(|i| [i as f64, 1.0]).collect();
        assert_eq!(thin(&short), short);
        let long: Vec<[f64; 2]> = (0..10_001).map(|i| [i as f64, i as f64]).collect();
        let t = thin(&long);
        assert!(t.len() <= MAX_POINTS + 1, "{}", t.len());
        assert_eq!(t.first(), Some(&[0.0, 0.0]));
        assert_eq!(t.last(), Some(&[10_000.0, 10_000.0]));
    }

    #[test]
    fn thinning_100k_points_keeps_spikes_and_step_order() {
        let mut long: Vec<[f64; 2]> = (0..100_000)
            .map(|i| [i as f64, 2.0 + (i as f64 * 0.01).sin()])
            .collect();
        long[54_321][1] = 40.0;
        long[77_777][1] = -5.0;
        let t = thin(&long);
        assert!(t.len() <= MAX_POINTS, "{}", t.len());
        assert!(t.contains(&[54_321.0, 40.0]) && t.contains(&[77_777.0, -5.0]));
        assert!(t.windows(2).all(|w| w[0][0] < w[1][0]));
        assert_eq!((t[0], t[t.len() - 1]), (long[0], long[99_999]));
    }
}
