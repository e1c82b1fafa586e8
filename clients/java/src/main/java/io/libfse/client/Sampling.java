package io.libfse.client;

import fse.v1.Fse;

/**
 * Sampling parameters; a null field is left unset and takes llama.cpp's default on the daemon
 * (temperature 0.8, top_k 40, top_p 0.95, min_p 0.05, a random seed). The daemon judges the
 * ranges and answers INVALID_ARGUMENT naming the field.
 *
 * @param temperature 0 = greedy
 * @param topK 0 = off
 * @param topP 1 = off
 * @param minP 0 = off
 * @param seed 0 .. 2^32-1
 */
public record Sampling(Double temperature, Integer topK, Double topP, Double minP, Long seed) {

    /** Every field unset: the daemon's defaults. */
    public static final Sampling DEFAULTS = new Sampling(null, null, null, null, null);

    /** Greedy decoding (temperature 0), deterministic. */
    public static Sampling greedy() {
        return DEFAULTS.withTemperature(0.0);
    }

    /** A copy with this temperature. */
    public Sampling withTemperature(double value) {
        return new Sampling(value, topK, topP, minP, seed);
    }

    /** A copy with this top_k. */
    public Sampling withTopK(int value) {
        return new Sampling(temperature, value, topP, minP, seed);
    }

    /** A copy with this top_p. */
    public Sampling withTopP(double value) {
        return new Sampling(temperature, topK, value, minP, seed);
    }

    /** A copy with this min_p. */
    public Sampling withMinP(double value) {
        return new Sampling(temperature, topK, topP, value, seed);
    }

    /** A copy with this seed, 0 .. 2^32-1. */
    public Sampling withSeed(long value) {
        if (value < 0 || value > 0xFFFF_FFFFL) {
            throw new IllegalArgumentException("seed: " + value + " is out of 0 .. 4294967295");
        }
        return new Sampling(temperature, topK, topP, minP, value);
    }

    Fse.Sampling toWire() {
        Fse.Sampling.Builder b = Fse.Sampling.newBuilder();
        if (temperature != null) {
            b.setTemperature(temperature);
        }
        if (topK != null) {
            b.setTopK(topK);
        }
        if (topP != null) {
            b.setTopP(topP);
        }
        if (minP != null) {
            b.setMinP(minP);
        }
        if (seed != null) {
            b.setSeed((int) (long) seed); // uint32 on the wire: the low 32 bits
        }
        return b.build();
    }
}
