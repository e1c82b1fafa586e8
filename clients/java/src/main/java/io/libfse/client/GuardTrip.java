package io.libfse.client;

import fse.v1.Fse;
import java.util.OptionalDouble;

/**
 * A guard with action "warn" that tripped on a token (the token was still released).
 *
 * @param guard the guard's name
 * @param value the measured value, if the guard has one
 * @param threshold the threshold it crossed, if any
 */
public record GuardTrip(String guard, OptionalDouble value, OptionalDouble threshold) {

    static GuardTrip fromWire(Fse.GuardTrip t) {
        return new GuardTrip(t.getGuard(),
                t.hasValue() ? OptionalDouble.of(t.getValue()) : OptionalDouble.empty(),
                t.hasThreshold() ? OptionalDouble.of(t.getThreshold()) : OptionalDouble.empty());
    }
}
