package io.libfse.client;

import fse.v1.Fse;
import java.util.List;

/**
 * One released token: it has passed every halting guard of the policy.
 *
 * @param index 0-based position among the generated tokens
 * @param id token id in the model's vocabulary
 * @param piece raw bytes of the token (may end inside a UTF-8 character)
 * @param text complete characters only; the concatenated text of all tokens is the output
 * @param nll -ln p(token) under the raw distribution, in nats
 * @param ppl perplexity over the policy's window
 * @param pplCumulative perplexity over all generated tokens
 * @param variance variance of the logits
 * @param maxProb probability of the most likely token
 * @param l2Norm L2 norm of the logit vector
 * @param entropy entropy of the raw next-token distribution, in nats
 * @param health the perplexity band
 * @param warnings the "warn" guards that tripped here
 */
public record TokenEvent(long index, int id, byte[] piece, String text, double nll, double ppl,
        double pplCumulative, double variance, double maxProb, double l2Norm, double entropy,
        Health health, List<GuardTrip> warnings) implements Event {

    static TokenEvent fromWire(Fse.Token t) {
        return new TokenEvent(Integer.toUnsignedLong(t.getIndex()), t.getId(),
                t.getPiece().toByteArray(), t.getText(), t.getNll(), t.getPpl(),
                t.getPplCumulative(), t.getVariance(), t.getMaxProb(), t.getL2Norm(), t.getEntropy(),
                Health.fromWire(t.getHealth()),
                t.getWarningsList().stream().map(GuardTrip::fromWire).toList());
    }
}
