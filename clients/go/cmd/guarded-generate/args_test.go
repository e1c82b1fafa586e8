package main

import (
	"strings"
	"testing"
)

func TestParseDefaults(t *testing.T) {
	o, err := parseArgs([]string{"--addr", "unix:/s", "hello world"})
	if err != nil {
		t.Fatal(err)
	}
	if o.addr != "unix:/s" || o.prompt != "hello world" || o.maxTokens != 256 ||
		o.temperature != 0.8 || o.topK != 40 || o.topP != 0.95 || o.minP != 0.05 ||
		o.seed != nil || o.timeoutMS != 0 || o.cancelAfter != 0 || o.json || o.policy != "" {
		t.Errorf("defaults: %+v", o)
	}
}

func TestParseEveryFlag(t *testing.T) {
	o, err := parseArgs([]string{
		"--addr=127.0.0.1:4000", "--json", "--policy", "test", "--max-tokens", "8",
		"--temperature", "0", "--top-k=0", "--top-p", "1", "--min-p", "0", "--seed", "4294967295",
		"--stop", "a", "--stop=b", "--timeout", "0.0025", "--cancel-after", "2",
		"--tls-ca", "ca.pem", "--token-file", "tok", "--", "--prompt",
	})
	if err != nil {
		t.Fatal(err)
	}
	if o.addr != "127.0.0.1:4000" || !o.json || o.policy != "test" || o.maxTokens != 8 ||
		o.temperature != 0 || o.topK != 0 || o.topP != 1 || o.minP != 0 || *o.seed != 4294967295 ||
		strings.Join(o.stop, ",") != "a,b" || o.timeoutMS != 2 || o.cancelAfter != 2 ||
		o.tlsCA != "ca.pem" || o.tokenFile != "tok" || o.prompt != "--prompt" {
		t.Errorf("parsed: %+v", o)
	}
}

func TestParseLeavesRangesToTheDaemon(t *testing.T) {
	// Out of the daemon's range but a valid request: the daemon names the field.
	o, err := parseArgs([]string{"--addr", "unix:/s", "--top-p", "2", "--top-k", "-1",
		"--temperature", "nan", "--max-tokens", "100000", "p"})
	if err != nil || o.topP != 2 || o.topK != -1 || o.maxTokens != 100000 {
		t.Fatalf("%+v, %v", o, err)
	}
}

func TestTimeoutMillis(t *testing.T) {
	for in, want := range map[string]uint32{
		"1": 1000, "0.0001": 1, "0.0025": 2, "0.0035": 4, "0.5": 500, "2.0005": 2001, // 2000.5000000000002, as in Python
	} {
		got, err := timeoutMillis(in)
		if err != nil || got != want {
			t.Errorf("timeoutMillis(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
}

func TestParseErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"p"}, "--addr: required; accepted: unix:/abs/path or HOST:PORT"},
		{[]string{"--addr", "nohost", "p"}, `--addr: "nohost" is invalid; accepted: unix:/abs/path or HOST:PORT`},
		{[]string{"--addr", "unix:/s"}, "PROMPT: must not be empty"},
		{[]string{"--addr", "unix:/s", ""}, "PROMPT: must not be empty"},
		{[]string{"--addr", "unix:/s", "a", "b"}, "PROMPT: 2 given; accepted: one (quote it)"},
		{[]string{"--addr", "unix:/s", "\xff"}, "PROMPT: not valid UTF-8; accepted: UTF-8 text"},
		{[]string{"--addr", "unix:/s", "--max-tokens", "0", "p"}, "--max-tokens: 0 is invalid; accepted: >= 1"},
		{[]string{"--addr", "unix:/s", "--max-tokens", "x", "p"}, `--max-tokens: "x" is invalid; accepted: >= 1`},
		{[]string{"--addr", "unix:/s", "--max-tokens", "4294967296", "p"}, "--max-tokens: 4294967296 is invalid; accepted: 1..4294967295"},
		{[]string{"--addr", "unix:/s", "--seed", "-1", "p"}, "--seed: -1 is invalid; accepted: 0 .. 2^32-1"},
		{[]string{"--addr", "unix:/s", "--seed", "99999999999999999999", "p"}, "--seed: 99999999999999999999 is invalid; accepted: 0 .. 2^32-1"},
		{[]string{"--addr", "unix:/s", "--top-k", "2147483648", "p"}, "--top-k: 2147483648 is invalid; accepted: 0..2147483647"},
		{[]string{"--addr", "unix:/s", "--temperature", "hot", "p"}, `--temperature: "hot" is invalid; accepted: a number (0 = greedy)`},
		{[]string{"--addr", "unix:/s", "--timeout", "0", "p"}, "--timeout: 0.0 is invalid; accepted: seconds > 0"},
		{[]string{"--addr", "unix:/s", "--timeout", "-1", "p"}, "--timeout: -1.0 is invalid; accepted: seconds > 0"},
		{[]string{"--addr", "unix:/s", "--timeout", "inf", "p"}, "--timeout: inf is invalid; accepted: seconds > 0"},
		{[]string{"--addr", "unix:/s", "--timeout", "nan", "p"}, "--timeout: nan is invalid; accepted: seconds > 0"},
		{[]string{"--addr", "unix:/s", "--timeout", "1e10", "p"}, "--timeout: 10000000000.0 is invalid; accepted: 0 < seconds <= 4294967.295"},
		{[]string{"--addr", "unix:/s", "--timeout", "soon", "p"}, `--timeout: "soon" is invalid; accepted: seconds > 0`},
		{[]string{"--addr", "unix:/s", "--cancel-after", "0", "p"}, "--cancel-after: 0 is invalid; accepted: >= 1"},
		{[]string{"--addr", "unix:/s", "--bogus", "1", "p"}, "--bogus: unknown flag; accepted: see --help"},
		{[]string{"--addr", "unix:/s", "p", "--seed"}, "--seed: expects a value; accepted: 0 .. 2^32-1"},
		{[]string{"--addr", "unix:/s", "--json=yes", "p"}, "--json: takes no value; accepted: --json"},
	} {
		_, err := parseArgs(tc.args)
		if err == nil || err.Error() != tc.want {
			t.Errorf("parseArgs(%q) error = %v\n want %s", tc.args, err, tc.want)
		}
	}
}

func TestPyFloat(t *testing.T) {
	for f, want := range map[float64]string{
		1e16: "1e+16", 1e-5: "1e-05", 0.0001: "0.0001", 123: "123.0", 1.5e300: "1.5e+300",
		9999999999999998: "9999999999999998.0", -2.5: "-2.5", 0: "0.0",
	} {
		if got := pyFloat(f); got != want {
			t.Errorf("pyFloat(%v) = %s, want %s", f, got, want)
		}
	}
}

func TestInfoTakesNoPrompt(t *testing.T) {
	if o, err := parseArgs([]string{"--addr", "unix:/s", "--info"}); err != nil || !o.info {
		t.Fatalf("%+v, %v", o, err)
	}
}

func TestHelp(t *testing.T) {
	o, err := parseArgs([]string{"--help"})
	if err != nil || !o.help {
		t.Fatalf("%+v, %v", o, err)
	}
}

// FuzzParseArgs: any command line parses or fails with a one-line usage error,
// never a panic. `go test` runs the seeds; `go test -fuzz=FuzzParseArgs` explores.
func FuzzParseArgs(f *testing.F) {
	for _, seed := range []string{
		"--addr\x00unix:/s\x00p", "--addr=h:1\x00--seed\x00-0\x00--\x00-p", "--timeout\x001e309",
		"--max-tokens=\x00--stop", "-\x00--json=\x00--info", "--top-k\x00 7 \x00\xff",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, joined string) {
		_, err := parseArgs(strings.Split(joined, "\x00"))
		if err != nil && strings.ContainsAny(err.Error(), "\n\r") && !strings.Contains(joined, "\n") &&
			!strings.Contains(joined, "\r") {
			t.Errorf("multi-line error %q", err)
		}
	})
}
