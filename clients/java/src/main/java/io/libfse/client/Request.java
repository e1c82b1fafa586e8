package io.libfse.client;

import fse.v1.Fse;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Objects;

/**
 * A generation request: a raw prompt or chat messages, and how to generate. Build one with
 * {@link #prompt(String)} or {@link #chat(List)} and the {@code with...} methods.
 *
 * @param prompt raw prompt text (null when {@code messages} is used)
 * @param messages chat messages, rendered with the model's template (empty when prompt is used)
 * @param maxTokens tokens to generate at most, 1 .. the daemon's limit
 * @param sampling sampling parameters
 * @param policy a policy name the daemon serves; empty means "default"
 * @param stop stop sequences
 * @param requestId echoed in Started and the audit log
 * @param timeout generation time budget from admission (the stream halts with guard
 *     "deadline"); null for none
 */
public record Request(String prompt, List<ChatMessage> messages, long maxTokens,
        Sampling sampling, String policy, List<String> stop, String requestId,
        Duration timeout) {

    /** The default of {@link #maxTokens()}. */
    public static final long DEFAULT_MAX_TOKENS = 256;

    /**
     * One chat message.
     *
     * @param role e.g. "system", "user", "assistant"
     * @param content the message text
     */
    public record ChatMessage(String role, String content) {
    }

    /** Checks what the wire format cannot carry; the daemon judges the rest. */
    public Request {
        if ((prompt == null) == messages.isEmpty()) {
            throw new IllegalArgumentException("exactly one of prompt and messages must be set");
        }
        if (maxTokens < 1 || maxTokens > 0xFFFF_FFFFL) {
            throw new IllegalArgumentException("max_tokens: " + maxTokens + " is out of 1 .. 2^32-1");
        }
        if (timeout != null && (timeout.isNegative() || timeout.isZero())) {
            throw new IllegalArgumentException("timeout: must be positive");
        }
        messages = List.copyOf(messages);
        stop = List.copyOf(stop);
        Objects.requireNonNull(sampling, "sampling");
        Objects.requireNonNull(policy, "policy");
        Objects.requireNonNull(requestId, "requestId");
    }

    /** A request for this raw prompt with the defaults. */
    public static Request prompt(String prompt) {
        return new Request(Objects.requireNonNull(prompt, "prompt"), List.of(), DEFAULT_MAX_TOKENS,
                Sampling.DEFAULTS, "", List.of(), "", null);
    }

    /** A request for these chat messages with the defaults. */
    public static Request chat(List<ChatMessage> messages) {
        return new Request(null, messages, DEFAULT_MAX_TOKENS, Sampling.DEFAULTS, "", List.of(), "",
                null);
    }

    /** A copy generating at most this many tokens. */
    public Request withMaxTokens(long value) {
        return new Request(prompt, messages, value, sampling, policy, stop, requestId, timeout);
    }

    /** A copy with these sampling parameters. */
    public Request withSampling(Sampling value) {
        return new Request(prompt, messages, maxTokens, value, policy, stop, requestId, timeout);
    }

    /** A copy guarded by this policy. */
    public Request withPolicy(String value) {
        return new Request(prompt, messages, maxTokens, sampling, value, stop, requestId, timeout);
    }

    /** A copy with one more stop sequence. */
    public Request withStop(String value) {
        List<String> more = new ArrayList<>(stop);
        more.add(value);
        return new Request(prompt, messages, maxTokens, sampling, policy, more, requestId, timeout);
    }

    /** A copy with this request id. */
    public Request withRequestId(String value) {
        return new Request(prompt, messages, maxTokens, sampling, policy, stop, value, timeout);
    }

    /** A copy with this generation time budget. */
    public Request withTimeout(Duration value) {
        return new Request(prompt, messages, maxTokens, sampling, policy, stop, requestId, value);
    }

    /**
     * The wire value of {@link #timeout()}: whole milliseconds, rounded half to even, at least 1;
     * 0 when there is none.
     */
    public long timeoutMillis() {
        if (timeout == null) {
            return 0;
        }
        double millis = Math.rint(timeout.toNanos() / 1e6);
        return (long) Math.min(0xFFFF_FFFFL, Math.max(1, millis));
    }

    Fse.GenerateRequest toWire() {
        Fse.GenerateRequest.Builder b = Fse.GenerateRequest.newBuilder()
                .setMaxTokens((int) maxTokens)
                .setSampling(sampling.toWire())
                .setPolicy(policy)
                .addAllStop(stop)
                .setRequestId(requestId)
                .setTimeoutMs((int) timeoutMillis());
        if (prompt != null) {
            b.setPrompt(prompt);
        }
        for (ChatMessage m : messages) {
            b.addMessages(Fse.ChatMessage.newBuilder().setRole(m.role()).setContent(m.content()));
        }
        return b.build();
    }
}
