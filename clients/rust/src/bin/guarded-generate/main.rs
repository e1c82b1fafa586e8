//! `guarded-generate`: stream guarded tokens from the libfse daemon, as
//! `fse generate --addr` does (flags, output and exit codes: clients/README.md).

mod args;
mod render;

use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;

use fse_client::{Client, Code, Error, Event, Generation, Status};
use tokio_stream::StreamExt;

use crate::args::{Cli, Parsed};

const PROG: &str = "guarded-generate";

/// Exit codes of the contract.
const EXIT_COMPLETED: u8 = 0;
const EXIT_ERROR: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_HALTED: u8 = 3;
const EXIT_CANCELLED: u8 = 4;

fn status_exit(status: Status) -> u8 {
    match status {
        Status::Completed => EXIT_COMPLETED,
        Status::Halted => EXIT_HALTED,
        Status::Cancelled => EXIT_CANCELLED,
        Status::Error => EXIT_ERROR,
    }
}

/// `INVALID_ARGUMENT` is the user's input, judged by the daemon: bad usage.
fn error_exit(err: &Error) -> u8 {
    if err.code() == Code::InvalidArgument {
        EXIT_USAGE
    } else {
        EXIT_ERROR
    }
}

fn main() -> ExitCode {
    let cli = match args::parse(std::env::args_os()) {
        Parsed::Run(cli) => cli,
        Parsed::Print(text) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Parsed::Usage(line) => {
            eprintln!("{PROG}: error: {line}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let code = match runtime {
        Ok(runtime) => runtime.block_on(run(&cli)),
        Err(err) => {
            eprintln!("{PROG}: error: INTERNAL: cannot start the async runtime: {err}");
            EXIT_ERROR
        }
    };
    ExitCode::from(code)
}

async fn run(cli: &Cli) -> u8 {
    let options = match cli.connect_options() {
        Ok(options) => options,
        Err(line) => {
            eprintln!("{PROG}: error: {line}");
            return EXIT_USAGE;
        }
    };
    let result = async {
        let client = Client::connect(&cli.addr, options).await?;
        if cli.info {
            let info = client.info().await?;
            return Ok(write_line(&render::json_line(&render::info_json(&info)))
                .map_or(EXIT_ERROR, |()| 0));
        }
        let generation = client.generate(cli.request()).await?;
        stream(cli, generation).await
    };
    match result.await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("{PROG}: error: {err}");
            error_exit(&err)
        }
    }
}

/// Renders the events until the verdict; the exit code is the verdict's. A
/// closed stdout ends the run with exit 1 (dropping the stream cancels the call).
async fn stream(cli: &Cli, mut generation: Generation) -> Result<u8, Error> {
    let colour = !cli.json && io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    // First Ctrl-C cancels cleanly (verdict `cancelled`, exit 4); a second one quits.
    let mut interrupts =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
    let mut interrupted = false;
    let mut tokens = 0u32;
    loop {
        let event = tokio::select! {
            event = generation.next() => event,
            Some(()) = async { interrupts.as_mut()?.recv().await } => {
                if interrupted {
                    std::process::exit(130);
                }
                interrupted = true;
                generation.cancel();
                continue;
            }
        };
        // A Generation always ends with a verdict or an error, so `None` is never seen.
        let Some(event) = event else {
            return Ok(EXIT_ERROR);
        };
        let written = match event? {
            Event::Started(_) => Ok(()),
            Event::Token(token) => {
                tokens += 1;
                if cli.cancel_after == Some(tokens) {
                    generation.cancel();
                }
                if cli.json {
                    write_line(&render::json_line(&render::token_json(&token)))
                } else {
                    write_text(
                        &token.text,
                        colour.then(|| render::colour(token.health)).flatten(),
                    )
                }
            }
            Event::Verdict(verdict) => {
                let written = if cli.json {
                    write_line(&render::json_line(&render::verdict_json(&verdict)))
                } else {
                    write_text("\n", None).map(|()| eprintln!("{}", render::verdict_line(&verdict)))
                };
                return Ok(written.map_or(EXIT_ERROR, |()| status_exit(verdict.status)));
            }
        };
        if written.is_err() {
            return Ok(EXIT_ERROR);
        }
    }
}

/// One line on stdout, flushed: a reader sees each event as it arrives.
fn write_line(line: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

fn write_text(text: &str, colour: Option<&str>) -> io::Result<()> {
    let mut out = io::stdout().lock();
    match colour {
        Some(code) => write!(out, "{code}{text}\x1b[0m")?,
        None => out.write_all(text.as_bytes())?,
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_contract() {
        assert_eq!(status_exit(Status::Completed), 0);
        assert_eq!(status_exit(Status::Error), 1);
        assert_eq!(status_exit(Status::Halted), 3);
        assert_eq!(status_exit(Status::Cancelled), 4);
        assert_eq!(
            error_exit(&Error::new(Code::InvalidArgument, "max_tokens: too many")),
            2
        );
        for code in [
            Code::Unavailable,
            Code::Unauthenticated,
            Code::ResourceExhausted,
            Code::Internal,
            Code::Unknown,
        ] {
            assert_eq!(error_exit(&Error::new(code, "x")), 1, "{code:?}");
        }
    }
}
