"""The values a client sees: typed mirrors of the fse.v1 messages, free of protobuf."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum


class Status(StrEnum):
    """How a stream ended."""

    COMPLETED = "completed"  # max_tokens, end of generation or a stop sequence
    HALTED = "halted"  # a guard (or deadline, shutdown) stopped it
    CANCELLED = "cancelled"  # the client cancelled or went away
    ERROR = "error"  # internal failure on the daemon


class Completion(StrEnum):
    """Why a completed stream ended."""

    END_OF_GENERATION = "end_of_generation"  # the model ended its output
    STOP_SEQUENCE = "stop_sequence"  # a stop sequence of the request was generated
    MAX_TOKENS = "max_tokens"  # max_tokens were generated


class Health(StrEnum):
    """Windowed perplexity against the policy's bands."""

    GREEN = "green"
    YELLOW = "yellow"
    RED = "red"


@dataclass(frozen=True, slots=True)
class Sampling:
    """Unset (None) fields take the daemon's defaults (llama.cpp's CLI: 0.8, 40, 0.95,
    0.05, a random seed). temperature 0 is greedy."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class Started:
    request_id: str
    policy: str  # the resolved policy name
    policy_sha256: str
    prompt_tokens: int
    seed: int  # the sampling seed in use (0 when greedy)
    model: str


@dataclass(frozen=True, slots=True)
class GuardTrip:
    """A guard with action "warn" that tripped on a token (the token was still released)."""

    guard: str
    value: float | None
    threshold: float | None


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """A token that passed every halting guard of the stream's policy."""

    index: int  # 0-based among the generated tokens
    id: int  # token id in the model's vocabulary
    piece: bytes  # raw bytes; may end inside a UTF-8 character
    text: str  # complete characters only: the concatenated texts are the output
    nll: float
    ppl: float  # over the policy's window
    ppl_cumulative: float
    variance: float
    max_prob: float
    l2_norm: float
    health: Health | None  # None if the daemon sent HEALTH_UNSPECIFIED
    warnings: tuple[GuardTrip, ...] = ()
    # Of the raw next-token distribution, in nats (0 from a daemon that predates it).
    entropy: float = math.nan


@dataclass(frozen=True, slots=True)
class Verdict:
    """The one verdict that ends every stream. guard..token_index are set for halts,
    completion for a completed stream (None for any other status)."""

    status: Status
    tokens: int  # tokens released
    text: str  # the released text
    policy: str
    policy_sha256: str
    guard: str | None = None
    value: float | None = None
    threshold: float | None = None
    token_index: int | None = None
    message: str = ""  # detail for ERROR
    completion: Completion | None = None  # why it completed; None unless COMPLETED


@dataclass(frozen=True, slots=True)
class Device:
    """A device the daemon's llama.cpp can compute on, and the model layers on it."""

    name: str  # ggml's name: CPU, CUDA0, Vulkan0 ...
    description: str
    kind: str  # cpu, gpu, igpu, accel or other
    memory_bytes: int  # total memory
    layers: int  # of ModelInfo.layers, placed on this device


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    sha256: str
    description: str
    vocab_size: int
    context_size: int  # tokens per stream (prompt + generated)
    train_context_size: int
    size_bytes: int  # of the GGUF file
    chat_template: bool  # whether chat messages are accepted
    backend: str = ""  # CPU, CUDA, Vulkan, Metal ...: where the offloaded layers run
    layers: int = 0  # the model's repeating layers
    gpu_layers: int = 0  # of them, on GPUs
    devices: tuple[Device, ...] = ()  # every device, in ggml's order


@dataclass(frozen=True, slots=True)
class PolicyInfo:
    name: str
    sha256: str
    builtin: bool


@dataclass(frozen=True, slots=True)
class Limits:
    max_streams: int
    max_queue: int
    max_tokens: int
    max_prompt_tokens: int
    max_message_bytes: int


@dataclass(frozen=True, slots=True)
class Info:
    version: str
    model: ModelInfo
    policies: tuple[PolicyInfo, ...]
    limits: Limits
