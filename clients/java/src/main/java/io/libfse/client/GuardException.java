package io.libfse.client;

import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import java.io.FileNotFoundException;
import java.util.List;
import java.util.Locale;

/**
 * Every failure of a call to the daemon: a gRPC error (the daemon refused the request, could not
 * be reached, or failed) or a stream that ended without a verdict. It carries the gRPC status
 * code and the server's message; a policy halt is never an exception but a {@link Verdict}.
 */
public final class GuardException extends RuntimeException {
    private static final long serialVersionUID = 1L;

    private final Status.Code code;
    private final String description;

    /** An error with this code and message (the server's, or the client's own detail). */
    public GuardException(Status.Code code, String description) {
        super(code.name() + ": " + description);
        this.code = code;
        this.description = description;
    }

    /** The gRPC status code, e.g. {@code INVALID_ARGUMENT} or {@code UNAVAILABLE}. */
    public Status.Code code() {
        return code;
    }

    /** The server's message without the code (for UNAVAILABLE: why the daemon was unreachable). */
    public String description() {
        return description;
    }

    /** Words of gRPC's and Netty's own UNAVAILABLE errors when no connection could be made. */
    private static final List<String> UNREACHABLE_MARKS = List.of("io exception", "network closed",
            "connection refused", "connection closed", "no such file", "unable to resolve",
            "failed to connect");

    /**
     * Maps a gRPC failure of a call to {@code addr}. When the daemon could not be reached at all
     * (no server, a refused TLS handshake) the message reads "cannot reach the daemon at ADDR
     * (DETAIL)" with the transport's reason; otherwise it is the server's message.
     */
    static GuardException from(Throwable error, String addr) {
        if (error instanceof GuardException guard) {
            return guard;
        }
        Status status = Status.fromThrowable(error);
        String description = status.getDescription() == null ? "" : status.getDescription();
        String lower = description.toLowerCase(Locale.ROOT);
        boolean unreachable = status.getCode() == Status.Code.UNAVAILABLE
                && (status.getCause() != null || UNREACHABLE_MARKS.stream().anyMatch(lower::contains));
        if (!unreachable) {
            return new GuardException(status.getCode(), description);
        }
        // Netty appends the channel pipeline on a second line: keep the first.
        String detail = description.lines().findFirst().orElse("");
        for (Throwable c = status.getCause(); c != null; c = c.getCause()) {
            // Netty reports a missing unix socket as a FileNotFoundException without a message.
            String why = c instanceof FileNotFoundException && c.getMessage() == null
                    ? "No such file or directory" : c.getMessage();
            if (why != null && !why.isEmpty() && !detail.contains(why)) {
                detail = detail.isEmpty() ? why : detail + ": " + why;
                break;
            }
        }
        return new GuardException(Status.Code.UNAVAILABLE,
                "cannot reach the daemon at " + addr + " (" + detail + ")");
    }

    /** {@link #from} for the exception a blocking stub throws. */
    static GuardException from(StatusRuntimeException error, String addr) {
        return from((Throwable) error, addr);
    }
}
