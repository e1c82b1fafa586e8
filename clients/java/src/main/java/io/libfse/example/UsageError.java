package io.libfse.example;

/** Bad usage: a flag or the prompt. Printed as one line, exit code 2. */
final class UsageError extends Exception {
    private static final long serialVersionUID = 1L;

    UsageError(String message) {
        super(message);
    }

    /** {@code --FLAG: WHAT; accepted: RANGE}, the contract's form. */
    static UsageError flag(String flag, String what, String accepted) {
        return new UsageError(flag + ": " + what + "; accepted: " + accepted);
    }
}
