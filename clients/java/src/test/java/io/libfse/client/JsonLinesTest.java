package io.libfse.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import fse.v1.Fse;
import java.nio.charset.StandardCharsets;
import java.util.List;
import java.util.Optional;
import java.util.OptionalDouble;
import java.util.OptionalLong;
import org.junit.jupiter.api.Test;

class JsonLinesTest {
    private static final String SHA = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    private static TokenEvent token(Health health, List<GuardTrip> warnings) {
        return new TokenEvent(0, 15687, " Berlin".getBytes(StandardCharsets.UTF_8), " Berlin", 0.17,
                1.19, 1.3, 19.7, 0.84, 2574.2, 1.2345678901234567, health, warnings);
    }

    @Test
    void tokenJsonHasTheContractsKeysInOrder() {
        assertEquals("{\"type\": \"token\", \"index\": 0, \"id\": 15687, \"text\": \" Berlin\", \"nll\": 0.17, "
                + "\"ppl\": 1.19, \"variance\": 19.7, \"max_prob\": 0.84, \"l2_norm\": 2574.2, "
                + "\"entropy\": 1.2345678901234567, \"health\": \"green\"}",
                JsonLines.token(token(Health.GREEN, List.of())));
    }

    @Test
    void tokenJsonWarningsOnlyWhenThereAreAny() {
        var trip = new GuardTrip("perplexity", OptionalDouble.of(80.5), OptionalDouble.empty());
        assertEquals("{\"type\": \"token\", \"index\": 0, \"id\": 15687, \"text\": \" Berlin\", \"nll\": 0.17, "
                + "\"ppl\": 1.19, \"variance\": 19.7, \"max_prob\": 0.84, \"l2_norm\": 2574.2, "
                + "\"entropy\": 1.2345678901234567, \"health\": null, "
                + "\"warnings\": [{\"guard\": \"perplexity\", \"value\": 80.5, \"threshold\": null}]}",
                JsonLines.token(token(Health.UNSPECIFIED, List.of(trip))));
    }

    @Test
    void nonFiniteEntropyIsNull() {
        var t = new TokenEvent(0, 1, new byte[0], "", 0.17, 1.19, 1.3, 19.7, 0.84, 2574.2, Double.NaN,
                Health.GREEN, List.of());
        assertTrue(JsonLines.token(t).contains("\"l2_norm\": 2574.2, \"entropy\": null, \"health\""));
    }

    @Test
    void stringsAreEscaped() {
        assertEquals("\"a\\\"b\\\\c\\u000ad\\u0001é漢😀\"", JsonLines.quote("a\"b\\c\nd\u0001é漢😀"));
    }

    private static Verdict halted() {
        return new Verdict(Verdict.Status.HALTED, Optional.of("l2_norm"), OptionalDouble.of(2574.2),
                OptionalDouble.of(10.0), OptionalLong.of(0), 0, "", "test", SHA, "", Optional.empty());
    }

    @Test
    void verdictJson() {
        assertEquals("{\"type\": \"verdict\", \"status\": \"halted\", \"completion\": null, \"guard\": \"l2_norm\", "
                + "\"value\": 2574.2, "
                + "\"threshold\": 10.0, \"token_index\": 0, \"tokens\": 0, \"text\": \"\", \"policy\": \"test\", "
                + "\"policy_sha256\": \"" + SHA + "\"}", JsonLines.verdict(halted()));
        Verdict error = new Verdict(Verdict.Status.ERROR, Optional.empty(), OptionalDouble.empty(),
                OptionalDouble.empty(), OptionalLong.empty(), 3, "abc", "default", SHA, "boom", Optional.empty());
        assertEquals("{\"type\": \"verdict\", \"status\": \"error\", \"completion\": null, \"guard\": null, "
                + "\"value\": null, "
                + "\"threshold\": null, \"token_index\": null, \"tokens\": 3, \"text\": \"abc\", "
                + "\"policy\": \"default\", \"policy_sha256\": \"" + SHA + "\", \"message\": \"boom\"}",
                JsonLines.verdict(error));
        for (Verdict.Completion c : Verdict.Completion.values()) {
            Verdict done = new Verdict(Verdict.Status.COMPLETED, Optional.empty(), OptionalDouble.empty(),
                    OptionalDouble.empty(), OptionalLong.empty(), 2, "ab", "default", SHA, "", Optional.of(c));
            assertEquals("{\"type\": \"verdict\", \"status\": \"completed\", \"completion\": \"" + c.wireName()
                    + "\", \"guard\": null, \"value\": null, \"threshold\": null, \"token_index\": null, "
                    + "\"tokens\": 2, \"text\": \"ab\", \"policy\": \"default\", \"policy_sha256\": \"" + SHA + "\"}",
                    JsonLines.verdict(done));
            assertEquals("[completed at " + c.wireName() + "] 2 tokens released · policy default (0123456789ab)",
                    done.summary());
        }
        assertEquals(List.of("end_of_generation", "stop_sequence", "max_tokens"),
                List.of(Verdict.Completion.values()).stream().map(Verdict.Completion::wireName).toList());
    }

    @Test
    void verdictLines() {
        assertEquals("[halted by l2_norm: value 2574.2, threshold 10, at token 0] 0 tokens released · "
                + "policy test (0123456789ab)", halted().summary());
        Verdict done = new Verdict(Verdict.Status.COMPLETED, Optional.empty(), OptionalDouble.empty(),
                OptionalDouble.empty(), OptionalLong.empty(), 12, "x", "default", SHA, "", Optional.empty());
        assertEquals("[completed] 12 tokens released · policy default (0123456789ab)", done.summary());
        Verdict error = new Verdict(Verdict.Status.ERROR, Optional.empty(), OptionalDouble.empty(),
                OptionalDouble.empty(), OptionalLong.empty(), 3, "x", "default", SHA, "MESSAGE", Optional.empty());
        assertEquals("[error: MESSAGE] 3 tokens released · policy default (0123456789ab)",
                error.summary());
    }

    @Test
    void infoJsonLeavesOutThePath() {
        Fse.Info info = Fse.Info.newBuilder().setVersion("0.1.0")
                .setModel(Fse.ModelInfo.newBuilder().setName("m").setPath("/secret/m.gguf").setSha256("ab")
                        .setDescription("d").setVocabSize(262144).setContextSize(2048)
                        .setTrainContextSize(32768).setSizeBytes(-1L).setChatTemplate(false)
                        .setBackend("CUDA").setLayers(18).setGpuLayers(18)
                        .addDevices(Fse.Device.newBuilder().setName("CUDA0").setDescription("H100").setKind("gpu")
                                .setMemoryBytes(1L << 36).setLayers(18))
                        .addDevices(Fse.Device.newBuilder().setName("CPU").setDescription("Xeon").setKind("cpu")
                                .setMemoryBytes(-1L)))
                .addPolicies(Fse.PolicyInfo.newBuilder().setName("default").setSha256("cd").setBuiltin(true))
                .setLimits(Fse.Limits.newBuilder().setMaxStreams(8).setMaxQueue(16).setMaxTokens(2047)
                        .setMaxPromptTokens(2047).setMaxMessageBytes(-1))
                .build();
        assertEquals("{\"version\": \"0.1.0\", \"model\": {\"name\": \"m\", \"sha256\": \"ab\", "
                + "\"description\": \"d\", \"vocab_size\": 262144, \"context_size\": 2048, "
                + "\"train_context_size\": 32768, \"size_bytes\": 18446744073709551615, "
                + "\"chat_template\": false, \"backend\": \"CUDA\", \"layers\": 18, \"gpu_layers\": 18, "
                + "\"devices\": [{\"name\": \"CUDA0\", \"description\": \"H100\", \"kind\": \"gpu\", "
                + "\"memory_bytes\": 68719476736, \"layers\": 18}, {\"name\": \"CPU\", \"description\": \"Xeon\", "
                + "\"kind\": \"cpu\", \"memory_bytes\": 18446744073709551615, \"layers\": 0}]}, "
                + "\"policies\": [{\"name\": \"default\", \"sha256\": \"cd\", \"builtin\": true}], "
                + "\"limits\": {\"max_streams\": 8, \"max_queue\": 16, "
                + "\"max_tokens\": 2047, \"max_prompt_tokens\": 2047, \"max_message_bytes\": 4294967295}}",
                JsonLines.info(info));
    }

    @Test
    void g6IsCsPrintf() {
        String[][] cases = {{"0.331084", "0.331084"}, {"2574.2", "2574.2"}, {"10", "10"}, {"1e6", "1e+06"},
            {"123456789", "1.23457e+08"}, {"1e-5", "1e-05"}, {"0.0001", "0.0001"}, {"999999.5", "1e+06"},
            {"-1.5", "-1.5"}, {"Infinity", "inf"}, {"NaN", "nan"}};
        for (String[] c : cases) {
            assertEquals(c[1], Verdict.g6(OptionalDouble.of(Double.parseDouble(c[0]))), c[0]);
        }
        assertEquals("n/a", Verdict.g6(OptionalDouble.empty()));
    }
}
