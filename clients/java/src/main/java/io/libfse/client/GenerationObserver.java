package io.libfse.client;

/**
 * Receives a generation's events on a gRPC thread (asynchronous API). Exactly one of
 * {@link #onVerdict} and {@link #onError} is called, last. Keep the callbacks short; they run on
 * the channel's executor.
 */
public interface GenerationObserver {
    /** The daemon admitted the request. */
    default void onStarted(Started started) {
    }

    /** A token passed every halting guard and is released. */
    void onToken(TokenEvent token);

    /** The generation ended (completed, halted, cancelled or error): the last event. */
    void onVerdict(Verdict verdict);

    /** The call failed without a verdict: the last event. */
    void onError(GuardException error);
}
