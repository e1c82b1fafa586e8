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
    private static Args parse(String... argv) throws Args.UsageError {
        return Args.parse(argv);
    }

    private static String error(String... argv) {
        return assertThrows(Args.UsageError.class, () -> Args.parse(argv)).getMessage();
    }

    @Test
    void defaultsAreTheContracts() throws Args.UsageError {
        Args a = parse("--addr", "unix:/tmp/fse.sock", "Hello there");
        assertEquals("unix:/tmp/fse.sock", a.addr());
        assertFalse(a.json());
        assertEquals(0, a.cancelAfter());
        Request r = a.request();
        assertEquals("Hello there", r.prompt());
        assertEquals(256, r.maxTokens());
        assertEquals("", r.policy());
        assertEquals(0.8, r.sampling().temperature());
        assertEquals(40, r.sampling().topK());
        assertEquals(0.95, r.sampling().topP());
        assertEquals(0.05, r.sampling().minP());
        assertNull(r.sampling().seed());
        assertNull(r.timeout());
    }

    @Test
    void everyFlag() throws Args.UsageError {
        Args a = parse("--json", "--addr=127.0.0.1:47000", "--policy", "test", "--max-tokens", "8",
                "--temperature", "0", "--top-k", "1", "--top-p=1", "--min-p", "0", "--seed", "4294967295",
                "--stop", "\n", "--stop=Paris", "--timeout", "1.5", "--cancel-after", "3",
                "Bonjour à tous", "--info");
        assertTrue(a.json());
        assertTrue(a.info());
        assertEquals("127.0.0.1:47000", a.addr());
        assertEquals(3, a.cancelAfter());
        Request r = a.request();
        assertEquals("Bonjour à tous", r.prompt());
        assertEquals("test", r.policy());
        assertEquals(8, r.maxTokens());
        assertEquals(0.0, r.sampling().temperature());
        assertEquals(1, r.sampling().topK());
        assertEquals(4294967295L, r.sampling().seed());
        assertEquals(List.of("\n", "Paris"), r.stop());
        assertEquals(1500, r.timeoutMillis());
    }

    @Test
    void promptAfterDoubleDashMayLookLikeAFlag() throws Args.UsageError {
        assertEquals("--json", parse("--addr", "h:1", "--", "--json").request().prompt());
        assertEquals("-3", parse("--addr", "h:1", "-3").request().prompt());
    }

    @Test
    void timeoutRoundsHalfToEvenWithAFloorOfOneMillisecond() throws Args.UsageError {
        assertEquals(2, parse("--addr", "h:1", "--timeout", "0.0025", "p").request().timeoutMillis());
        assertEquals(1, parse("--addr", "h:1", "--timeout", "0.0001", "p").request().timeoutMillis());
        assertEquals(1000, parse("--addr", "h:1", "--timeout", "1", "p").request().timeoutMillis());
    }

    @Test
    void badUsageNamesTheFlag() {
        for (String[] c : List.of(
                new String[] {"'--max-tokens'", "--max-tokens", "0"},
                new String[] {"'--max-tokens'", "--max-tokens", "4294967296"},
                new String[] {"'--temperature'", "--temperature", "abc"},
                new String[] {"'--seed'", "--seed", "-1"},
                new String[] {"'--timeout'", "--timeout", "0"},
                new String[] {"'--timeout'", "--timeout", "-1.5"},
                new String[] {"'--cancel-after'", "--cancel-after", "0"},
                new String[] {"'--top-k'", "--top-k", "1.5"},
                new String[] {"'--bogus'", "--bogus"},
                new String[] {"'--json'", "--json=1"})) {
            String message = error(List.of("--addr", "h:1", c[1], c.length > 2 ? c[2] : "--", "p")
                    .toArray(String[]::new));
            assertTrue(message.contains(c[0]), message);
        }
        assertTrue(error("p").contains("'--addr'"));
        assertTrue(error("--addr", "h:1", "p", "--top-k").contains("'--top-k'"));
        assertEquals("PROMPT: must not be empty", error("--addr", "h:1", ""));
        assertEquals("PROMPT: must not be empty", error("--addr", "h:1"));
        assertTrue(error("--addr", "h:1", "a", "b").startsWith("PROMPT: one expected"));
        assertEquals("option '--tls-key' is required with '--tls-cert'",
                error("--addr", "h:1", "--tls-ca", "ca", "--tls-cert", "c", "p"));
        assertEquals("option '--tls-cert' is required with '--tls-key'",
                error("--addr", "h:1", "--tls-ca", "ca", "--tls-key", "k", "p"));
        assertTrue(error("--addr", "h:1", "--tls-cert", "c", "--tls-key", "k", "p")
                .startsWith("option '--tls-ca' is required with '--tls-cert' and '--tls-key'"));
    }

    @Test
    void aClientCertificateAndItsKey() throws Args.UsageError {
        Args a = parse("--addr", "h:1", "--tls-ca", "ca.pem", "--tls-cert=c.pem", "--tls-key", "k.pem", "p");
        assertEquals(List.of(Path.of("ca.pem"), Path.of("c.pem"), Path.of("k.pem")),
                List.of(a.tlsCa(), a.tlsCert(), a.tlsKey()));
        Args none = parse("--addr", "h:1", "p");
        assertEquals(null, none.tlsCert());
        assertEquals(null, none.tlsKey());
    }

    @Test
    void daemonJudgedValuesPassThrough() throws Args.UsageError {
        Request r = parse("--addr", "h:1", "--top-p", "5", "--temperature", "NaN", "--top-k", "-1", "p").request();
        assertEquals(5.0, r.sampling().topP());
        assertTrue(Double.isNaN(r.sampling().temperature()));
        assertEquals(-1, r.sampling().topK());
    }

    @Test
    void infoNeedsNoPrompt() throws Args.UsageError {
        assertTrue(parse("--addr", "unix:/x", "--info").info());
        assertTrue(parse("--help").help());
    }

    @Test
    void tokenIsTheFirstLineTrimmed(@TempDir Path dir) throws IOException, Args.UsageError {
        Path file = dir.resolve("token");
        Files.writeString(file, "  s3cret-token \nsecond line\n");
        assertEquals("s3cret-token", parse("--addr", "h:1", "--token-file", file.toString(), "p").token());
        Files.writeString(file, "\n");
        Args empty = parse("--addr", "h:1", "--token-file", file.toString(), "p");
        assertTrue(assertThrows(Args.UsageError.class, empty::token).getMessage().contains("'--token-file'"));
        Args none = parse("--addr", "h:1", "--token-file", dir.resolve("none").toString(), "p");
        assertTrue(assertThrows(Args.UsageError.class, none::token).getMessage().contains("'--token-file'"));
        assertNull(parse("--addr", "h:1", "p").token());
    }
}
