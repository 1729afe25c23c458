//! Opens the FineTune window, loading any model folder or JSONL paths given as arguments (what
//! `finetune` with no subcommand will do once the CLI calls `finetune::ui::run_app`).

fn main() -> std::process::ExitCode {
    let paths = std::env::args_os().skip(1).map(Into::into).collect();
    match finetune::ui::run_app(paths) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
