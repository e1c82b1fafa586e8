package io.libfse.client;

/**
 * What a generation stream delivers, in order: one {@link Started}, zero or more
 * {@link TokenEvent}s, then exactly one {@link Verdict}.
 */
public sealed interface Event permits Started, TokenEvent, Verdict {
}
