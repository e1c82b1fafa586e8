//! The JSON lines and the verdict line, against the contract's examples.

use serde_json::{Value, json};

use super::*;
use crate::{Completion, GuardTrip, Health, Info, Token};

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
        entropy: 1.234_567_890_123_456_7,
        health: Some(Health::Green),
        warnings: vec![],
    }
}

fn halted() -> Verdict {
    Verdict {
        status: Status::Halted,
        completion: None,
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
        token().to_json().to_string(),
        r#"{"type":"token","index":0,"id":15687,"text":" Berlin","nll":0.17,"ppl":1.185329933166504,"variance":19.7,"max_prob":0.84,"l2_norm":2574.2,"entropy":1.2345678901234567,"health":"green"}"#
    );
}

#[test]
fn numbers_round_trip_and_non_finite_is_null() {
    let mut t = token();
    t.nll = f64::NAN;
    t.ppl = f64::INFINITY;
    t.variance = 1e-300;
    t.max_prob = 0.1 + 0.2;
    t.entropy = f64::NEG_INFINITY;
    t.health = None;
    t.text = "é\"\n世".into();
    t.warnings = vec![GuardTrip {
        guard: "perplexity".into(),
        value: Some(12.5),
        threshold: None,
    }];
    let line = t.to_json().to_string();
    let back: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(back["nll"], Value::Null);
    assert_eq!(back["ppl"], Value::Null);
    assert_eq!(back["variance"].as_f64(), Some(1e-300));
    assert_eq!(back["max_prob"].as_f64(), Some(0.1 + 0.2));
    assert_eq!(back["entropy"], Value::Null);
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
        halted().to_json().to_string(),
        r#"{"type":"verdict","status":"halted","completion":null,"guard":"l2_norm","value":2574.2001953125,"threshold":10.0,"token_index":0,"tokens":0,"text":"","policy":"test","policy_sha256":"0123456789abcdef"}"#
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
    let doc = error.to_json();
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
        halted().to_string(),
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
        done.to_string(),
        "[completed] 12 tokens released · policy test (0123456789ab)"
    );
    for completion in [
        Completion::EndOfGeneration,
        Completion::StopSequence,
        Completion::MaxTokens,
    ] {
        let why = completion.as_str();
        let ended = Verdict {
            completion: Some(completion),
            ..done.clone()
        };
        assert_eq!(
            ended.to_string(),
            format!("[completed at {why}] 12 tokens released · policy test (0123456789ab)")
        );
        let doc = ended.to_json();
        assert_eq!(doc["completion"], why);
        let keys: Vec<_> = doc.as_object().unwrap().keys().take(3).collect();
        assert_eq!(keys, ["type", "status", "completion"]);
    }
    let error = Verdict {
        status: Status::Error,
        message: Some("MESSAGE".into()),
        tokens: 3,
        ..done.clone()
    };
    assert_eq!(
        error.to_string(),
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
        deadline
            .to_string()
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
        model: Some(crate::ModelInfo {
            name: "m".into(),
            path: "/secret/m.gguf".into(),
            size_bytes: 1 << 40,
            chat_template: true,
            backend: "CUDA".into(),
            layers: 18,
            gpu_layers: 18,
            devices: vec![
                crate::Device {
                    name: "CUDA0".into(),
                    description: "H100".into(),
                    kind: "gpu".into(),
                    memory_bytes: 1 << 36,
                    layers: 18,
                },
                crate::Device {
                    name: "CPU".into(),
                    kind: "cpu".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }),
        policies: vec![crate::PolicyInfo {
            name: "default".into(),
            sha256: "ab".into(),
            builtin: true,
        }],
        limits: Some(crate::Limits {
            max_tokens: 2047,
            ..Default::default()
        }),
    };
    let doc = info_json(&info);
    assert!(doc["model"].get("path").is_none());
    assert_eq!(doc["model"]["size_bytes"], json!(1u64 << 40));
    assert_eq!(doc["model"]["chat_template"], json!(true));
    assert_eq!(doc["model"]["backend"], json!("CUDA"));
    assert_eq!(doc["model"]["layers"], json!(18));
    assert_eq!(doc["model"]["gpu_layers"], json!(18));
    assert_eq!(
        doc["model"]["devices"],
        json!([
            {"name": "CUDA0", "description": "H100", "kind": "gpu", "memory_bytes": 1u64 << 36, "layers": 18},
            {"name": "CPU", "description": "", "kind": "cpu", "memory_bytes": 0, "layers": 0},
        ])
    );
    assert_eq!(doc["policies"][0]["builtin"], json!(true));
    assert_eq!(doc["limits"]["max_tokens"], json!(2047));
    let keys: Vec<_> = doc.as_object().unwrap().keys().cloned().collect();
    assert_eq!(keys, ["version", "model", "policies", "limits"]);
}
