package main

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"unicode/utf8"
)

const usage = `usage: guarded-generate --addr unix:PATH|HOST:PORT [--tls-ca FILE] [--token-file FILE]
                        [--json] [--policy NAME] [--max-tokens N] [--temperature T] [--top-k K]
                        [--top-p P] [--min-p M] [--seed S] [--stop TEXT]... [--timeout SECONDS]
                        [--cancel-after N] PROMPT
       guarded-generate --addr unix:PATH|HOST:PORT [--tls-ca FILE] [--token-file FILE] --info

A guarded generation from the libfse daemon. Exit status: 0 completed, 3 halted,
4 cancelled, 1 error, 2 bad usage or INVALID_ARGUMENT.
`

// options are the parsed command line. Defaults are llama.cpp's CLI defaults,
// as every client's guarded-generate has them.
type options struct {
	addr        string
	tlsCA       string
	tokenFile   string
	json        bool
	info        bool
	help        bool
	policy      string
	maxTokens   uint32
	temperature float64
	topK        int32
	topP        float64
	minP        float64
	seed        *uint32
	stop        []string
	timeoutMS   uint32 // 0 = no --timeout
	cancelAfter int    // 0 = never
	prompt      string
}

// usageError is bad input on the command line: one line, exit code 2.
type usageError struct{ what, problem, accepted string }

func (e *usageError) Error() string {
	if e.accepted == "" {
		return e.what + ": " + e.problem
	}
	return fmt.Sprintf("%s: %s; accepted: %s", e.what, e.problem, e.accepted)
}

func invalid(flag, value, accepted string) *usageError {
	return &usageError{flag, strconv.Quote(value) + " is invalid", accepted}
}

// parseArgs reads "--flag VALUE", "--flag=VALUE" and one PROMPT anywhere ("--"
// ends the flags, for a prompt that starts with "-"). It checks only what it
// must to build a request: the daemon judges every range it knows better.
func parseArgs(args []string) (*options, error) {
	o := &options{
		maxTokens: 256, temperature: 0.8, topK: 40, topP: 0.95, minP: 0.05,
	}
	var prompts []string
	for i := 0; i < len(args); i++ {
		arg := args[i]
		if arg == "--" {
			prompts = append(prompts, args[i+1:]...)
			break
		}
		if !strings.HasPrefix(arg, "-") || arg == "-" {
			prompts = append(prompts, arg)
			continue
		}
		name, value, hasValue := strings.Cut(arg, "=")
		switch name {
		case "-h", "--help":
			o.help = true
			return o, nil
		case "--json", "--info":
			if hasValue {
				return nil, &usageError{name, "takes no value", name}
			}
			if name == "--json" {
				o.json = true
			} else {
				o.info = true
			}
			continue
		}
		if !hasValue {
			if i+1 == len(args) {
				return nil, &usageError{name, "expects a value", valueHelp[name]}
			}
			i++
			value = args[i]
		}
		if err := o.set(name, value); err != nil {
			return nil, err
		}
	}
	return o, o.check(prompts)
}

// valueHelp is what each flag accepts, for "accepted: ..." in errors.
var valueHelp = map[string]string{
	"--addr":         "unix:/abs/path or HOST:PORT",
	"--tls-ca":       "a PEM CA certificate file",
	"--token-file":   "a file whose first line is the token",
	"--policy":       "a policy name the daemon serves",
	"--max-tokens":   ">= 1",
	"--temperature":  "a number (0 = greedy)",
	"--top-k":        "an integer (0 = off)",
	"--top-p":        "a number (1 = off)",
	"--min-p":        "a number (0 = off)",
	"--seed":         "0 .. 2^32-1",
	"--stop":         "text",
	"--timeout":      "seconds > 0",
	"--cancel-after": ">= 1",
}

func (o *options) set(name, value string) error {
	accepted, known := valueHelp[name]
	if !known {
		return &usageError{name, "unknown flag", "see --help"}
	}
	var err error
	switch name {
	case "--addr":
		o.addr = value
	case "--tls-ca":
		o.tlsCA = value
	case "--token-file":
		o.tokenFile = value
	case "--policy":
		o.policy, err = utf8Text(name, value)
	case "--stop":
		var s string
		s, err = utf8Text(name, value)
		o.stop = append(o.stop, s)
	case "--temperature":
		o.temperature, err = number(name, value, accepted)
	case "--top-p":
		o.topP, err = number(name, value, accepted)
	case "--min-p":
		o.minP, err = number(name, value, accepted)
	case "--top-k":
		var k int64
		k, err = integer(name, value, math.MinInt32, math.MaxInt32, accepted, "0..2147483647")
		o.topK = int32(k)
	case "--max-tokens":
		var n int64
		n, err = integer(name, value, 1, math.MaxUint32, accepted, "1..4294967295")
		o.maxTokens = uint32(n)
	case "--seed":
		var n int64
		n, err = integer(name, value, 0, math.MaxUint32, accepted, accepted)
		seed := uint32(n)
		o.seed = &seed
	case "--cancel-after":
		var n int64
		n, err = integer(name, value, 1, math.MaxInt32, accepted, "1..2147483647")
		o.cancelAfter = int(n)
	case "--timeout":
		o.timeoutMS, err = timeoutMillis(value)
	}
	return err
}

func (o *options) check(prompts []string) error {
	if o.help {
		return nil
	}
	if o.addr == "" {
		return &usageError{"--addr", "required", valueHelp["--addr"]}
	}
	if !validAddr(o.addr) {
		return invalid("--addr", o.addr, valueHelp["--addr"])
	}
	if len(prompts) > 1 {
		return &usageError{"PROMPT", fmt.Sprintf("%d given", len(prompts)), "one (quote it)"}
	}
	if o.info {
		return nil // a prompt is not needed, nor looked at
	}
	if len(prompts) == 0 || prompts[0] == "" {
		return &usageError{what: "PROMPT", problem: "must not be empty"}
	}
	p, err := utf8Text("PROMPT", prompts[0])
	o.prompt = p
	return err
}

func validAddr(addr string) bool {
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		return path != ""
	}
	i := strings.LastIndex(addr, ":")
	return i > 0 && i < len(addr)-1
}

// utf8Text refuses bytes that are not UTF-8: proto strings must be.
func utf8Text(what, s string) (string, error) {
	if !utf8.ValidString(s) {
		return "", &usageError{what, "not valid UTF-8", "UTF-8 text"}
	}
	return s, nil
}

// number parses a float as Python's float() does, NaN and infinities included:
// whether they make sense is the daemon's to say.
func number(flag, value, accepted string) (float64, error) {
	f, err := strconv.ParseFloat(strings.TrimSpace(value), 64)
	if err != nil {
		return 0, invalid(flag, value, accepted)
	}
	return f, nil
}

// integer parses a decimal integer within lo..hi; tooBig is what a number past hi
// is told is accepted (the wire's range rather than the flag's meaning).
func integer(flag, value string, lo, hi int64, accepted, tooBig string) (int64, error) {
	n, err := strconv.ParseInt(strings.TrimSpace(value), 10, 64)
	if err != nil && !errors.Is(err, strconv.ErrRange) {
		return 0, invalid(flag, value, accepted)
	}
	switch {
	case err != nil || n > hi:
		return 0, &usageError{flag, strings.TrimSpace(value) + " is invalid", tooBig}
	case n < lo:
		return 0, &usageError{flag, strconv.FormatInt(n, 10) + " is invalid", accepted}
	}
	return n, nil
}

// timeoutMillis is the contract's timeout_ms = max(1, round(SECONDS * 1000)),
// with Python's round (half to even) so every client sends the same number.
func timeoutMillis(value string) (uint32, error) {
	sec, err := strconv.ParseFloat(strings.TrimSpace(value), 64)
	if err != nil && !errors.Is(err, strconv.ErrRange) {
		return 0, invalid("--timeout", value, "seconds > 0")
	}
	if !(sec > 0) || math.IsInf(sec, 0) {
		return 0, &usageError{"--timeout", pyFloat(sec) + " is invalid", "seconds > 0"}
	}
	ms := math.RoundToEven(sec * 1000)
	if ms > math.MaxUint32 {
		return 0, &usageError{"--timeout", pyFloat(sec) + " is invalid", "0 < seconds <= 4294967.295"}
	}
	return uint32(max(1, ms)), nil
}

// pyFloat spells a float as Python's repr does ("0.0", "-1.5", "1e+16", "nan"),
// so this client's usage errors read as the Python client's.
func pyFloat(f float64) string {
	switch {
	case math.IsNaN(f):
		return "nan"
	case math.IsInf(f, 1):
		return "inf"
	case math.IsInf(f, -1):
		return "-inf"
	}
	sci := strconv.FormatFloat(f, 'e', -1, 64) // shortest digits, as repr's
	exp, _ := strconv.Atoi(sci[strings.IndexByte(sci, 'e')+1:])
	if exp < -4 || exp >= 16 {
		return sci
	}
	s := strconv.FormatFloat(f, 'f', -1, 64)
	if !strings.Contains(s, ".") {
		s += ".0"
	}
	return s
}
