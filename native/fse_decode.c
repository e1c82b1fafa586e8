// fse_decode.c: llama_decode with the event loop's wake-up in front of it.
//
// The scheduler thread hands each step's released tokens to the asyncio event loop.
// With loop.call_soon_threadsafe the wake-up (a send on the loop's self-pipe) releases
// the GIL; the loop thread takes it and converts and sends every stream's token, and
// the decode thread waits for the GIL back before it can start the next llama_decode.
// On a GPU that serialises the loop's work with the decode: on a model that decodes in
// next to no time (bench/bench_handoff.py), 16 streams, the send took 0.32 ms of the
// decode thread per step. Here the write happens with the GIL released (cffi releases it
// around the call), so the loop works while the batch decodes.

#include "fse.h"
#include "llama.h"

#include <errno.h>
#include <stdint.h>
#include <unistd.h>

int32_t fse_decode(struct llama_context * ctx, struct llama_batch batch, int32_t wake_fd) {
    if (wake_fd >= 0) {
        const uint64_t one = 1;
        ssize_t written;
        do {
            written = write(wake_fd, &one, sizeof one);
        } while (written < 0 && errno == EINTR);
        // Nothing to do on failure: an eventfd write fails only if its counter would
        // overflow (the loop is gone and nobody reads it), and then nobody waits either.
    }
    return llama_decode(ctx, batch);
}
