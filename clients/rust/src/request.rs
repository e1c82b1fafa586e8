//! Building a generation request.

use std::time::Duration;

use crate::pb;

/// One chat message, rendered by the daemon with the model's chat template.
pub type ChatMessage = pb::ChatMessage;

impl pb::ChatMessage {
    /// A message from `role` ("system", "user", "assistant").
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A message from the user.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
}

/// A generation request: a prompt or chat messages, plus sampling, policy and
/// limits. Built fluently; anything not set takes the daemon's default.
/// The daemon checks every value and answers `INVALID_ARGUMENT` naming the field.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    inner: pb::GenerateRequest,
}

/// Tokens to generate when the caller does not say (the `fse generate` default).
pub const DEFAULT_MAX_TOKENS: u32 = 256;

impl Request {
    /// A raw prompt, tokenized with the model's BOS rule.
    pub fn prompt(text: impl Into<String>) -> Self {
        Self::from_proto(pb::GenerateRequest {
            prompt: text.into(),
            max_tokens: DEFAULT_MAX_TOKENS,
            ..Default::default()
        })
    }

    /// Chat messages, rendered with the model's template up to the assistant's turn.
    pub fn chat(messages: impl IntoIterator<Item = ChatMessage>) -> Self {
        Self::from_proto(pb::GenerateRequest {
            messages: messages.into_iter().collect(),
            max_tokens: DEFAULT_MAX_TOKENS,
            ..Default::default()
        })
    }

    /// A request exactly as the wire message has it.
    pub fn from_proto(inner: pb::GenerateRequest) -> Self {
        Self { inner }
    }

    /// Tokens to generate at most (1 ..= the daemon's `limits.max_tokens`).
    pub fn max_tokens(mut self, n: u32) -> Self {
        self.inner.max_tokens = n;
        self
    }

    /// Sampling temperature; 0 is greedy.
    pub fn temperature(mut self, t: f64) -> Self {
        self.sampling().temperature = Some(t);
        self
    }

    /// Top-k cut-off; 0 is off.
    pub fn top_k(mut self, k: i32) -> Self {
        self.sampling().top_k = Some(k);
        self
    }

    /// Nucleus (top-p) cut-off; 1 is off.
    pub fn top_p(mut self, p: f64) -> Self {
        self.sampling().top_p = Some(p);
        self
    }

    /// Min-p cut-off; 0 is off.
    pub fn min_p(mut self, p: f64) -> Self {
        self.sampling().min_p = Some(p);
        self
    }

    /// The sampling seed (otherwise the daemon picks one and reports it in `Started`).
    pub fn seed(mut self, seed: u32) -> Self {
        self.sampling().seed = Some(seed);
        self
    }

    /// A policy name from `Info.policies`; the daemon's `default` otherwise.
    pub fn policy(mut self, name: impl Into<String>) -> Self {
        self.inner.policy = name.into();
        self
    }

    /// Adds a stop sequence: generation completes before it, and it is not sent.
    pub fn stop(mut self, text: impl Into<String>) -> Self {
        self.inner.stop.push(text.into());
        self
    }

    /// An id echoed in `Started` and the daemon's audit log.
    pub fn request_id(mut self, id: impl Into<String>) -> Self {
        self.inner.request_id = id.into();
        self
    }

    /// A generation budget from admission; when it passes the stream halts with
    /// guard `deadline` (and the verdict still arrives). Rounded to milliseconds,
    /// at least 1.
    pub fn timeout(self, budget: Duration) -> Self {
        self.timeout_secs(budget.as_secs_f64())
    }

    /// [`Request::timeout`] in seconds: `max(1, round(seconds * 1000))` ms.
    pub fn timeout_secs(self, seconds: f64) -> Self {
        self.timeout_ms(millis(seconds))
    }

    /// The generation budget in milliseconds; 0 means none.
    pub fn timeout_ms(mut self, ms: u32) -> Self {
        self.inner.timeout_ms = ms;
        self
    }

    /// The wire message.
    pub fn as_proto(&self) -> &pb::GenerateRequest {
        &self.inner
    }

    /// Into the wire message.
    pub fn into_proto(self) -> pb::GenerateRequest {
        self.inner
    }

    fn sampling(&mut self) -> &mut pb::Sampling {
        self.inner.sampling.get_or_insert_with(Default::default)
    }
}

/// `max(1, round(seconds * 1000))` as `fse generate` computes it: ties to even,
/// like Python's `round`, so every client sends the same `timeout_ms`. Saturates
/// at `u32::MAX`.
fn millis(seconds: f64) -> u32 {
    let ms = (seconds * 1000.0).round_ties_even();
    if ms >= f64::from(u32::MAX) {
        u32::MAX
    } else if ms >= 1.0 {
        ms as u32
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_the_wire_request() {
        let req = Request::prompt("hi")
            .max_tokens(8)
            .temperature(0.0)
            .seed(7)
            .policy("test")
            .stop("\n")
            .stop(".")
            .request_id("r1")
            .timeout(Duration::from_millis(1500))
            .into_proto();
        assert_eq!(req.prompt, "hi");
        assert_eq!(req.max_tokens, 8);
        let s = req.sampling.unwrap();
        assert_eq!((s.temperature, s.seed, s.top_k), (Some(0.0), Some(7), None));
        assert_eq!(req.policy, "test");
        assert_eq!(req.stop, vec!["\n", "."]);
        assert_eq!(req.request_id, "r1");
        assert_eq!(req.timeout_ms, 1500);
    }

    #[test]
    fn chat_request_has_messages_and_no_prompt() {
        let req =
            Request::chat([ChatMessage::system("be brief"), ChatMessage::user("hi")]).into_proto();
        assert!(req.prompt.is_empty());
        assert_eq!(req.messages[1], ChatMessage::new("user", "hi"));
        assert_eq!(req.max_tokens, DEFAULT_MAX_TOKENS);
        assert!(req.sampling.is_none());
    }

    #[test]
    fn millis_rounds_like_python() {
        assert_eq!(millis(0.0005), 1); // round(0.5) == 0, then max(1, 0)
        assert_eq!(millis(0.0025), 2); // ties to even
        assert_eq!(millis(0.0035), 4);
        assert_eq!(millis(1.2345), 1234); // 1234.5 exactly: to even
        assert_eq!(millis(1e-9), 1);
        assert_eq!(millis(1e12), u32::MAX);
    }
}
