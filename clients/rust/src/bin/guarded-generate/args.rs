//! Flags of `guarded-generate` (clients/README.md, "The contract every example
//! keeps") and the one-line usage errors they produce.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{CommandFactory, FromArgMatches, Parser};
use fse_client::{Address, ConnectOptions, Request};

/// Stream guarded tokens from the libfse daemon.
#[derive(Debug, Parser)]
#[command(
    name = "guarded-generate",
    bin_name = "guarded-generate",
    version,
    args_override_self = true
)]
pub struct Cli {
    /// Daemon address: unix:/abs/path or HOST:PORT
    #[arg(long, value_name = "unix:PATH|HOST:PORT", value_parser = address)]
    pub addr: String,
    /// TLS over TCP, the server's certificate checked against this PEM CA
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Bearer token: the file's first line, sent as `authorization: Bearer TOKEN`
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// JSON lines on stdout: one per token, then the verdict
    #[arg(long)]
    pub json: bool,
    /// Print the daemon's Info (model, policies, limits) as one JSON line
    #[arg(long)]
    pub info: bool,
    /// A policy the daemon serves [default: the daemon's `default`]
    #[arg(long, value_name = "NAME")]
    pub policy: Option<String>,
    /// Tokens to generate at most
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = at_least_one, allow_negative_numbers = true)]
    pub max_tokens: u32,
    /// Sampling temperature; 0 = greedy
    #[arg(long, value_name = "T", default_value_t = 0.8, value_parser = number, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Top-k; 0 = off
    #[arg(long, value_name = "K", default_value_t = 40, value_parser = integer, allow_negative_numbers = true)]
    pub top_k: i32,
    /// Top-p; 1 = off
    #[arg(long, value_name = "P", default_value_t = 0.95, value_parser = number, allow_negative_numbers = true)]
    pub top_p: f64,
    /// Min-p; 0 = off
    #[arg(long, value_name = "M", default_value_t = 0.05, value_parser = number, allow_negative_numbers = true)]
    pub min_p: f64,
    /// Sampling seed [default: random, chosen by the daemon]
    #[arg(long, value_name = "S", value_parser = seed, allow_negative_numbers = true)]
    pub seed: Option<u32>,
    /// A stop sequence (repeatable); not included in the output
    #[arg(long = "stop", value_name = "TEXT", allow_hyphen_values = true)]
    pub stops: Vec<String>,
    /// Generation budget in seconds; the stream halts with guard `deadline`
    #[arg(long, value_name = "SECONDS", value_parser = seconds, allow_negative_numbers = true)]
    pub timeout: Option<f64>,
    /// Send Cancel after the N-th token and read on until the verdict
    #[arg(long, value_name = "N", value_parser = at_least_one, allow_negative_numbers = true)]
    pub cancel_after: Option<u32>,
    /// The prompt text (the last argument)
    #[arg(value_name = "PROMPT", required_unless_present = "info", value_parser = prompt)]
    pub prompt: Option<String>,
}

/// What the CLI asks for: usage problems are `--FLAG: WHAT; accepted: RANGE`.
#[derive(Debug)]
pub enum Parsed {
    /// --help or --version: print this on stdout, exit 0.
    Print(String),
    /// A bad flag or prompt: the line after `guarded-generate: error: `, exit 2.
    Usage(String),
    Run(Box<Cli>),
}

/// What each flag accepts, for the usage lines.
fn accepted(flag: &str) -> &'static str {
    match flag {
        "--addr" => "unix:PATH or HOST:PORT",
        "--tls-ca" => "a readable PEM CA certificate file",
        "--token-file" => "a readable file whose first line is the token",
        "--max-tokens" | "--cancel-after" => ">= 1",
        "--top-k" => "an integer",
        "--seed" => "0 .. 2^32-1",
        "--timeout" => "seconds > 0",
        "prompt" => "non-empty UTF-8 text",
        "--stop" => "UTF-8 text",
        "--policy" => "a policy name",
        "--temperature" | "--top-p" | "--min-p" => "a number",
        _ => "see --help",
    }
}

fn usage(flag: &str, what: impl std::fmt::Display) -> String {
    format!("{flag}: {what}; accepted: {}", accepted(flag))
}

pub fn parse<I, T>(argv: I) -> Parsed
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    if let Some(flag) = non_utf8_arg(&argv) {
        return Parsed::Usage(usage(&flag, "not valid UTF-8"));
    }
    let matches = Cli::command().try_get_matches_from(argv);
    match matches.and_then(|m| Cli::from_arg_matches(&m)) {
        Ok(cli) => Parsed::Run(Box::new(cli)),
        Err(err)
            if matches!(
                err.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) =>
        {
            Parsed::Print(err.render().to_string())
        }
        Err(err) => Parsed::Usage(usage_line(&err)),
    }
}

/// The flag (or "prompt") whose value is not UTF-8, which clap cannot name.
fn non_utf8_arg(argv: &[OsString]) -> Option<String> {
    let at = argv.iter().skip(1).position(|a| a.to_str().is_none())? + 1;
    let arg = argv[at].to_string_lossy();
    if let Some(flag) = arg
        .strip_prefix("--")
        .and_then(|a| a.split_once('='))
        .map(|(f, _)| f)
    {
        return Some(format!("--{flag}"));
    }
    match argv[at - 1].to_str() {
        Some(prev) if prev.starts_with("--") && !prev.contains('=') && takes_value(prev) => {
            Some(prev.to_string())
        }
        _ => Some("prompt".to_string()),
    }
}

fn takes_value(flag: &str) -> bool {
    let name = flag.trim_start_matches('-');
    Cli::command()
        .get_arguments()
        .any(|a| a.get_long() == Some(name) && a.get_action().takes_values())
}

/// clap's multi-line error as the contract's one line.
fn usage_line(err: &clap::Error) -> String {
    // "--max-tokens <N>" -> "--max-tokens"; "[PROMPT]" -> "prompt".
    let arg = match err.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => s.clone(),
        Some(ContextValue::Strings(v)) => v.first().cloned().unwrap_or_default(),
        _ => String::new(),
    };
    let name = arg.split([' ', '=']).next().unwrap_or_default();
    let flag = if name.starts_with("--") {
        name.to_string()
    } else if name.is_empty() {
        String::new()
    } else {
        "prompt".to_string()
    };
    let value = match err.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(s)) => s.clone(),
        _ => String::new(),
    };
    match err.kind() {
        // Our value parsers' messages are already "WHAT" ("x is invalid").
        ErrorKind::ValueValidation => {
            let what = std::error::Error::source(err)
                .map_or_else(|| format!("{value:?} is invalid"), ToString::to_string);
            usage(&flag, what)
        }
        ErrorKind::InvalidValue if value.is_empty() => usage(&flag, "a value is required"),
        ErrorKind::MissingRequiredArgument => usage(&flag, "missing"),
        ErrorKind::InvalidUtf8 => usage(
            if flag.is_empty() { "prompt" } else { &flag },
            "not valid UTF-8",
        ),
        ErrorKind::UnknownArgument if arg.starts_with('-') => usage(name, "unknown flag"),
        ErrorKind::UnknownArgument => usage(
            "prompt",
            format!("unexpected second argument {arg:?} (quote the prompt)"),
        ),
        _ => {
            // Anything else: clap's own first line, minus its "error: " prefix.
            let text = err.render().to_string();
            let first = text.lines().next().unwrap_or("bad usage");
            first.trim_start_matches("error: ").to_string()
        }
    }
}

// Value parsers: each returns the WHAT part of a usage line.

/// Checked here, kept as typed: error messages name the address the user gave.
fn address(s: &str) -> Result<String, String> {
    match s.parse::<Address>() {
        Ok(_) => Ok(s.to_string()),
        Err(_) => Err(format!("{s:?} is invalid")),
    }
}

fn at_least_one(s: &str) -> Result<u32, String> {
    s.trim()
        .parse::<u32>()
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| format!("{s} is invalid"))
}

fn integer(s: &str) -> Result<i32, String> {
    s.trim().parse().map_err(|_| format!("{s} is invalid"))
}

fn seed(s: &str) -> Result<u32, String> {
    s.trim().parse().map_err(|_| format!("{s} is invalid"))
}

/// Any double, as Python's float() reads it (ranges are the daemon's to judge).
fn number(s: &str) -> Result<f64, String> {
    s.trim().parse().map_err(|_| format!("{s} is invalid"))
}

fn seconds(s: &str) -> Result<f64, String> {
    s.trim()
        .parse::<f64>()
        .ok()
        .filter(|t| t.is_finite() && *t > 0.0)
        .ok_or_else(|| format!("{s} is invalid"))
}

fn prompt(s: &str) -> Result<String, String> {
    if s.is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(s.to_string())
    }
}

impl Cli {
    /// The generation request the flags describe: all four sampling values
    /// always, the seed and the rest only when given.
    pub fn request(&self) -> Request {
        let mut request = Request::prompt(self.prompt.clone().unwrap_or_default())
            .max_tokens(self.max_tokens)
            .temperature(self.temperature)
            .top_k(self.top_k)
            .top_p(self.top_p)
            .min_p(self.min_p);
        if let Some(seed) = self.seed {
            request = request.seed(seed);
        }
        if let Some(policy) = &self.policy {
            request = request.policy(policy);
        }
        for stop in &self.stops {
            request = request.stop(stop);
        }
        if let Some(timeout) = self.timeout {
            request = request.timeout_secs(timeout);
        }
        request
    }

    /// Connection options from --tls-ca and --token-file, reading both files.
    pub fn connect_options(&self) -> Result<ConnectOptions, String> {
        let mut options = ConnectOptions::new();
        if let Some(path) = &self.tls_ca {
            if matches!(self.addr.parse(), Ok(Address::Unix(_))) {
                return Err(usage(
                    "--tls-ca",
                    "TLS needs a HOST:PORT address, not a unix socket",
                ));
            }
            let pem = read("--tls-ca", path)?;
            if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                return Err(usage(
                    "--tls-ca",
                    format!("{} holds no PEM certificate", path.display()),
                ));
            }
            options = options.tls_ca_pem(pem);
        }
        if let Some(path) = &self.token_file {
            let bytes = read("--token-file", path)?;
            let text = String::from_utf8_lossy(&bytes);
            let token = text.lines().next().unwrap_or_default().trim();
            if token.is_empty() {
                return Err(usage(
                    "--token-file",
                    format!("{} has no token on its first line", path.display()),
                ));
            }
            // It goes into an HTTP header: visible ASCII only.
            if !token.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
                return Err(usage(
                    "--token-file",
                    format!("the token in {} is not printable ASCII", path.display()),
                ));
            }
            options = options.token(token);
        }
        Ok(options)
    }
}

fn read(flag: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| {
        usage(
            flag,
            format!("cannot read {}: {}", path.display(), io_reason(&e)),
        )
    })
}

/// "No such file or directory", without Rust's " (os error 2)".
fn io_reason(err: &std::io::Error) -> String {
    let text = err.to_string();
    match text.find(" (os error") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Cli {
        match parse(std::iter::once("guarded-generate").chain(args.iter().copied())) {
            Parsed::Run(cli) => *cli,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    fn usage_of(args: &[&str]) -> String {
        match parse(std::iter::once("guarded-generate").chain(args.iter().copied())) {
            Parsed::Usage(line) => line,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn defaults_send_all_four_sampling_values_and_no_seed() {
        let cli = run(&["--addr", "unix:/s", "hi"]);
        let req = cli.request().into_proto();
        let s = req.sampling.unwrap();
        assert_eq!(
            (s.temperature, s.top_k, s.top_p, s.min_p, s.seed),
            (Some(0.8), Some(40), Some(0.95), Some(0.05), None)
        );
        assert_eq!(
            (req.max_tokens, req.prompt.as_str(), req.policy.as_str()),
            (256, "hi", "")
        );
        assert_eq!(req.timeout_ms, 0);
        assert!(!cli.json && !cli.info && cli.cancel_after.is_none());
    }

    #[test]
    fn every_flag_reaches_the_request() {
        let cli = run(&[
            "--addr",
            "127.0.0.1:47001",
            "--json",
            "--policy",
            "test",
            "--max-tokens",
            "8",
            "--temperature",
            "0",
            "--top-k",
            "0",
            "--top-p",
            "1",
            "--min-p",
            "0",
            "--seed",
            "4294967295",
            "--stop",
            "\n",
            "--stop",
            "-x",
            "--timeout",
            "0.0025",
            "--cancel-after",
            "2",
            "Grüße, 世界",
        ]);
        let req = cli.request().into_proto();
        let s = req.sampling.unwrap();
        assert_eq!(
            (s.temperature, s.top_k, s.top_p, s.min_p, s.seed),
            (Some(0.0), Some(0), Some(1.0), Some(0.0), Some(u32::MAX))
        );
        assert_eq!(
            (req.policy.as_str(), req.max_tokens, req.timeout_ms),
            ("test", 8, 2)
        );
        assert_eq!(req.stop, vec!["\n", "-x"]);
        assert_eq!(req.prompt, "Grüße, 世界");
        assert_eq!(cli.cancel_after, Some(2));
        assert!(cli.json);
    }

    #[test]
    fn daemon_judged_values_pass_through() {
        // Ranges of sampling are the daemon's to reject, with INVALID_ARGUMENT.
        let s = run(&[
            "--addr",
            "unix:/s",
            "--temperature",
            "-1",
            "--top-p",
            "7",
            "--top-k",
            "-3",
            "x",
        ])
        .request()
        .into_proto()
        .sampling
        .unwrap();
        assert_eq!(
            (s.temperature, s.top_p, s.top_k),
            (Some(-1.0), Some(7.0), Some(-3))
        );
    }

    #[test]
    fn info_needs_no_prompt() {
        let cli = run(&["--addr", "unix:/s", "--info"]);
        assert!(cli.info && cli.prompt.is_none());
    }

    #[test]
    fn bad_flags_are_one_line_naming_the_flag() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["--addr", "unix:/s", "--max-tokens", "0", "p"],
                "--max-tokens: 0 is invalid; accepted: >= 1",
            ),
            (
                &["--addr", "unix:/s", "--max-tokens", "-2", "p"],
                "--max-tokens: -2 is invalid; accepted: >= 1",
            ),
            (
                &["--addr", "unix:/s", "--max-tokens", "abc", "p"],
                "--max-tokens: abc is invalid; accepted: >= 1",
            ),
            (
                &["--addr", "unix:/s", "--cancel-after", "0", "p"],
                "--cancel-after: 0 is invalid; accepted: >= 1",
            ),
            (
                &["--addr", "unix:/s", "--timeout", "0", "p"],
                "--timeout: 0 is invalid; accepted: seconds > 0",
            ),
            (
                &["--addr", "unix:/s", "--timeout", "nan", "p"],
                "--timeout: nan is invalid; accepted: seconds > 0",
            ),
            (
                &["--addr", "unix:/s", "--temperature", "hot", "p"],
                "--temperature: hot is invalid; accepted: a number",
            ),
            (
                &["--addr", "unix:/s", "--seed", "-1", "p"],
                "--seed: -1 is invalid; accepted: 0 .. 2^32-1",
            ),
            (
                &["--addr", "unix:/s", "--seed", "4294967296", "p"],
                "--seed: 4294967296 is invalid; accepted: 0 .. 2^32-1",
            ),
            (
                &["--addr", "nowhere", "p"],
                "--addr: \"nowhere\" is invalid; accepted: unix:PATH or HOST:PORT",
            ),
            (
                &["--addr", "unix:/s", ""],
                "prompt: must not be empty; accepted: non-empty UTF-8 text",
            ),
            (
                &["--addr", "unix:/s"],
                "prompt: missing; accepted: non-empty UTF-8 text",
            ),
            (&["p"], "--addr: missing; accepted: unix:PATH or HOST:PORT"),
            (
                &["--addr", "unix:/s", "--bogus", "p"],
                "--bogus: unknown flag; accepted: see --help",
            ),
            (
                &["--addr", "unix:/s", "p", "--max-tokens"],
                "--max-tokens: a value is required; accepted: >= 1",
            ),
        ];
        for (args, want) in cases {
            assert_eq!(usage_of(args), *want, "{args:?}");
        }
        assert!(
            usage_of(&["--addr", "unix:/s", "a", "b"])
                .starts_with("prompt: unexpected second argument")
        );
    }

    #[cfg(unix)]
    #[test]
    fn non_utf8_arguments_name_their_flag() {
        use std::os::unix::ffi::OsStringExt;
        let bad = || OsString::from_vec(b"ab\xff".to_vec());
        let usage_os = |args: Vec<OsString>| match parse(args) {
            Parsed::Usage(line) => line,
            other => panic!("{other:?}"),
        };
        let os = |s: &str| OsString::from(s);
        let args = vec![
            os("guarded-generate"),
            os("--addr"),
            os("unix:/s"),
            os("--stop"),
            bad(),
            os("p"),
        ];
        assert_eq!(
            usage_os(args),
            "--stop: not valid UTF-8; accepted: UTF-8 text"
        );
        let args = vec![
            os("guarded-generate"),
            os("--addr"),
            os("unix:/s"),
            os("--json"),
            bad(),
        ];
        assert_eq!(
            usage_os(args),
            "prompt: not valid UTF-8; accepted: non-empty UTF-8 text"
        );
    }

    #[test]
    fn help_is_printed_not_an_error() {
        let Parsed::Print(text) = parse(["guarded-generate", "--help"]) else {
            panic!()
        };
        assert!(text.contains("--cancel-after"));
    }

    #[test]
    fn token_and_ca_files_are_checked() {
        let dir = std::env::temp_dir().join(format!("fse-rust-args-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let token = dir.join("token");
        std::fs::write(&token, "  s3cret \nsecond line\n").unwrap();
        let t = token.to_str().unwrap();
        assert!(
            run(&["--addr", "h:1", "--token-file", t, "p"])
                .connect_options()
                .is_ok()
        );
        std::fs::write(&token, "\n").unwrap();
        let err = run(&["--addr", "h:1", "--token-file", t, "p"])
            .connect_options()
            .unwrap_err();
        assert!(
            err.starts_with("--token-file: ") && err.contains("has no token"),
            "{err}"
        );
        let err = run(&["--addr", "h:1", "--token-file", "/nonexistent/t", "p"])
            .connect_options()
            .unwrap_err();
        assert_eq!(
            err,
            "--token-file: cannot read /nonexistent/t: No such file or directory; accepted: a readable file whose first line is the token"
        );
        let err = run(&["--addr", "h:1", "--tls-ca", t, "p"])
            .connect_options()
            .unwrap_err();
        assert!(err.contains("holds no PEM certificate"), "{err}");
        let err = run(&["--addr", "unix:/s", "--tls-ca", t, "p"])
            .connect_options()
            .unwrap_err();
        assert!(
            err.starts_with("--tls-ca: TLS needs a HOST:PORT address"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
