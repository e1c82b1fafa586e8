package io.libfse.example;

import static org.junit.jupiter.api.Assertions.assertEquals;

import io.grpc.Status;
import io.libfse.client.GuardException;
import io.libfse.client.Verdict;
import org.junit.jupiter.api.Test;

class ExitCodeTest {
    @Test
    void exitCodes() {
        assertEquals(0, GuardedGenerate.exitCode(Verdict.Status.COMPLETED));
        assertEquals(3, GuardedGenerate.exitCode(Verdict.Status.HALTED));
        assertEquals(4, GuardedGenerate.exitCode(Verdict.Status.CANCELLED));
        assertEquals(1, GuardedGenerate.exitCode(Verdict.Status.ERROR));
        assertEquals(2, GuardedGenerate.exitCode(new GuardException(Status.Code.INVALID_ARGUMENT, "x")));
        assertEquals(1, GuardedGenerate.exitCode(new GuardException(Status.Code.UNAUTHENTICATED, "x")));
        assertEquals(1, GuardedGenerate.exitCode(new GuardException(Status.Code.UNAVAILABLE, "x")));
    }
}
