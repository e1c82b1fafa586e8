package io.libfse.client;

import fse.v1.Fse;
import fse.v1.GuardGrpc;
import io.grpc.ChannelCredentials;
import io.grpc.ClientInterceptor;
import io.grpc.ClientInterceptors;
import io.grpc.Grpc;
import io.grpc.InsecureChannelCredentials;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.ManagedChannelRegistry;
import io.grpc.Metadata;
import io.grpc.StatusRuntimeException;
import io.grpc.TlsChannelCredentials;
import io.grpc.netty.shaded.io.grpc.netty.NettyChannelBuilder;
import io.grpc.netty.shaded.io.netty.channel.ChannelOption;
import io.grpc.stub.MetadataUtils;
import java.io.ByteArrayInputStream;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.cert.CertificateException;
import java.security.cert.CertificateFactory;
import java.util.concurrent.TimeUnit;

/**
 * A connection to the libfse daemon (service {@code fse.v1.Guard}). Thread-safe; one client can
 * run many generations at once. Calls fail fast: an unreachable daemon is an immediate
 * {@link GuardException} with code UNAVAILABLE.
 *
 * <pre>{@code
 * try (GuardClient client = GuardClient.connect("unix:/run/fse.sock")) {
 *     Verdict verdict = client.stream(Request.prompt("Hello")).verdict();
 * }
 * }</pre>
 */
public final class GuardClient implements AutoCloseable {
    private static final Metadata.Key<String> AUTHORIZATION =
            Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER);

    private final String addr;
    private final ManagedChannel channel;
    private final GuardGrpc.GuardStub async;
    private final GuardGrpc.GuardBlockingStub blocking;

    private GuardClient(String addr, ManagedChannel channel, String token) {
        this.addr = addr;
        this.channel = channel;
        var target = token == null
                ? channel
                : ClientInterceptors.intercept(channel, bearer(token));
        this.async = GuardGrpc.newStub(target);
        this.blocking = GuardGrpc.newBlockingStub(target);
    }

    /** Connects over plain TCP or a unix socket: {@code unix:/abs/path} or {@code HOST:PORT}. */
    public static GuardClient connect(String addr) {
        return connect(addr, null, null);
    }

    /**
     * Connects with optional TLS and a bearer token.
     *
     * @param addr {@code unix:/abs/path} or {@code HOST:PORT}
     * @param tlsCa a PEM file of the CA that signed the daemon's certificate; null for plain
     *     text. The host of {@code addr} is the name checked against the certificate.
     * @param token sent as {@code authorization: Bearer TOKEN} on every call; null for none
     * @throws IllegalArgumentException if the CA file cannot be read or holds no certificate, or
     *     gRPC cannot make a channel for {@code addr}
     */
    public static GuardClient connect(String addr, Path tlsCa, String token) {
        return connect(addr, tlsCa, null, null, token);
    }

    /**
     * Connects with optional TLS, a client certificate for mutual TLS, and a bearer token.
     *
     * @param addr {@code unix:/abs/path} or {@code HOST:PORT}
     * @param tlsCa a PEM file of the CA that signed the daemon's certificate; null for plain
     *     text. The host of {@code addr} is the name checked against the certificate.
     * @param tlsCert a PEM file of the client certificate (chain) to present, for a daemon with
     *     {@code tls.client_ca}; null for none. Needs {@code tlsKey}; it turns TLS on too (without
     *     {@code tlsCa}, the server is checked against the JDK's default trust store).
     * @param tlsKey the PEM file of {@code tlsCert}'s private key (PKCS#8); null for none
     * @param token sent as {@code authorization: Bearer TOKEN} on every call; null for none
     * @throws TlsFileException if one of the files cannot be read or does not hold a PEM
     *     certificate (or a PEM private key)
     * @throws IllegalArgumentException if only one of {@code tlsCert} and {@code tlsKey} is given,
     *     or gRPC cannot make a channel for {@code addr}
     */
    public static GuardClient connect(String addr, Path tlsCa, Path tlsCert, Path tlsKey, String token) {
        if ((tlsCert == null) != (tlsKey == null)) {
            throw new IllegalArgumentException(tlsKey == null ? "tlsKey: required with tlsCert"
                    : "tlsCert: required with tlsKey");
        }
        ChannelCredentials credentials = InsecureChannelCredentials.create();
        if (tlsCa != null || tlsCert != null) {
            credentials = tls(tlsCa, tlsCert, tlsKey);
        }
        // grpc-java resolves "unix:/path" itself (epoll domain sockets of grpc-netty-shaded) and
        // "HOST:PORT" through DNS. Calls are fail-fast by default (no wait-for-ready).
        ManagedChannelBuilder<?> builder;
        try {
            builder = Grpc.newChannelBuilder(addr, credentials);
        } catch (ManagedChannelRegistry.ProviderNotFoundException e) {
            throw new IllegalArgumentException(e.getMessage(), e);
        }
        if (addr.startsWith("unix:") && builder instanceof NettyChannelBuilder netty) {
            // grpc-java sets SO_KEEPALIVE on every socket; a domain socket has none, and Netty
            // would log a warning on each connection.
            netty.withOption(ChannelOption.SO_KEEPALIVE, null);
        }
        return new GuardClient(addr, builder.build(), token);
    }

    /**
     * TLS trusting only the CA certificates in this PEM file (the default trust store without one),
     * presenting a client certificate if given.
     */
    private static ChannelCredentials tls(Path ca, Path cert, Path key) {
        // Checked here: gRPC would only fail later, with a message about its providers.
        var builder = TlsChannelCredentials.newBuilder();
        try {
            if (ca != null) {
                builder.trustManager(new ByteArrayInputStream(certificates("tlsCa", ca)));
            }
            if (cert != null) {
                byte[] certPem = certificates("tlsCert", cert);
                byte[] keyPem = read("tlsKey", key);
                if (!new String(keyPem, StandardCharsets.US_ASCII).contains("PRIVATE KEY-----")) {
                    throw new TlsFileException("tlsKey", key + " holds no PEM private key", null);
                }
                builder.keyManager(new ByteArrayInputStream(certPem), new ByteArrayInputStream(keyPem));
            }
        } catch (IOException e) {
            throw new TlsFileException("tlsCa", ca + " holds no PEM certificate", e);
        }
        return builder.build();
    }

    private static byte[] read(String parameter, Path file) {
        try {
            return Files.readAllBytes(file);
        } catch (IOException e) {
            throw new TlsFileException(parameter, "cannot read " + file + ": " + e.getMessage(), e);
        }
    }

    /** The file's bytes, if they hold at least one PEM certificate. */
    private static byte[] certificates(String parameter, Path file) {
        byte[] pem = read(parameter, file);
        try {
            if (!CertificateFactory.getInstance("X.509").generateCertificates(new ByteArrayInputStream(pem))
                    .isEmpty()) {
                return pem;
            }
        } catch (CertificateException e) {
            throw new TlsFileException(parameter, file + " holds no PEM certificate", e);
        }
        throw new TlsFileException(parameter, file + " holds no PEM certificate", null);
    }

    /** A client over a channel built elsewhere (tests use an in-process one). */
    static GuardClient over(String addr, ManagedChannel channel, String token) {
        return new GuardClient(addr, channel, token);
    }

    private static ClientInterceptor bearer(String token) {
        Metadata headers = new Metadata();
        headers.put(AUTHORIZATION, "Bearer " + token);
        return MetadataUtils.newAttachHeadersInterceptor(headers);
    }

    /** The address this client connects to. */
    public String addr() {
        return addr;
    }

    /** The served model, the policies a request may name, and the limits. */
    public Fse.Info info() {
        try {
            return blocking.getInfo(Fse.GetInfoRequest.getDefaultInstance());
        } catch (StatusRuntimeException e) {
            throw GuardException.from(e, addr);
        }
    }

    /** Starts a generation and returns its events as a blocking iterator. */
    public GenerationStream stream(Request request) {
        GenerationStream stream = new GenerationStream(addr);
        stream.call().start(async, request.toWire());
        return stream;
    }

    /** Starts a generation whose events go to {@code observer} on a gRPC thread. */
    public GenerationCall generate(Request request, GenerationObserver observer) {
        return new GenerationCall(addr, observer).start(async, request.toWire());
    }

    /** Closes the connection; running calls are cancelled. */
    @Override
    public void close() {
        channel.shutdownNow();
        try {
            channel.awaitTermination(5, TimeUnit.SECONDS);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
    }
}
