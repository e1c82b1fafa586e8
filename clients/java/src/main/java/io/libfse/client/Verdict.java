package io.libfse.client;

import fse.v1.Fse;
import java.math.BigDecimal;
import java.math.MathContext;
import java.math.RoundingMode;
import java.util.Locale;
import java.util.Optional;
import java.util.OptionalDouble;
import java.util.OptionalLong;

/**
 * How a generation ended: the stream's last event.
 *
 * @param status the outcome
 * @param guard the guard that halted it (perplexity, l2_norm, deadline, ...); empty unless HALTED
 * @param value the guard's measured value, if any
 * @param threshold the policy threshold it crossed, if any
 * @param tokenIndex index of the withheld token that tripped the guard, if any
 * @param tokens tokens released
 * @param text the released text
 * @param policy the policy's name
 * @param policySha256 sha256 of the policy's canonical form
 * @param message detail for ERROR; empty otherwise
 * @param completion why a COMPLETED stream ended; empty for any other status (and from a daemon
 *     that predates it)
 */
public record Verdict(Status status, Optional<String> guard, OptionalDouble value,
        OptionalDouble threshold, OptionalLong tokenIndex, long tokens, String text,
        String policy, String policySha256, String message, Optional<Completion> completion) implements Event {

    /** The outcome of a generation. */
    public enum Status {
        /** max_tokens, end of generation or a stop sequence: all of it was guarded. */
        COMPLETED,
        /** A guard (or the deadline, or a shutdown) stopped it. */
        HALTED,
        /** The client cancelled or went away. */
        CANCELLED,
        /** An internal failure; also any status this client does not know, never COMPLETED. */
        ERROR;

        static Status fromWire(Fse.Status status) {
            return switch (status) {
                case STATUS_COMPLETED -> COMPLETED;
                case STATUS_HALTED -> HALTED;
                case STATUS_CANCELLED -> CANCELLED;
                default -> ERROR;
            };
        }
    }

    /** Why a COMPLETED stream ended. */
    public enum Completion {
        /** The model ended its output (an end-of-generation token). */
        END_OF_GENERATION,
        /** A stop sequence of the request was generated. */
        STOP_SEQUENCE,
        /** max_tokens were generated. */
        MAX_TOKENS;

        /**
         * The name the JSON lines and the verdict line use.
         *
         * @return {@code end_of_generation}, {@code stop_sequence} or {@code max_tokens}
         */
        public String wireName() {
            return name().toLowerCase(Locale.ROOT);
        }

        /** Empty for COMPLETION_UNSPECIFIED and any value this client does not know. */
        static Optional<Completion> fromWire(Fse.Completion completion) {
            return switch (completion) {
                case COMPLETION_END_OF_GENERATION -> Optional.of(END_OF_GENERATION);
                case COMPLETION_STOP_SEQUENCE -> Optional.of(STOP_SEQUENCE);
                case COMPLETION_MAX_TOKENS -> Optional.of(MAX_TOKENS);
                default -> Optional.empty();
            };
        }
    }

    /**
     * The verdict as one line for people, as {@code fse generate} prints it: {@code [completed at
     * max_tokens] 12 tokens released · policy default (0123456789ab)}, or for a halt {@code [halted by
     * l2_norm: value 2574.2, threshold 10, at token 0] ...} (value and threshold as C's {@code %.6g},
     * n/a when unset).
     *
     * @return the line, without a newline
     */
    public String summary() {
        String what = status.name().toLowerCase(Locale.ROOT);
        if (status == Status.COMPLETED && completion.isPresent()) {
            what += " at " + completion.get().wireName();
        }
        if (status == Status.HALTED) {
            what = "halted by " + guard.orElse("n/a") + ": value " + g6(value) + ", threshold " + g6(threshold)
                    + ", at token " + (tokenIndex.isPresent() ? Long.toString(tokenIndex.getAsLong()) : "n/a");
        }
        String detail = message.isEmpty() ? "" : ": " + message;
        String hash = policySha256.substring(0, Math.min(12, policySha256.length()));
        return "[" + what + detail + "] " + tokens + " tokens released · policy " + policy + " (" + hash + ")";
    }

    /** C's {@code printf("%.6g", value)}, "n/a" when unset. */
    static String g6(OptionalDouble value) {
        double x = value.orElse(Double.NaN);
        if (value.isEmpty() || Double.isNaN(x) || Double.isInfinite(x)) {
            return value.isEmpty() ? "n/a" : Double.isNaN(x) ? "nan" : x > 0 ? "inf" : "-inf";
        } else if (x == 0) {
            return 1 / x < 0 ? "-0" : "0";
        }
        BigDecimal d = new BigDecimal(x).round(new MathContext(6, RoundingMode.HALF_EVEN)).stripTrailingZeros();
        int exp = d.precision() - d.scale() - 1;
        if (exp >= -4 && exp < 6) {
            return d.toPlainString();
        }
        String digits = d.unscaledValue().abs().toString();
        String mantissa = digits.length() == 1 ? digits : digits.charAt(0) + "." + digits.substring(1);
        return (x < 0 ? "-" : "") + mantissa + String.format("e%s%02d", exp < 0 ? "-" : "+", Math.abs(exp));
    }

    static Verdict fromWire(Fse.Verdict v) {
        return new Verdict(Status.fromWire(v.getStatus()),
                v.getGuard().isEmpty() ? Optional.empty() : Optional.of(v.getGuard()),
                v.hasValue() ? OptionalDouble.of(v.getValue()) : OptionalDouble.empty(),
                v.hasThreshold() ? OptionalDouble.of(v.getThreshold()) : OptionalDouble.empty(),
                v.hasTokenIndex()
                        ? OptionalLong.of(Integer.toUnsignedLong(v.getTokenIndex()))
                        : OptionalLong.empty(),
                Integer.toUnsignedLong(v.getTokens()), v.getText(), v.getPolicy(),
                v.getPolicySha256(), v.getMessage(), Completion.fromWire(v.getCompletion()));
    }
}
