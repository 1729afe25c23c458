//! Small widgets of the Hub side of the Models step: sort labels, check marks, the supported
//! line, a model's facts, and a Hub problem with what to do about it.

use super::*;

pub(super) fn sort_label(s: SearchSort) -> &'static str {
    match s {
        SearchSort::Downloads => "Downloads",
        SearchSort::Trending => "Trending",
        SearchSort::Likes => "Likes",
        SearchSort::Updated => "Recently updated",
    }
}

pub(super) fn ok_color() -> Color32 {
    Color32::from_rgb(40, 150, 70)
}

/// A check mark or a cross, drawn (the bundled fonts have neither glyph).
pub(super) fn mark_ui(ui: &mut Ui, ok: bool) {
    let size = ui.text_style_height(&egui::TextStyle::Body);
    let (rect, _) = ui.allocate_exact_size(egui::vec2(size, size), egui::Sense::hover());
    let r = rect.shrink(size * 0.2);
    let (color, points): (Color32, &[[egui::Pos2; 2]]) = if ok {
        let mid = egui::pos2(r.left() + r.width() * 0.38, r.bottom());
        (
            ok_color(),
            &[
                [egui::pos2(r.left(), r.center().y), mid],
                [mid, r.right_top()],
            ],
        )
    } else {
        (
            error_color(ui),
            &[
                [r.left_top(), r.right_bottom()],
                [r.right_top(), r.left_bottom()],
            ],
        )
    };
    for p in points {
        ui.painter()
            .line_segment(*p, egui::Stroke::new(size * 0.13, color));
    }
}

/// A check mark and "yes", or a cross with a short reason (the whole reason on hover).
pub(super) fn supported_ui(ui: &mut Ui, supported: &Result<(), String>) {
    ui.horizontal(|ui| match supported {
        Ok(()) => {
            mark_ui(ui, true);
            ui.label(RichText::new("yes").color(ok_color()));
        }
        Err(why) => {
            // The architecture column already names it; the hover has the whole reason.
            let short = if why.contains("is not supported") {
                "unsupported"
            } else if why.contains("no transformers config.json") {
                "no config"
            } else {
                why.as_str()
            };
            mark_ui(ui, false);
            ui.label(RichText::new(format!("no: {short}")).color(error_color(ui)))
                .on_hover_text(why);
        }
    });
}

/// Architecture, parameters, size, gated/license, downloads, likes, whether it trains.
pub(super) fn facts_ui(ui: &mut Ui, d: &ModelDetails) {
    ui.horizontal_wrapped(|ui| {
        ui.hyperlink_to("Open on the Hub", &d.url);
        if let Some(c) = &d.commit {
            ui.weak(format!("commit {}", &c[..c.len().min(10)]));
        }
    });
    egui::Grid::new("hub-details-grid")
        .num_columns(2)
        .spacing([16.0, 4.0])
        .show(ui, |ui| facts_grid_ui(ui, d));
    if d.gated.is_some() {
        ui.horizontal_wrapped(|ui| {
            ui.hyperlink_to("Accept the license", &d.url);
            ui.weak("then set your token under \"Hugging Face token\" below.");
        });
    }
    egui::CollapsingHeader::new(format!("Files to download ({})", d.files.len()))
        .id_salt(("hub-files", &d.repo))
        .show(ui, |ui| {
            for f in &d.files {
                ui.horizontal(|ui| {
                    ui.label(&f.path);
                    ui.weak(format_bytes(f.bytes));
                });
            }
            if ui.small_button("Copy summary").clicked() {
                ui.ctx().copy_text(d.summary());
            }
        });
}

/// The rows of the facts grid, one fact each, "Trainable" last.
fn facts_grid_ui(ui: &mut Ui, d: &ModelDetails) {
    let arch = match (&d.architecture, &d.model_type) {
        (Some(a), Some(t)) => format!("{a} ({t})"),
        (Some(a), None) => a.clone(),
        (None, _) => "unknown".into(),
    };
    fact(ui, "Architecture", &arch);
    ui.end_row();
    fact(ui, "Parameters", &parameters_text(d));
    ui.end_row();
    fact(
        ui,
        "Download",
        &format!(
            "{} in {} file{}",
            format_bytes(d.download_bytes),
            d.files.len(),
            if d.files.len() == 1 { "" } else { "s" }
        ),
    );
    ui.end_row();
    fact(
        ui,
        "Gated",
        &match &d.gated {
            Some(mode) => format!("yes ({mode}): accept the license first"),
            None => "no".into(),
        },
    );
    ui.end_row();
    fact(ui, "License", d.license.as_deref().unwrap_or("unknown"));
    ui.end_row();
    fact(
        ui,
        "Popularity",
        &format!(
            "{} downloads, {} likes",
            format_count(d.downloads as usize),
            d.likes
        ),
    );
    ui.end_row();
    ui.weak("Trainable");
    ui.horizontal_wrapped(|ui| match (&d.supported, &d.weights) {
        (Ok(()), Ok(kind)) => {
            mark_ui(ui, true);
            ui.label(RichText::new(format!("yes ({kind} weights)")).color(ok_color()));
        }
        (Err(why), _) | (_, Err(why)) => {
            mark_ui(ui, false);
            ui.label(RichText::new(format!("no: {why}")).color(error_color(ui)));
        }
    });
    ui.end_row();
}

/// The parameter count with the dtypes it is stored in, e.g. `494M (BF16)`.
fn parameters_text(d: &ModelDetails) -> String {
    match d.parameters {
        Some(p) => {
            let dtypes: Vec<&str> = d
                .parameters_by_dtype
                .iter()
                .map(|(t, _)| t.as_str())
                .collect();
            if dtypes.is_empty() {
                format_count(p as usize)
            } else {
                format!("{} ({})", format_count(p as usize), dtypes.join(", "))
            }
        }
        None => "unknown".into(),
    }
}

/// A Hub problem: its message (which says what to do next) and, for a gated model, the link to
/// its license.
pub(super) fn problem_ui(ui: &mut Ui, p: &Problem) {
    let color = match p.kind {
        ProblemKind::Cancelled => ui.visuals().text_color(),
        _ => error_color(ui),
    };
    ui.label(RichText::new(&p.text).color(color));
    match &p.kind {
        ProblemKind::Gated { url } => {
            ui.horizontal_wrapped(|ui| {
                ui.hyperlink_to("Open the license page", url);
                ui.weak("then set your token under \"Hugging Face token\" below (or in step 3, Settings).");
            });
        }
        ProblemKind::Offline => {
            ui.weak("Offline: the downloaded models listed above still work; choose one there.");
        }
        ProblemKind::BadToken => {
            ui.weak("Fix the token under \"Hugging Face token\" below.");
        }
        ProblemKind::Cancelled | ProblemKind::Other => {}
    }
}
