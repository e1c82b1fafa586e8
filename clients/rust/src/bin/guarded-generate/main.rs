//! `guarded-generate`: stream guarded tokens from the libfse daemon, as
//! `fse generate --addr` does (flags, output and exit codes: clients/README.md).

mod args;
#[cfg(test)]
mod tests;

use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;

use clap::Parser;
use fse_client::{Client, Code, Error, Event, Generation, Health, Status};
use tokio_stream::StreamExt;

use crate::args::Cli;

/// Exit codes of the contract.
const EXIT_ERROR: u8 = 1;
const EXIT_USAGE: u8 = 2;

fn status_exit(status: Status) -> u8 {
    match status {
        Status::Completed => 0,
        Status::Halted => 3,
        Status::Cancelled => 4,
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
    let cli = Cli::parse(); // on bad usage: clap's error, exit 2
    let options = cli.connect_options().unwrap_or_else(|e| e.exit());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread tokio runtime");
    ExitCode::from(runtime.block_on(async {
        let result = async {
            let client = Client::connect(&cli.addr, options).await?;
            if cli.info {
                let line = fse_client::info_json(&client.info().await?).to_string();
                return Ok(write_line(&line).map_or(EXIT_ERROR, |()| 0));
            }
            stream(&cli, client.generate(cli.request()).await?).await
        };
        result.await.unwrap_or_else(|err| {
            eprintln!("guarded-generate: error: {err}");
            error_exit(&err)
        })
    }))
}

/// Renders the events until the verdict; the exit code is the verdict's. A
/// closed stdout ends the run with exit 1 (dropping the stream cancels the call).
async fn stream(cli: &Cli, mut generation: Generation) -> Result<u8, Error> {
    let colour = !cli.json && io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    // First Ctrl-C cancels cleanly (verdict `cancelled`, exit 4); a second one quits.
    let canceller = generation.canceller();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut interrupts) = signal(SignalKind::interrupt()) {
            interrupts.recv().await;
            canceller.cancel();
            interrupts.recv().await;
            std::process::exit(130);
        }
    });
    let mut tokens = 0u32;
    // A Generation always ends with a verdict or an error: the loop returns from inside.
    while let Some(event) = generation.next().await {
        let written = match event? {
            Event::Started(_) => Ok(()),
            Event::Token(token) => {
                tokens += 1;
                if cli.cancel_after == Some(tokens) {
                    generation.cancel();
                }
                if cli.json {
                    write_line(&token.to_json().to_string())
                } else {
                    let colour = colour.then(|| ansi(token.health)).flatten();
                    write_text(&token.text, colour)
                }
            }
            Event::Verdict(verdict) => {
                let written = if cli.json {
                    write_line(&verdict.to_json().to_string())
                } else {
                    write_text("\n", None).map(|()| eprintln!("{verdict}"))
                };
                return Ok(written.map_or(EXIT_ERROR, |()| status_exit(verdict.status)));
            }
        };
        if written.is_err() {
            return Ok(EXIT_ERROR);
        }
    }
    Ok(EXIT_ERROR)
}

/// ANSI colour of a health band, for text on a terminal.
fn ansi(health: Option<Health>) -> Option<&'static str> {
    match health? {
        Health::Green => Some("\x1b[32m"),
        Health::Yellow => Some("\x1b[33m"),
        Health::Red => Some("\x1b[31m"),
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
