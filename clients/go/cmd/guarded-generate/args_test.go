package main

import (
	"bytes"
	"errors"
	"flag"
	"io"
	"strings"
	"testing"
	"time"
)

func TestParseDefaults(t *testing.T) {
	o, err := parseArgs([]string{"--addr", "unix:/s", "hello world"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	s := o.req.Sampling
	if o.addr != "unix:/s" || o.req.Prompt != "hello world" || o.req.MaxTokens != 256 ||
		*s.Temperature != 0.8 || *s.TopK != 40 || *s.TopP != 0.95 || *s.MinP != 0.05 || s.Seed != nil ||
		o.req.Timeout != 0 || o.cancelAfter != 0 || o.json || o.req.Policy != "" {
		t.Errorf("defaults: %+v", o)
	}
}

func TestParseEveryFlag(t *testing.T) {
	o, err := parseArgs([]string{
		"--addr=127.0.0.1:4000", "--json", "--policy", "test", "--max-tokens", "8",
		"--temperature", "0", "--top-k=0", "--top-p", "1", "--min-p", "0", "--seed", "4294967295",
		"--stop", "a", "--stop=b", "--timeout", "0.0025", "--cancel-after", "2",
		"--tls-ca", "ca.pem", "--token-file", "tok", "--", "--prompt",
	}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	s := o.req.Sampling
	if o.addr != "127.0.0.1:4000" || !o.json || o.req.Policy != "test" || o.req.MaxTokens != 8 ||
		*s.Temperature != 0 || *s.TopK != 0 || *s.TopP != 1 || *s.MinP != 0 || *s.Seed != 4294967295 ||
		strings.Join(o.req.Stop, ",") != "a,b" || o.req.Timeout != 2*time.Millisecond || o.cancelAfter != 2 ||
		o.tlsCA != "ca.pem" || o.tokenFile != "tok" || o.req.Prompt != "--prompt" {
		t.Errorf("parsed: %+v", o)
	}
}

func TestParseLeavesRangesToTheDaemon(t *testing.T) {
	// Out of the daemon's range but a valid request: the daemon names the field.
	o, err := parseArgs([]string{"--addr", "unix:/s", "--top-p", "2", "--top-k", "-1",
		"--temperature", "nan", "--max-tokens", "100000", "p"}, io.Discard)
	if err != nil || *o.req.Sampling.TopP != 2 || *o.req.Sampling.TopK != -1 || o.req.MaxTokens != 100000 {
		t.Fatalf("%+v, %v", o, err)
	}
}

func TestTimeoutIsRoundedMilliseconds(t *testing.T) {
	for in, want := range map[string]time.Duration{
		"1": 1000, "0.0001": 1, "0.0025": 2, "0.0035": 4, "0.5": 500, "2.0005": 2001, // 2000.5000000000002, as in Python
	} {
		o, err := parseArgs([]string{"--addr", "unix:/s", "--timeout", in, "p"}, io.Discard)
		if err != nil || o.req.Timeout != want*time.Millisecond {
			t.Errorf("--timeout %s: %v, %v; want %d ms", in, o, err, want)
		}
	}
}

// Usage errors are package flag's own, and name the flag (or PROMPT).
func TestParseErrorsNameTheFlag(t *testing.T) {
	for _, tc := range []struct {
		args []string
		name string
	}{
		{[]string{"p"}, "-addr"},
		{[]string{"--addr", "unix:/s"}, "PROMPT"},
		{[]string{"--addr", "unix:/s", ""}, "PROMPT"},
		{[]string{"--addr", "unix:/s", "a", "b"}, "PROMPT"},
		{[]string{"--addr", "unix:/s", "--max-tokens", "0", "p"}, "-max-tokens"},
		{[]string{"--addr", "unix:/s", "--max-tokens", "x", "p"}, "-max-tokens"},
		{[]string{"--addr", "unix:/s", "--max-tokens", "4294967296", "p"}, "-max-tokens"},
		{[]string{"--addr", "unix:/s", "--seed", "-1", "p"}, "-seed"},
		{[]string{"--addr", "unix:/s", "--top-k", "2147483648", "p"}, "-top-k"},
		{[]string{"--addr", "unix:/s", "--temperature", "hot", "p"}, "-temperature"},
		{[]string{"--addr", "unix:/s", "--timeout", "0", "p"}, "-timeout"},
		{[]string{"--addr", "unix:/s", "--timeout", "-1", "p"}, "-timeout"},
		{[]string{"--addr", "unix:/s", "--timeout", "inf", "p"}, "-timeout"},
		{[]string{"--addr", "unix:/s", "--timeout", "nan", "p"}, "-timeout"},
		{[]string{"--addr", "unix:/s", "--timeout", "1e10", "p"}, "-timeout"},
		{[]string{"--addr", "unix:/s", "--cancel-after", "0", "p"}, "-cancel-after"},
		{[]string{"--addr", "unix:/s", "--bogus", "1", "p"}, "-bogus"},
		{[]string{"--addr", "unix:/s", "--json", "--seed"}, "-seed"},
	} {
		var stderr bytes.Buffer
		_, err := parseArgs(tc.args, &stderr)
		if err == nil || !strings.Contains(err.Error(), tc.name) || !strings.Contains(stderr.String(), tc.name) {
			t.Errorf("parseArgs(%q): error %v, stderr %q; want %s named", tc.args, err, stderr.String(), tc.name)
		}
	}
}

func TestInfoTakesNoPrompt(t *testing.T) {
	if o, err := parseArgs([]string{"--addr", "unix:/s", "--info"}, io.Discard); err != nil || !o.info {
		t.Fatalf("%+v, %v", o, err)
	}
}

func TestHelp(t *testing.T) {
	var stderr bytes.Buffer
	if _, err := parseArgs([]string{"--help"}, &stderr); !errors.Is(err, flag.ErrHelp) ||
		!strings.Contains(stderr.String(), "-cancel-after N") {
		t.Fatalf("%v, %s", err, stderr.String())
	}
}

// FuzzParseArgs: any command line parses or fails with an error, never a panic.
// `go test` runs the seeds; `go test -fuzz=FuzzParseArgs` explores.
func FuzzParseArgs(f *testing.F) {
	for _, seed := range []string{
		"--addr\x00unix:/s\x00p", "--addr=h:1\x00--seed\x00-0\x00--\x00-p", "--timeout\x001e309",
		"--max-tokens=\x00--stop", "-\x00--json=\x00--info", "--top-k\x00 7 \x00\xff",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, joined string) {
		if o, err := parseArgs(strings.Split(joined, "\x00"), io.Discard); (o == nil) == (err == nil) {
			t.Errorf("options %v with error %v", o, err)
		}
	})
}
