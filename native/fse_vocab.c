// fse_vocab.c: how much text one token can stand for, to refuse oversized prompts unread.
//
// A prompt of B bytes needs at least B / max_token_bytes tokens, so one far larger than a
// stream's context is refused on its length alone. Tokenizing even a 16 KiB prefix to
// decide cost ~8 ms a prompt with Gemma 3 (llama.cpp scans the text once per special
// token), half a core-second for a burst of 64 refused 1 MiB prompts, taken from the
// decode threads. Measured with the embedded model: 48 bytes, computed in ~20 ms at load.
//
// The bound holds only where every byte of the text ends up in some token's piece:
// SPM and BPE vocabularies, whose tokenizers never drop or fold text. WPM lowercases
// and strips accents, UGM normalizes and collapses whitespace, and a token with the
// lstrip/rstrip attribute swallows the whitespace next to it; for those, 0.
#include "fse.h"

#include "llama.h"

int32_t fse_vocab_max_token_bytes(const struct llama_vocab * vocab) {
    const enum llama_vocab_type type = llama_vocab_type(vocab);
    if (type != LLAMA_VOCAB_TYPE_SPM && type != LLAMA_VOCAB_TYPE_BPE) {
        return 0;
    }
    char piece[256];
    int32_t longest = 0;
    const int32_t n_tokens = llama_vocab_n_tokens(vocab);
    for (llama_token token = 0; token < n_tokens; token++) {
        if (llama_vocab_get_attr(vocab, token) & (LLAMA_TOKEN_ATTR_LSTRIP | LLAMA_TOKEN_ATTR_RSTRIP)) {
            return 0;
        }
        // special = true: control tokens render as their text, which a prompt parsed
        // with special tokens (a chat template) can contain. n < 0: the piece needs -n.
        int32_t n = llama_token_to_piece(vocab, token, piece, sizeof piece, 0, true);
        if (n < 0) {
            n = -n;
        }
        if (n > longest) {
            longest = n;
        }
    }
    return longest;
}
