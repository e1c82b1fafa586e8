"""The model: a GGUF file loaded by llama.cpp, with its vocabulary and chat template.

`Model` checks the file (fse.core.gguf) before llama.cpp sees it, loads it through
fse._native, and turns text into tokens and tokens back into bytes: tokenize with
a bound (TooManyTokens, refused from the text's length or a prefix before the whole
list is built), cached token pieces, and the chat template. It also holds what the
engine's Context shares with it: the backend's one-time start, llama.cpp's last
logged error, and `Closing` (a `with` frees the llama.cpp object).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from fse._native import ffi, lib
from fse.core.errors import EngineError, InputError
from fse.core.gguf import ModelError, check_gguf
from fse.core.types import utf8_length

_backend_lock = threading.Lock()
_backend_ready = False


class TooManyTokens(ValueError):
    """A text needs more tokens than the caller allows (n_tokens says how many; with
    at_least, the text was refused from its length or a prefix and needs n_tokens or
    more)."""

    def __init__(self, n_tokens: int, limit: int, at_least: bool = False) -> None:
        super().__init__(f"{'at least ' if at_least else ''}{n_tokens} tokens; at most {limit}")
        self.n_tokens = n_tokens
        self.limit = limit
        self.at_least = at_least


# A prefix of max_tokens * this many bytes holds more than max_tokens tokens of any
# ordinary text (about 4 bytes a token here), so an oversized prompt is refused after
# tokenizing 16 KiB instead of all of it: 1 MiB took ~0.2 s of a core.
PREFIX_BYTES_PER_TOKEN = 8


def init_backend(verbose: bool = False) -> None:
    """Route llama.cpp's log (quiet unless verbose) and initialise its backend once."""
    global _backend_ready
    with _backend_lock:
        lib.fse_log_install(1 if verbose else 0)
        if not _backend_ready:
            lib.llama_backend_init()
            _backend_ready = True


def last_llama_error(default: str) -> str:
    """The last error llama.cpp logged (fse_log.c keeps it), else `default`."""
    message: str = ffi.string(lib.fse_log_last_error()).decode("utf-8", "replace")
    return message or default


# Model(gpu_layers=...): "auto" puts every layer on a GPU when llama.cpp has a usable
# one, else runs on the CPU; "all" needs a GPU; an integer N puts N layers on it (0: none).
GPU_LAYERS_AUTO = "auto"
GPU_LAYERS_ALL = "all"
GPU_LAYERS_ACCEPTED = (
    '"auto" (every layer on a GPU when llama.cpp has one, else the CPU), "all" (every '
    "layer on a GPU; needs one), 0 (the CPU only) or N >= 1 (that many layers on a GPU)"
)


def parse_gpu_layers(value: int | str) -> int | str:
    """`auto`, `all` or a count (a flag's text or a config value); InputError otherwise."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not (
        value in (GPU_LAYERS_AUTO, GPU_LAYERS_ALL) or (isinstance(value, int) and value >= 0)
    ):
        raise InputError(f"gpu_layers: {value!r} is not accepted; accepted: {GPU_LAYERS_ACCEPTED}")
    return value


# How a model is split over several GPUs, as llama.cpp names it.
SPLIT_MODES = {
    "none": lib.LLAMA_SPLIT_MODE_NONE,  # the whole model on main_gpu
    "layer": lib.LLAMA_SPLIT_MODE_LAYER,  # layers (and their KV) spread over the GPUs
    "row": lib.LLAMA_SPLIT_MODE_ROW,  # rows of each matrix spread (tensor parallelism)
}
_DEVICE_KINDS = {
    lib.GGML_BACKEND_DEVICE_TYPE_CPU: "cpu",
    lib.GGML_BACKEND_DEVICE_TYPE_GPU: "gpu",
    lib.GGML_BACKEND_DEVICE_TYPE_IGPU: "igpu",
    lib.GGML_BACKEND_DEVICE_TYPE_ACCEL: "accel",
}


@dataclass(frozen=True, slots=True)
class Device:
    """A device ggml can compute on (llama.cpp's backends: the CPU, each GPU)."""

    name: str  # ggml's name: CPU, CUDA0, Vulkan0 ...
    description: str
    kind: str  # cpu, gpu, igpu, accel (or "other")
    memory_total: int  # bytes
    memory_free: int


def devices() -> list[Device]:
    """The devices this llama.cpp build can use, in ggml's order (the GPUs first)."""
    init_backend()
    found = []
    free, total = ffi.new("size_t *"), ffi.new("size_t *")
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        lib.ggml_backend_dev_memory(dev, free, total)
        found.append(
            Device(
                ffi.string(lib.ggml_backend_dev_name(dev)).decode("utf-8", "replace"),
                ffi.string(lib.ggml_backend_dev_description(dev)).decode("utf-8", "replace"),
                _DEVICE_KINDS.get(lib.ggml_backend_dev_type(dev), "other"),
                int(total[0]),
                int(free[0]),
            )
        )
    return found


def tensor_split(text: str) -> list[float]:
    """`3,1` as llama.cpp's tensor_split (the share of each GPU, in device order); empty:
    none (llama.cpp splits by free memory). InputError naming the key otherwise."""
    if not text.strip():
        return []
    try:
        shares = [float(part) for part in text.split(",")]
    except ValueError:
        shares = []
    most = lib.llama_max_devices()
    fits = 0 < len(shares) <= most
    if not fits or not all(0 <= s < float("inf") for s in shares) or sum(shares) <= 0:
        raise InputError(
            f"tensor_split: {text!r} is not accepted; accepted: comma-separated non-negative "
            f'shares, one per GPU (at most {most}), not all zero, such as "3,1"'
        )
    return shares


def gpu_offload() -> bool:
    """Whether llama.cpp has a device to offload layers to: a GPU of a GPU backend, or an
    RPC worker's device (fse.core.rpc registers those; they say kind gpu). Not
    llama_supports_gpu_offload(): that is true for every build with the RPC backend,
    workers or none."""
    return any(d.kind in ("gpu", "igpu") for d in devices())


def offloaded_layers(gpu_layers: int | str) -> int:
    """llama.cpp's n_gpu_layers for `gpu_layers` (parse_gpu_layers): "auto" is every layer
    (-1 to llama.cpp) with a GPU and 0 without; "all" is every layer; 0 is none; "all" and
    N > 0 need a GPU, else InputError: a model meant for a GPU must not silently run at
    CPU speed."""
    gpu_layers = parse_gpu_layers(gpu_layers)
    if gpu_layers == GPU_LAYERS_AUTO:
        return -1 if gpu_offload() else 0
    if gpu_layers != 0 and not gpu_offload():
        asked = "every layer" if gpu_layers == GPU_LAYERS_ALL else f"{gpu_layers} layers"
        raise InputError(
            f"gpu_layers: {asked} asked for a GPU, but this llama.cpp has no GPU backend or "
            'no GPU is present; accepted: "auto" (every layer on a GPU when there is one, '
            "else the CPU) or 0 (the CPU); for a GPU, build llama.cpp with its backend "
            "(docs/getting-started.md) or give RPC workers (--rpc, docs/rpc.md)"
        )
    return -1 if gpu_layers == GPU_LAYERS_ALL else int(gpu_layers)


def repeating_layers_offloaded(n_gpu_layers: int, n_layer: int) -> int:
    """The model's repeating layers on GPUs for llama.cpp's n_gpu_layers, which counts the
    output layer too (it logs "offloaded N/n_layer+1 layers"): every one for a negative
    count or one above n_layer, else N - 1 (the output layer takes the first)."""
    if n_gpu_layers < 0 or n_gpu_layers > n_layer:
        return n_layer
    return max(n_gpu_layers - 1, 0)


class Closing:
    """`with` frees the llama.cpp object deterministically: close() on exit."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Model(Closing):
    """A GGUF model loaded by llama.cpp, with its vocabulary. Use as a context manager."""

    def __init__(
        self,
        path: Path | str,
        *,
        verbose: bool = False,
        gpu_layers: int | str = GPU_LAYERS_AUTO,
        main_gpu: int = 0,
        split_mode: str = "layer",
        split: Sequence[float] = (),
    ) -> None:
        """`gpu_layers`, `main_gpu`, `split_mode` (SPLIT_MODES) and `split` (the share of
        each GPU, see tensor_split) are llama.cpp's model parameters of those names."""
        self.path = check_gguf(Path(path))
        init_backend(verbose)
        params = lib.llama_model_default_params()
        params.n_gpu_layers = offloaded_layers(gpu_layers)
        params.main_gpu = main_gpu
        params.split_mode = SPLIT_MODES[split_mode]
        # llama.cpp reads one share per device it has: the array is that long, zero-padded,
        # and alive for the whole load.
        shares = ffi.new("float[]", max(len(split), lib.llama_max_devices()))
        shares[0 : len(split)] = list(split)
        params.tensor_split = shares if split else ffi.NULL
        handle = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if handle == ffi.NULL:
            reason = last_llama_error("llama.cpp could not load it")
            raise ModelError(f"model: {self.path}: {reason}")
        self._handle = handle
        self.main_gpu, self.split_mode, self.split = main_gpu, split_mode, tuple(split)
        self.n_layer: int = lib.llama_model_n_layer(handle)
        self.n_gpu_layers: int = params.n_gpu_layers
        self.gpu_layers = repeating_layers_offloaded(self.n_gpu_layers, self.n_layer)
        self._vocab = lib.llama_model_get_vocab(handle)
        self.n_vocab: int = lib.llama_vocab_n_tokens(self._vocab)
        self.n_ctx_train: int = lib.llama_model_n_ctx_train(handle)
        # No token stands for more bytes of text than this (0: no such bound here).
        self.max_token_bytes: int = lib.fse_vocab_max_token_bytes(self._vocab)
        self.name = self._meta("general.name") or self.path.stem
        buf = ffi.new("char[]", 256)
        lib.llama_model_desc(handle, buf, 256)
        self.description: str = ffi.string(buf).decode("utf-8", "replace")
        template = lib.llama_model_chat_template(handle, ffi.NULL)
        self.chat_template: bytes | None = None if template == ffi.NULL else ffi.string(template)
        # Token id -> bytes, filled lazily: token_to_piece once per distinct token.
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ffi.new("char[]", 256)

    def _meta(self, key: str) -> str | None:
        buf = ffi.new("char[]", 512)
        n = lib.llama_model_meta_val_str(self.handle, key.encode(), buf, 512)
        return ffi.string(buf).decode("utf-8", "replace") if n >= 0 else None

    @property
    def handle(self) -> Any:
        if self._handle is None:
            raise EngineError("model is closed")
        return self._handle

    @property
    def vocab(self) -> Any:
        """The model's vocabulary; freed with the model, so closed raises EngineError."""
        if self._handle is None:
            raise EngineError("model is closed")
        return self._vocab

    def tokenize(
        self,
        text: str,
        *,
        add_special: bool = True,
        parse_special: bool = True,
        max_tokens: int | None = None,
    ) -> list[int]:
        """Tokens for text, with the model's own BOS rule; special tokens like
        <start_of_turn> in a rendered chat template are parsed as such.

        With max_tokens, a longer text raises TooManyTokens without building the
        token list: a 1 MiB prompt would otherwise cost ~20 MiB of Python ints."""
        longest = self.max_token_bytes
        if (
            max_tokens is not None
            and longest
            and (size := utf8_length(text)) > max_tokens * longest
        ):
            # Refused on its length alone, nothing tokenized: see fse_vocab.c.
            raise TooManyTokens(-(-size // longest), max_tokens, at_least=True)
        data = text.encode("utf-8")
        if max_tokens is not None and len(data) > max_tokens * PREFIX_BYTES_PER_TOKEN:
            self._refuse_from_prefix(data, max_tokens, add_special, parse_special)
        capacity = len(data) + 8  # a token covers at least one byte, bar BOS/EOS
        if max_tokens is not None:
            capacity = min(capacity, max_tokens)
        tokens = ffi.new("llama_token[]", capacity)
        n = lib.llama_tokenize(
            self.vocab, data, len(data), tokens, capacity, add_special, parse_special
        )
        if n < 0:  # buffer too small: -n is the size needed
            if max_tokens is not None and -n > max_tokens:
                raise TooManyTokens(-n, max_tokens)
            capacity = -n
            tokens = ffi.new("llama_token[]", capacity)
            n = lib.llama_tokenize(
                self.vocab, data, len(data), tokens, capacity, add_special, parse_special
            )
        if n < 0:
            raise EngineError(f"prompt: llama.cpp could not tokenize it ({n})")
        return list(ffi.unpack(tokens, n))

    def _refuse_from_prefix(
        self, data: bytes, max_tokens: int, add_special: bool, parse_special: bool
    ) -> None:
        """TooManyTokens if a prefix of the text alone needs more than max_tokens + 1
        tokens (the cut may split one token in two: the whole then needs > max_tokens)."""
        cut = max_tokens * PREFIX_BYTES_PER_TOKEN
        while cut > 0 and data[cut] & 0xC0 == 0x80:  # not inside a UTF-8 character
            cut -= 1
        n = lib.llama_tokenize(self.vocab, data, cut, ffi.NULL, 0, add_special, parse_special)
        if -n > max_tokens + 1:
            raise TooManyTokens(-n - 1, max_tokens, at_least=True)

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes a token stands for: special tokens render as empty, or with
        `special` as their text (<start_of_turn>), so that a templated prompt's pieces
        spell it byte for byte (that form is not cached: prompt-time only)."""
        cached = None if special else self._pieces.get(token)
        if cached is not None:
            return cached
        n = lib.llama_token_to_piece(self.vocab, token, self._piece_buf, 256, 0, special)
        result: bytes
        if n < 0:
            buf = ffi.new("char[]", -n)
            n = lib.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
            result = ffi.unpack(buf, n)
        else:
            result = ffi.unpack(self._piece_buf, n)
        if not special:
            self._pieces[token] = result
        return result

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")

    def is_end_of_generation(self, token: int) -> bool:
        return bool(lib.llama_vocab_is_eog(self.vocab, token))

    def use_chat_template(self, name: str) -> None:
        """Use one of llama.cpp's built-in templates (chatml, llama3, gemma...) instead of
        the GGUF's own; InputError when llama.cpp does not know the name."""
        previous, self.chat_template = self.chat_template, name.encode()
        try:
            self.apply_chat_template([("user", "hi")])
        except ValueError:
            self.chat_template = previous
            raise InputError(
                f"model.chat_template: {name!r} is not a template llama.cpp knows; "
                "accepted: a built-in name such as chatml, llama3, gemma, mistral-v7, phi3"
            ) from None

    def apply_chat_template(self, messages: Sequence[tuple[str, str]]) -> str:
        """Render (role, content) messages with the model's own template, ready for the
        assistant's turn. Raises ValueError when the model has no (supported) template."""
        if self.chat_template is None:
            raise ValueError("messages: this model has no chat template; send a raw prompt")
        for i, message in enumerate(messages):
            for field, text in zip(("role", "content"), message, strict=True):
                if "\0" in text:  # a C string ends there: the rest would vanish unseen
                    raise ValueError(
                        f"messages[{i}].{field}: contains a NUL character; accepted: text "
                        "without NUL (the chat template would cut the text there)"
                    )
        # NUL-terminated C strings owned by this list, alive until the call returns. (A
        # from_buffer over a temporary `role + b"\0"` dangled: the template sometimes read
        # freed memory and rendered an empty role.)
        keep = [(ffi.new("char[]", r.encode()), ffi.new("char[]", c.encode())) for r, c in messages]
        chat = ffi.new("llama_chat_message[]", len(keep))
        for i, (role, content) in enumerate(keep):
            chat[i].role = role
            chat[i].content = content
        size = 2 * sum(len(r) + len(c) for r, c in keep) + 256
        for _ in range(2):
            buf = ffi.new("char[]", size)
            n = lib.llama_chat_apply_template(self.chat_template, chat, len(keep), True, buf, size)
            if n < 0:
                raise ValueError(
                    "messages: the model's chat template is not supported by llama.cpp"
                )
            if n <= size:
                rendered: bytes = ffi.unpack(buf, n)
                return rendered.decode("utf-8", "replace")
            size = n
        raise EngineError("chat template output kept growing")

    def close(self) -> None:
        if self._handle is not None:
            lib.llama_model_free(self._handle)
            self._handle = None
