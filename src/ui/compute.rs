//! The Compute part of the Settings step: device and dtype (automatic, or the user's override),
//! gradient checkpointing, and the memory estimate for the current form with a warning when it
//! exceeds what the chosen device has.

use eframe::egui;
use egui::{RichText, Ui};

use super::settings::{error_color, Settings};
use crate::backend::{BackendKind, Plan};
use crate::inspect::{format_bytes, ModelSummary};
use crate::memory::{estimate, Estimate, EstimateInput};
use crate::model::kernels;
use crate::train::{DeviceChoice, DtypeChoice};

/// The estimate for the form's worst case (every row at the max sequence length), in the dtype
/// and with the kernels the plan will use (before the device is known: the CPU in f32).
pub fn form_estimate(s: &Settings, model: &ModelSummary, plan: Option<&Plan>) -> Estimate {
    let weight_bytes = plan.map_or(4, |p| p.dtype.size_in_bytes());
    let kernels = match plan {
        Some(p) => p.kernels(),
        None => kernels::plan_for_device(&candle_core::Device::Cpu, candle_core::DType::F32),
    };
    estimate(
        &model.config,
        &EstimateInput {
            batch: s.batch_size.max(1),
            seq_len: s.max_seq_len.max(1),
            rank: s.lora_rank,
            weight_bytes,
            activation_bytes: kernels.activations.size_in_bytes(),
            checkpointing: s.gradient_checkpointing,
            checkpoint_keep_every: s.checkpoint_keep_every,
            lora_modules_per_layer: s.lora_targets.as_ref().map(Vec::len),
            kernels,
            lora_dropout: s.lora_dropout > 0.0,
            quant_bytes_per_weight: quant_bytes_per_weight(s, model),
            dora: s.lora_dora,
            device_memory: plan.is_some_and(|p| p.kind == BackendKind::Cuda),
            checkpoint_bytes: None,
        },
    )
}

/// Bytes per weight of the quantized linear weights the run will hold: the chosen quantization's,
/// or for a GGUF model left on automatic (which keeps the file's own) the file's bytes per
/// parameter; `None` for float weights.
fn quant_bytes_per_weight(s: &Settings, model: &ModelSummary) -> Option<f64> {
    match s.quantize {
        Some(q) => q.bytes_per_weight(),
        None if s.dtype == DtypeChoice::Auto && is_gguf(&model.source) => {
            let bytes = std::fs::metadata(&model.source).ok()?.len() as f64;
            (model.parameters > 0).then(|| bytes / model.parameters as f64)
        }
        None => None,
    }
}

fn is_gguf(path: &std::path::Path) -> bool {
    path.is_file()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// A warning when `need` exceeds what the plan's device has (most of RAM on the CPU, where the OS
/// and other apps need their share).
pub fn memory_warning(need: u64, plan: &Plan) -> Option<String> {
    let have = plan.memory_bytes?;
    let usable = match plan.kind {
        BackendKind::Cpu | BackendKind::Metal => have / 10 * 8,
        BackendKind::Cuda => have / 20 * 19,
    };
    (need > usable).then(|| {
        format!(
            "needs about {} but {} has {}: lower the batch size or max sequence length, or turn on gradient checkpointing",
            format_bytes(need),
            plan.name,
            format_bytes(have)
        )
    })
}

/// The Compute rows of the settings grid. Returns true when a value changed.
pub fn compute_ui(
    ui: &mut Ui,
    s: &mut Settings,
    model: Option<&ModelSummary>,
    plan: Option<&Result<Plan, String>>,
) -> bool {
    let before = (
        s.device,
        s.dtype,
        s.gradient_checkpointing,
        s.checkpoint_keep_every,
    );
    egui::Grid::new("compute-grid")
        .num_columns(3)
        .spacing([12.0, 6.0])
        .show(ui, |ui| {
            ui.heading("Compute");
            ui.end_row();
            device_row(ui, s, plan);
            precision_row(ui, s, plan);
            memory_saver_row(ui, s);
            ui.end_row();
        });
    estimate_line(ui, s, model, plan);
    before
        != (
            s.device,
            s.dtype,
            s.gradient_checkpointing,
            s.checkpoint_keep_every,
        )
}

/// Device picker, with the plan it leads to and why.
fn device_row(ui: &mut Ui, s: &mut Settings, plan: Option<&Result<Plan, String>>) {
    let label = ui.label("Device");
    egui::ComboBox::from_id_salt("device")
        .selected_text(device_label(s.device))
        .show_ui(ui, |ui| {
            for d in [
                DeviceChoice::Auto,
                DeviceChoice::Metal,
                DeviceChoice::Cuda,
                DeviceChoice::Cpu,
            ] {
                ui.selectable_value(&mut s.device, d, device_label(d));
            }
        })
        .response
        .labelled_by(label.id);
    match plan {
        Some(Ok(p)) => ui.weak(format!("{} — {}", p.name, p.reason)),
        Some(Err(e)) => ui.label(RichText::new(e).color(error_color(ui))),
        None => ui.weak("checking…"),
    };
    ui.end_row();
}

/// Precision picker, with what the base model then runs in.
fn precision_row(ui: &mut Ui, s: &mut Settings, plan: Option<&Result<Plan, String>>) {
    let label = ui.label("Precision");
    egui::ComboBox::from_id_salt("dtype")
        .selected_text(dtype_label(s.dtype))
        .show_ui(ui, |ui| {
            for d in [
                DtypeChoice::Auto,
                DtypeChoice::F32,
                DtypeChoice::Bf16,
                DtypeChoice::F16,
            ] {
                ui.selectable_value(&mut s.dtype, d, dtype_label(d));
            }
        })
        .response
        .labelled_by(label.id);
    let now = match plan {
        Some(Ok(p)) if p.kernels().mixed_bf16() => "bf16 weights × f32 activations".to_string(),
        Some(Ok(p)) => format!("{:?}", p.dtype).to_lowercase(),
        _ => "…".to_string(),
    };
    ui.weak(format!(
        "base model in {now}; LoRA weights and optimizer state stay f32"
    ));
    ui.end_row();
}

/// Memory saver (gradient checkpointing) picker, with what it trades.
fn memory_saver_row(ui: &mut Ui, s: &mut Settings) {
    let label = ui.label("Memory saver");
    let mut saver = MemorySaver::of(s);
    egui::ComboBox::from_id_salt("memory-saver")
        .selected_text(saver.label())
        .show_ui(ui, |ui| {
            for m in [
                MemorySaver::Off,
                MemorySaver::Balanced,
                MemorySaver::Maximum,
            ] {
                ui.selectable_value(&mut saver, m, m.label());
            }
        })
        .response
        .labelled_by(label.id);
    saver.apply(s);
    ui.weak(saver.help());
    ui.end_row();
}

/// The memory estimate for the chosen model, or a warning when it will not fit.
fn estimate_line(
    ui: &mut Ui,
    s: &Settings,
    model: Option<&ModelSummary>,
    plan: Option<&Result<Plan, String>>,
) {
    ui.horizontal_wrapped(|ui| {
        ui.label("Memory:");
        let Some(m) = model else {
            ui.weak("choose a model to see the estimate");
            return;
        };
        let p = plan.and_then(|p| p.as_ref().ok());
        let e = form_estimate(s, m, p);
        let detail = format!(
            "about {} at most for the longest batch: weights {}, activations {}, logits {}, LoRA + optimizer {}",
            format_bytes(e.total),
            format_bytes(e.base_weights),
            format_bytes(e.activations),
            format_bytes(e.logits),
            format_bytes(e.lora_and_optimizer)
        );
        match p.and_then(|p| memory_warning(e.total, p)) {
            Some(w) => ui.label(RichText::new(format!("⚠ {w}")).color(error_color(ui))),
            None => ui.weak(detail),
        };
    });
}

/// Gradient checkpointing as the form offers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MemorySaver {
    Off,
    /// Two layers in three recomputed.
    Balanced,
    /// Every layer recomputed.
    Maximum,
}

impl MemorySaver {
    fn of(s: &Settings) -> Self {
        match (s.gradient_checkpointing, s.checkpoint_keep_every) {
            (false, _) => Self::Off,
            (true, 0) => Self::Maximum,
            (true, _) => Self::Balanced,
        }
    }

    fn apply(self, s: &mut Settings) {
        (s.gradient_checkpointing, s.checkpoint_keep_every) = match self {
            Self::Off => (false, 0),
            Self::Balanced => (true, 3),
            Self::Maximum => (true, 0),
        };
    }

    fn label(self) -> &'static str {
        match self {
            Self::Off => "Off (fastest)",
            Self::Balanced => "Balanced (gradient checkpointing, 2 layers in 3)",
            Self::Maximum => "Maximum (gradient checkpointing, every layer)",
        }
    }

    fn help(self) -> &'static str {
        match self {
            Self::Off => "keeps every activation for backward",
            Self::Balanced => {
                "recomputes most activations in backward: about half the memory, ~15% slower"
            }
            Self::Maximum => "recomputes all activations in backward: least memory, ~25% slower",
        }
    }
}

fn device_label(d: DeviceChoice) -> &'static str {
    match d {
        DeviceChoice::Auto => "Automatic",
        DeviceChoice::Metal => "Metal (Apple GPU)",
        DeviceChoice::Cuda => "CUDA (NVIDIA GPU)",
        DeviceChoice::Cpu => "CPU",
    }
}

fn dtype_label(d: DtypeChoice) -> &'static str {
    match d {
        DtypeChoice::Auto => "Automatic",
        DtypeChoice::F32 => "f32",
        DtypeChoice::Bf16 => "bf16",
        DtypeChoice::F16 => "f16",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn plan(kind: BackendKind, memory: u64) -> Plan {
        Plan {
            kind,
            dtype: DType::F32,
            name: "CPU (2 cores, AVX2)".into(),
            reason: "test".into(),
            memory_bytes: Some(memory),
        }
    }

    #[test]
    fn warns_only_past_what_the_device_has() {
        let p = plan(BackendKind::Cpu, 16_000_000_000);
        assert_eq!(memory_warning(8_000_000_000, &p), None);
        let w = memory_warning(15_000_000_000, &p).unwrap();
        assert!(
            w.contains("gradient checkpointing") && w.contains("CPU"),
            "{w}"
        );
        let unknown = Plan {
            memory_bytes: None,
            ..p
        };
        assert_eq!(memory_warning(u64::MAX, &unknown), None);
    }

    #[test]
    fn a_gguf_on_automatic_is_estimated_at_its_own_quantization() {
        let gguf = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/convert/tiny-llama.Q4_0.gguf");
        let cache = tempfile::tempdir().unwrap();
        let prepared = crate::model::ModelSource::open(&gguf)
            .unwrap()
            .prepare(cache.path())
            .unwrap();
        let model = crate::inspect::summarize_prepared(&prepared).unwrap();
        let mut s = Settings::default();
        let file = std::fs::metadata(&gguf).unwrap().len() as f64;
        let auto = quant_bytes_per_weight(&s, &model).unwrap();
        assert!(
            (auto - file / model.parameters as f64).abs() < 1e-9,
            "{auto}"
        );
        let float = form_estimate(
            &Settings {
                quantize: Some(crate::model::qload::QuantChoice::None),
                ..s.clone()
            },
            &model,
            None,
        );
        assert!(form_estimate(&s, &model, None).base_weights < float.base_weights);
        s.dtype = DtypeChoice::F32; // an explicit dtype converts the GGUF to float
        assert_eq!(quant_bytes_per_weight(&s, &model), None);
        s.quantize = Some(crate::model::qload::QuantChoice::Q8_0);
        assert_eq!(quant_bytes_per_weight(&s, &model), Some(34.0 / 32.0));
    }
}
