//! How events look: JSON lines for programs, text and a verdict line for people.

use std::io;

use fse_client::{Health, Info, Status, Token, Verdict};
use serde::Serialize;
use serde_json::{Value, json};

/// A double as JSON: shortest round-trip form, `null` for NaN and infinities.
fn num(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

fn opt_num(x: Option<f64>) -> Value {
    x.map_or(Value::Null, num)
}

pub fn token_json(t: &Token) -> Value {
    let mut doc = json!({
        "type": "token",
        "index": t.index,
        "id": t.id,
        "text": t.text,
        "nll": num(t.nll),
        "ppl": num(t.ppl),
        "variance": num(t.variance),
        "max_prob": num(t.max_prob),
        "l2_norm": num(t.l2_norm),
        "health": t.health.map(Health::as_str),
    });
    if !t.warnings.is_empty() {
        let warnings = t
            .warnings
            .iter()
            .map(|w| json!({"guard": w.guard, "value": opt_num(w.value), "threshold": opt_num(w.threshold)}))
            .collect();
        insert(&mut doc, "warnings", Value::Array(warnings));
    }
    doc
}

pub fn verdict_json(v: &Verdict) -> Value {
    let mut doc = json!({
        "type": "verdict",
        "status": v.status.as_str(),
        "guard": v.guard,
        "value": opt_num(v.value),
        "threshold": opt_num(v.threshold),
        "token_index": v.token_index,
        "tokens": v.tokens,
        "text": v.text,
        "policy": v.policy,
        "policy_sha256": v.policy_sha256,
    });
    if let Some(message) = &v.message {
        insert(&mut doc, "message", json!(message));
    }
    doc
}

/// The Info message with the proto's field names, less `model.path`.
pub fn info_json(info: &Info) -> Value {
    let model = info.model.clone().unwrap_or_default();
    let limits = info.limits.unwrap_or_default();
    json!({
        "version": info.version,
        "model": {
            "name": model.name,
            "sha256": model.sha256,
            "description": model.description,
            "vocab_size": model.vocab_size,
            "context_size": model.context_size,
            "train_context_size": model.train_context_size,
            "size_bytes": model.size_bytes,
            "chat_template": model.chat_template,
        },
        "policies": info.policies.iter().map(|p| json!({"name": p.name, "sha256": p.sha256, "builtin": p.builtin})).collect::<Vec<_>>(),
        "limits": {
            "max_streams": limits.max_streams,
            "max_queue": limits.max_queue,
            "max_tokens": limits.max_tokens,
            "max_prompt_tokens": limits.max_prompt_tokens,
            "max_message_bytes": limits.max_message_bytes,
        },
    })
}

fn insert(doc: &mut Value, key: &str, value: Value) {
    if let Value::Object(map) = doc {
        map.insert(key.to_string(), value);
    }
}

/// One JSON line with Python's `json.dumps` separators (", " and ": "), so the
/// output reads like `fse generate --json`; keys keep their insertion order.
pub fn json_line(doc: &Value) -> String {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonSeparators);
    doc.serialize(&mut ser).expect("a Value always serializes");
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

struct PythonSeparators;

impl serde_json::ser::Formatter for PythonSeparators {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }
}

/// `[completed] 12 tokens released · policy default (0123456789ab)`, or for a
/// halt `[halted by l2_norm: value 2574.2, threshold 10, at token 0] ...`.
pub fn verdict_line(v: &Verdict) -> String {
    let hash: String = v.policy_sha256.chars().take(12).collect();
    let what = if v.status == Status::Halted {
        let g = |x: Option<f64>| x.map_or_else(|| "n/a".to_string(), format_g6);
        let at = v
            .token_index
            .map_or_else(|| "n/a".to_string(), |i| i.to_string());
        format!(
            "halted by {}: value {}, threshold {}, at token {at}",
            v.guard.as_deref().unwrap_or("n/a"),
            g(v.value),
            g(v.threshold)
        )
    } else {
        v.status.as_str().to_string()
    };
    let detail = v
        .message
        .as_deref()
        .map(|m| format!(": {m}"))
        .unwrap_or_default();
    format!(
        "[{what}{detail}] {} tokens released · policy {} ({hash})",
        v.tokens, v.policy
    )
}

/// ANSI colour of a health band, for text on a terminal.
pub fn colour(health: Option<Health>) -> Option<&'static str> {
    match health? {
        Health::Green => Some("\x1b[32m"),
        Health::Yellow => Some("\x1b[33m"),
        Health::Red => Some("\x1b[31m"),
    }
}

/// C's `printf("%.6g", x)`: six significant digits, trailing zeros dropped,
/// exponent form below 1e-4 and from 1e6 up.
pub fn format_g6(x: f64) -> String {
    const P: i32 = 6;
    if x.is_nan() {
        return if x.is_sign_negative() { "-nan" } else { "nan" }.to_string();
    }
    if x.is_infinite() {
        return if x < 0.0 { "-inf" } else { "inf" }.to_string();
    }
    // The exponent after rounding to P digits decides the style, as in C.
    let sci = format!("{:.*e}", (P - 1) as usize, x);
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("{:e} exponent is an integer");
    if !(-4..P).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", strip_zeros(mantissa), exp.abs())
    } else {
        strip_zeros(&format!("{:.*}", (P - 1 - exp) as usize, x)).to_string()
    }
}

fn strip_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fse_client::GuardTrip;

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
            json_line(&token_json(&token())),
            r#"{"type": "token", "index": 0, "id": 15687, "text": " Berlin", "nll": 0.17, "ppl": 1.185329933166504, "variance": 19.7, "max_prob": 0.84, "l2_norm": 2574.2, "health": "green"}"#
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
        let line = json_line(&token_json(&t));
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
        assert!(line.ends_with(r#""health": null, "warnings": [{"guard": "perplexity", "value": 12.5, "threshold": null}]}"#));
    }

    #[test]
    fn verdict_json_keys_and_optional_message() {
        assert_eq!(
            json_line(&verdict_json(&halted())),
            r#"{"type": "verdict", "status": "halted", "guard": "l2_norm", "value": 2574.2001953125, "threshold": 10.0, "token_index": 0, "tokens": 0, "text": "", "policy": "test", "policy_sha256": "0123456789abcdef"}"#
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
}
