//! Frame cost of the training charts with long runs (issue 20): the four charts of a run of
//! 1,000 / 10,000 / 100,000 steps laid out and tessellated by egui, as the window does each frame
//! (the GPU upload of the vertices is left out). Prints p50/p99 frame times per length and the
//! vertex count; the charts draw at most `MAX_POINTS` points a series, so the cost must not grow
//! with the run. `cargo run --release --example chart_frames [frames]`.

use std::time::{Duration, Instant};

use eframe::egui;
use finetune::ui::charts::{run_charts_ui, MAX_POINTS};
use finetune::ui::run_view::RunView;

fn view(steps: usize) -> RunView {
    let mut v = RunView::default();
    for i in 1..=steps {
        let s = i as f64;
        let loss = 2.0 + 1.5 / s.sqrt() + 0.2 * (s * 0.37).sin();
        v.loss.push([s, loss]);
        v.loss_smooth.push([s, 2.0 + 1.5 / s.sqrt()]);
        v.lr.push([s, 1e-4 * (1.0 - s / steps as f64)]);
        v.throughput.push([s, 900.0 + 50.0 * (s * 0.11).cos()]);
        v.rss_mb.push([s, 800.0 + (s * 0.01).sin()]);
        if i % 100 == 0 {
            v.val_loss.push([s, 2.0 + 1.4 / s.sqrt()]);
        }
    }
    v.total_steps = steps;
    v.step = steps;
    v
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    let frames: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    println!("cpu: {}", finetune::bench::generate::cpu_name());
    println!("steps     p50 ms   p99 ms   vertices   (MAX_POINTS {MAX_POINTS})");
    for steps in [1_000, 10_000, 100_000] {
        let v = view(steps);
        let ctx = egui::Context::default();
        let mut times = Vec::with_capacity(frames);
        let mut vertices = 0;
        for f in 0..frames + 5 {
            let input = egui::RawInput {
                screen_rect: Some(egui::Rect::from_min_size(
                    egui::Pos2::ZERO,
                    egui::vec2(1280.0, 860.0),
                )),
                time: Some(f as f64 / 60.0),
                ..Default::default()
            };
            let t = Instant::now();
            let mut out = ctx.run_ui(input, |ui| {
                egui::CentralPanel::default().show(ui, |ui| run_charts_ui(ui, &v));
            });
            let meshes = ctx.tessellate(std::mem::take(&mut out.shapes), out.pixels_per_point);
            let dt = t.elapsed();
            // No GPU here: the font atlas uploads are dropped.
            out.textures_delta.clear();
            vertices = meshes
                .iter()
                .map(|m| match &m.primitive {
                    egui::epaint::Primitive::Mesh(mesh) => mesh.vertices.len(),
                    egui::epaint::Primitive::Callback(_) => 0,
                })
                .sum();
            // The first frames build fonts and caches.
            if f >= 5 {
                times.push(dt);
            }
        }
        times.sort();
        println!(
            "{steps:>7}  {:>7.2}  {:>7.2}  {vertices:>9}",
            percentile(&times, 0.5).as_secs_f64() * 1e3,
            percentile(&times, 0.99).as_secs_f64() * 1e3
        );
    }
}
