package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"libfse/clients/go/internal/fakeguard"
	pb "libfse/clients/go/internal/pb/fse/v1"
)

// runWith runs the program against a fake daemon playing script.
func runWith(t *testing.T, script fakeguard.Script, args ...string) (code int, stdout, stderr string, srv *fakeguard.Server) {
	t.Helper()
	srv = &fakeguard.Server{Script: script, Info: &pb.Info{Version: "0.1.0", Model: &pb.ModelInfo{Name: "m"}}}
	addr := fakeguard.Serve(t, srv)
	var out, errOut bytes.Buffer
	code = run(append([]string{"--addr", addr}, args...), &out, &errOut)
	return code, out.String(), errOut.String(), srv
}

func refuse(code codes.Code, msg string) fakeguard.Script {
	return func(context.Context, *pb.GenerateRequest, <-chan struct{}, func(*pb.GenerateServerMessage) error) error {
		return status.Error(code, msg)
	}
}

func lines(t *testing.T, out string) []map[string]any {
	t.Helper()
	var docs []map[string]any
	for _, line := range strings.Split(strings.TrimSuffix(out, "\n"), "\n") {
		var doc map[string]any
		if err := json.Unmarshal([]byte(line), &doc); err != nil {
			t.Fatalf("not JSON: %q", line)
		}
		docs = append(docs, doc)
	}
	return docs
}

func TestRunJSON(t *testing.T) {
	code, out, errOut, srv := runWith(t, fakeguard.Tokens(3), "--json", "--temperature", "0", "--seed", "5", "p")
	docs := lines(t, out)
	if code != 0 || errOut != "" || len(docs) != 4 || docs[3]["status"] != "completed" ||
		docs[3]["completion"] != "max_tokens" || docs[0]["type"] != "token" {
		t.Fatalf("exit %d, stderr %q, stdout %s", code, errOut, out)
	}
	start, _ := srv.Last()
	s := start.GetSampling()
	// All four sampling values always, the seed only when given.
	if s.Temperature == nil || s.TopK == nil || s.GetTopK() != 40 || s.GetTopP() != 0.95 ||
		s.GetMinP() != 0.05 || s.Seed == nil || start.GetMaxTokens() != 256 || start.GetPrompt() != "p" {
		t.Errorf("request %v", start)
	}
}

func TestRunText(t *testing.T) {
	code, out, errOut, _ := runWith(t, fakeguard.Tokens(2), "p")
	if code != 0 || out != " t0 t1\n" ||
		errOut != "[completed at max_tokens] 2 tokens released · policy default (0123456789ab)\n" {
		t.Fatalf("exit %d, stdout %q, stderr %q", code, out, errOut)
	}
}

func TestRunCancelAfter(t *testing.T) {
	code, out, _, _ := runWith(t, fakeguard.UntilCancel(2), "--json", "--cancel-after", "2", "p")
	docs := lines(t, out)
	if code != 4 || len(docs) != 3 || docs[2]["status"] != "cancelled" || docs[2]["tokens"] != 2.0 {
		t.Fatalf("exit %d, stdout %s", code, out)
	}
}

func TestRunExitCodes(t *testing.T) {
	verdict := func(v *pb.Verdict) fakeguard.Script {
		return func(_ context.Context, _ *pb.GenerateRequest, _ <-chan struct{}, send func(*pb.GenerateServerMessage) error) error {
			_ = send(fakeguard.Started(0))
			return send(fakeguard.Verdict(v))
		}
	}
	for _, tc := range []struct {
		name   string
		script fakeguard.Script
		code   int
		stderr string
	}{
		{"halted", verdict(&pb.Verdict{Status: pb.Status_STATUS_HALTED, Guard: "l2_norm"}), 3, ""},
		{"cancelled", verdict(&pb.Verdict{Status: pb.Status_STATUS_CANCELLED}), 4, ""},
		{"error", verdict(&pb.Verdict{Status: pb.Status_STATUS_ERROR, Message: "x"}), 1, ""},
		{"unspecified", verdict(&pb.Verdict{}), 1, ""},
		{"invalid", refuse(codes.InvalidArgument, "sampling.top_p: 2.0 is invalid"), 2,
			"guarded-generate: error: INVALID_ARGUMENT: sampling.top_p: 2.0 is invalid\n"},
		{"unauthenticated", refuse(codes.Unauthenticated, "bad token"), 1,
			"guarded-generate: error: UNAUTHENTICATED: bad token\n"},
		{"overloaded", refuse(codes.ResourceExhausted, "overloaded: queue full\nsecond line"), 1,
			"guarded-generate: error: RESOURCE_EXHAUSTED: overloaded: queue full second line\n"},
		{"loading", refuse(codes.Unavailable, "the model is still loading"), 1,
			"guarded-generate: error: UNAVAILABLE: the model is still loading\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, out, errOut, _ := runWith(t, tc.script, "--json", "p")
			if code != tc.code || errOut != tc.stderr {
				t.Errorf("exit %d (want %d), stderr %q (want %q), stdout %s", code, tc.code, errOut, tc.stderr, out)
			}
			if tc.stderr == "" && lines(t, out)[0]["type"] != "verdict" {
				t.Errorf("stdout %s", out)
			}
		})
	}
}

func TestRunNoVerdict(t *testing.T) {
	code, _, errOut, _ := runWith(t, func(_ context.Context, _ *pb.GenerateRequest, _ <-chan struct{},
		send func(*pb.GenerateServerMessage) error) error {
		return send(fakeguard.Started(0))
	}, "--json", "p")
	if code != 1 || !strings.HasPrefix(errOut, "guarded-generate: error: UNKNOWN: the daemon at unix:/") ||
		!strings.HasSuffix(errOut, " ended the stream without a verdict\n") {
		t.Errorf("exit %d, stderr %q", code, errOut)
	}
}

func TestRunUnreachable(t *testing.T) {
	var out, errOut bytes.Buffer
	code := run([]string{"--addr", "unix:/nonexistent/fse.sock", "p"}, &out, &errOut)
	if code != 1 || !strings.HasPrefix(errOut.String(), "guarded-generate: error: UNAVAILABLE: ") ||
		strings.Count(errOut.String(), "\n") != 1 {
		t.Errorf("exit %d, stderr %q", code, errOut.String())
	}
}

// Bad usage exits 2 before any connection, naming the flag.
func TestRunUsage(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "none")
	notPEM := filepath.Join(t.TempDir(), "ca.pem")
	_ = os.WriteFile(notPEM, []byte("hello"), 0o600)
	empty := filepath.Join(t.TempDir(), "token")
	_ = os.WriteFile(empty, []byte("\nsecond line\n"), 0o600)
	for _, tc := range []struct {
		args []string
		flag string
	}{
		{[]string{"--max-tokens", "0", "p"}, "-max-tokens"},
		{[]string{"--token-file", missing, "p"}, "-token-file"},
		{[]string{"--token-file", empty, "p"}, "-token-file"},
		{[]string{"--tls-ca", missing, "p"}, "-tls-ca"},
		{[]string{"--tls-ca", notPEM, "p"}, "-tls-ca"},
		{[]string{"--tls-ca", notPEM, "--tls-cert", notPEM, "p"}, "-tls-key"},
		{[]string{"--tls-ca", notPEM, "--tls-key", notPEM, "p"}, "-tls-cert"},
		{[]string{"--tls-cert", notPEM, "--tls-key", notPEM, "p"}, "-tls-ca"},
	} {
		var out, errOut bytes.Buffer
		code := run(append([]string{"--addr", "unix:/nonexistent/fse.sock"}, tc.args...), &out, &errOut)
		if code != 2 || out.Len() != 0 || !strings.Contains(errOut.String(), tc.flag) {
			t.Errorf("%q: exit %d, stderr %q", tc.args, code, errOut.String())
		}
	}
	var out, errOut bytes.Buffer
	if code := run([]string{"--help"}, &out, &errOut); code != 0 || !strings.Contains(errOut.String(), "-addr") {
		t.Errorf("--help: exit %d", code)
	}
}

func TestRunTokenFile(t *testing.T) {
	tok := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tok, []byte("  s3cret \nsecond line\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	code, _, _, srv := runWith(t, fakeguard.Tokens(1), "--token-file", tok, "--json", "p")
	_, md := srv.Last()
	if code != 0 || strings.Join(md.Get("authorization"), ",") != "Bearer s3cret" {
		t.Errorf("exit %d, authorization %q", code, md.Get("authorization"))
	}
}

func TestRunInfo(t *testing.T) {
	code, out, errOut, _ := runWith(t, nil, "--info")
	if code != 0 || errOut != "" || !strings.HasPrefix(out, `{"version":"0.1.0","model":{"name":"m",`) {
		t.Errorf("exit %d, stdout %s, stderr %s", code, out, errOut)
	}
}

func TestRunTLS(t *testing.T) {
	cfg, caPEM := fakeguard.Certificates(t)
	port := fakeguard.ServeTLS(t, &fakeguard.Server{Script: fakeguard.Tokens(2)}, cfg)
	ca := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(ca, caPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	var out, errOut bytes.Buffer
	if code := run([]string{"--addr", "localhost:" + port, "--tls-ca", ca, "--json", "p"}, &out, &errOut); code != 0 {
		t.Fatalf("exit %d, stderr %s", code, errOut.String())
	}
	if docs := lines(t, out.String()); len(docs) != 3 || docs[2]["status"] != "completed" {
		t.Errorf("stdout %s", out.String())
	}
}

func TestRunMutualTLS(t *testing.T) {
	cfg, caPEM, certPEM, keyPEM := fakeguard.MutualCertificates(t)
	port := fakeguard.ServeTLS(t, &fakeguard.Server{Script: fakeguard.Tokens(2)}, cfg)
	dir := t.TempDir()
	ca, cert, key := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	for path, data := range map[string][]byte{ca: caPEM, cert: certPEM, key: keyPEM} {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	addr := []string{"--addr", "localhost:" + port, "--tls-ca", ca}
	var out, errOut bytes.Buffer
	if code := run(append(addr, "--tls-cert", cert, "--tls-key", key, "--json", "p"), &out, &errOut); code != 0 {
		t.Fatalf("exit %d, stderr %s", code, errOut.String())
	}
	if docs := lines(t, out.String()); len(docs) != 3 || docs[2]["status"] != "completed" {
		t.Errorf("stdout %s", out.String())
	}
	// Without the certificate: the daemon's handshake refuses it, one line, exit 1.
	out.Reset()
	errOut.Reset()
	if code := run(append(addr, "--json", "p"), &out, &errOut); code != 1 ||
		!strings.HasPrefix(errOut.String(), "guarded-generate: error: UNAVAILABLE: ") ||
		strings.Count(errOut.String(), "\n") != 1 {
		t.Errorf("exit %d, stderr %q", code, errOut.String())
	}
	// Unreadable or mismatched files are usage errors naming the flag.
	missing := filepath.Join(dir, "none")
	for _, tc := range []struct {
		args []string
		flag string
	}{
		{[]string{"--tls-cert", missing, "--tls-key", key}, "-tls-cert"},
		{[]string{"--tls-cert", cert, "--tls-key", missing}, "-tls-key"},
		{[]string{"--tls-cert", key, "--tls-key", key}, "-tls-cert"},
		{[]string{"--tls-cert", cert, "--tls-key", ca}, "-tls-key"},
	} {
		out.Reset()
		errOut.Reset()
		code := run(append(append(addr, tc.args...), "p"), &out, &errOut)
		if code != 2 || out.Len() != 0 || !strings.Contains(errOut.String(), tc.flag) {
			t.Errorf("%q: exit %d, stderr %q", tc.args, code, errOut.String())
		}
	}
}
