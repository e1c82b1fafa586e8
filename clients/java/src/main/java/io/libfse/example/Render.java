package io.libfse.example;

import fse.v1.Fse;
import io.libfse.client.Health;
import io.libfse.client.TokenEvent;
import io.libfse.client.Verdict;
import java.math.BigDecimal;
import java.math.MathContext;
import java.math.RoundingMode;
import java.util.Locale;
import java.util.Optional;
import java.util.OptionalDouble;
import java.util.OptionalLong;
import java.util.StringJoiner;

/** The contract's output: JSON lines, the text-mode verdict line, and the Info document. */
final class Render {
    private Render() {
    }

    /** A value already rendered as JSON (a nested object or array). */
    private record Raw(String json) {
    }

    /** A JSON object of key, value pairs in order, spaced as Python's json.dumps spaces it. */
    static String object(Object... keysAndValues) {
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

    static String tokenJson(TokenEvent t) {
        String health = t.health() == Health.UNSPECIFIED ? null : t.health().name().toLowerCase(Locale.ROOT);
        String doc = object("type", "token", "index", t.index(), "id", t.id(), "text", t.text(), "nll", t.nll(),
                "ppl", t.ppl(), "variance", t.variance(), "max_prob", t.maxProb(), "l2_norm", t.l2Norm(),
                "health", health);
        if (t.warnings().isEmpty()) {
            return doc;
        }
        StringJoiner trips = new StringJoiner(", ", "[", "]");
        t.warnings().forEach(w -> trips.add(object("guard", w.guard(), "value", w.value(), "threshold",
                w.threshold())));
        return doc.substring(0, doc.length() - 1) + ", \"warnings\": " + trips + "}";
    }

    static String verdictJson(Verdict v) {
        String doc = object("type", "verdict", "status", v.status().name().toLowerCase(Locale.ROOT), "guard",
                v.guard(), "value", v.value(), "threshold", v.threshold(), "token_index", v.tokenIndex(),
                "tokens", v.tokens(), "text", v.text(), "policy", v.policy(), "policy_sha256", v.policySha256());
        return v.message().isEmpty() ? doc : doc.substring(0, doc.length() - 1) + ", \"message\": "
                + quote(v.message()) + "}";
    }

    /** GetInfo as one JSON object with the proto field names (model.path left out). */
    static String infoJson(Fse.Info info) {
        Fse.ModelInfo m = info.getModel();
        Fse.Limits l = info.getLimits();
        StringJoiner policies = new StringJoiner(", ", "[", "]");
        info.getPoliciesList().forEach(p -> policies.add(object("name", p.getName(), "sha256", p.getSha256(),
                "builtin", p.getBuiltin())));
        return object("version", info.getVersion(), "model", new Raw(object("name", m.getName(),
                "sha256", m.getSha256(), "description", m.getDescription(),
                "vocab_size", Integer.toUnsignedLong(m.getVocabSize()),
                "context_size", Integer.toUnsignedLong(m.getContextSize()),
                "train_context_size", Integer.toUnsignedLong(m.getTrainContextSize()),
                "size_bytes", new Raw(Long.toUnsignedString(m.getSizeBytes())),
                "chat_template", m.getChatTemplate())),
                "policies", new Raw(policies.toString()),
                "limits", new Raw(object("max_streams", Integer.toUnsignedLong(l.getMaxStreams()),
                "max_queue", Integer.toUnsignedLong(l.getMaxQueue()),
                "max_tokens", Integer.toUnsignedLong(l.getMaxTokens()),
                "max_prompt_tokens", Integer.toUnsignedLong(l.getMaxPromptTokens()),
                "max_message_bytes", Integer.toUnsignedLong(l.getMaxMessageBytes()))));
    }

    /** The text-mode verdict line, e.g. {@code [completed] 12 tokens released · policy ...}. */
    static String verdictLine(Verdict v) {
        String what = v.status().name().toLowerCase(Locale.ROOT);
        if (v.status() == Verdict.Status.HALTED) {
            what = "halted by " + v.guard().orElse("n/a") + ": value " + g6(v.value()) + ", threshold "
                    + g6(v.threshold()) + ", at token "
                    + (v.tokenIndex().isPresent() ? Long.toString(v.tokenIndex().getAsLong()) : "n/a");
        }
        String detail = v.message().isEmpty() ? "" : ": " + v.message();
        String hash = v.policySha256().substring(0, Math.min(12, v.policySha256().length()));
        return "[" + what + detail + "] " + v.tokens() + " tokens released · policy " + v.policy() + " (" + hash + ")";
    }

    /** C's {@code printf("%.6g", value)}, "n/a" when unset. */
    static String g6(OptionalDouble value) {
        double x = value.orElse(Double.NaN);
        if (value.isEmpty() || Double.isNaN(x) || Double.isInfinite(x)) {
            return value.isEmpty() ? "n/a" : Double.isNaN(x) ? "nan" : x > 0 ? "inf" : "-inf";
        } else if (x == 0) {
            return 1 / x < 0 ? "-0" : "0";
        }
        BigDecimal d = new BigDecimal(x).round(new MathContext(6, RoundingMode.HALF_EVEN)).stripTrailingZeros();
        int exp = d.precision() - d.scale() - 1;
        if (exp >= -4 && exp < 6) {
            return d.toPlainString();
        }
        String digits = d.unscaledValue().abs().toString();
        String mantissa = digits.length() == 1 ? digits : digits.charAt(0) + "." + digits.substring(1);
        return (x < 0 ? "-" : "") + mantissa + String.format("e%s%02d", exp < 0 ? "-" : "+", Math.abs(exp));
    }
}
