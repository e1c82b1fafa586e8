//! How events look: JSON lines for programs, text and a verdict line for people.
//! Keys keep their order (serde_json's `preserve_order`); doubles print in
//! shortest round-trip form, NaN and infinities as `null`.

use fse_client::{Health, Info, Status, Token, Verdict};
use serde_json::{Value, json};

fn num(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

fn opt_num(x: Option<f64>) -> Value {
    x.map_or(Value::Null, num)
}

pub fn token_json(t: &Token) -> Value {
    let mut doc = json!({
        "type": "token", "index": t.index, "id": t.id, "text": t.text, "nll": num(t.nll),
        "ppl": num(t.ppl), "variance": num(t.variance), "max_prob": num(t.max_prob),
        "l2_norm": num(t.l2_norm), "health": t.health.map(Health::as_str),
    });
    if !t.warnings.is_empty() {
        let trips = t.warnings.iter().map(|w| {
            json!({"guard": w.guard, "value": opt_num(w.value), "threshold": opt_num(w.threshold)})
        });
        doc["warnings"] = trips.collect();
    }
    doc
}

pub fn verdict_json(v: &Verdict) -> Value {
    let mut doc = json!({
        "type": "verdict", "status": v.status.as_str(), "guard": v.guard, "value": opt_num(v.value),
        "threshold": opt_num(v.threshold), "token_index": v.token_index, "tokens": v.tokens,
        "text": v.text, "policy": v.policy, "policy_sha256": v.policy_sha256,
    });
    if let Some(message) = &v.message {
        doc["message"] = json!(message);
    }
    doc
}

/// The Info message with the proto's field names, less `model.path`.
pub fn info_json(info: &Info) -> Value {
    let (m, l) = (
        info.model.clone().unwrap_or_default(),
        info.limits.unwrap_or_default(),
    );
    let policy = |p: &fse_client::PolicyInfo| json!({"name": p.name, "sha256": p.sha256, "builtin": p.builtin});
    let policies: Vec<_> = info.policies.iter().map(policy).collect();
    json!({
        "version": info.version,
        "model": {"name": m.name, "sha256": m.sha256, "description": m.description,
            "vocab_size": m.vocab_size, "context_size": m.context_size,
            "train_context_size": m.train_context_size, "size_bytes": m.size_bytes,
            "chat_template": m.chat_template},
        "policies": policies,
        "limits": {"max_streams": l.max_streams, "max_queue": l.max_queue,
            "max_tokens": l.max_tokens, "max_prompt_tokens": l.max_prompt_tokens,
            "max_message_bytes": l.max_message_bytes},
    })
}

/// `[completed] 12 tokens released · policy default (0123456789ab)`, or for a
/// halt `[halted by l2_norm: value 2574.2, threshold 10, at token 0] ...`.
pub fn verdict_line(v: &Verdict) -> String {
    let hash: String = v.policy_sha256.chars().take(12).collect();
    let mut what = v.status.as_str().to_string();
    if v.status == Status::Halted {
        let g = |x: Option<f64>| x.map_or_else(|| "n/a".into(), format_g6);
        let at = v
            .token_index
            .map_or_else(|| "n/a".into(), |i| i.to_string());
        let guard = v.guard.as_deref().unwrap_or("n/a");
        what = format!(
            "halted by {guard}: value {}, threshold {}, at token {at}",
            g(v.value),
            g(v.threshold)
        );
    }
    if let Some(message) = &v.message {
        what = format!("{what}: {message}");
    }
    format!(
        "[{what}] {} tokens released · policy {} ({hash})",
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
/// exponent form below 1e-4 and from 1e6 up (the exponent after rounding decides).
pub fn format_g6(x: f64) -> String {
    if !x.is_finite() {
        return if x.is_nan() {
            "nan"
        } else if x < 0.0 {
            "-inf"
        } else {
            "inf"
        }
        .into();
    }
    let strip = |s: String| match s.contains('.') {
        true => s.trim_end_matches('0').trim_end_matches('.').to_string(),
        false => s,
    };
    let sci = format!("{x:.5e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("{:e} exponent is an integer");
    if (-4..6).contains(&exp) {
        strip(format!("{:.*}", (5 - exp) as usize, x))
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", strip(mantissa.into()), exp.abs())
    }
}
