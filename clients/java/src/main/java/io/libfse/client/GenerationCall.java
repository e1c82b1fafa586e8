package io.libfse.client;

import fse.v1.Fse;
import fse.v1.GuardGrpc;
import io.grpc.Status;
import io.grpc.stub.ClientCallStreamObserver;
import io.grpc.stub.ClientResponseObserver;
import io.grpc.stub.StreamObserver;

/**
 * One running generation (the handle the asynchronous API returns). {@link #cancel()} asks the
 * daemon to stop within one decode step and still delivers the {@code CANCELLED} verdict;
 * {@link #abort()} drops the call at once, without a verdict.
 */
public final class GenerationCall {
    private static final Fse.GenerateClientMessage CANCEL = Fse.GenerateClientMessage.newBuilder()
            .setCancel(Fse.Cancel.getDefaultInstance()).build();

    private final Object lock = new Object();
    private final String addr;
    private final GenerationObserver observer;
    private ClientCallStreamObserver<Fse.GenerateClientMessage> requests; // guarded by lock
    private boolean open = true; // the request side is still open; guarded by lock
    private boolean done; // the observer has had its last event; guarded by lock

    GenerationCall(String addr, GenerationObserver observer) {
        this.addr = addr;
        this.observer = observer;
    }

    /** Sends a Cancel message; the stream still ends with a verdict (normally CANCELLED). */
    public void cancel() {
        synchronized (lock) {
            if (open && requests != null) {
                requests.onNext(CANCEL);
            }
        }
    }

    /**
     * Cancels the RPC itself (gRPC's ClientCall.cancel): the daemon sees the client go away and
     * the observer gets {@code onError(CANCELLED)} unless the verdict came first.
     */
    public void abort() {
        synchronized (lock) {
            if (requests != null && !done) {
                open = false;
                requests.cancel("aborted by the client", null);
            }
        }
    }

    /** Starts the call: the first message is the request; the request side stays open for cancel. */
    GenerationCall start(GuardGrpc.GuardStub stub, Fse.GenerateRequest request) {
        StreamObserver<Fse.GenerateClientMessage> stream = stub.generate(responses());
        synchronized (lock) {
            if (open) {
                stream.onNext(Fse.GenerateClientMessage.newBuilder().setStart(request).build());
            }
        }
        return this;
    }

    private ClientResponseObserver<Fse.GenerateClientMessage, Fse.GenerateServerMessage> responses() {
        return new ClientResponseObserver<>() {
            @Override
            public void beforeStart(ClientCallStreamObserver<Fse.GenerateClientMessage> stream) {
                synchronized (lock) {
                    requests = stream;
                }
            }

            @Override
            public void onNext(Fse.GenerateServerMessage message) {
                switch (message.getKindCase()) {
                    case STARTED -> deliver(() -> observer.onStarted(Started.fromWire(message.getStarted())));
                    case TOKEN -> deliver(() -> observer.onToken(TokenEvent.fromWire(message.getToken())));
                    case VERDICT -> {
                        if (finish()) {
                            observer.onVerdict(Verdict.fromWire(message.getVerdict()));
                        }
                    }
                    default -> { } // a kind this client does not know yet: skipped
                }
            }

            @Override
            public void onError(Throwable error) {
                if (finish()) {
                    observer.onError(GuardException.from(error, addr));
                }
            }

            @Override
            public void onCompleted() {
                if (finish()) {
                    observer.onError(new GuardException(Status.Code.UNKNOWN,
                            "the daemon at " + addr + " ended the stream without a verdict"));
                }
            }
        };
    }

    private void deliver(Runnable event) {
        synchronized (lock) {
            if (done) {
                return;
            }
        }
        event.run();
    }

    /** Marks the last event; closes the request side. False when it was already delivered. */
    private boolean finish() {
        synchronized (lock) {
            if (done) {
                return false;
            }
            done = true;
            if (open && requests != null) {
                open = false;
                requests.onCompleted();
            }
            return true;
        }
    }
}
