//! `finetune`: the FineTune binary. Parses arguments and hands off to the library.

fn main() -> std::process::ExitCode {
    finetune::cli::main()
}
