package io.libfse.example;

import io.libfse.client.Request;
import io.libfse.client.Sampling;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;

/**
 * The command line of {@code guarded-generate}: {@code --flag VALUE} or {@code --flag=VALUE}, the
 * prompt last ({@code --} ends the flags). Only what building a request needs is checked; the
 * daemon judges the ranges it knows better.
 */
record Args(String addr, Path tlsCa, Path tlsCert, Path tlsKey, Path tokenFile, boolean json, boolean info,
        boolean help, long cancelAfter, Request request) {

    static final String USAGE = """
            usage: guarded-generate --addr unix:PATH|HOST:PORT [--tls-ca FILE [--tls-cert FILE --tls-key FILE]]
                     [--token-file FILE] [--json] [--policy NAME] [--max-tokens N] [--temperature T]
                     [--top-k K] [--top-p P] [--min-p M] [--seed S] [--stop TEXT]... [--timeout SECONDS]
                     [--cancel-after N] PROMPT
                   guarded-generate --addr unix:PATH|HOST:PORT [--tls-ca FILE [--tls-cert FILE --tls-key FILE]]
                     [--token-file FILE] --info
            Exit 0 completed, 3 halted, 4 cancelled, 1 error, 2 bad usage or INVALID_ARGUMENT.
            """;
    private static final List<String> VALUE_FLAGS = List.of("addr", "tls-ca", "tls-cert", "tls-key", "token-file",
            "policy", "max-tokens", "temperature", "top-k", "top-p", "min-p", "seed", "stop", "timeout",
            "cancel-after");

    /** Bad usage, naming the flag: printed as {@code guarded-generate: MESSAGE}, exit 2. */
    static final class UsageError extends Exception {
        private static final long serialVersionUID = 1L;

        UsageError(String message) {
            super(message);
        }

        static UsageError value(String flag, String value, String accepted) {
            return new UsageError("option '--" + flag + "': invalid value '" + value + "' (" + accepted + ")");
        }
    }

    static Args parse(String[] argv) throws UsageError {
        String addr = null;
        String tlsCa = null;
        String tlsCert = null;
        String tlsKey = null;
        String tokenFile = null;
        boolean json = false;
        boolean info = false;
        long cancelAfter = 0;
        String policy = "";
        long maxTokens = Request.DEFAULT_MAX_TOKENS;
        List<String> stop = new ArrayList<>();
        Duration timeout = null;
        double[] sampling = {0.8, 40, 0.95, 0.05}; // temperature, top_k, top_p, min_p: always sent
        Long seed = null;
        List<String> prompts = new ArrayList<>();
        for (int i = 0; i < argv.length; i++) {
            String arg = argv[i].equals("-h") ? "--help" : argv[i];
            if (arg.equals("--")) {
                prompts.addAll(List.of(argv).subList(i + 1, argv.length));
                break;
            } else if (!arg.startsWith("--")) {
                prompts.add(arg);
                continue;
            }
            String flag = arg.substring(2);
            String value = null;
            if (flag.contains("=")) {
                value = flag.substring(flag.indexOf('=') + 1);
                flag = flag.substring(0, flag.indexOf('='));
            }
            if (!VALUE_FLAGS.contains(flag) && value == null) {
                switch (flag) {
                    case "json" -> json = true;
                    case "info" -> info = true;
                    case "help" -> {
                        return new Args(null, null, null, null, null, false, false, true, 0, null);
                    }
                    default -> throw new UsageError("unrecognized option '" + arg + "'");
                }
                continue;
            } else if (!VALUE_FLAGS.contains(flag)) {
                throw new UsageError("option '--" + flag + "' doesn't allow an argument");
            } else if (value == null && i + 1 == argv.length) {
                throw new UsageError("option '" + arg + "' requires an argument");
            } else if (value == null) {
                value = argv[++i];
            }
            switch (flag) {
                case "addr" -> addr = value;
                case "tls-ca" -> tlsCa = value;
                case "tls-cert" -> tlsCert = value;
                case "tls-key" -> tlsKey = value;
                case "token-file" -> tokenFile = value;
                case "policy" -> policy = value;
                case "max-tokens" -> maxTokens = integer(flag, value, 1, 0xFFFF_FFFFL);
                case "temperature" -> sampling[0] = number(flag, value);
                case "top-k" -> sampling[1] = integer(flag, value, Integer.MIN_VALUE, Integer.MAX_VALUE);
                case "top-p" -> sampling[2] = number(flag, value);
                case "min-p" -> sampling[3] = number(flag, value);
                case "seed" -> seed = integer(flag, value, 0, 0xFFFF_FFFFL);
                case "stop" -> stop.add(value);
                case "cancel-after" -> cancelAfter = integer(flag, value, 1, Long.MAX_VALUE);
                default -> { // timeout: timeout_ms = max(1, round(SECONDS * 1000)), half to even as Python
                    double seconds = number(flag, value);
                    if (!(seconds > 0 && seconds <= 4294967.295)) {
                        throw UsageError.value(flag, value, "seconds > 0");
                    }
                    timeout = Duration.ofMillis((long) Math.max(1, Math.rint(seconds * 1000)));
                }
            }
        }
        if (addr == null || addr.isEmpty()) {
            throw new UsageError("option '--addr' is required");
        } else if (prompts.size() > 1) {
            throw new UsageError("PROMPT: one expected, got " + prompts.size() + " (quote it)");
        } else if (!info && (prompts.isEmpty() || prompts.get(0).isEmpty())) {
            throw new UsageError("PROMPT: must not be empty");
        } else if (tlsCert != null && tlsKey == null) {
            throw new UsageError("option '--tls-key' is required with '--tls-cert'");
        } else if (tlsKey != null && tlsCert == null) {
            throw new UsageError("option '--tls-cert' is required with '--tls-key'");
        } else if (tlsCert != null && tlsCa == null) {
            throw new UsageError(
                    "option '--tls-ca' is required with '--tls-cert' and '--tls-key' (mutual TLS is TLS)");
        }
        Request request = new Request(prompts.isEmpty() ? "" : prompts.get(0), List.of(), maxTokens,
                new Sampling(sampling[0], (int) sampling[1], sampling[2], sampling[3], seed), policy, stop, "",
                timeout);
        return new Args(addr, path(tlsCa), path(tlsCert), path(tlsKey), path(tokenFile), json, info, false,
                cancelAfter, request);
    }

    private static Path path(String file) {
        return file == null ? null : Path.of(file);
    }

    /** The bearer token: the --token-file's first line, whitespace trimmed; null without one. */
    String token() throws UsageError {
        try {
            String token = tokenFile == null ? null
                    : Files.readString(tokenFile, StandardCharsets.UTF_8).lines().findFirst().orElse("").strip();
            if (token != null && token.isEmpty()) {
                throw new UsageError("option '--token-file': " + tokenFile + " has no token on its first line");
            }
            return token;
        } catch (IOException e) {
            throw new UsageError("option '--token-file': " + e);
        }
    }

    private static long integer(String flag, String value, long min, long max) throws UsageError {
        try {
            long n = Long.parseLong(value.strip());
            if (n >= min && n <= max) {
                return n;
            }
        } catch (NumberFormatException e) {
            // named below
        }
        throw UsageError.value(flag, value, "an integer in " + min + ".." + max);
    }

    private static double number(String flag, String value) throws UsageError {
        try {
            return Double.parseDouble(value.strip());
        } catch (NumberFormatException e) {
            throw UsageError.value(flag, value, "a number");
        }
    }
}
