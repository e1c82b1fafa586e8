// Package fse is a client of libfse's guard daemon (gRPC service fse.v1.Guard):
// guarded token streams from a local model, where every token is released only
// after the policy's guards passed it, and every stream ends in a [Verdict].
//
//	c, err := fse.NewClient("unix:/run/fse.sock")
//	...
//	defer c.Close()
//	s, err := c.Generate(ctx, fse.Request{Prompt: "The capital of France is", MaxTokens: 32})
//	...
//	for tok := range s.Tokens() {
//		fmt.Print(tok.Text)
//	}
//	v, err := s.Verdict()
//
// Calls fail fast: an unreachable daemon is an [Error] with code Unavailable at
// once, never a wait. Every failure is an *[Error]; a halt is a verdict.
package fse

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"iter"
	"net"
	"os"
	"strings"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	pb "libfse/clients/go/internal/pb/fse/v1"
)

// Client is a connection to the daemon, safe for concurrent use. It connects on
// the first call and reconnects as needed.
type Client struct {
	addr string
	conn *grpc.ClientConn
	stub pb.GuardClient
}

type config struct {
	tls      *tls.Config
	certs    []tls.Certificate // client certificates, for mutual TLS
	token    string
	dialOpts []grpc.DialOption
}

// Option configures [NewClient].
type Option func(*config) error

// WithRootCAs turns on TLS: the server's certificate is checked against pool,
// for the host of the address (localhost for a unix socket).
func WithRootCAs(pool *x509.CertPool) Option {
	return func(c *config) error {
		c.tls = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
		return nil
	}
}

// WithCAFile is [WithRootCAs] with the PEM certificates of a file.
func WithCAFile(path string) Option {
	return func(c *config) error {
		pem, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return fmt.Errorf("%s: no PEM certificate", path)
		}
		return WithRootCAs(pool)(c)
	}
}

// WithTLSConfig turns on TLS with a config of the caller's (client certificates,
// another server name).
func WithTLSConfig(cfg *tls.Config) Option {
	return func(c *config) error {
		c.tls = cfg
		return nil
	}
}

// WithClientCertificate presents cert (with its private key) to the server: mutual TLS,
// for a daemon with tls.client_ca. It turns on TLS too; without [WithRootCAs],
// [WithCAFile] or [WithTLSConfig] the server is checked against the system's roots.
func WithClientCertificate(cert tls.Certificate) Option {
	return func(c *config) error {
		c.certs = append(c.certs, cert)
		return nil
	}
}

// WithClientCertFiles is [WithClientCertificate] with a PEM certificate (chain) file
// and the PEM file of its private key.
func WithClientCertFiles(certFile, keyFile string) Option {
	return func(c *config) error {
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return err
		}
		return WithClientCertificate(cert)(c)
	}
}

// WithToken sends "authorization: Bearer TOKEN" metadata on every call.
func WithToken(token string) Option {
	return func(c *config) error {
		c.token = token
		return nil
	}
}

// WithDialOptions passes options to grpc.NewClient (interceptors, keepalive...).
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(c *config) error {
		c.dialOpts = append(c.dialOpts, opts...)
		return nil
	}
}

// NewClient prepares a client of the daemon at addr: "unix:/abs/path" for a unix
// socket or "HOST:PORT" for TCP. It does not connect: the first call does.
func NewClient(addr string, opts ...Option) (*Client, error) {
	var cfg config
	for _, opt := range opts {
		if err := opt(&cfg); err != nil {
			return nil, err
		}
	}
	creds := insecure.NewCredentials()
	if cfg.tls == nil && len(cfg.certs) > 0 {
		cfg.tls = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	if cfg.tls != nil {
		tc := cfg.tls.Clone()
		if tc.ServerName == "" {
			tc.ServerName = serverName(addr)
		}
		tc.Certificates = append(tc.Certificates, cfg.certs...)
		creds = credentials.NewTLS(tc)
	}
	dialOpts := []grpc.DialOption{grpc.WithTransportCredentials(creds)}
	if cfg.token != "" {
		dialOpts = append(dialOpts, grpc.WithPerRPCCredentials(bearer(cfg.token)))
	}
	conn, err := grpc.NewClient(addr, append(dialOpts, cfg.dialOpts...)...)
	if err != nil {
		return nil, err
	}
	return &Client{addr: addr, conn: conn, stub: pb.NewGuardClient(conn)}, nil
}

// serverName is the name a TLS certificate is checked for: the host of HOST:PORT.
func serverName(addr string) string {
	if strings.HasPrefix(addr, "unix:") {
		return "localhost"
	}
	if host, _, err := net.SplitHostPort(addr); err == nil {
		return host
	}
	return addr
}

// bearer is a token sent with every call, over TLS or not: a unix socket is
// local, and the daemon decides what it accepts.
type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

func (bearer) RequireTransportSecurity() bool { return false }

// Close closes the connection; streams still open fail.
func (c *Client) Close() error { return c.conn.Close() }

// Info returns the served model, the policies a request may name, and the limits.
func (c *Client) Info(ctx context.Context) (*Info, error) {
	info, err := c.stub.GetInfo(ctx, &pb.GetInfoRequest{})
	if err != nil {
		return nil, fromRPC(ctx, c.addr, err)
	}
	return infoFromWire(info), nil
}

// Generate starts a generation and returns once the daemon admitted it (its
// Started message), or with the *Error that refused it (InvalidArgument naming a
// field, ResourceExhausted when overloaded, Unavailable, ...).
//
// Ending ctx aborts the RPC: the result is an error, not a verdict. To stop a
// generation and still get its verdict, use [Stream.Cancel].
func (c *Client) Generate(ctx context.Context, req Request) (*Stream, error) {
	start, err := requestToWire(req)
	if err != nil {
		return nil, err
	}
	ctx, abort := context.WithCancel(ctx)
	rpc, err := c.stub.Generate(ctx)
	if err != nil {
		abort()
		return nil, fromRPC(ctx, c.addr, err)
	}
	s := &Stream{ctx: ctx, addr: c.addr, abort: abort, rpc: rpc}
	// A failed Send says only io.EOF; the reason is the status that Recv returns.
	_ = rpc.Send(start)
	first, err := rpc.Recv()
	if err != nil {
		abort()
		return nil, fromRPC(ctx, c.addr, err)
	}
	if st := first.GetStarted(); st != nil {
		s.started = startedFromWire(st)
	} else {
		s.pending = first // not the protocol's order, but still the server's word
	}
	return s, nil
}

// Stream is one generation in progress. Read it from one goroutine: range over
// [Stream.Tokens], then call [Stream.Verdict]. [Stream.Cancel] may be called from
// any goroutine.
type Stream struct {
	ctx     context.Context
	addr    string
	abort   context.CancelFunc
	rpc     grpc.BidiStreamingClient[pb.GenerateClientMessage, pb.GenerateServerMessage]
	started Started
	pending *pb.GenerateServerMessage // a message received before Tokens ran

	sendMu    sync.Mutex
	cancelled bool

	done    bool
	verdict Verdict
	err     error
}

// Started is the daemon's admission of the request: resolved policy, seed, model.
func (s *Stream) Started() Started { return s.started }

// Tokens iterates the released tokens until the stream ends. Breaking out early
// is fine: [Stream.Verdict] reads (and drops) the rest.
func (s *Stream) Tokens() iter.Seq[Token] {
	return func(yield func(Token) bool) {
		for !s.done {
			msg, err := s.recv()
			if err != nil {
				s.finish(Verdict{}, fromRPC(s.ctx, s.addr, err))
				return
			}
			switch kind := msg.GetKind().(type) {
			case *pb.GenerateServerMessage_Token:
				if !yield(tokenFromWire(kind.Token)) {
					return
				}
			case *pb.GenerateServerMessage_Verdict:
				s.finish(verdictFromWire(kind.Verdict), nil)
			}
		}
	}
}

func (s *Stream) recv() (*pb.GenerateServerMessage, error) {
	if msg := s.pending; msg != nil {
		s.pending = nil
		return msg, nil
	}
	return s.rpc.Recv()
}

// finish records the outcome and releases the RPC. After a verdict the server
// closes the stream at once (with Internal after an error verdict, which the
// verdict already says): reading that status lets the RPC end cleanly.
func (s *Stream) finish(v Verdict, err error) {
	s.done, s.verdict, s.err = true, v, err
	if err == nil {
		for {
			if _, rerr := s.rpc.Recv(); rerr != nil {
				break
			}
		}
	}
	s.abort()
}

// Verdict waits for the end of the stream and returns the daemon's verdict, or
// the *Error that ended the stream without one. Tokens not yet read are dropped.
func (s *Stream) Verdict() (Verdict, error) {
	for range s.Tokens() {
	}
	return s.verdict, s.err
}

// Cancel asks the daemon to stop the generation within one decode step; the
// stream then ends with a StatusCancelled verdict (or another, if the stream was
// already ending). Calling it again, or after the end, does nothing.
func (s *Stream) Cancel() {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	if s.cancelled {
		return
	}
	s.cancelled = true
	msg := &pb.GenerateClientMessage{Kind: &pb.GenerateClientMessage_Cancel{Cancel: &pb.Cancel{}}}
	// A failed Send means the stream already ended: its verdict or error is
	// what the reader gets.
	_ = s.rpc.Send(msg)
}

// Close aborts the stream if it is still running. It need not be called once
// Verdict returned.
func (s *Stream) Close() { s.abort() }
