package io.libfse.client;

import io.grpc.Status;
import io.grpc.StatusRuntimeException;

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

    /**
     * Maps a gRPC failure of a call to {@code addr}. UNAVAILABLE (no server, a refused TLS
     * handshake, a daemon still loading or shutting down) reads "cannot reach the daemon at ADDR
     * (DETAIL)", DETAIL being the server's or the transport's reason, as the Python client says it.
     */
    static GuardException from(Throwable error, String addr) {
        if (error instanceof GuardException guard) {
            return guard;
        }
        Status status = Status.fromThrowable(error);
        String description = status.getDescription() == null ? "" : status.getDescription();
        if (status.getCode() != Status.Code.UNAVAILABLE) {
            return new GuardException(status.getCode(), description);
        }
        String detail = description;
        for (Throwable c = status.getCause(); c != null; c = c.getCause()) {
            String why = c.getMessage();
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
