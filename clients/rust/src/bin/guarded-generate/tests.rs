//! Unit tests of the example: its flags (clap's errors name the flag) and its
//! exit codes (the JSON lines and the verdict line are the library's, tested there). The real daemon is the conformance harness's.

use clap::Parser;
use clap::error::ErrorKind;
use fse_client::{Code, Error, Status};

use crate::args::Cli;
use crate::{error_exit, status_exit};

fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("guarded-generate").chain(args.iter().copied()))
}

fn run(args: &[&str]) -> Cli {
    parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
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
        (req.max_tokens, req.policy.as_str(), req.prompt.as_str()),
        (8, "test", "Grüße, 世界")
    );
    assert_eq!(req.stop, ["\n", "-x"]);
    assert_eq!(req.timeout_ms, 2); // round(2.5) = 2, half to even as Python
    assert!(cli.json && cli.cancel_after == Some(2));
}

#[test]
fn ranges_the_daemon_judges_pass_through() {
    let cli = run(&[
        "--addr",
        "unix:/s",
        "--top-p",
        "2",
        "--top-k",
        "-1",
        "--temperature",
        "-1",
        "--max-tokens",
        "100000",
        "p",
    ]);
    let req = cli.request().into_proto();
    let s = req.sampling.unwrap();
    assert_eq!(
        (s.top_p, s.top_k, s.temperature, req.max_tokens),
        (Some(2.0), Some(-1), Some(-1.0), 100000)
    );
}

#[test]
fn info_needs_no_prompt() {
    assert!(run(&["--addr", "unix:/s", "--info"]).info);
}

#[test]
fn usage_errors_are_clap_errors_naming_the_flag() {
    for (args, name) in [
        (&["p"][..], "--addr"),
        (&["--addr", "unix:/s"][..], "PROMPT"),
        (&["--addr", "unix:/s", ""][..], "PROMPT"),
        (
            &["--addr", "unix:/s", "--max-tokens", "0", "p"][..],
            "--max-tokens",
        ),
        (
            &["--addr", "unix:/s", "--max-tokens", "x", "p"][..],
            "--max-tokens",
        ),
        (
            &["--addr", "unix:/s", "--seed", "4294967296", "p"][..],
            "--seed",
        ),
        (
            &["--addr", "unix:/s", "--temperature", "warm", "p"][..],
            "--temperature",
        ),
        (
            &["--addr", "unix:/s", "--timeout", "0", "p"][..],
            "--timeout",
        ),
        (
            &["--addr", "unix:/s", "--timeout", "-1", "p"][..],
            "--timeout",
        ),
        (
            &["--addr", "unix:/s", "--timeout", "nan", "p"][..],
            "--timeout",
        ),
        (
            &["--addr", "unix:/s", "--timeout", "1e10", "p"][..],
            "--timeout",
        ),
        (
            &["--addr", "unix:/s", "--cancel-after", "0", "p"][..],
            "--cancel-after",
        ),
        (
            &["--addr", "unix:/s", "--no-such-flag", "p"][..],
            "--no-such-flag",
        ),
        (
            &["--addr", "a:1", "--tls-ca", "c", "--tls-cert", "c", "p"][..],
            "--tls-key",
        ),
        (
            &["--addr", "a:1", "--tls-ca", "c", "--tls-key", "k", "p"][..],
            "--tls-cert",
        ),
        (
            &["--addr", "a:1", "--tls-cert", "c", "--tls-key", "k", "p"][..],
            "--tls-ca",
        ),
    ] {
        let err = parse(args).expect_err(name);
        assert_eq!(err.exit_code(), 2, "{args:?}");
        assert!(err.to_string().contains(name), "{args:?}: {err}");
    }
    assert_eq!(
        parse(&["--help"]).unwrap_err().kind(),
        ErrorKind::DisplayHelp
    );
}

#[test]
fn unusable_files_name_their_flag() {
    let dir = std::env::temp_dir().join(format!("gg-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let empty = dir.join("empty-token");
    std::fs::write(&empty, "\nsecond\n").unwrap();
    let missing = dir.join("missing").display().to_string();
    for (flag, path) in [
        ("--token-file", missing.as_str()),
        ("--tls-ca", missing.as_str()),
        ("--token-file", empty.to_str().unwrap()),
    ] {
        let err = run(&["--addr", "127.0.0.1:1", flag, path, "p"])
            .connect_options()
            .expect_err(flag);
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains(flag), "{err}");
    }
    let pem = dir.join("cert.pem");
    std::fs::write(
        &pem,
        "-----BEGIN CERTIFICATE-----\nMII=\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let key = dir.join("key.pem");
    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nMII=\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let (pem, key) = (pem.to_str().unwrap(), key.to_str().unwrap());
    for (cert_file, key_file, flag) in [
        (missing.as_str(), key, "--tls-cert"),
        (pem, missing.as_str(), "--tls-key"),
        (key, key, "--tls-cert"),
        (pem, pem, "--tls-key"),
    ] {
        let args = [
            "--addr",
            "127.0.0.1:1",
            "--tls-ca",
            pem,
            "--tls-cert",
            cert_file,
            "--tls-key",
            key_file,
            "p",
        ];
        let err = run(&args).connect_options().expect_err(flag);
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains(flag), "{err}");
    }
    let args = [
        "--addr",
        "127.0.0.1:1",
        "--tls-ca",
        pem,
        "--tls-cert",
        pem,
        "--tls-key",
        key,
        "p",
    ];
    assert!(run(&args).connect_options().is_ok());
    let token = dir.join("token");
    std::fs::write(&token, "  s3cret \nsecond\n").unwrap();
    assert!(
        run(&[
            "--addr",
            "127.0.0.1:1",
            "--token-file",
            token.to_str().unwrap(),
            "p"
        ])
        .connect_options()
        .is_ok()
    );
}

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
