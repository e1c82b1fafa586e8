package io.libfse.example;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import fse.v1.Fse;
import fse.v1.GuardGrpc;
import io.grpc.Grpc;
import io.grpc.Metadata;
import io.grpc.Server;
import io.grpc.ServerCall;
import io.grpc.ServerCallHandler;
import io.grpc.ServerInterceptor;
import io.grpc.ServerInterceptors;
import io.grpc.Status;
import io.grpc.TlsServerCredentials;
import io.grpc.stub.StreamObserver;
import java.io.ByteArrayOutputStream;
import java.io.File;
import java.io.IOException;
import java.io.PrintStream;
import java.net.URISyntaxException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * TLS (root CA from --tls-ca, the host of --addr checked against the certificate's SANs
 * IP:127.0.0.1 and DNS:localhost) and the bearer token, against a local TLS server that demands
 * the token the way the daemon does.
 */
class TlsTokenTest {
    private static final Metadata.Key<String> AUTHORIZATION =
            Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER);
    private static Server server;
    private static Path ca;

    private static Path resource(String name) throws URISyntaxException {
        return Path.of(TlsTokenTest.class.getResource("/tls/" + name).toURI());
    }

    @BeforeAll
    static void start() throws IOException, URISyntaxException {
        ca = resource("ca.pem");
        File cert = resource("server.pem").toFile();
        File key = resource("server.key").toFile();
        ServerInterceptor auth = new ServerInterceptor() {
            @Override
            public <Q, R> ServerCall.Listener<Q> interceptCall(ServerCall<Q, R> call, Metadata headers,
                    ServerCallHandler<Q, R> next) {
                if (!"Bearer good-token".equals(headers.get(AUTHORIZATION))) {
                    call.close(Status.UNAUTHENTICATED.withDescription("missing or unknown bearer token"),
                            new Metadata());
                    return new ServerCall.Listener<>() { };
                }
                return next.startCall(call, headers);
            }
        };
        GuardGrpc.GuardImplBase service = new GuardGrpc.GuardImplBase() {
            @Override
            public void getInfo(Fse.GetInfoRequest request, StreamObserver<Fse.Info> out) {
                out.onNext(Fse.Info.newBuilder().setVersion("tls-ok").build());
                out.onCompleted();
            }
        };
        server = Grpc.newServerBuilderForPort(0, TlsServerCredentials.create(cert, key))
                .addService(ServerInterceptors.intercept(service, auth)).build().start();
    }

    @AfterAll
    static void stop() {
        server.shutdownNow();
    }

    private record Result(int code, String out, String err) {
    }

    private static Result run(String... argv) {
        var out = new ByteArrayOutputStream();
        var err = new ByteArrayOutputStream();
        int code = GuardedGenerate.run(argv, new PrintStream(out, true, StandardCharsets.UTF_8),
                new PrintStream(err, true, StandardCharsets.UTF_8), false);
        return new Result(code, out.toString(StandardCharsets.UTF_8), err.toString(StandardCharsets.UTF_8));
    }

    private static Path token(Path dir, String token) throws IOException {
        return Files.writeString(dir.resolve("token"), token + "\n");
    }

    @Test
    void tlsWithTheRightTokenByIpAndByName(@TempDir Path dir) throws IOException {
        String file = token(dir, "good-token").toString();
        for (String host : new String[] {"127.0.0.1", "localhost"}) {
            Result r = run("--addr", host + ":" + server.getPort(), "--tls-ca", ca.toString(),
                    "--token-file", file, "--info");
            assertEquals(0, r.code(), r.err());
            assertTrue(r.out().startsWith("{\"version\": \"tls-ok\", "), r.out());
        }
    }

    @Test
    void aWrongTokenIsUnauthenticated(@TempDir Path dir) throws IOException {
        Result r = run("--addr", "127.0.0.1:" + server.getPort(), "--tls-ca", ca.toString(),
                "--token-file", token(dir, "bad-token").toString(), "--info");
        assertEquals(1, r.code());
        assertEquals("guarded-generate: error: UNAUTHENTICATED: missing or unknown bearer token\n", r.err());
        Result g = run("--addr", "127.0.0.1:" + server.getPort(), "--tls-ca", ca.toString(), "--json", "Hi");
        assertEquals(1, g.code());
        assertEquals("guarded-generate: error: UNAUTHENTICATED: missing or unknown bearer token\n", g.err());
    }

    @Test
    void anUntrustedCertificateOrPlainTextIsUnreachable(@TempDir Path dir) throws IOException,
            URISyntaxException {
        String addr = "127.0.0.1:" + server.getPort();
        Result plain = run("--addr", addr, "--info");
        assertEquals(1, plain.code());
        assertTrue(plain.err().startsWith("guarded-generate: error: UNAVAILABLE: cannot reach the daemon at "
                + addr + " ("), plain.err());
        // A CA that did not sign the server's certificate: the handshake fails.
        Result untrusted = run("--addr", addr, "--tls-ca", resource("other-ca.pem").toString(), "--info");
        assertEquals(1, untrusted.code());
        assertTrue(untrusted.err().startsWith("guarded-generate: error: UNAVAILABLE: cannot reach the daemon at "),
                untrusted.err());
        assertEquals(1, untrusted.err().lines().count(), untrusted.err());
        Path junk = Files.writeString(dir.resolve("junk.pem"), "not a certificate\n");
        Result bad = run("--addr", addr, "--tls-ca", junk.toString(), "--info");
        assertEquals(2, bad.code());
        assertEquals("guarded-generate: option '--tls-ca': " + junk + " holds no PEM certificate\n", bad.err());
    }
}
