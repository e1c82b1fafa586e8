package io.libfse.client;

import io.grpc.Status;
import java.util.Iterator;
import java.util.NoSuchElementException;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.LinkedBlockingQueue;

/**
 * A generation as a blocking iterator of events (Started, tokens, then the Verdict, after which
 * {@link #hasNext()} is false). A gRPC failure is thrown as {@link GuardException} from
 * {@link #hasNext()}/{@link #next()}. Close it to drop a generation you stop reading.
 *
 * <pre>{@code
 * try (GenerationStream stream = client.stream(request)) {
 *     for (Event event : stream) { ... }
 * }
 * }</pre>
 */
public final class GenerationStream implements Iterator<Event>, Iterable<Event>, AutoCloseable {
    private final BlockingQueue<Object> queue = new LinkedBlockingQueue<>();
    private final GenerationCall call;
    private Object next; // the event or GuardException taken from the queue, not yet returned
    private boolean finished; // the verdict or the error was returned

    GenerationStream(String addr) {
        // Events go from the gRPC thread into an unbounded queue: a stream is at most
        // max_tokens events, so there is no need for flow control here.
        this.call = new GenerationCall(addr, new GenerationObserver() {
            @Override
            public void onStarted(Started started) {
                queue.add(started);
            }

            @Override
            public void onToken(TokenEvent token) {
                queue.add(token);
            }

            @Override
            public void onVerdict(Verdict verdict) {
                queue.add(verdict);
            }

            @Override
            public void onError(GuardException error) {
                queue.add(error);
            }
        });
    }

    GenerationCall call() {
        return call;
    }

    /** Asks the daemon to stop; keep reading for the verdict (normally CANCELLED). */
    public void cancel() {
        call.cancel();
    }

    /** Drops the call at once (no verdict follows). */
    public void abort() {
        call.abort();
    }

    @Override
    public boolean hasNext() {
        if (next == null && !finished) {
            try {
                next = queue.take();
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
                call.abort();
                finished = true;
                throw new GuardException(Status.Code.CANCELLED, "interrupted");
            }
        }
        if (next instanceof GuardException error) {
            next = null;
            finished = true;
            throw error;
        }
        return next != null;
    }

    @Override
    public Event next() {
        if (!hasNext()) {
            throw new NoSuchElementException("the stream has ended");
        }
        Event event = (Event) next;
        next = null;
        if (event instanceof Verdict) {
            finished = true;
        }
        return event;
    }

    @Override
    public Iterator<Event> iterator() {
        return this;
    }

    /** Reads the rest of the stream and returns its verdict. */
    public Verdict verdict() {
        while (hasNext()) {
            if (next() instanceof Verdict verdict) {
                return verdict;
            }
        }
        throw new IllegalStateException("the verdict was already read");
    }

    /** Aborts the call if the verdict has not been read. */
    @Override
    public void close() {
        if (!finished) {
            call.abort();
        }
    }
}
