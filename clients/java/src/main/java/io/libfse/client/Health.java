package io.libfse.client;

import fse.v1.Fse;

/** The windowed-perplexity band of a token, as the policy judges it. */
public enum Health {
    /** Below the policy's green band. */
    GREEN,
    /** Between the bands: drifting or creative. */
    YELLOW,
    /** Above the red band. */
    RED,
    /** Not reported (HEALTH_UNSPECIFIED, or a value this client does not know). */
    UNSPECIFIED;

    static Health fromWire(Fse.Health health) {
        return switch (health) {
            case HEALTH_GREEN -> GREEN;
            case HEALTH_YELLOW -> YELLOW;
            case HEALTH_RED -> RED;
            default -> UNSPECIFIED;
        };
    }
}
