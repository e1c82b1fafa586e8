package io.libfse.example;

import io.libfse.client.Request;
import io.libfse.client.Sampling;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.AccessDeniedException;
import java.nio.file.Files;
import java.nio.file.NoSuchFileException;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.regex.Pattern;

/**
 * The command line of {@code guarded-generate}, parsed and checked only as far as building a
 * request needs; sampling ranges, the policy and max_tokens' upper bound are the daemon's to judge.
 *
 * @param addr {@code unix:/abs/path} or {@code HOST:PORT}
 * @param tlsCa the CA file, or null for plain text
 * @param tokenFile the bearer token file, or null
 * @param json JSON lines instead of text
 * @param info print GetInfo instead of generating
 * @param help print the usage
 * @param policy the policy name; empty for the daemon's default
 * @param maxTokens tokens to generate at most
 * @param temperature sampling temperature
 * @param topK top_k
 * @param topP top_p
 * @param minP min_p
 * @param seed the seed, or null for the daemon's random one
 * @param stop stop sequences
 * @param timeoutMillis the generation budget in ms, or 0 for none
 * @param cancelAfter send Cancel after this many token events, or 0 for never
 * @param prompt the prompt text
 */
record Args(String addr, Path tlsCa, Path tokenFile, boolean json, boolean info, boolean help,
        String policy, long maxTokens, double temperature, int topK, double topP, double minP,
        Long seed, List<String> stop, long timeoutMillis, long cancelAfter, String prompt) {

    static final String USAGE = """
            usage: guarded-generate --addr unix:PATH|HOST:PORT [--tls-ca FILE] [--token-file FILE]
                                    [--json] [--policy NAME] [--max-tokens N] [--temperature T]
                                    [--top-k K] [--top-p P] [--min-p M] [--seed S] [--stop TEXT]...
                                    [--timeout SECONDS] [--cancel-after N] PROMPT
                   guarded-generate --addr unix:PATH|HOST:PORT [--tls-ca FILE] [--token-file FILE] --info

            Streams a guarded generation from the libfse daemon. Exit 0 completed, 3 halted,
            4 cancelled, 1 error, 2 bad usage or INVALID_ARGUMENT.
            """;

    private static final long UINT32_MAX = 0xFFFF_FFFFL;
    private static final Pattern INTEGER = Pattern.compile("[+-]?[0-9]+");
    private static final Pattern NUMBER = Pattern.compile(
            "[+-]?(?:(?:[0-9]+\\.?[0-9]*|\\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)",
            Pattern.CASE_INSENSITIVE);
    private static final Pattern HOST_PORT = Pattern.compile("(?:\\[[^\\]]+\\]|[^:\\[\\]/]+):[0-9]{1,5}");
    private static final List<String> VALUE_FLAGS = List.of("--addr", "--tls-ca", "--token-file",
            "--policy", "--max-tokens", "--temperature", "--top-k", "--top-p", "--min-p", "--seed",
            "--stop", "--timeout", "--cancel-after");
    private static final List<String> BOOLEAN_FLAGS = List.of("--json", "--info", "--help");

    /** Parses argv; flags may come before or after the prompt, {@code --} ends the flags. */
    static Args parse(String[] argv) throws UsageError {
        String addr = null;
        Path tlsCa = null;
        Path tokenFile = null;
        boolean json = false;
        boolean info = false;
        String policy = "";
        long maxTokens = Request.DEFAULT_MAX_TOKENS;
        double temperature = 0.8;
        int topK = 40;
        double topP = 0.95;
        double minP = 0.05;
        Long seed = null;
        List<String> stop = new ArrayList<>();
        long timeoutMillis = 0;
        long cancelAfter = 0;
        List<String> prompts = new ArrayList<>();

        boolean flags = true;
        for (int i = 0; i < argv.length; i++) {
            String arg = argv[i];
            if (!flags || !arg.startsWith("-") || arg.equals("-") || NUMBER.matcher(arg).matches()) {
                prompts.add(arg);
                continue;
            }
            if (arg.equals("--")) {
                flags = false;
                continue;
            }
            if (arg.equals("-h")) {
                arg = "--help";
            }
            String flag = arg;
            String value = null;
            int eq = arg.indexOf('=');
            if (eq > 0) {
                flag = arg.substring(0, eq);
                value = arg.substring(eq + 1);
            }
            if (BOOLEAN_FLAGS.contains(flag)) {
                if (value != null) {
                    throw UsageError.flag(flag, "takes no value", "the flag alone");
                }
                switch (flag) {
                    case "--json" -> json = true;
                    case "--info" -> info = true;
                    default -> {
                        return helpOnly();
                    }
                }
                continue;
            }
            if (!VALUE_FLAGS.contains(flag)) {
                throw UsageError.flag(flag, "unknown flag",
                        String.join(", ", VALUE_FLAGS) + ", " + String.join(", ", BOOLEAN_FLAGS));
            }
            if (value == null) {
                if (i + 1 >= argv.length) {
                    throw UsageError.flag(flag, "a value is required", accepted(flag));
                }
                value = argv[++i];
            }
            switch (flag) {
                case "--addr" -> addr = address(value);
                case "--tls-ca" -> tlsCa = readable(flag, value);
                case "--token-file" -> tokenFile = readable(flag, value);
                case "--policy" -> policy = value;
                case "--max-tokens" -> maxTokens = maxTokens(value);
                case "--temperature" -> temperature = number(flag, value);
                case "--top-k" -> topK = (int) integer(flag, value, Integer.MIN_VALUE, Integer.MAX_VALUE);
                case "--top-p" -> topP = number(flag, value);
                case "--min-p" -> minP = number(flag, value);
                case "--seed" -> seed = integer(flag, value, 0, UINT32_MAX);
                case "--stop" -> stop.add(value);
                case "--timeout" -> timeoutMillis = timeout(value);
                case "--cancel-after" -> cancelAfter = integer(flag, value, 1, Long.MAX_VALUE);
                default -> throw new AssertionError(flag);
            }
        }
        if (addr == null) {
            throw UsageError.flag("--addr", "is required", accepted("--addr"));
        }
        String prompt = "";
        if (!info) {
            if (prompts.isEmpty()) {
                throw new UsageError("PROMPT: must not be empty");
            }
            if (prompts.size() > 1) {
                throw new UsageError("PROMPT: " + prompts.size()
                        + " arguments given; accepted: one argument (quote a prompt with spaces)");
            }
            prompt = prompts.get(0);
            if (prompt.isEmpty()) {
                throw new UsageError("PROMPT: must not be empty");
            }
        }
        return new Args(addr, tlsCa, tokenFile, json, info, false, policy, maxTokens, temperature,
                topK, topP, minP, seed, List.copyOf(stop), timeoutMillis, cancelAfter, prompt);
    }

    private static Args helpOnly() {
        return new Args("", null, null, false, false, true, "", 1, 0, 0, 0, 0, null, List.of(), 0, 0, "");
    }

    /** The request these flags describe: all four sampling values always, the seed when given. */
    Request request() {
        Sampling sampling = new Sampling(temperature, topK, topP, minP, seed);
        Request request = Request.prompt(prompt).withMaxTokens(maxTokens).withSampling(sampling)
                .withPolicy(policy);
        for (String s : stop) {
            request = request.withStop(s);
        }
        return timeoutMillis > 0 ? request.withTimeout(Duration.ofMillis(timeoutMillis)) : request;
    }

    /** The bearer token: the file's first line, whitespace trimmed; null without --token-file. */
    String token() throws UsageError {
        if (tokenFile == null) {
            return null;
        }
        String text = new String(read("--token-file", tokenFile), StandardCharsets.UTF_8);
        String token = text.lines().findFirst().orElse("").strip();
        if (token.isEmpty()) {
            throw UsageError.flag("--token-file", tokenFile + " has no token on its first line",
                    "a file whose first line is the token");
        }
        if (!token.chars().allMatch(c -> c > 0x20 && c < 0x7f)) {
            throw UsageError.flag("--token-file", "the token has characters a header cannot carry",
                    "printable ASCII");
        }
        return token;
    }

    private static String accepted(String flag) {
        return switch (flag) {
            case "--addr" -> "unix:/abs/path or HOST:PORT";
            case "--tls-ca" -> "a readable PEM file";
            case "--token-file" -> "a readable file";
            case "--policy" -> "a policy name";
            case "--max-tokens" -> ">= 1";
            case "--top-k" -> "an integer, -2^31 .. 2^31-1";
            case "--seed" -> "0 .. 2^32-1";
            case "--stop" -> "text";
            case "--timeout" -> "seconds > 0";
            case "--cancel-after" -> ">= 1";
            default -> "a number";
        };
    }

    private static String address(String value) throws UsageError {
        boolean ok = value.startsWith("unix:")
                ? value.length() > "unix:".length()
                : HOST_PORT.matcher(value).matches();
        if (!ok) {
            throw UsageError.flag("--addr", value + " is invalid", accepted("--addr"));
        }
        return value;
    }

    private static long integer(String flag, String value, long min, long max) throws UsageError {
        String v = value.strip();
        if (INTEGER.matcher(v).matches()) {
            // Out of range values are named as Python's int() prints them ("007" -> 7).
            String shown = new java.math.BigInteger(v).toString();
            try {
                long n = Long.parseLong(v);
                if (n >= min && n <= max) {
                    return n;
                }
            } catch (NumberFormatException e) {
                // beyond a long: out of range like any other
            }
            throw UsageError.flag(flag, shown + " is invalid", accepted(flag));
        }
        throw UsageError.flag(flag, value + " is invalid", accepted(flag));
    }

    private static long maxTokens(String value) throws UsageError {
        long n = integer("--max-tokens", value, 1, Long.MAX_VALUE);
        if (n > UINT32_MAX) {
            throw UsageError.flag("--max-tokens", n + " is invalid", "1 .. 2^32-1");
        }
        return n;
    }

    private static double number(String flag, String value) throws UsageError {
        String v = value.strip();
        if (!NUMBER.matcher(v).matches()) {
            throw UsageError.flag(flag, value + " is invalid", accepted(flag));
        }
        String lower = v.toLowerCase(java.util.Locale.ROOT);
        if (lower.endsWith("nan")) {
            return Double.NaN;
        }
        if (lower.endsWith("inf") || lower.endsWith("infinity")) {
            return lower.startsWith("-") ? Double.NEGATIVE_INFINITY : Double.POSITIVE_INFINITY;
        }
        return Double.parseDouble(v);
    }

    /** {@code timeout_ms = max(1, round(SECONDS * 1000))}, rounding half to even like Python. */
    private static long timeout(String value) throws UsageError {
        double seconds = number("--timeout", value);
        double millis = Math.max(1, Math.rint(seconds * 1000));
        if (!(seconds > 0) || millis > UINT32_MAX) {
            throw UsageError.flag("--timeout", pythonFloat(seconds) + " is invalid",
                    seconds > 0 ? "seconds > 0, up to 4294967.295" : "seconds > 0");
        }
        return (long) millis;
    }

    /** The float as Python's repr prints it, as the Python client names a bad --timeout. */
    private static String pythonFloat(double x) {
        if (Double.isNaN(x)) {
            return "nan";
        }
        if (Double.isInfinite(x)) {
            return x > 0 ? "inf" : "-inf";
        }
        return Numbers.json(x);
    }

    private static Path readable(String flag, String value) throws UsageError {
        Path path = Path.of(value);
        read(flag, path);
        return path;
    }

    /** Reads a file; fails as the Python client does: {@code --FLAG: PATH: cannot read: WHY}. */
    private static byte[] read(String flag, Path path) throws UsageError {
        String why;
        try {
            return Files.readAllBytes(path);
        } catch (NoSuchFileException e) {
            why = "No such file or directory";
        } catch (AccessDeniedException e) {
            why = "Permission denied";
        } catch (IOException | SecurityException e) {
            why = Files.isDirectory(path) ? "Is a directory" : e.getMessage();
        }
        throw new UsageError(flag + ": " + path + ": cannot read: " + why);
    }
}
