package io.libfse.example;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import io.libfse.client.Request;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

class ArgsTest {
    private static Args parse(String... argv) throws UsageError {
        return Args.parse(argv);
    }

    private static String error(String... argv) {
        return assertThrows(UsageError.class, () -> Args.parse(argv)).getMessage();
    }

    @Test
    void defaultsAreTheContracts() throws UsageError {
        Args a = parse("--addr", "unix:/tmp/fse.sock", "Hello there");
        assertEquals("unix:/tmp/fse.sock", a.addr());
        assertEquals("Hello there", a.prompt());
        assertFalse(a.json());
        assertEquals(256, a.maxTokens());
        assertEquals(0.8, a.temperature());
        assertEquals(40, a.topK());
        assertEquals(0.95, a.topP());
        assertEquals(0.05, a.minP());
        assertNull(a.seed());
        assertEquals(0, a.timeoutMillis());
        assertEquals(0, a.cancelAfter());
        Request r = a.request();
        assertEquals("", r.policy());
        assertEquals(0.8, r.sampling().temperature());
        assertEquals(40, r.sampling().topK());
        assertNull(r.sampling().seed());
        assertNull(r.timeout());
    }

    @Test
    void everyFlag() throws UsageError {
        Args a = parse("--json", "--addr=127.0.0.1:47000", "--policy", "test", "--max-tokens", "8",
                "--temperature", "0", "--top-k", "1", "--top-p=1", "--min-p", "0", "--seed", "4294967295",
                "--stop", "\n", "--stop=Paris", "--timeout", "1.5", "--cancel-after", "3",
                "Bonjour à tous", "--info");
        assertTrue(a.json());
        assertTrue(a.info());
        assertEquals("127.0.0.1:47000", a.addr());
        assertEquals(8, a.maxTokens());
        assertEquals(4294967295L, a.seed());
        assertEquals(List.of("\n", "Paris"), a.stop());
        assertEquals(1500, a.timeoutMillis());
        assertEquals(3, a.cancelAfter());
        assertEquals(1500, a.request().timeoutMillis());
        assertEquals(List.of("\n", "Paris"), a.request().stop());
    }

    @Test
    void promptAfterDoubleDashMayLookLikeAFlag() throws UsageError {
        assertEquals("--json", parse("--addr", "h:1", "--", "--json").prompt());
        assertEquals("-3", parse("--addr", "h:1", "-3").prompt());
    }

    @Test
    void timeoutRoundsHalfToEvenWithAFloorOfOneMillisecond() throws UsageError {
        assertEquals(2, parse("--addr", "h:1", "--timeout", "0.0025", "p").timeoutMillis());
        assertEquals(1, parse("--addr", "h:1", "--timeout", "0.0001", "p").timeoutMillis());
        assertEquals(1000, parse("--addr", "h:1", "--timeout", "1", "p").timeoutMillis());
    }

    @Test
    void badFlagsAreOneLineNamingTheFlagAndTheRange() {
        assertEquals("--max-tokens: 0 is invalid; accepted: >= 1",
                error("--addr", "h:1", "--max-tokens", "0", "p"));
        assertEquals("--temperature: abc is invalid; accepted: a number",
                error("--addr", "h:1", "--temperature", "abc", "p"));
        assertEquals("--seed: -1 is invalid; accepted: 0 .. 2^32-1",
                error("--addr", "h:1", "--seed", "-1", "p"));
        assertEquals("--timeout: 0.0 is invalid; accepted: seconds > 0",
                error("--addr", "h:1", "--timeout", "0", "p"));
        assertEquals("--cancel-after: 0 is invalid; accepted: >= 1",
                error("--addr", "h:1", "--cancel-after", "000", "p"));
        assertEquals("--timeout: -1.5 is invalid; accepted: seconds > 0",
                error("--addr", "h:1", "--timeout", "-1.5", "p"));
        assertEquals("--cancel-after: 0 is invalid; accepted: >= 1",
                error("--addr", "h:1", "--cancel-after", "0", "p"));
        assertEquals("--addr: is required; accepted: unix:/abs/path or HOST:PORT", error("p"));
        assertEquals("--addr: nohost is invalid; accepted: unix:/abs/path or HOST:PORT",
                error("--addr", "nohost", "p"));
        assertEquals("--top-k: a value is required; accepted: an integer, -2^31 .. 2^31-1",
                error("--addr", "h:1", "p", "--top-k"));
        assertTrue(error("--addr", "h:1", "--bogus", "p").startsWith("--bogus: unknown flag; accepted: --addr"));
        assertEquals("PROMPT: must not be empty", error("--addr", "h:1", ""));
        assertEquals("--max-tokens: 4294967296 is invalid; accepted: 1 .. 2^32-1",
                error("--addr", "h:1", "--max-tokens", "4294967296", "p"));
        assertEquals("PROMPT: must not be empty", error("--addr", "h:1"));
        assertTrue(error("--addr", "h:1", "a", "b").startsWith("PROMPT: 2 arguments given"));
        assertEquals("--json: takes no value; accepted: the flag alone", error("--addr", "h:1", "--json=1", "p"));
    }

    @Test
    void daemonJudgedValuesPassThrough() throws UsageError {
        Args a = parse("--addr", "h:1", "--top-p", "5", "--temperature", "nan", "--top-k", "-1", "p");
        assertEquals(5.0, a.topP());
        assertTrue(Double.isNaN(a.temperature()));
        assertEquals(-1, a.topK());
    }

    @Test
    void infoNeedsNoPrompt() throws UsageError {
        assertTrue(parse("--addr", "unix:/x", "--info").info());
        assertTrue(parse("--help").help());
    }

    @Test
    void tokenIsTheFirstLineTrimmed(@TempDir Path dir) throws IOException, UsageError {
        Path file = dir.resolve("token");
        Files.writeString(file, "  s3cret-token \nsecond line\n");
        assertEquals("s3cret-token", parse("--addr", "h:1", "--token-file", file.toString(), "p").token());
        Files.writeString(file, "\n");
        assertTrue(assertThrows(UsageError.class,
                () -> parse("--addr", "h:1", "--token-file", file.toString(), "p").token())
                .getMessage().startsWith("--token-file: "));
        assertEquals("--token-file: " + dir.resolve("none") + ": cannot read: No such file or directory",
                error("--addr", "h:1", "--token-file", dir.resolve("none").toString(), "p"));
        assertNull(parse("--addr", "h:1", "p").token());
    }
}
