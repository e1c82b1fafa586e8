// Package fakeguard is an in-process fse.v1.Guard server for the unit tests: it
// plays scripted streams so the client's handling of every outcome (cancel,
// errors, odd servers) is tested without the daemon and its model.
package fakeguard

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"

	pb "libfse/clients/go/internal/pb/fse/v1"
)

// Script plays one stream after its start message: send what the test wants, and
// return a status error to end the RPC with it. cancelled closes when the client
// sends Cancel.
type Script func(ctx context.Context, start *pb.GenerateRequest, cancelled <-chan struct{},
	send func(*pb.GenerateServerMessage) error) error

// Server is the fake daemon.
type Server struct {
	pb.UnimplementedGuardServer
	Script Script
	Info   *pb.Info

	mu        sync.Mutex
	lastStart *pb.GenerateRequest
	lastMD    metadata.MD
}

// Last returns the start message and the metadata of the latest call.
func (s *Server) Last() (*pb.GenerateRequest, metadata.MD) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastStart, s.lastMD
}

func (s *Server) record(ctx context.Context, start *pb.GenerateRequest) {
	md, _ := metadata.FromIncomingContext(ctx)
	s.mu.Lock()
	s.lastStart, s.lastMD = start, md
	s.mu.Unlock()
}

// Generate reads the start message, watches for Cancel, and plays the script.
func (s *Server) Generate(stream grpc.BidiStreamingServer[pb.GenerateClientMessage, pb.GenerateServerMessage]) error {
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	s.record(stream.Context(), first.GetStart())
	cancelled := make(chan struct{})
	go func() {
		for {
			msg, err := stream.Recv()
			if err != nil {
				return
			}
			if msg.GetCancel() != nil {
				close(cancelled)
				return
			}
		}
	}()
	return s.Script(stream.Context(), first.GetStart(), cancelled, stream.Send)
}

// GetInfo returns s.Info.
func (s *Server) GetInfo(ctx context.Context, _ *pb.GetInfoRequest) (*pb.Info, error) {
	s.record(ctx, nil)
	return s.Info, nil
}

// Serve starts s on a fresh unix socket and returns its "unix:PATH" address; the
// server stops when the test ends.
func Serve(t testing.TB, s *Server) string {
	t.Helper()
	// Not t.TempDir(): a socket path must fit in 108 bytes.
	dir, err := os.MkdirTemp("", "fseg")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	path := filepath.Join(dir, "s.sock")
	lis, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	serve(t, s, lis)
	return "unix:" + path
}

// ServeTLS starts s on 127.0.0.1 with TLS and returns its port.
func ServeTLS(t testing.TB, s *Server, cfg *tls.Config) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	serve(t, s, lis, grpc.Creds(credentials.NewTLS(cfg)))
	_, port, _ := net.SplitHostPort(lis.Addr().String())
	return port
}

func serve(t testing.TB, s *Server, lis net.Listener, opts ...grpc.ServerOption) {
	srv := grpc.NewServer(opts...)
	pb.RegisterGuardServer(srv, s)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
}

// Started is a Started message for the default policy.
func Started(seed uint32) *pb.GenerateServerMessage {
	return &pb.GenerateServerMessage{Kind: &pb.GenerateServerMessage_Started{Started: &pb.Started{
		Policy: "default", PolicySha256: PolicySHA256, PromptTokens: 5, Seed: seed, Model: "fake",
	}}}
}

// PolicySHA256 is the fake default policy's hash.
const PolicySHA256 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

// Token is a green token with fixed metrics.
func Token(index uint32, text string) *pb.GenerateServerMessage {
	return &pb.GenerateServerMessage{Kind: &pb.GenerateServerMessage_Token{Token: &pb.Token{
		Index: index, Id: int32(100 + index), Piece: []byte(text), Text: text,
		Nll: 0.1, Ppl: 1.1, PplCumulative: 1.2, Variance: 19.7, MaxProb: 0.84, L2Norm: 2574.2,
		Entropy: 2.5, Health: pb.Health_HEALTH_GREEN,
	}}}
}

// Verdict wraps v, filling in the default policy.
func Verdict(v *pb.Verdict) *pb.GenerateServerMessage {
	if v.Policy == "" {
		v.Policy, v.PolicySha256 = "default", PolicySHA256
	}
	return &pb.GenerateServerMessage{Kind: &pb.GenerateServerMessage_Verdict{Verdict: v}}
}

// Tokens is the usual script: Started, n tokens " t0", " t1", ..., and a
// verdict completed at max_tokens.
func Tokens(n uint32) Script {
	return func(_ context.Context, _ *pb.GenerateRequest, _ <-chan struct{},
		send func(*pb.GenerateServerMessage) error) error {
		if err := send(Started(0)); err != nil {
			return err
		}
		text, err := sendTokens(n, send)
		if err != nil {
			return err
		}
		return send(Verdict(&pb.Verdict{
			Status: pb.Status_STATUS_COMPLETED, Completion: pb.Completion_COMPLETION_MAX_TOKENS,
			Tokens: n, Text: text,
		}))
	}
}

// UntilCancel sends Started and n tokens, then waits for the client: a Cancel
// gets a cancelled verdict, the end of the call gets nothing.
func UntilCancel(n uint32) Script {
	return func(ctx context.Context, _ *pb.GenerateRequest, cancelled <-chan struct{},
		send func(*pb.GenerateServerMessage) error) error {
		if err := send(Started(0)); err != nil {
			return err
		}
		text, err := sendTokens(n, send)
		if err != nil {
			return err
		}
		select {
		case <-cancelled:
			return send(Verdict(&pb.Verdict{Status: pb.Status_STATUS_CANCELLED, Tokens: n, Text: text}))
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func sendTokens(n uint32, send func(*pb.GenerateServerMessage) error) (string, error) {
	text := ""
	for i := range n {
		piece := fmt.Sprintf(" t%d", i)
		text += piece
		if err := send(Token(i, piece)); err != nil {
			return "", err
		}
	}
	return text, nil
}
