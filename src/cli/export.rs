//! `finetune export --format gguf|ollama`: the model as one GGUF file, or a folder for Ollama.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;

use crate::export::gguf::{export_gguf, GgufQuant};

/// What `export --format gguf|ollama` was asked.
pub(super) struct GgufRequest {
    /// The adapter folder.
    pub adapter: PathBuf,
    /// The base model.
    pub base: PathBuf,
    /// The .gguf file or a folder.
    pub output: PathBuf,
    /// `--quant`.
    pub quant: String,
    /// `--base-only`.
    pub base_only: bool,
    /// `--format ollama`.
    pub ollama: bool,
}

/// A progress line every 10% when stderr is a terminal.
fn progress_line() -> impl Fn(usize, usize) + Sync {
    let last = Mutex::new(0usize);
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    move |done, total| {
        if !terminal {
            return;
        }
        let tenth = done * 10 / total.max(1);
        if let Ok(mut l) = last.lock() {
            if tenth > *l {
                *l = tenth;
                eprintln!("  {done}/{total} tensors");
            }
        }
    }
}

/// The file to write for `output`: itself when it names a .gguf file, else a file in that folder
/// named after the base model and the type.
pub(crate) fn gguf_path(output: &Path, base: &Path, q: GgufQuant, tuned: bool) -> PathBuf {
    if output
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return output.to_path_buf();
    }
    let stem = crate::export::file_stem_of(base);
    let tag = if tuned { "-tuned" } else { "" };
    output.join(format!("{stem}{tag}-{}.gguf", q.name()))
}

pub(super) fn gguf(r: &GgufRequest) -> anyhow::Result<ExitCode> {
    let q = GgufQuant::parse(&r.quant).ok_or_else(|| {
        let names: Vec<&str> = GgufQuant::ALL.iter().map(|q| q.name()).collect();
        anyhow::anyhow!("--quant {}: choose one of {}", r.quant, names.join(", "))
    })?;
    let start = std::time::Instant::now();
    if r.ollama {
        let data = super::trainer_state_near(&r.adapter).map(|s| s.config.train_data);
        let o = crate::export::ollama::export_ollama(
            &crate::export::ollama::OllamaRequest {
                adapter: &r.adapter,
                base: &r.base,
                dir: &r.output,
                quant: q,
                separate_adapter: r.base_only,
                data: data.as_deref(),
            },
            &progress_line(),
        )?;
        for w in &o.warnings {
            eprintln!("warning: {w}");
        }
        println!(
            "wrote {} for Ollama in {:.1} s: {}",
            o.dir.display(),
            start.elapsed().as_secs_f64(),
            o.files
                .iter()
                .filter_map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!("run it: {}", o.command);
        return Ok(ExitCode::SUCCESS);
    }
    let file = gguf_path(&r.output, &r.base, q, !r.base_only);
    let adapter = (!r.base_only).then_some(r.adapter.as_path());
    let g = export_gguf(adapter, &r.base, &file, q, &progress_line())?;
    println!(
        "wrote {} ({}, {}, {} tensors, {} merged, {:.1} MB) in {:.1} s",
        g.path.display(),
        g.architecture,
        q.name(),
        g.tensors,
        g.merged,
        g.bytes as f64 / 1e6,
        start.elapsed().as_secs_f64()
    );
    println!("run it: llama-cli -m {}", g.path.display());
    Ok(ExitCode::SUCCESS)
}
