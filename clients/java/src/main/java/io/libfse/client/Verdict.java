package io.libfse.client;

import fse.v1.Fse;
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
 */
public record Verdict(Status status, Optional<String> guard, OptionalDouble value,
        OptionalDouble threshold, OptionalLong tokenIndex, long tokens, String text,
        String policy, String policySha256, String message) implements Event {

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

    static Verdict fromWire(Fse.Verdict v) {
        return new Verdict(Status.fromWire(v.getStatus()),
                v.getGuard().isEmpty() ? Optional.empty() : Optional.of(v.getGuard()),
                v.hasValue() ? OptionalDouble.of(v.getValue()) : OptionalDouble.empty(),
                v.hasThreshold() ? OptionalDouble.of(v.getThreshold()) : OptionalDouble.empty(),
                v.hasTokenIndex()
                        ? OptionalLong.of(Integer.toUnsignedLong(v.getTokenIndex()))
                        : OptionalLong.empty(),
                Integer.toUnsignedLong(v.getTokens()), v.getText(), v.getPolicy(),
                v.getPolicySha256(), v.getMessage());
    }
}
