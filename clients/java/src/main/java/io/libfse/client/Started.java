package io.libfse.client;

import fse.v1.Fse;

/**
 * The daemon admitted the request.
 *
 * @param requestId the request id, echoed
 * @param policy the resolved policy name
 * @param policySha256 sha256 of the policy's canonical form
 * @param promptTokens tokens in the prompt
 * @param seed the sampling seed in use (0 when greedy), 0 .. 2^32-1
 * @param model the served model's name
 */
public record Started(String requestId, String policy, String policySha256, long promptTokens,
        long seed, String model) implements Event {

    static Started fromWire(Fse.Started s) {
        return new Started(s.getRequestId(), s.getPolicy(), s.getPolicySha256(),
                Integer.toUnsignedLong(s.getPromptTokens()), Integer.toUnsignedLong(s.getSeed()),
                s.getModel());
    }
}
