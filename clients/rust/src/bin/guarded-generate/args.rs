//! Flags of `guarded-generate` (clients/README.md, "The contract every example
//! keeps"), parsed by clap: bad usage is clap's own error, naming the flag, exit 2.

use std::path::PathBuf;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};
use fse_client::{ConnectOptions, Request};

/// Stream guarded tokens from the libfse daemon. Exit status: 0 completed,
/// 3 halted, 4 cancelled, 1 error, 2 bad usage or INVALID_ARGUMENT.
#[derive(Debug, Parser)]
#[command(name = "guarded-generate", version)]
pub struct Cli {
    /// Daemon address: unix:/abs/path or HOST:PORT
    #[arg(long, value_name = "unix:PATH|HOST:PORT")]
    pub addr: String,
    /// TLS over TCP, the server's certificate checked against this PEM CA
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Mutual TLS: present this PEM client certificate (with --tls-key; needs --tls-ca)
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// Mutual TLS: the PEM private key of --tls-cert
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
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
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tokens: u32,
    /// Sampling temperature; 0 = greedy
    #[arg(long, default_value_t = 0.8, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Top-k; 0 = off
    #[arg(long, default_value_t = 40, allow_negative_numbers = true)]
    pub top_k: i32,
    /// Top-p; 1 = off
    #[arg(long, default_value_t = 0.95, allow_negative_numbers = true)]
    pub top_p: f64,
    /// Min-p; 0 = off
    #[arg(long, default_value_t = 0.05, allow_negative_numbers = true)]
    pub min_p: f64,
    /// Sampling seed [default: random, chosen by the daemon]
    #[arg(long, value_name = "S")]
    pub seed: Option<u32>,
    /// A stop sequence (repeatable); not included in the output
    #[arg(long = "stop", value_name = "TEXT", allow_hyphen_values = true)]
    pub stops: Vec<String>,
    /// Generation budget in seconds, > 0; the stream halts with guard `deadline`
    #[arg(long, value_name = "SECONDS", value_parser = seconds, allow_negative_numbers = true)]
    pub timeout: Option<f64>,
    /// Send Cancel after the N-th token and read on until the verdict
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub cancel_after: Option<u32>,
    /// The prompt text (the last argument)
    #[arg(required_unless_present = "info", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub prompt: Option<String>,
}

/// Seconds > 0 whose milliseconds fit the wire's u32.
fn seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x > 0.0 && x * 1000.0 <= f64::from(u32::MAX) => Ok(x),
        _ => Err("expected seconds > 0".into()),
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

    /// Connection options from --tls-ca, --tls-cert with --tls-key, and
    /// --token-file; a file that cannot be used is a clap error naming its flag.
    pub fn connect_options(&self) -> Result<ConnectOptions, clap::Error> {
        let invalid = |flag: &str, what: String| {
            Cli::command().error(ErrorKind::ValueValidation, format!("--{flag}: {what}"))
        };
        let read = |flag: &str, path: &PathBuf| {
            std::fs::read(path).map_err(|e| invalid(flag, format!("{}: {e}", path.display())))
        };
        let mut options = ConnectOptions::new();
        if let Some(path) = &self.tls_ca {
            options = options.tls_ca_pem(read("tls-ca", path)?);
        }
        if let (Some(cert_path), Some(key_path)) = (&self.tls_cert, &self.tls_key) {
            let (cert, key) = (read("tls-cert", cert_path)?, read("tls-key", key_path)?);
            // rustls would only say so at the handshake, naming no file.
            let holds = |pem: &[u8], label: &str| String::from_utf8_lossy(pem).contains(label);
            if !holds(&cert, "-----BEGIN CERTIFICATE-----") {
                let what = format!("{}: no PEM certificate", cert_path.display());
                return Err(invalid("tls-cert", what));
            }
            if !holds(&key, "PRIVATE KEY-----") {
                let what = format!("{}: no PEM private key", key_path.display());
                return Err(invalid("tls-key", what));
            }
            options = options.tls_identity_pem(cert, key);
        }
        if let Some(path) = &self.token_file {
            let bytes = read("token-file", path)?;
            let text = String::from_utf8_lossy(&bytes);
            let token = text.lines().next().unwrap_or_default().trim();
            if token.is_empty() {
                let what = format!("{}: no token on its first line", path.display());
                return Err(invalid("token-file", what));
            }
            options = options.token(token);
        }
        Ok(options)
    }
}
