//! Unit tests of the example: its flags (clap's errors name the flag), its
//! rendering and its exit codes. The real daemon is the conformance harness's.

use clap::Parser;
use clap::error::ErrorKind;
use fse_client::{Code, Error, GuardTrip, Health, Info, Status, Token, Verdict};
use serde_json::{Value, json};

use crate::args::Cli;
use crate::render::*;
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

fn token() -> Token {
    Token {
        index: 0,
        id: 15687,
        piece: b" Berlin".to_vec(),
        text: " Berlin".into(),
        nll: 0.17,
        ppl: 1.185_329_933_166_504,
        ppl_cumulative: 1.19,
        variance: 19.7,
        max_prob: 0.84,
        l2_norm: 2574.2,
        health: Some(Health::Green),
        warnings: vec![],
    }
}

fn halted() -> Verdict {
    Verdict {
        status: Status::Halted,
        guard: Some("l2_norm".into()),
        value: Some(2574.2001953125),
        threshold: Some(10.0),
        token_index: Some(0),
        tokens: 0,
        text: String::new(),
        policy: "test".into(),
        policy_sha256: "0123456789abcdef".into(),
        message: None,
    }
}

#[test]
fn token_line_has_contract_keys_in_order() {
    assert_eq!(
        token_json(&token()).to_string(),
        r#"{"type":"token","index":0,"id":15687,"text":" Berlin","nll":0.17,"ppl":1.185329933166504,"variance":19.7,"max_prob":0.84,"l2_norm":2574.2,"health":"green"}"#
    );
}

#[test]
fn numbers_round_trip_and_non_finite_is_null() {
    let mut t = token();
    t.nll = f64::NAN;
    t.ppl = f64::INFINITY;
    t.variance = 1e-300;
    t.max_prob = 0.1 + 0.2;
    t.health = None;
    t.text = "é\"\n世".into();
    t.warnings = vec![GuardTrip {
        guard: "perplexity".into(),
        value: Some(12.5),
        threshold: None,
    }];
    let line = token_json(&t).to_string();
    let back: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(back["nll"], Value::Null);
    assert_eq!(back["ppl"], Value::Null);
    assert_eq!(back["variance"].as_f64(), Some(1e-300));
    assert_eq!(back["max_prob"].as_f64(), Some(0.1 + 0.2));
    assert_eq!(back["health"], Value::Null);
    assert_eq!(back["text"], "é\"\n世");
    assert_eq!(
        back["warnings"],
        json!([{"guard": "perplexity", "value": 12.5, "threshold": null}])
    );
    assert!(line.ends_with(
        r#""health":null,"warnings":[{"guard":"perplexity","value":12.5,"threshold":null}]}"#
    ));
}

#[test]
fn verdict_json_keys_and_optional_message() {
    assert_eq!(
        verdict_json(&halted()).to_string(),
        r#"{"type":"verdict","status":"halted","guard":"l2_norm","value":2574.2001953125,"threshold":10.0,"token_index":0,"tokens":0,"text":"","policy":"test","policy_sha256":"0123456789abcdef"}"#
    );
    let error = Verdict {
        status: Status::Error,
        guard: None,
        value: None,
        threshold: None,
        token_index: None,
        message: Some("boom".into()),
        ..halted()
    };
    let doc = verdict_json(&error);
    assert_eq!(doc["guard"], Value::Null);
    assert_eq!(doc["token_index"], Value::Null);
    assert_eq!(doc["message"], "boom");
    assert_eq!(
        doc.as_object().unwrap().keys().next_back().unwrap(),
        "message"
    );
}

#[test]
fn verdict_lines() {
    assert_eq!(
        verdict_line(&halted()),
        "[halted by l2_norm: value 2574.2, threshold 10, at token 0] 0 tokens released · policy test (0123456789ab)"
    );
    let done = Verdict {
        status: Status::Completed,
        guard: None,
        value: None,
        threshold: None,
        tokens: 12,
        ..halted()
    };
    assert_eq!(
        verdict_line(&done),
        "[completed] 12 tokens released · policy test (0123456789ab)"
    );
    let error = Verdict {
        status: Status::Error,
        message: Some("MESSAGE".into()),
        tokens: 3,
        ..done.clone()
    };
    assert_eq!(
        verdict_line(&error),
        "[error: MESSAGE] 3 tokens released · policy test (0123456789ab)"
    );
    let deadline = Verdict {
        guard: Some("deadline".into()),
        value: None,
        threshold: None,
        token_index: None,
        ..halted()
    };
    assert!(
        verdict_line(&deadline)
            .starts_with("[halted by deadline: value n/a, threshold n/a, at token n/a]")
    );
}

#[test]
fn g6_matches_printf() {
    // Expected values from C's printf("%.6g").
    let cases = [
        (0.0, "0"),
        (-0.0, "-0"),
        (10.0, "10"),
        (2574.2001953125, "2574.2"),
        (0.1 + 0.2, "0.3"),
        (123456.0, "123456"),
        (1234567.0, "1.23457e+06"),
        (999999.5, "1e+06"),
        (0.0001, "0.0001"),
        (0.00001234, "1.234e-05"),
        (1e-300, "1e-300"),
        (-1.23456789, "-1.23457"),
        (1.5e300, "1.5e+300"),
        (f64::INFINITY, "inf"),
        (f64::NAN, "nan"),
    ];
    for (x, want) in cases {
        assert_eq!(format_g6(x), want, "{x}");
    }
}

#[test]
fn info_line_leaves_out_model_path() {
    let info = Info {
        version: "0.1.0".into(),
        model: Some(fse_client::ModelInfo {
            name: "m".into(),
            path: "/secret/m.gguf".into(),
            size_bytes: 1 << 40,
            chat_template: true,
            ..Default::default()
        }),
        policies: vec![fse_client::PolicyInfo {
            name: "default".into(),
            sha256: "ab".into(),
            builtin: true,
        }],
        limits: Some(fse_client::Limits {
            max_tokens: 2047,
            ..Default::default()
        }),
    };
    let doc = info_json(&info);
    assert!(doc["model"].get("path").is_none());
    assert_eq!(doc["model"]["size_bytes"], json!(1u64 << 40));
    assert_eq!(doc["model"]["chat_template"], json!(true));
    assert_eq!(doc["policies"][0]["builtin"], json!(true));
    assert_eq!(doc["limits"]["max_tokens"], json!(2047));
    let keys: Vec<_> = doc.as_object().unwrap().keys().cloned().collect();
    assert_eq!(keys, ["version", "model", "policies", "limits"]);
}
