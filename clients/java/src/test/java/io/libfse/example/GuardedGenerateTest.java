package io.libfse.example;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.ByteArrayOutputStream;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

class GuardedGenerateTest {
    private record Result(int code, String out, String err) {
    }

    private static Result run(String... argv) {
        var out = new ByteArrayOutputStream();
        var err = new ByteArrayOutputStream();
        int code = GuardedGenerate.run(argv, new PrintStream(out, true, StandardCharsets.UTF_8),
                new PrintStream(err, true, StandardCharsets.UTF_8), false);
        return new Result(code, out.toString(StandardCharsets.UTF_8), err.toString(StandardCharsets.UTF_8));
    }

    @Test
    void badUsageIsExitTwoNamingTheFlag() {
        Result r = run("--addr", "unix:/tmp/x.sock", "--max-tokens", "zero", "p");
        assertEquals(2, r.code());
        assertTrue(r.err().startsWith("guarded-generate: option '--max-tokens': "), r.err());
        assertEquals("", r.out());
    }

    @Test
    void anUnreachableDaemonIsExitOneAtOnce(@TempDir java.nio.file.Path dir) {
        String addr = "unix:" + dir.resolve("absent.sock");
        long start = System.nanoTime();
        Result r = run("--addr", addr, "--json", "Hello");
        assertEquals(1, r.code());
        assertTrue(r.err().startsWith(
                "guarded-generate: error: UNAVAILABLE: cannot reach the daemon at " + addr + " ("), r.err());
        assertEquals(1, r.err().lines().count());
        assertEquals("", r.out());
        assertTrue(System.nanoTime() - start < 10_000_000_000L, "fail-fast, not wait-for-ready");
        Result info = run("--addr", addr, "--info");
        assertEquals(1, info.code());
        assertTrue(info.err().startsWith("guarded-generate: error: UNAVAILABLE: cannot reach the daemon at "));
    }

    @Test
    void helpIsExitZero() {
        Result r = run("--help");
        assertEquals(0, r.code());
        assertTrue(r.out().startsWith("usage: guarded-generate"));
    }
}
