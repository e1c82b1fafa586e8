// Fuzz target: fse_vocab_max_token_bytes (native/fse_vocab.c), the bound that refuses an
// oversized prompt unread, over arbitrary vocabularies. Its input is a model's vocabulary
// (any GGUF an operator serves), so this harness stands in for libllama: the four
// llama.h functions fse_vocab.c calls are defined here over a vocabulary read from the
// input (a tokenizer type, then per token its attributes and the length of its piece,
// which may be longer than fse_vocab.c's 256-byte buffer).
//
// Invariants: 0 for a tokenizer other than SPM and BPE, and for any vocabulary that holds
// a token with the LSTRIP or RSTRIP attribute; otherwise the longest piece, in bytes,
// whatever the buffer it was asked into; a piece is never written past the buffer given
// (checked by ASan: the stub writes as many bytes as it says).
#include "fse.h"

#include "llama.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_TOKENS 4096

struct llama_vocab {
    enum llama_vocab_type type;
    int32_t n;
    uint16_t attr[MAX_TOKENS];
    int32_t len[MAX_TOKENS];
};

enum llama_vocab_type llama_vocab_type(const struct llama_vocab * vocab) {
    return vocab->type;
}

int32_t llama_vocab_n_tokens(const struct llama_vocab * vocab) {
    return vocab->n;
}

enum llama_token_attr llama_vocab_get_attr(const struct llama_vocab * vocab, llama_token token) {
    if (token < 0 || token >= vocab->n) {
        fprintf(stderr, "llama_vocab_get_attr(%d) of %d tokens\n", token, vocab->n);
        abort();
    }
    return (enum llama_token_attr) vocab->attr[token];
}

int32_t llama_token_to_piece(const struct llama_vocab * vocab, llama_token token, char * buf,
                             int32_t length, int32_t lstrip, bool special) {
    (void) lstrip;
    (void) special;
    if (token < 0 || token >= vocab->n) {
        fprintf(stderr, "llama_token_to_piece(%d) of %d tokens\n", token, vocab->n);
        abort();
    }
    const int32_t n = vocab->len[token];
    if (n > length) {
        return -n;
    }
    memset(buf, 'x', (size_t) n); // all of it: ASan sees a length larger than the buffer
    return n;
}

int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    if (size < 1) {
        return 0;
    }
    static struct llama_vocab vocab;
    vocab.type = (enum llama_vocab_type) (data[0] % 9);
    vocab.n = 0;
    int stripped = 0;
    int32_t longest = 0;
    for (size_t i = 1; i + 2 < size && vocab.n < MAX_TOKENS; i += 3) {
        // attributes: bit 7 of the first byte picks LSTRIP/RSTRIP (rarely both)
        const uint16_t attr = data[i] & 0x80 ? (uint16_t) (data[i] & 1 ? LLAMA_TOKEN_ATTR_LSTRIP
                                                                       : LLAMA_TOKEN_ATTR_RSTRIP)
                                             : (uint16_t) (data[i] & 0x7f);
        const int32_t len = (int32_t) (data[i + 1] | (data[i + 2] & 0x03) << 8); // 0..1023
        vocab.attr[vocab.n] = attr;
        vocab.len[vocab.n] = len;
        stripped |= (attr & (LLAMA_TOKEN_ATTR_LSTRIP | LLAMA_TOKEN_ATTR_RSTRIP)) != 0;
        longest = len > longest ? len : longest;
        vocab.n++;
    }
    const int bounded = vocab.type == LLAMA_VOCAB_TYPE_SPM || vocab.type == LLAMA_VOCAB_TYPE_BPE;
    const int32_t want = bounded && !stripped ? longest : 0;
    const int32_t got = fse_vocab_max_token_bytes(&vocab);
    if (got != want) {
        fprintf(stderr, "type %d, %d tokens: %d, expected %d\n", vocab.type, vocab.n, got, want);
        abort();
    }
    return 0;
}
