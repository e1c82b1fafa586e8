//! How events look outside the program: the JSON lines of `docs/protocol.md`
//! (feature `json`) and the one-line verdict of `fse generate` ([`Verdict`]'s
//! `Display`).
//!
//! JSON keys keep the protocol's order (serde_json's `preserve_order`); doubles
//! print in shortest round-trip form, NaN and infinities as `null`.

use std::fmt;

use crate::{Status, Verdict};

#[cfg(feature = "json")]
pub use json::info_json;

#[cfg(feature = "json")]
mod json {
    use serde_json::{Value, json};

    use crate::{Completion, Device, Health, Info, PolicyInfo, Token, Verdict};

    fn num(x: f64) -> Value {
        serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
    }

    fn opt_num(x: Option<f64>) -> Value {
        x.map_or(Value::Null, num)
    }

    impl Token {
        /// The token's JSON line: `type`, `index`, `id`, `text`, `nll`, `ppl`,
        /// `variance`, `max_prob`, `l2_norm`, `entropy`, `health`, and `warnings`
        /// only when there are any.
        pub fn to_json(&self) -> Value {
            let mut doc = json!({
                "type": "token", "index": self.index, "id": self.id, "text": self.text,
                "nll": num(self.nll), "ppl": num(self.ppl), "variance": num(self.variance),
                "max_prob": num(self.max_prob), "l2_norm": num(self.l2_norm),
                "entropy": num(self.entropy),
                "health": self.health.map(Health::as_str),
            });
            if !self.warnings.is_empty() {
                let trips = self.warnings.iter().map(|w| {
                    json!({"guard": w.guard, "value": opt_num(w.value), "threshold": opt_num(w.threshold)})
                });
                doc["warnings"] = trips.collect();
            }
            doc
        }
    }

    impl Verdict {
        /// The verdict's JSON line: `type`, `status`, `completion`, `guard`, `value`,
        /// `threshold`, `token_index`, `tokens`, `text`, `policy`, `policy_sha256`,
        /// and `message` only when there is one.
        pub fn to_json(&self) -> Value {
            let mut doc = json!({
                "type": "verdict", "status": self.status.as_str(),
                "completion": self.completion.map(Completion::as_str), "guard": self.guard,
                "value": opt_num(self.value), "threshold": opt_num(self.threshold),
                "token_index": self.token_index, "tokens": self.tokens, "text": self.text,
                "policy": self.policy, "policy_sha256": self.policy_sha256,
            });
            if let Some(message) = &self.message {
                doc["message"] = json!(message);
            }
            doc
        }
    }

    /// The Info message with the proto's field names, less `model.path` (the
    /// daemon machine's business).
    pub fn info_json(info: &Info) -> Value {
        let (m, l) = (
            info.model.clone().unwrap_or_default(),
            info.limits.unwrap_or_default(),
        );
        let policy =
            |p: &PolicyInfo| json!({"name": p.name, "sha256": p.sha256, "builtin": p.builtin});
        let policies: Vec<_> = info.policies.iter().map(policy).collect();
        let device = |d: &Device| {
            json!({"name": d.name, "description": d.description, "kind": d.kind,
                "memory_bytes": d.memory_bytes, "layers": d.layers})
        };
        let devices: Vec<_> = m.devices.iter().map(device).collect();
        json!({
            "version": info.version,
            "model": {"name": m.name, "sha256": m.sha256, "description": m.description,
                "vocab_size": m.vocab_size, "context_size": m.context_size,
                "train_context_size": m.train_context_size, "size_bytes": m.size_bytes,
                "chat_template": m.chat_template, "backend": m.backend, "layers": m.layers,
                "gpu_layers": m.gpu_layers, "devices": devices},
            "policies": policies,
            "limits": {"max_streams": l.max_streams, "max_queue": l.max_queue,
                "max_tokens": l.max_tokens, "max_prompt_tokens": l.max_prompt_tokens,
                "max_message_bytes": l.max_message_bytes},
        })
    }
}

/// `[completed at max_tokens] 12 tokens released · policy default (0123456789ab)`,
/// or for a halt `[halted by l2_norm: value 2574.2, threshold 10, at token 0] ...`:
/// value and threshold as C's `%.6g`, `n/a` when unset.
impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hash: String = self.policy_sha256.chars().take(12).collect();
        write!(f, "[{}", self.status.as_str())?;
        if let (Status::Completed, Some(completion)) = (self.status, self.completion) {
            write!(f, " at {}", completion.as_str())?;
        }
        if self.status == Status::Halted {
            let g = |x: Option<f64>| x.map_or_else(|| "n/a".into(), format_g6);
            let at = self
                .token_index
                .map_or_else(|| "n/a".into(), |i| i.to_string());
            let guard = self.guard.as_deref().unwrap_or("n/a");
            let (value, threshold) = (g(self.value), g(self.threshold));
            write!(
                f,
                " by {guard}: value {value}, threshold {threshold}, at token {at}"
            )?;
        }
        if let Some(message) = &self.message {
            write!(f, ": {message}")?;
        }
        let (tokens, policy) = (self.tokens, &self.policy);
        write!(f, "] {tokens} tokens released · policy {policy} ({hash})")
    }
}

/// C's `printf("%.6g", x)`: six significant digits, trailing zeros dropped,
/// exponent form below 1e-4 and from 1e6 up (the exponent after rounding decides).
fn format_g6(x: f64) -> String {
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

#[cfg(all(test, feature = "json"))]
mod tests;
