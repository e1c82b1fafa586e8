//! The typed events of a generation stream, converted from the wire messages.

use crate::pb;

/// What the daemon reports when it admits a stream: the resolved policy, the
/// prompt's size and the seed in use.
pub type Started = pb::Started;

/// A guard with action "warn" that tripped at a token (the token was still sent).
pub type GuardTrip = pb::GuardTrip;

/// One event of a generation, in the order the daemon sends them: `Started`,
/// zero or more `Token`s, then exactly one `Verdict` (the stream's last item).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The stream was admitted.
    Started(Started),
    /// A token that passed every halting guard.
    Token(Token),
    /// The outcome; nothing follows it.
    Verdict(Verdict),
}

/// The windowed-perplexity band of a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Health {
    /// Below the policy's green band.
    Green,
    /// Between the bands: drifting or creative.
    Yellow,
    /// Above the red band.
    Red,
}

impl Health {
    /// `green`, `yellow` or `red`.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Green => "green",
            Health::Yellow => "yellow",
            Health::Red => "red",
        }
    }

    /// `None` for `HEALTH_UNSPECIFIED` and values this client does not know.
    fn from_wire(value: i32) -> Option<Self> {
        match pb::Health::try_from(value).ok()? {
            pb::Health::Green => Some(Health::Green),
            pb::Health::Yellow => Some(Health::Yellow),
            pb::Health::Red => Some(Health::Red),
            pb::Health::Unspecified => None,
        }
    }
}

/// A released token and the model's measurements at it.
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    /// 0-based position among the generated tokens.
    pub index: u32,
    /// Token id in the model's vocabulary.
    pub id: i32,
    /// Raw bytes of the token; may end inside a UTF-8 character.
    pub piece: Vec<u8>,
    /// Complete characters only: concatenated over the stream, this is the output.
    pub text: String,
    /// -ln p(token) under the raw distribution, in nats.
    pub nll: f64,
    /// Perplexity over the policy's window.
    pub ppl: f64,
    /// Perplexity over all generated tokens.
    pub ppl_cumulative: f64,
    /// Variance of the logits.
    pub variance: f64,
    /// Probability of the most likely token.
    pub max_prob: f64,
    /// L2 norm of the logit vector.
    pub l2_norm: f64,
    /// Entropy of the raw next-token distribution, in nats.
    pub entropy: f64,
    /// The perplexity band; `None` when the daemon did not say.
    pub health: Option<Health>,
    /// Warn-only guards that tripped here.
    pub warnings: Vec<GuardTrip>,
}

impl From<pb::Token> for Token {
    fn from(t: pb::Token) -> Self {
        Self {
            index: t.index,
            id: t.id,
            piece: t.piece,
            text: t.text,
            nll: t.nll,
            ppl: t.ppl,
            ppl_cumulative: t.ppl_cumulative,
            variance: t.variance,
            max_prob: t.max_prob,
            l2_norm: t.l2_norm,
            entropy: t.entropy,
            health: Health::from_wire(t.health),
            warnings: t.warnings,
        }
    }
}

/// How a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// `max_tokens`, end of generation or a stop sequence: all output was guarded.
    Completed,
    /// A guard (or the deadline, or a daemon shutdown) stopped it.
    Halted,
    /// The client cancelled.
    Cancelled,
    /// An internal failure, or a status this client does not know. Fail closed:
    /// anything but an explicit `STATUS_COMPLETED` is never `Completed`.
    Error,
}

impl Status {
    /// `completed`, `halted`, `cancelled` or `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Completed => "completed",
            Status::Halted => "halted",
            Status::Cancelled => "cancelled",
            Status::Error => "error",
        }
    }

    fn from_wire(value: i32) -> Self {
        match pb::Status::try_from(value) {
            Ok(pb::Status::Completed) => Status::Completed,
            Ok(pb::Status::Halted) => Status::Halted,
            Ok(pb::Status::Cancelled) => Status::Cancelled,
            Ok(pb::Status::Error | pb::Status::Unspecified) | Err(_) => Status::Error,
        }
    }
}

/// Why a [`Status::Completed`] stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Completion {
    /// The model ended its output (an end-of-generation token).
    EndOfGeneration,
    /// A stop sequence of the request was generated.
    StopSequence,
    /// `max_tokens` were generated.
    MaxTokens,
}

impl Completion {
    /// `end_of_generation`, `stop_sequence` or `max_tokens`.
    pub fn as_str(self) -> &'static str {
        match self {
            Completion::EndOfGeneration => "end_of_generation",
            Completion::StopSequence => "stop_sequence",
            Completion::MaxTokens => "max_tokens",
        }
    }

    /// `None` for `COMPLETION_UNSPECIFIED` and values this client does not know.
    fn from_wire(value: i32) -> Option<Self> {
        match pb::Completion::try_from(value).ok()? {
            pb::Completion::EndOfGeneration => Some(Completion::EndOfGeneration),
            pb::Completion::StopSequence => Some(Completion::StopSequence),
            pb::Completion::MaxTokens => Some(Completion::MaxTokens),
            pb::Completion::Unspecified => None,
        }
    }
}

/// The outcome of a generation: the last event of every stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// How it ended.
    pub status: Status,
    /// Why a `Completed` stream ended; `None` for any other status (and from a
    /// daemon that predates the field).
    pub completion: Option<Completion>,
    /// The guard that halted it (`perplexity`, `l2_norm`, `deadline`, ...); `None`
    /// unless halted.
    pub guard: Option<String>,
    /// The guard's measured value, when it has one.
    pub value: Option<f64>,
    /// The policy threshold the value crossed.
    pub threshold: Option<f64>,
    /// Index of the withheld token that tripped the guard.
    pub token_index: Option<u32>,
    /// Tokens sent.
    pub tokens: u32,
    /// The released text (all tokens' `text` concatenated).
    pub text: String,
    /// The resolved policy name.
    pub policy: String,
    /// SHA-256 of the policy's canonical form.
    pub policy_sha256: String,
    /// Detail of an `Error` verdict; `None` when the daemon gave none.
    pub message: Option<String>,
}

impl From<pb::Verdict> for Verdict {
    fn from(v: pb::Verdict) -> Self {
        Self {
            status: Status::from_wire(v.status),
            completion: Completion::from_wire(v.completion),
            guard: Some(v.guard).filter(|g| !g.is_empty()),
            value: v.value,
            threshold: v.threshold,
            token_index: v.token_index,
            tokens: v.tokens,
            text: v.text,
            policy: v.policy,
            policy_sha256: v.policy_sha256,
            message: Some(v.message).filter(|m| !m.is_empty()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_unspecified_status_are_errors() {
        for wire in [0, 4, 99, -1] {
            assert_eq!(Status::from_wire(wire), Status::Error, "wire {wire}");
        }
        assert_eq!(Status::from_wire(1), Status::Completed);
        assert_eq!(Status::from_wire(2), Status::Halted);
        assert_eq!(Status::from_wire(3), Status::Cancelled);
    }

    #[test]
    fn unspecified_health_is_none() {
        assert_eq!(Health::from_wire(0), None);
        assert_eq!(Health::from_wire(7), None);
        assert_eq!(Health::from_wire(3), Some(Health::Red));
    }

    #[test]
    fn completion_from_the_wire_and_unknown_is_none() {
        assert_eq!(Completion::from_wire(0), None);
        assert_eq!(Completion::from_wire(99), None);
        assert_eq!(Completion::from_wire(1), Some(Completion::EndOfGeneration));
        assert_eq!(Completion::from_wire(2), Some(Completion::StopSequence));
        assert_eq!(Completion::from_wire(3), Some(Completion::MaxTokens));
        let v = Verdict::from(pb::Verdict {
            status: 1,
            completion: pb::Completion::StopSequence.into(),
            ..Default::default()
        });
        assert_eq!(
            (v.status, v.completion),
            (Status::Completed, Some(Completion::StopSequence))
        );
        assert_eq!(Verdict::from(pb::Verdict::default()).completion, None);
    }

    #[test]
    fn token_carries_every_metric() {
        let t = Token::from(pb::Token {
            index: 4,
            l2_norm: 2574.2,
            entropy: 1.234_567_890_123_456_7,
            health: 1,
            ..Default::default()
        });
        assert_eq!((t.index, t.l2_norm), (4, 2574.2));
        assert_eq!(t.entropy, 1.234_567_890_123_456_7);
        assert_eq!(t.health, Some(Health::Green));
    }

    #[test]
    fn verdict_empty_strings_become_none() {
        let v = Verdict::from(pb::Verdict {
            status: 2,
            guard: "l2_norm".into(),
            value: Some(2574.2),
            threshold: Some(10.0),
            token_index: Some(0),
            ..Default::default()
        });
        assert_eq!(v.status, Status::Halted);
        assert_eq!(v.guard.as_deref(), Some("l2_norm"));
        assert_eq!(v.message, None);
        let v = Verdict::from(pb::Verdict::default());
        assert_eq!(
            (v.status, v.guard, v.token_index),
            (Status::Error, None, None)
        );
    }
}
