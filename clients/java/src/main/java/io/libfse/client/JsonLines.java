package io.libfse.client;

import fse.v1.Fse;
import java.util.Locale;
import java.util.Optional;
import java.util.OptionalDouble;
import java.util.OptionalLong;
import java.util.StringJoiner;

/**
 * The JSON lines of docs/protocol.md, as {@code fse generate --json} and every client's
 * guarded-generate print them: keys in the protocol's order, spaced as Python's json.dumps spaces
 * them; doubles as {@link Double#toString} prints them (they parse back to the same double), NaN and
 * infinities as null; strings with their text raw (write them as UTF-8).
 */
public final class JsonLines {
    private JsonLines() {
    }

    /** A value already rendered as JSON (a nested object or array). */
    private record Raw(String json) {
    }

    /** A JSON object of key, value pairs in order, spaced as Python's json.dumps spaces it. */
    private static String object(Object... keysAndValues) {
        StringJoiner out = new StringJoiner(", ", "{", "}");
        for (int i = 0; i < keysAndValues.length; i += 2) {
            out.add(quote((String) keysAndValues[i]) + ": " + value(keysAndValues[i + 1]));
        }
        return out.toString();
    }

    /**
     * A JSON value: doubles as Double.toString prints them (they parse back to the same double),
     * NaN and infinities as null, empty optionals as null, strings quoted.
     */
    private static String value(Object v) {
        if (v instanceof OptionalDouble d) {
            v = d.isPresent() ? d.getAsDouble() : null;
        } else if (v instanceof OptionalLong n) {
            v = n.isPresent() ? n.getAsLong() : null;
        } else if (v instanceof Optional<?> o) {
            v = o.orElse(null);
        }
        if (v == null || v instanceof Double d && (d.isNaN() || d.isInfinite())) {
            return "null";
        }
        return v instanceof String s ? quote(s) : v instanceof Raw r ? r.json() : v.toString();
    }

    /** A JSON string literal: text raw (UTF-8 on output), quotes and control characters escaped. */
    static String quote(String s) {
        StringBuilder out = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            if (c == '"' || c == '\\') {
                out.append('\\').append(c);
            } else if (c < 0x20) {
                out.append(String.format("\\u%04x", (int) c));
            } else {
                out.append(c);
            }
        }
        return out.append('"').toString();
    }

    /**
     * The token's JSON line: type, index, id, text, nll, ppl, variance, max_prob, l2_norm, entropy, health
     * (null when unspecified), and warnings only when there are any.
     *
     * @param t a token event
     * @return one JSON object, without a newline
     */
    public static String token(TokenEvent t) {
        String health = t.health() == Health.UNSPECIFIED ? null : t.health().name().toLowerCase(Locale.ROOT);
        String doc = object("type", "token", "index", t.index(), "id", t.id(), "text", t.text(), "nll", t.nll(),
                "ppl", t.ppl(), "variance", t.variance(), "max_prob", t.maxProb(), "l2_norm", t.l2Norm(),
                "entropy", t.entropy(), "health", health);
        if (t.warnings().isEmpty()) {
            return doc;
        }
        StringJoiner trips = new StringJoiner(", ", "[", "]");
        t.warnings().forEach(w -> trips.add(object("guard", w.guard(), "value", w.value(), "threshold",
                w.threshold())));
        return doc.substring(0, doc.length() - 1) + ", \"warnings\": " + trips + "}";
    }

    /**
     * The verdict's JSON line: type, status, completion, guard, value, threshold, token_index (each
     * null when unset), tokens, text, policy, policy_sha256, and message only when it is not empty.
     *
     * @param v a verdict
     * @return one JSON object, without a newline
     */
    public static String verdict(Verdict v) {
        String doc = object("type", "verdict", "status", v.status().name().toLowerCase(Locale.ROOT),
                "completion", v.completion().map(Verdict.Completion::wireName), "guard", v.guard(), "value",
                v.value(), "threshold", v.threshold(), "token_index", v.tokenIndex(), "tokens", v.tokens(),
                "text", v.text(), "policy", v.policy(), "policy_sha256", v.policySha256());
        return v.message().isEmpty() ? doc : doc.substring(0, doc.length() - 1) + ", \"message\": "
                + quote(v.message()) + "}";
    }

    /**
     * GetInfo's answer with the proto's field names, less model.path (the daemon machine's business).
     *
     * @param info what {@link GuardClient#info()} returned
     * @return one JSON object, without a newline
     */
    public static String info(Fse.Info info) {
        Fse.ModelInfo m = info.getModel();
        Fse.Limits l = info.getLimits();
        StringJoiner policies = new StringJoiner(", ", "[", "]");
        info.getPoliciesList().forEach(p -> policies.add(object("name", p.getName(), "sha256", p.getSha256(),
                "builtin", p.getBuiltin())));
        StringJoiner devices = new StringJoiner(", ", "[", "]");
        m.getDevicesList().forEach(d -> devices.add(object("name", d.getName(), "description",
                d.getDescription(), "kind", d.getKind(),
                "memory_bytes", new Raw(Long.toUnsignedString(d.getMemoryBytes())),
                "layers", Integer.toUnsignedLong(d.getLayers()))));
        return object("version", info.getVersion(), "model", new Raw(object("name", m.getName(),
                "sha256", m.getSha256(), "description", m.getDescription(),
                "vocab_size", Integer.toUnsignedLong(m.getVocabSize()),
                "context_size", Integer.toUnsignedLong(m.getContextSize()),
                "train_context_size", Integer.toUnsignedLong(m.getTrainContextSize()),
                "size_bytes", new Raw(Long.toUnsignedString(m.getSizeBytes())),
                "chat_template", m.getChatTemplate(), "backend", m.getBackend(),
                "layers", Integer.toUnsignedLong(m.getLayers()),
                "gpu_layers", Integer.toUnsignedLong(m.getGpuLayers()),
                "devices", new Raw(devices.toString()))),
                "policies", new Raw(policies.toString()),
                "limits", new Raw(object("max_streams", Integer.toUnsignedLong(l.getMaxStreams()),
                "max_queue", Integer.toUnsignedLong(l.getMaxQueue()),
                "max_tokens", Integer.toUnsignedLong(l.getMaxTokens()),
                "max_prompt_tokens", Integer.toUnsignedLong(l.getMaxPromptTokens()),
                "max_message_bytes", Integer.toUnsignedLong(l.getMaxMessageBytes()))));
    }
}
