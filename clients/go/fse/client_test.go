package fse_test

import (
	"context"
	"crypto/x509"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"libfse/clients/go/fse"
	"libfse/clients/go/internal/fakeguard"
	pb "libfse/clients/go/internal/pb/fse/v1"
)

func dial(t *testing.T, script fakeguard.Script, opts ...fse.Option) (*fse.Client, *fakeguard.Server) {
	t.Helper()
	srv := &fakeguard.Server{Script: script}
	c, err := fse.NewClient(fakeguard.Serve(t, srv), opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c, srv
}

func TestGenerateTokensThenVerdict(t *testing.T) {
	c, srv := dial(t, fakeguard.Tokens(3), fse.WithToken("s3cret"))
	s, err := c.Generate(context.Background(), fse.Request{
		Prompt: "hi", MaxTokens: 3, Policy: "default", Stop: []string{"x"},
		Sampling: fse.Sampling{Temperature: new(0.0), Seed: new(uint32(7))},
		Timeout:  1500 * time.Microsecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := s.Started(); got.Policy != "default" || got.Model != "fake" {
		t.Errorf("Started() = %+v", got)
	}
	var text string
	for tok := range s.Tokens() {
		text += tok.Text
		if tok.Health != fse.HealthGreen || tok.L2Norm != 2574.2 || tok.Entropy != 2.5 {
			t.Errorf("token %+v", tok)
		}
	}
	v, err := s.Verdict()
	if err != nil || v.Status != fse.StatusCompleted || v.Tokens != 3 || v.Text != text ||
		v.Completion != fse.CompletionMaxTokens {
		t.Fatalf("Verdict() = %+v, %v; text %q", v, err, text)
	}

	start, md := srv.Last()
	if got := md.Get("authorization"); len(got) != 1 || got[0] != "Bearer s3cret" {
		t.Errorf("authorization metadata = %q", got)
	}
	sp := start.GetSampling()
	if start.GetTimeoutMs() != 2 || sp.Temperature == nil || *sp.Temperature != 0 ||
		sp.TopK != nil || sp.GetSeed() != 7 || start.GetStop()[0] != "x" {
		t.Errorf("start message = %v", start)
	}
}

func TestCancelEndsWithCancelledVerdict(t *testing.T) {
	c, _ := dial(t, fakeguard.UntilCancel(1))
	s, err := c.Generate(context.Background(), fse.Request{Prompt: "hi", MaxTokens: 100})
	if err != nil {
		t.Fatal(err)
	}
	for range s.Tokens() {
		s.Cancel()
		s.Cancel() // a second cancel is harmless
	}
	v, err := s.Verdict()
	if err != nil || v.Status != fse.StatusCancelled || v.Tokens != 1 {
		t.Fatalf("Verdict() = %+v, %v", v, err)
	}
}

func TestBreakingOutOfTokensStillGivesTheVerdict(t *testing.T) {
	c, _ := dial(t, fakeguard.Tokens(5))
	s, err := c.Generate(context.Background(), fse.Request{Prompt: "hi", MaxTokens: 5})
	if err != nil {
		t.Fatal(err)
	}
	for range s.Tokens() {
		break
	}
	if v, err := s.Verdict(); err != nil || v.Status != fse.StatusCompleted || v.Tokens != 5 {
		t.Fatalf("Verdict() = %+v, %v", v, err)
	}
}

func TestRefusalIsAnErrorFromGenerate(t *testing.T) {
	c, _ := dial(t, func(context.Context, *pb.GenerateRequest, <-chan struct{},
		func(*pb.GenerateServerMessage) error) error {
		return status.Error(codes.InvalidArgument, "max_tokens: 0 is out of range; accepted: 1..2047")
	})
	_, err := c.Generate(context.Background(), fse.Request{Prompt: "hi"})
	var e *fse.Error
	if !errors.As(err, &e) || e.Code != codes.InvalidArgument ||
		e.Message != "max_tokens: 0 is out of range; accepted: 1..2047" {
		t.Fatalf("err = %#v", err)
	}
	if !errors.Is(err, fse.ErrInvalidArgument) || errors.Is(err, fse.ErrUnavailable) {
		t.Errorf("errors.Is does not match the code: %v", err)
	}
	if err.Error() != "INVALID_ARGUMENT: max_tokens: 0 is out of range; accepted: 1..2047" {
		t.Errorf("Error() = %q", err)
	}
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("status.Code = %v", status.Code(err))
	}
}

func TestErrorVerdictIsTheVerdictNotTheInternalStatus(t *testing.T) {
	c, _ := dial(t, func(_ context.Context, _ *pb.GenerateRequest, _ <-chan struct{},
		send func(*pb.GenerateServerMessage) error) error {
		_ = send(fakeguard.Started(0))
		_ = send(fakeguard.Verdict(&pb.Verdict{Status: pb.Status_STATUS_ERROR, Message: "boom"}))
		return status.Error(codes.Internal, "boom")
	})
	s, err := c.Generate(context.Background(), fse.Request{Prompt: "hi", MaxTokens: 1})
	if err != nil {
		t.Fatal(err)
	}
	if v, err := s.Verdict(); err != nil || v.Status != fse.StatusError || v.Message != "boom" {
		t.Fatalf("Verdict() = %+v, %v", v, err)
	}
}

func TestUnknownStatusIsNeverCompleted(t *testing.T) {
	c, _ := dial(t, func(_ context.Context, _ *pb.GenerateRequest, _ <-chan struct{},
		send func(*pb.GenerateServerMessage) error) error {
		_ = send(fakeguard.Started(0))
		return send(fakeguard.Verdict(&pb.Verdict{Status: pb.Status(99)}))
	})
	s, err := c.Generate(context.Background(), fse.Request{Prompt: "hi", MaxTokens: 1})
	if err != nil {
		t.Fatal(err)
	}
	if v, err := s.Verdict(); err != nil || v.Status != fse.StatusError {
		t.Fatalf("Verdict() = %+v, %v", v, err)
	}
}

// Every reason a completed stream gives arrives; an unknown one is unspecified.
func TestCompletionFromTheWire(t *testing.T) {
	for wire, want := range map[pb.Completion]fse.Completion{
		pb.Completion_COMPLETION_END_OF_GENERATION: fse.CompletionEndOfGeneration,
		pb.Completion_COMPLETION_STOP_SEQUENCE:     fse.CompletionStopSequence,
		pb.Completion_COMPLETION_MAX_TOKENS:        fse.CompletionMaxTokens,
		pb.Completion_COMPLETION_UNSPECIFIED:       fse.CompletionUnspecified,
		pb.Completion(99):                          fse.CompletionUnspecified,
	} {
		c, _ := dial(t, func(_ context.Context, _ *pb.GenerateRequest, _ <-chan struct{},
			send func(*pb.GenerateServerMessage) error) error {
			_ = send(fakeguard.Started(0))
			return send(fakeguard.Verdict(&pb.Verdict{Status: pb.Status_STATUS_COMPLETED, Completion: wire}))
		})
		s, err := c.Generate(context.Background(), fse.Request{Prompt: "hi", MaxTokens: 1})
		if err != nil {
			t.Fatal(err)
		}
		if v, err := s.Verdict(); err != nil || v.Status != fse.StatusCompleted || v.Completion != want {
			t.Errorf("%v: Verdict() = %+v, %v", wire, v, err)
		}
	}
	if fse.CompletionStopSequence.String() != "stop_sequence" || fse.Completion(42).String() != "unspecified" {
		t.Error("Completion names")
	}
}

func TestStreamWithoutVerdictIsAnError(t *testing.T) {
	c, _ := dial(t, func(_ context.Context, _ *pb.GenerateRequest, _ <-chan struct{},
		send func(*pb.GenerateServerMessage) error) error {
		_ = send(fakeguard.Started(0))
		return send(fakeguard.Token(0, "a"))
	})
	s, err := c.Generate(context.Background(), fse.Request{Prompt: "hi", MaxTokens: 2})
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for range s.Tokens() {
		n++
	}
	var e *fse.Error
	if _, err := s.Verdict(); n != 1 || !errors.As(err, &e) || e.Code != codes.Unknown ||
		!strings.HasSuffix(e.Message, " ended the stream without a verdict") {
		t.Fatalf("%d tokens, Verdict() error %v", n, err)
	}
}

func TestContextDeadlineEndsTheCallWithAnError(t *testing.T) {
	c, _ := dial(t, fakeguard.UntilCancel(1))
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	s, err := c.Generate(ctx, fse.Request{Prompt: "hi", MaxTokens: 100})
	if err != nil {
		t.Fatal(err)
	}
	_, err = s.Verdict()
	if !errors.Is(err, fse.ErrDeadlineExceeded) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Verdict() error %v", err)
	}
}

func TestUnreachableDaemonIsUnavailableAtOnce(t *testing.T) {
	c, err := fse.NewClient("unix:/nonexistent/fse.sock")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	begin := time.Now()
	_, err = c.Generate(context.Background(), fse.Request{Prompt: "hi", MaxTokens: 1})
	if !errors.Is(err, fse.ErrUnavailable) {
		t.Fatalf("err = %v", err)
	}
	if _, err := c.Info(context.Background()); !errors.Is(err, fse.ErrUnavailable) {
		t.Fatalf("Info err = %v", err)
	}
	if d := time.Since(begin); d > 5*time.Second {
		t.Errorf("took %v: calls must fail fast", d)
	}
}

func TestInfo(t *testing.T) {
	srv := &fakeguard.Server{Info: &pb.Info{
		Version: "0.1.0",
		Model: &pb.ModelInfo{Name: "m", SizeBytes: 1 << 40, ChatTemplate: true, Backend: "CUDA", Layers: 18,
			GpuLayers: 18, Devices: []*pb.Device{
				{Name: "CUDA0", Description: "H100", Kind: "gpu", MemoryBytes: 1 << 36, Layers: 18},
				{Name: "CPU", Description: "Xeon", Kind: "cpu", MemoryBytes: 1 << 35},
			}},
		Policies: []*pb.PolicyInfo{{Name: "default", Builtin: true}},
		Limits:   &pb.Limits{MaxTokens: 2047},
	}}
	c, err := fse.NewClient(fakeguard.Serve(t, srv))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	info, err := c.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if info.Version != "0.1.0" || info.Model.SizeBytes != 1<<40 || !info.Model.ChatTemplate ||
		len(info.Policies) != 1 || !info.Policies[0].Builtin || info.Limits.MaxTokens != 2047 {
		t.Errorf("Info() = %+v", info)
	}
	want := []fse.Device{
		{Name: "CUDA0", Description: "H100", Kind: "gpu", MemoryBytes: 1 << 36, Layers: 18},
		{Name: "CPU", Description: "Xeon", Kind: "cpu", MemoryBytes: 1 << 35},
	}
	m := info.Model
	if m.Backend != "CUDA" || m.Layers != 18 || m.GPULayers != 18 || !reflect.DeepEqual(m.Devices, want) {
		t.Errorf("Info().Model = %+v", m)
	}
}

func TestTimeoutRounding(t *testing.T) {
	c, srv := dial(t, fakeguard.Tokens(1))
	for _, tc := range []struct {
		d    time.Duration
		want uint32
	}{
		{0, 0}, {time.Microsecond, 1}, {2500 * time.Microsecond, 2}, {3500 * time.Microsecond, 4},
		{1500 * time.Millisecond, 1500},
	} {
		s, err := c.Generate(context.Background(), fse.Request{Prompt: "hi", MaxTokens: 1, Timeout: tc.d})
		if err != nil {
			t.Fatal(err)
		}
		_, _ = s.Verdict()
		if start, _ := srv.Last(); start.GetTimeoutMs() != tc.want {
			t.Errorf("Timeout %v: timeout_ms %d, want %d", tc.d, start.GetTimeoutMs(), tc.want)
		}
	}
	_, err := c.Generate(context.Background(), fse.Request{Prompt: "hi", Timeout: -time.Second})
	if !errors.Is(err, fse.ErrInvalidArgument) {
		t.Errorf("negative timeout: %v", err)
	}
}

func TestStatusAndHealthNames(t *testing.T) {
	var zero fse.Verdict
	if zero.Status != fse.StatusError {
		t.Error("the zero Verdict must not be a success")
	}
	for s, want := range map[fse.Status]string{
		fse.StatusCompleted: "completed", fse.StatusHalted: "halted",
		fse.StatusCancelled: "cancelled", fse.StatusError: "error", fse.Status(42): "error",
	} {
		if s.String() != want {
			t.Errorf("%d.String() = %q", s, s.String())
		}
	}
	if fse.HealthYellow.String() != "yellow" || fse.HealthUnspecified.String() != "unspecified" {
		t.Error("Health names")
	}
	if fse.CodeName(codes.Unauthenticated) != "UNAUTHENTICATED" || fse.CodeName(codes.Code(99)) != "UNKNOWN" {
		t.Error("CodeName")
	}
}

func TestTLSChecksTheHostOfTheAddress(t *testing.T) {
	cfg, caPEM := fakeguard.Certificates(t)
	srv := &fakeguard.Server{Script: fakeguard.Tokens(1)}
	port := fakeguard.ServeTLS(t, srv, cfg)
	ca := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(ca, caPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, host := range []string{"127.0.0.1", "localhost"} {
		c, err := fse.NewClient(host+":"+port, fse.WithCAFile(ca), fse.WithToken("tok"))
		if err != nil {
			t.Fatal(err)
		}
		s, err := c.Generate(context.Background(), fse.Request{Prompt: "hi", MaxTokens: 1})
		if err != nil {
			t.Fatalf("%s: %v", host, err)
		}
		if v, err := s.Verdict(); err != nil || v.Status != fse.StatusCompleted {
			t.Errorf("%s: %+v, %v", host, v, err)
		}
		_ = c.Close()
	}
	if _, md := srv.Last(); md.Get("authorization")[0] != "Bearer tok" {
		t.Errorf("metadata %v", md)
	}

	// Another CA's certificate, or plain TCP to a TLS port: Unavailable, not a hang.
	_, otherPEM := fakeguard.Certificates(t)
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(otherPEM)
	for _, opts := range [][]fse.Option{{fse.WithRootCAs(pool)}, nil} {
		c, err := fse.NewClient("127.0.0.1:"+port, opts...)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Info(context.Background()); !errors.Is(err, fse.ErrUnavailable) {
			t.Errorf("untrusted server: %v", err)
		}
		_ = c.Close()
	}
	if _, err := fse.NewClient("127.0.0.1:"+port, fse.WithCAFile(filepath.Join(t.TempDir(), "none"))); err == nil {
		t.Error("a missing CA file is an error")
	}
}

func TestMutualTLSPresentsTheClientCertificate(t *testing.T) {
	cfg, caPEM, certPEM, keyPEM := fakeguard.MutualCertificates(t)
	port := fakeguard.ServeTLS(t, &fakeguard.Server{Script: fakeguard.Tokens(1)}, cfg)
	dir := t.TempDir()
	ca, cert, key := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	for path, data := range map[string][]byte{ca: caPEM, cert: certPEM, key: keyPEM} {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	c, err := fse.NewClient("localhost:"+port, fse.WithClientCertFiles(cert, key), fse.WithCAFile(ca))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = c.Close() }()
	s, err := c.Generate(context.Background(), fse.Request{Prompt: "hi", MaxTokens: 1})
	if err != nil {
		t.Fatal(err)
	}
	if v, err := s.Verdict(); err != nil || v.Status != fse.StatusCompleted {
		t.Fatalf("Verdict() = %+v, %v", v, err)
	}

	// Without a certificate the handshake fails: Unavailable, not a hang.
	anonymous, err := fse.NewClient("localhost:"+port, fse.WithCAFile(ca))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = anonymous.Close() }()
	if _, err := anonymous.Info(context.Background()); !errors.Is(err, fse.ErrUnavailable) {
		t.Errorf("without a client certificate: %v", err)
	}
	if _, err := fse.NewClient("localhost:"+port, fse.WithClientCertFiles(cert, ca)); err == nil {
		t.Error("a key file without the certificate's key is an error")
	}
}
