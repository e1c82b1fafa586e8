package io.libfse.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import fse.v1.Fse;
import fse.v1.GuardGrpc;
import io.grpc.Metadata;
import io.grpc.Server;
import io.grpc.ServerCall;
import io.grpc.ServerCallHandler;
import io.grpc.ServerInterceptor;
import io.grpc.ServerInterceptors;
import io.grpc.Status;
import io.grpc.inprocess.InProcessChannelBuilder;
import io.grpc.inprocess.InProcessServerBuilder;
import io.grpc.stub.StreamObserver;
import java.io.IOException;
import java.util.ArrayList;
import java.util.List;
import java.util.Optional;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicReference;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.Test;

/**
 * The library's stream handling against an in-process stand-in of the service (the wire
 * behaviour of the real daemon is checked by the conformance harness).
 */
class GuardClientTest {
    private static final Metadata.Key<String> AUTHORIZATION =
            Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER);

    private final AtomicReference<String> authorization = new AtomicReference<>();
    private Server server;
    private GuardClient client;

    /** Scripted service: the prompt picks the behaviour. */
    private static final class Service extends GuardGrpc.GuardImplBase {
        final CompletableFuture<Fse.GenerateRequest> started = new CompletableFuture<>();

        @Override
        public StreamObserver<Fse.GenerateClientMessage> generate(
                StreamObserver<Fse.GenerateServerMessage> out) {
            return new StreamObserver<>() {
                @Override
                public void onNext(Fse.GenerateClientMessage message) {
                    if (message.hasStart()) {
                        Fse.GenerateRequest r = message.getStart();
                        started.complete(r);
                        out.onNext(Fse.GenerateServerMessage.newBuilder().setStarted(
                                Fse.Started.newBuilder().setPolicy("default").setSeed(-1)).build());
                        switch (r.getPrompt()) {
                            case "bad" -> out.onError(Status.INVALID_ARGUMENT
                                    .withDescription("sampling.top_p: 5.0 is invalid").asRuntimeException());
                            case "no verdict" -> out.onCompleted();
                            case "wait" -> out.onNext(token(0, "a"));
                            case "end of generation", "stop", "max tokens", "unknown completion" -> {
                                int completion = switch (r.getPrompt()) {
                                    case "end of generation" -> Fse.Completion.COMPLETION_END_OF_GENERATION_VALUE;
                                    case "stop" -> Fse.Completion.COMPLETION_STOP_SEQUENCE_VALUE;
                                    case "max tokens" -> Fse.Completion.COMPLETION_MAX_TOKENS_VALUE;
                                    default -> 42;
                                };
                                out.onNext(verdict(Fse.Verdict.newBuilder().setStatus(Fse.Status.STATUS_COMPLETED)
                                        .setCompletionValue(completion)));
                                out.onCompleted();
                            }
                            case "unknown status" -> {
                                out.onNext(verdict(Fse.Verdict.newBuilder().setStatusValue(42)));
                                out.onCompleted();
                            }
                            case "error" -> {
                                out.onNext(verdict(Fse.Verdict.newBuilder().setStatus(Fse.Status.STATUS_ERROR)
                                        .setMessage("decode failed")));
                                out.onError(Status.INTERNAL.withDescription("decode failed").asRuntimeException());
                            }
                            default -> {
                                out.onNext(token(0, "Hello"));
                                out.onNext(token(1, " world"));
                                out.onNext(verdict(Fse.Verdict.newBuilder().setStatus(Fse.Status.STATUS_HALTED)
                                        .setGuard("l2_norm").setValue(2574.2).setThreshold(10).setTokenIndex(2)
                                        .setTokens(2).setText("Hello world").setPolicy("default")));
                                out.onCompleted();
                            }
                        }
                    } else if (message.hasCancel()) {
                        out.onNext(verdict(Fse.Verdict.newBuilder().setStatus(Fse.Status.STATUS_CANCELLED)
                                .setTokens(1).setText("a")));
                        out.onCompleted();
                    }
                }

                @Override
                public void onError(Throwable t) {
                }

                @Override
                public void onCompleted() {
                }
            };
        }

        @Override
        public void getInfo(Fse.GetInfoRequest request, StreamObserver<Fse.Info> out) {
            out.onNext(Fse.Info.newBuilder().setVersion("9.9").build());
            out.onCompleted();
        }
    }

    private static Fse.GenerateServerMessage token(int index, String text) {
        return Fse.GenerateServerMessage.newBuilder().setToken(Fse.Token.newBuilder().setIndex(index)
                .setText(text).setEntropy(2.5).setHealth(Fse.Health.HEALTH_YELLOW)
                .addWarnings(Fse.GuardTrip.newBuilder().setGuard("perplexity").setValue(3))).build();
    }

    private static Fse.GenerateServerMessage verdict(Fse.Verdict.Builder v) {
        return Fse.GenerateServerMessage.newBuilder().setVerdict(v).build();
    }

    private Service start(String token) throws IOException {
        Service service = new Service();
        String name = InProcessServerBuilder.generateName();
        ServerInterceptor headers = new ServerInterceptor() {
            @Override
            public <Q, R> ServerCall.Listener<Q> interceptCall(ServerCall<Q, R> call, Metadata h,
                    ServerCallHandler<Q, R> next) {
                authorization.set(h.get(AUTHORIZATION));
                return next.startCall(call, h);
            }
        };
        server = InProcessServerBuilder.forName(name).directExecutor()
                .addService(ServerInterceptors.intercept(service, headers)).build().start();
        client = GuardClient.over("test", InProcessChannelBuilder.forName(name).build(), token);
        return service;
    }

    @AfterEach
    void stop() {
        if (client != null) {
            client.close();
            server.shutdownNow();
        }
    }

    @Test
    void streamsStartedTokensThenTheVerdict() throws Exception {
        Service service = start(null);
        List<Event> events = new ArrayList<>();
        try (GenerationStream stream = client.stream(Request.prompt("hi").withMaxTokens(8)
                .withSampling(Sampling.greedy().withSeed(4294967295L)).withStop("x"))) {
            stream.forEach(events::add);
        }
        assertEquals(4, events.size());
        assertEquals(4294967295L, assertInstanceOf(Started.class, events.get(0)).seed());
        TokenEvent first = assertInstanceOf(TokenEvent.class, events.get(1));
        assertEquals("Hello", first.text());
        assertEquals(Health.YELLOW, first.health());
        assertEquals(2.5, first.entropy());
        assertEquals(3.0, first.warnings().get(0).value().getAsDouble());
        assertTrue(first.warnings().get(0).threshold().isEmpty());
        Verdict v = assertInstanceOf(Verdict.class, events.get(3));
        assertEquals(Verdict.Status.HALTED, v.status());
        assertEquals("l2_norm", v.guard().orElseThrow());
        assertEquals(2L, v.tokenIndex().getAsLong());
        Fse.GenerateRequest wire = service.started.get(5, TimeUnit.SECONDS);
        assertEquals(8, wire.getMaxTokens());
        assertEquals(0.0, wire.getSampling().getTemperature());
        assertTrue(wire.getSampling().hasTemperature());
        assertTrue(!wire.getSampling().hasTopK());
        assertEquals(-1, wire.getSampling().getSeed());
        assertEquals(List.of("x"), wire.getStopList());
        assertEquals(0, wire.getTimeoutMs());
    }

    @Test
    void cancelSendsCancelAndStillEndsWithTheVerdict() throws Exception {
        start(null);
        try (GenerationStream stream = client.stream(Request.prompt("wait"))) {
            assertInstanceOf(Started.class, stream.next());
            assertInstanceOf(TokenEvent.class, stream.next());
            stream.cancel();
            assertEquals(Verdict.Status.CANCELLED, stream.verdict().status());
        }
    }

    @Test
    void grpcErrorsAreGuardExceptionsWithTheCodeAndMessage() throws Exception {
        start(null);
        try (GenerationStream stream = client.stream(Request.prompt("bad"))) {
            GuardException e = assertThrows(GuardException.class, stream::verdict);
            assertEquals(Status.Code.INVALID_ARGUMENT, e.code());
            assertEquals("sampling.top_p: 5.0 is invalid", e.description());
            assertEquals("INVALID_ARGUMENT: sampling.top_p: 5.0 is invalid", e.getMessage());
        }
    }

    @Test
    void aStreamWithoutAVerdictIsAnError() throws Exception {
        start(null);
        try (GenerationStream stream = client.stream(Request.prompt("no verdict"))) {
            GuardException e = assertThrows(GuardException.class, stream::verdict);
            assertTrue(e.description().contains("without a verdict"));
        }
    }

    @Test
    void aCompletedVerdictSaysWhyItEnded() throws Exception {
        start(null);
        for (var c : List.of(List.of("end of generation", "END_OF_GENERATION"), List.of("stop", "STOP_SEQUENCE"),
                List.of("max tokens", "MAX_TOKENS"))) {
            try (GenerationStream stream = client.stream(Request.prompt(c.get(0)))) {
                Verdict v = stream.verdict();
                assertEquals(Verdict.Status.COMPLETED, v.status());
                assertEquals(Optional.of(Verdict.Completion.valueOf(c.get(1))), v.completion());
            }
        }
        try (GenerationStream stream = client.stream(Request.prompt("unknown completion"))) {
            assertEquals(Optional.empty(), stream.verdict().completion());
        }
        try (GenerationStream stream = client.stream(Request.prompt("halt"))) {
            assertEquals(Optional.empty(), stream.verdict().completion());
        }
    }

    @Test
    void anUnknownStatusIsNeverCompleted() throws Exception {
        start(null);
        try (GenerationStream stream = client.stream(Request.prompt("unknown status"))) {
            assertEquals(Verdict.Status.ERROR, stream.verdict().status());
        }
    }

    @Test
    void anErrorVerdictIsDeliveredAndTheTrailingInternalIgnored() throws Exception {
        start(null);
        try (GenerationStream stream = client.stream(Request.prompt("error"))) {
            Verdict v = stream.verdict();
            assertEquals(Verdict.Status.ERROR, v.status());
            assertEquals("decode failed", v.message());
            assertTrue(!stream.hasNext());
        }
    }

    @Test
    void theTokenTravelsAsBearerMetadataOnEveryCall() throws Exception {
        start("s3cret");
        assertEquals("9.9", client.info().getVersion());
        assertEquals("Bearer s3cret", authorization.get());
        authorization.set(null);
        try (GenerationStream stream = client.stream(Request.prompt("hi"))) {
            stream.verdict();
        }
        assertEquals("Bearer s3cret", authorization.get());
    }

    @Test
    void theObserverGetsEveryEventAndOneEnd() throws Exception {
        start(null);
        AtomicInteger tokens = new AtomicInteger();
        AtomicInteger ends = new AtomicInteger();
        CountDownLatch done = new CountDownLatch(1);
        AtomicReference<Verdict> verdict = new AtomicReference<>();
        client.generate(Request.prompt("hi"), new GenerationObserver() {
            @Override
            public void onToken(TokenEvent token) {
                tokens.incrementAndGet();
            }

            @Override
            public void onVerdict(Verdict v) {
                verdict.set(v);
                ends.incrementAndGet();
                done.countDown();
            }

            @Override
            public void onError(GuardException error) {
                ends.incrementAndGet();
                done.countDown();
            }
        });
        assertTrue(done.await(5, TimeUnit.SECONDS));
        assertEquals(2, tokens.get());
        assertEquals(1, ends.get());
        assertEquals("Hello world", verdict.get().text());
    }

    @Test
    void abortEndsTheCallWithCancelled() throws Exception {
        start(null);
        CompletableFuture<GuardException> failed = new CompletableFuture<>();
        GenerationCall call = client.generate(Request.prompt("wait"), new GenerationObserver() {
            @Override
            public void onToken(TokenEvent token) {
            }

            @Override
            public void onVerdict(Verdict v) {
                failed.completeExceptionally(new AssertionError("no verdict after abort"));
            }

            @Override
            public void onError(GuardException error) {
                failed.complete(error);
            }
        });
        call.abort();
        assertEquals(Status.Code.CANCELLED, failed.get(5, TimeUnit.SECONDS).code());
    }

    @Test
    void requestsCheckWhatTheWireCannotCarry() {
        assertThrows(IllegalArgumentException.class, () -> Request.prompt("x").withMaxTokens(0));
        assertThrows(IllegalArgumentException.class, () -> Sampling.DEFAULTS.withSeed(-1));
        assertThrows(IllegalArgumentException.class, () -> Request.chat(List.of()));
        assertEquals(1, Request.prompt("x").withTimeout(java.time.Duration.ofNanos(1)).timeoutMillis());
    }
}
