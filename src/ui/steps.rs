//! The steps of the flow (Model → Dataset → Settings → Train → Try → Export) and the side panel that
//! lists them, each with a one-line status so the state of the whole flow shows at a glance.

use eframe::egui;
use egui::{RichText, Ui};

/// The steps of the flow, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// 1: choose the base model.
    Model,
    /// 2: choose and check the dataset.
    Dataset,
    /// 3: the training settings.
    Settings,
    /// 4: run the training and watch it.
    Train,
    /// 5: talk to the base and tuned models side by side.
    Try,
    /// 6: export the adapter.
    Export,
}

impl Step {
    /// Every step, in the order of the flow.
    pub const ALL: [Step; 6] = [
        Step::Model,
        Step::Dataset,
        Step::Settings,
        Step::Train,
        Step::Try,
        Step::Export,
    ];

    /// The side panel's label, e.g. "1. Model".
    pub fn title(self) -> &'static str {
        match self {
            Step::Model => "1. Model",
            Step::Dataset => "2. Dataset",
            Step::Settings => "3. Settings",
            Step::Train => "4. Train",
            Step::Try => "5. Try",
            Step::Export => "6. Export",
        }
    }
}

/// The side panel. `status` gives each step's line and whether that step is in order.
pub fn steps_ui(ui: &mut Ui, current: &mut Step, status: impl Fn(Step) -> (String, bool)) {
    ui.add_space(8.0);
    ui.heading("FineTune");
    ui.weak("LoRA on your own machine");
    ui.add_space(12.0);
    for step in Step::ALL {
        let r = ui
            .add_sized(
                [ui.available_width(), 28.0],
                egui::Button::selectable(*current == step, RichText::new(step.title()).size(16.0)),
            )
            .on_hover_text(format!(
                "Cmd/Ctrl+{}",
                Step::ALL
                    .iter()
                    .position(|s| *s == step)
                    .map_or(0, |i| i + 1)
            ));
        if r.clicked() {
            *current = step;
        }
        let (text, ok) = status(step);
        let color = if ok {
            ui.visuals().weak_text_color()
        } else {
            ui.visuals().warn_fg_color
        };
        ui.label(RichText::new(text).size(12.0).color(color));
        ui.add_space(6.0);
    }
}
