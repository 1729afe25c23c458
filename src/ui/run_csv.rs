//! The run's charts as CSV: every point of every series, one row per step (the charts draw a
//! reduced copy of long series, the file keeps them whole), written next to the run's adapter.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::run_view::RunView;

/// The file name the chart data is saved under, in the run's output folder.
pub const CSV_NAME: &str = "metrics.csv";

/// The columns, in order.
const HEADER: &str = "step,loss,loss_smoothed,val_loss,learning_rate,tokens_per_s,rss_mb,device_mb";

/// Every series of `view` as CSV: a row per step that has any value, empty cells where a series
/// has none at that step (validation loss only at evaluations).
pub fn run_csv(view: &RunView) -> String {
    let series = [
        &view.loss,
        &view.loss_smooth,
        &view.val_loss,
        &view.lr,
        &view.throughput,
        &view.rss_mb,
        &view.device_mb,
    ];
    let mut rows: BTreeMap<u64, [Option<f64>; 7]> = BTreeMap::new();
    for (col, points) in series.iter().enumerate() {
        for p in points.iter() {
            rows.entry(p[0].max(0.0) as u64).or_default()[col] = Some(p[1]);
        }
    }
    let mut out = String::with_capacity(HEADER.len() + rows.len() * 64);
    out.push_str(HEADER);
    out.push('\n');
    for (step, cells) in rows {
        let _ = write!(out, "{step}");
        for cell in cells {
            out.push(',');
            if let Some(v) = cell.filter(|v| v.is_finite()) {
                let _ = write!(out, "{v}");
            }
        }
        out.push('\n');
    }
    out
}

/// Writes [`run_csv`] to `dir/metrics.csv` (a temporary file renamed into place).
pub fn save_run_csv(view: &RunView, dir: &Path) -> Result<PathBuf, String> {
    let path = dir.join(CSV_NAME);
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("could not make the run's folder ({e}): {}", dir.display()))?;
    crate::model::adapter::write_atomic(&path, run_csv(view).as_bytes())
        .map_err(|e| format!("could not save the chart data ({e}): {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn every_point_of_100k_steps_is_a_row() {
        let mut view = RunView::default();
        for i in 1..=100_000u32 {
            let s = f64::from(i);
            view.loss.push([s, 3.0 / s.sqrt()]);
            view.lr.push([s, 1e-4]);
            if i % 10_000 == 0 {
                view.val_loss.push([s, 2.5]);
            }
        }
        view.val_loss.insert(0, [0.0, 3.1]);
        let csv = run_csv(&view);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], HEADER);
        assert_eq!(lines.len(), 1 + 100_001);
        assert_eq!(lines[1], "0,,,3.1,,,,");
        assert_eq!(lines[2], "1,3,,,0.0001,,,");
        assert_eq!(lines[10_001], format!("10000,{},,2.5,0.0001,,,", 0.03));
        let dir = tempfile::tempdir().unwrap();
        let path = save_run_csv(&view, dir.path()).unwrap();
        assert_eq!(std::fs::read_to_string(path).unwrap(), csv);
    }
}
