"""A tiny random-weight GGUF whose decode costs next to nothing: for measuring the
daemon's own per-token work at the rates a GPU decodes at (bench_handoff.py).

A llama-architecture model: one layer, 64-wide, a 512-token SentencePiece vocabulary
(the three control tokens, the 256 byte tokens, then letters and common words), so a
step of 16 streams decodes in well under a millisecond on two cores and the host's work
(scheduling, guards, the handoff to gRPC) is what the daemon's throughput measures.

The weights are seeded noise, shaped so that generation never ends by itself: token
embeddings are positive, the layer's weights small, so the final hidden state stays
positive, and the output rows of the control tokens (</s> among them) are -1, so their
logits are far below every other token's. The text is noise; only speed means anything.

    .venv/bin/python bench/tiny_model.py --out /tmp/tiny.gguf
"""

from __future__ import annotations

import argparse
import string
from pathlib import Path

import gguf
import numpy as np

N_EMBD = 64
N_FF = 128
N_HEAD = 4
WORDS = str.split(
    "the of and to in is was for on that with as by at from it his her an be this "
    "which or are had not but they were have one all their there been has when who "
    "will more no if out so said what up its about into than them can only other new "
    "some could time these two may then do first any my now such like our over man me"
)


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """SentencePiece pieces, scores and types: control, bytes, then normal pieces."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    pieces = ["\u2581"] + [f"\u2581{w}" for w in WORDS] + list(string.ascii_letters)
    pieces += [f"\u2581{c}" for c in string.ascii_letters] + list(string.digits + ".,!?'")
    for piece in pieces:
        if piece not in tokens and len(tokens) < 512:
            tokens.append(piece)
            types.append(gguf.TokenType.NORMAL)
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    return tokens, scores, [int(t) for t in types]


def write(out: Path, seed: int = 0) -> Path:
    tokens, scores, types = vocabulary()
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(out), arch="llama")
    w.add_name("tiny random (bench)")
    w.add_context_length(8192)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(1)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)

    def small(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    embd = rng.uniform(0.5, 1.5, (n_vocab, N_EMBD)).astype(np.float32)
    output = rng.standard_normal((n_vocab, N_EMBD), dtype=np.float32) * 0.3
    control = [i for i, t in enumerate(types) if t != gguf.TokenType.NORMAL]
    output[control] = -1.0  # never chosen: h > 0, so these logits are about -8 * |h|
    w.add_tensor("token_embd.weight", embd)
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    w.add_tensor("output.weight", output.astype(np.float32))
    p = "blk.0."
    w.add_tensor(p + "attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        w.add_tensor(f"{p}{name}.weight", small(N_EMBD, N_EMBD))
    w.add_tensor(p + "ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    w.add_tensor(p + "ffn_gate.weight", small(N_FF, N_EMBD))
    w.add_tensor(p + "ffn_up.weight", small(N_FF, N_EMBD))
    w.add_tensor(p + "ffn_down.weight", small(N_EMBD, N_FF))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(write(args.out, args.seed))


if __name__ == "__main__":
    main()
