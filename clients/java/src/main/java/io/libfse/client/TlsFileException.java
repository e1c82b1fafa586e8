package io.libfse.client;

/**
 * A TLS file given to {@link GuardClient#connect(String, java.nio.file.Path, java.nio.file.Path,
 * java.nio.file.Path, String)} that cannot be used: unreadable, or not holding what it should (a
 * PEM certificate, a PEM private key).
 */
public final class TlsFileException extends IllegalArgumentException {
    private static final long serialVersionUID = 1L;

    /** The parameter that named the file: {@code tlsCa}, {@code tlsCert} or {@code tlsKey}. */
    private final String parameter;

    TlsFileException(String parameter, String message, Throwable cause) {
        super(message, cause);
        this.parameter = parameter;
    }

    /**
     * Which file it is.
     *
     * @return {@code tlsCa}, {@code tlsCert} or {@code tlsKey}
     */
    public String parameter() {
        return parameter;
    }
}
