package io.libfse.example;

import fse.v1.Fse;
import io.libfse.client.GuardTrip;
import io.libfse.client.Health;
import io.libfse.client.TokenEvent;
import io.libfse.client.Verdict;
import java.util.Locale;

/** The contract's output: JSON lines, the text-mode verdict line, and the Info document. */
final class Render {
    private Render() {
    }

    static String health(Health health) {
        return health == Health.UNSPECIFIED ? null : health.name().toLowerCase(Locale.ROOT);
    }

    static String status(Verdict.Status status) {
        return status.name().toLowerCase(Locale.ROOT);
    }

    static String tokenJson(TokenEvent t) {
        Json doc = new Json().put("type", "token").put("index", t.index()).put("id", t.id())
                .put("text", t.text()).put("nll", t.nll()).put("ppl", t.ppl())
                .put("variance", t.variance()).put("max_prob", t.maxProb())
                .put("l2_norm", t.l2Norm()).put("health", health(t.health()));
        if (!t.warnings().isEmpty()) {
            doc.raw("warnings", Json.array(t.warnings().stream().map(Render::tripJson).toList()));
        }
        return doc.toString();
    }

    private static String tripJson(GuardTrip trip) {
        return new Json().put("guard", trip.guard()).put("value", trip.value())
                .put("threshold", trip.threshold()).toString();
    }

    static String verdictJson(Verdict v) {
        Json doc = new Json().put("type", "verdict").put("status", status(v.status()))
                .put("guard", v.guard().orElse(null)).put("value", v.value())
                .put("threshold", v.threshold()).put("token_index", v.tokenIndex())
                .put("tokens", v.tokens()).put("text", v.text()).put("policy", v.policy())
                .put("policy_sha256", v.policySha256());
        if (!v.message().isEmpty()) {
            doc.put("message", v.message());
        }
        return doc.toString();
    }

    /** The text-mode verdict line, e.g. {@code [completed] 12 tokens released · policy ...}. */
    static String verdictLine(Verdict v) {
        String what = status(v.status());
        if (v.status() == Verdict.Status.HALTED) {
            what = "halted by " + v.guard().orElse("n/a")
                    + ": value " + (v.value().isPresent() ? Numbers.g6(v.value().getAsDouble()) : "n/a")
                    + ", threshold "
                    + (v.threshold().isPresent() ? Numbers.g6(v.threshold().getAsDouble()) : "n/a")
                    + ", at token "
                    + (v.tokenIndex().isPresent() ? Long.toString(v.tokenIndex().getAsLong()) : "n/a");
        }
        String detail = v.message().isEmpty() ? "" : ": " + v.message();
        String hash = v.policySha256().substring(0, Math.min(12, v.policySha256().length()));
        return "[" + what + detail + "] " + v.tokens() + " tokens released · policy " + v.policy()
                + " (" + hash + ")";
    }

    /** GetInfo as one JSON object with the proto field names (model.path left out). */
    static String infoJson(Fse.Info info) {
        Fse.ModelInfo m = info.getModel();
        String model = new Json().put("name", m.getName()).put("sha256", m.getSha256())
                .put("description", m.getDescription())
                .put("vocab_size", Integer.toUnsignedLong(m.getVocabSize()))
                .put("context_size", Integer.toUnsignedLong(m.getContextSize()))
                .put("train_context_size", Integer.toUnsignedLong(m.getTrainContextSize()))
                .raw("size_bytes", Long.toUnsignedString(m.getSizeBytes()))
                .put("chat_template", m.getChatTemplate()).toString();
        String policies = Json.array(info.getPoliciesList().stream()
                .map(p -> new Json().put("name", p.getName()).put("sha256", p.getSha256())
                        .put("builtin", p.getBuiltin()).toString())
                .toList());
        Fse.Limits l = info.getLimits();
        String limits = new Json()
                .put("max_streams", Integer.toUnsignedLong(l.getMaxStreams()))
                .put("max_queue", Integer.toUnsignedLong(l.getMaxQueue()))
                .put("max_tokens", Integer.toUnsignedLong(l.getMaxTokens()))
                .put("max_prompt_tokens", Integer.toUnsignedLong(l.getMaxPromptTokens()))
                .put("max_message_bytes", Integer.toUnsignedLong(l.getMaxMessageBytes())).toString();
        return new Json().put("version", info.getVersion()).raw("model", model)
                .raw("policies", policies).raw("limits", limits).toString();
    }
}
