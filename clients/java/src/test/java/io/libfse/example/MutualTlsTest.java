package io.libfse.example;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import fse.v1.Fse;
import fse.v1.GuardGrpc;
import io.grpc.Grpc;
import io.grpc.Server;
import io.grpc.TlsServerCredentials;
import io.grpc.stub.StreamObserver;
import io.libfse.client.GuardClient;
import io.libfse.client.GuardException;
import io.libfse.client.TlsFileException;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.PrintStream;
import java.net.URISyntaxException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Path;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;

/**
 * Mutual TLS: a local server that requires a client certificate signed by its client CA, reached
 * through the library with a client certificate and through guarded-generate's --tls-cert and
 * --tls-key (test resources: client-ca.pem, client.pem, client.key).
 */
class MutualTlsTest {
    private static Server server;
    private static String addr;

    private static Path resource(String name) throws URISyntaxException {
        return Path.of(MutualTlsTest.class.getResource("/tls/" + name).toURI());
    }

    @BeforeAll
    static void start() throws IOException, URISyntaxException {
        GuardGrpc.GuardImplBase service = new GuardGrpc.GuardImplBase() {
            @Override
            public void getInfo(Fse.GetInfoRequest request, StreamObserver<Fse.Info> out) {
                out.onNext(Fse.Info.newBuilder().setVersion("mtls-ok").build());
                out.onCompleted();
            }
        };
        var credentials = TlsServerCredentials.newBuilder()
                .keyManager(resource("server.pem").toFile(), resource("server.key").toFile())
                .trustManager(resource("client-ca.pem").toFile())
                .clientAuth(TlsServerCredentials.ClientAuth.REQUIRE).build();
        server = Grpc.newServerBuilderForPort(0, credentials).addService(service).build().start();
        addr = "localhost:" + server.getPort();
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

    @Test
    void theLibraryPresentsTheClientCertificate() throws URISyntaxException {
        try (GuardClient client = GuardClient.connect(addr, resource("ca.pem"), resource("client.pem"),
                resource("client.key"), null)) {
            assertEquals("mtls-ok", client.info().getVersion());
        }
        try (GuardClient anonymous = GuardClient.connect(addr, resource("ca.pem"), null)) {
            GuardException e = assertThrows(GuardException.class, anonymous::info);
            assertEquals(io.grpc.Status.Code.UNAVAILABLE, e.code());
        }
        IllegalArgumentException half = assertThrows(IllegalArgumentException.class,
                () -> GuardClient.connect(addr, resource("ca.pem"), resource("client.pem"), null, null));
        assertEquals("tlsKey: required with tlsCert", half.getMessage());
        TlsFileException notAKey = assertThrows(TlsFileException.class, () -> GuardClient.connect(addr,
                resource("ca.pem"), resource("client.pem"), resource("client.pem"), null));
        assertEquals("tlsKey", notAKey.parameter());
    }

    @Test
    void guardedGenerateWithAndWithoutTheCertificate() throws URISyntaxException {
        String ca = resource("ca.pem").toString();
        String cert = resource("client.pem").toString();
        String key = resource("client.key").toString();
        Result ok = run("--addr", addr, "--tls-ca", ca, "--tls-cert", cert, "--tls-key", key, "--info");
        assertEquals(0, ok.code(), ok.err());
        assertTrue(ok.out().startsWith("{\"version\": \"mtls-ok\", "), ok.out());
        Result refused = run("--addr", addr, "--tls-ca", ca, "--info");
        assertEquals(1, refused.code());
        assertEquals("", refused.out());
        assertTrue(refused.err().startsWith("guarded-generate: error: UNAVAILABLE: "), refused.err());
        assertEquals(1, refused.err().lines().count(), refused.err());
    }

    @Test
    void unusableFilesNameTheirFlag() throws URISyntaxException {
        String ca = resource("ca.pem").toString();
        String cert = resource("client.pem").toString();
        String key = resource("client.key").toString();
        String[][] cases = {
            {"--tls-cert", "/nonexistent/client.pem", "--tls-key", key, "'--tls-cert'"},
            {"--tls-cert", cert, "--tls-key", "/nonexistent/client.key", "'--tls-key'"},
            {"--tls-cert", key, "--tls-key", key, "'--tls-cert'"},
            {"--tls-cert", cert, "--tls-key", cert, "'--tls-key'"},
        };
        for (String[] c : cases) {
            Result r = run("--addr", addr, "--tls-ca", ca, c[0], c[1], c[2], c[3], "--info");
            assertEquals(2, r.code(), r.err());
            assertTrue(r.err().startsWith("guarded-generate: option " + c[4] + ": "), r.err());
        }
        Result half = run("--addr", addr, "--tls-ca", ca, "--tls-cert", cert, "--info");
        assertEquals(2, half.code());
        assertEquals("guarded-generate: option '--tls-key' is required with '--tls-cert'\n", half.err());
    }
}
