//! `finetune chat`: an interactive conversation with a model (and optionally an adapter) in the
//! terminal. Each line read is a user turn; the answer streams to stdout; the conversation is
//! rendered with the model's chat template every turn. Commands: `/reset` forgets the
//! conversation, `/base` and `/tuned` switch the adapter off and on, `/quit` (or end of input)
//! leaves. Ctrl-C ends the answer being written; at the prompt it leaves.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Args;

use super::generate::{Loaded, ModelArgs, SamplingArgs, TemplateArgs};
use crate::generate::prompt::{self, Turn};

/// `finetune chat` flags.
#[derive(Debug, Args)]
pub struct ChatArgs {
    /// The model and adapter.
    #[command(flatten)]
    pub model: ModelArgs,
    /// System message and template variables.
    #[command(flatten)]
    pub template: TemplateArgs,
    /// Sampling.
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

const HELP: &str = "Type a message and press Enter. /reset forgets the conversation, /base and \
/tuned switch the adapter off and on, /quit leaves. Ctrl-C stops an answer.";

/// What a line typed at the prompt asks for.
#[derive(Debug, PartialEq, Eq)]
enum Line<'a> {
    Say(&'a str),
    Reset,
    Adapter(bool),
    Help,
    Quit,
    Nothing,
    Unknown(&'a str),
}

fn parse(line: &str) -> Line<'_> {
    let line = line.trim();
    match line {
        "" => Line::Nothing,
        "/reset" | "/clear" => Line::Reset,
        "/base" => Line::Adapter(false),
        "/tuned" => Line::Adapter(true),
        "/help" | "/?" => Line::Help,
        "/quit" | "/exit" | "/q" => Line::Quit,
        _ if line.starts_with('/') && !line.contains(' ') => Line::Unknown(line),
        _ => Line::Say(line),
    }
}

/// Ctrl-C's handler: while an answer is being written it ends the answer; at the prompt it
/// leaves (exit code 130, as a shell's interrupt).
fn interrupt_flags() -> (Arc<AtomicBool>, Arc<AtomicBool>) {
    let stop = Arc::new(AtomicBool::new(false));
    let answering = Arc::new(AtomicBool::new(false));
    let (s, a) = (stop.clone(), answering.clone());
    let set = ctrlc::set_handler(move || {
        if a.load(Ordering::Relaxed) {
            s.store(true, Ordering::Relaxed);
        } else {
            eprintln!();
            std::process::exit(130);
        }
    });
    if let Err(e) = set {
        eprintln!("note: Ctrl-C will end the chat, not just the answer ({e})");
    }
    (stop, answering)
}

/// One answer to `text` after `history`; the answer is added to the history unless cancelled.
fn answer(
    args: &ChatArgs,
    loaded: &Loaded,
    history: &mut Vec<Turn>,
    text: &str,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let prompt = args.template.chat_prompt(text, history.clone());
    let ids = prompt::ids(&loaded.tokenizer, &prompt)?;
    let options = loaded.options(&args.sampling);
    let mut out = std::io::stdout().lock();
    let (done, said) = loaded.stream(&ids, &options, stop, &mut out)?;
    writeln!(out)?;
    eprintln!("{}", loaded.stats(&done));
    if done.finish != crate::generate::Finish::Cancelled {
        history.push(Turn {
            user: text.to_owned(),
            assistant: said,
        });
    }
    Ok(())
}

/// Runs `finetune chat` on standard input.
pub fn run(args: &ChatArgs) -> anyhow::Result<ExitCode> {
    let mut loaded = args.model.load()?;
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("{HELP}");
    }
    let (stop, answering) = interrupt_flags();
    let mut history: Vec<Turn> = Vec::new();
    let mut input = std::io::stdin().lock();
    let mut line = String::new();
    loop {
        if interactive {
            let who = if loaded.model.lora_enabled() {
                "tuned"
            } else {
                "base"
            };
            eprint!("{who}> ");
        }
        line.clear();
        if input.read_line(&mut line)? == 0 {
            break;
        }
        match parse(&line) {
            Line::Nothing => {}
            Line::Quit => break,
            Line::Help => eprintln!("{HELP}"),
            Line::Unknown(cmd) => eprintln!("unknown command {cmd}; /help lists them"),
            Line::Reset => {
                history.clear();
                eprintln!("(conversation forgotten)");
            }
            Line::Adapter(_) if args.model.adapter.is_none() => {
                eprintln!("no adapter loaded: start with --adapter DIR to compare");
            }
            Line::Adapter(on) => {
                loaded.model.set_lora_enabled(on);
                eprintln!("(adapter {})", if on { "on" } else { "off" });
            }
            Line::Say(text) => {
                stop.store(false, Ordering::Relaxed);
                answering.store(true, Ordering::Relaxed);
                let result = answer(args, &loaded, &mut history, text, &stop);
                answering.store(false, Ordering::Relaxed);
                result?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_messages_or_commands() {
        assert_eq!(parse("  hello there \n"), Line::Say("hello there"));
        assert_eq!(parse("\n"), Line::Nothing);
        assert_eq!(parse("/reset\n"), Line::Reset);
        assert_eq!(parse("/base"), Line::Adapter(false));
        assert_eq!(parse("/tuned"), Line::Adapter(true));
        assert_eq!(parse("/quit"), Line::Quit);
        assert_eq!(parse("/nope"), Line::Unknown("/nope"));
        assert_eq!(
            parse("/usr/bin is a folder"),
            Line::Say("/usr/bin is a folder")
        );
    }
}
