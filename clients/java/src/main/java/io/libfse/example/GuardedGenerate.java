package io.libfse.example;

import io.grpc.Status;
import io.libfse.client.Event;
import io.libfse.client.GenerationStream;
import io.libfse.client.GuardClient;
import io.libfse.client.GuardException;
import io.libfse.client.Health;
import io.libfse.client.JsonLines;
import io.libfse.client.TlsFileException;
import io.libfse.client.TokenEvent;
import io.libfse.client.Verdict;
import java.io.FileDescriptor;
import java.io.FileOutputStream;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.util.logging.Level;
import java.util.logging.Logger;

/**
 * {@code guarded-generate}: streams one guarded generation (or GetInfo) from the daemon and prints
 * it as the clients' contract says (clients/README.md): text or JSON lines, exit 0 completed,
 * 3 halted, 4 cancelled, 1 error, 2 bad usage or INVALID_ARGUMENT.
 */
public final class GuardedGenerate {
    static final int EXIT_OK = 0;
    static final int EXIT_ERROR = 1;
    static final int EXIT_USAGE = 2;
    static final int EXIT_HALTED = 3;
    static final int EXIT_CANCELLED = 4;

    private static final String PREFIX = "guarded-generate: error: ";
    private static final String RESET = "\u001b[0m";

    private GuardedGenerate() {
    }

    /** Runs the command and exits with its code. */
    public static void main(String[] argv) {
        // gRPC and Netty log through java.util.logging; an error must be exactly one stderr line.
        Logger.getLogger("").setLevel(Level.OFF);
        // UTF-8 whatever the locale: model text is UTF-8 and must not turn into '?'.
        PrintStream out = new PrintStream(new FileOutputStream(FileDescriptor.out), false,
                StandardCharsets.UTF_8);
        PrintStream err = new PrintStream(new FileOutputStream(FileDescriptor.err), true,
                StandardCharsets.UTF_8);
        int code = run(argv, out, err, System.console() != null && System.getenv("NO_COLOR") == null);
        out.flush();
        err.flush();
        System.exit(code);
    }

    /** The whole program, minus the process: returns the exit code. */
    static int run(String[] argv, PrintStream out, PrintStream err, boolean colour) {
        Args args;
        String token;
        try {
            args = Args.parse(argv);
            if (args.help()) {
                out.print(Args.USAGE);
                return EXIT_OK;
            }
            token = args.token();
        } catch (Args.UsageError e) {
            err.println("guarded-generate: " + e.getMessage());
            return EXIT_USAGE;
        }
        GuardClient client;
        try {
            client = GuardClient.connect(args.addr(), args.tlsCa(), args.tlsCert(), args.tlsKey(), token);
        } catch (TlsFileException e) { // a TLS file unreadable, or not a PEM certificate (or key)
            String flag = switch (e.parameter()) {
                case "tlsCert" -> "tls-cert";
                case "tlsKey" -> "tls-key";
                default -> "tls-ca";
            };
            err.println("guarded-generate: option '--" + flag + "': " + e.getMessage());
            return EXIT_USAGE;
        } catch (IllegalArgumentException e) { // a target gRPC cannot use
            err.println("guarded-generate: option '--addr': " + e.getMessage());
            return EXIT_USAGE;
        }
        try (client) {
            if (args.info()) {
                out.println(JsonLines.info(client.info()));
                out.flush();
                return EXIT_OK;
            }
            return generate(client, args, out, err, colour);
        } catch (GuardException e) {
            out.flush();
            // One line, whatever the server's message holds.
            err.println(PREFIX + e.getMessage().replaceAll("\\s*\\R\\s*", " "));
            return exitCode(e);
        }
    }

    private static int generate(GuardClient client, Args args, PrintStream out, PrintStream err,
            boolean colour) {
        long tokens = 0;
        try (GenerationStream stream = client.stream(args.request())) {
            for (Event event : stream) {
                if (event instanceof TokenEvent token) {
                    if (args.json()) {
                        out.println(JsonLines.token(token));
                    } else {
                        out.print(colour ? colour(token.health()) + token.text() + RESET : token.text());
                    }
                    out.flush();
                    if (++tokens == args.cancelAfter()) {
                        stream.cancel();
                    }
                } else if (event instanceof Verdict verdict) {
                    out.println(args.json() ? JsonLines.verdict(verdict) : ""); // text mode: end the line
                    out.flush();
                    if (!args.json()) {
                        err.println(verdict.summary());
                    }
                    return exitCode(verdict.status());
                }
            }
        }
        // The stream ends with a verdict or throws; this is only for the compiler.
        throw new GuardException(Status.Code.UNKNOWN, "the stream ended without a verdict");
    }

    static int exitCode(Verdict.Status status) {
        return switch (status) {
            case COMPLETED -> EXIT_OK;
            case HALTED -> EXIT_HALTED;
            case CANCELLED -> EXIT_CANCELLED;
            default -> EXIT_ERROR;
        };
    }

    static int exitCode(GuardException error) {
        return error.code() == Status.Code.INVALID_ARGUMENT ? EXIT_USAGE : EXIT_ERROR;
    }

    private static String colour(Health health) {
        return switch (health) {
            case GREEN -> "\u001b[32m";
            case YELLOW -> "\u001b[33m";
            case RED -> "\u001b[31m";
            default -> RESET;
        };
    }
}
