// Command guarded-generate streams one guarded generation from the libfse daemon,
// with the flags, output and exit codes that every libfse client's example keeps
// (clients/README.md): a thin command line over package fse, parsed by package flag.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"libfse/clients/go/fse"
)

// Exit codes of the contract: a verdict's, or 1 for an error, 2 for bad usage.
const exitError, exitUsage = 1, 2

var exitCodes = map[fse.Status]int{fse.StatusCompleted: 0, fse.StatusHalted: 3, fse.StatusCancelled: 4}

// options are the parsed command line: the request as it will be sent (defaults are
// llama.cpp's CLI defaults, as every client's guarded-generate has them) and the rest.
type options struct {
	addr, tlsCA, tokenFile string
	tlsCert, tlsKey        string // a client certificate and its key, for mutual TLS
	json, info             bool
	cancelAfter            uint32 // 0 = never
	req                    fse.Request
}

// parseArgs parses the flags with package flag, which reports its own errors
// (naming the flag) on stderr. Only what building a request needs is checked:
// the daemon judges every range it knows better.
func parseArgs(args []string, stderr io.Writer) (*options, error) {
	s := fse.Sampling{Temperature: new(0.8), TopK: new(int32(40)), TopP: new(0.95), MinP: new(0.05)}
	o := &options{req: fse.Request{MaxTokens: 256, Sampling: s}}
	fs := flag.NewFlagSet("guarded-generate", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.addr, "addr", "", "unix:/abs/path or HOST:PORT (required)")
	fs.StringVar(&o.tlsCA, "tls-ca", "", "use TLS, checking the server against the PEM CA in `FILE`")
	fs.StringVar(&o.tlsCert, "tls-cert", "", "mutual TLS: present the PEM client certificate in `FILE` (with -tls-key)")
	fs.StringVar(&o.tlsKey, "tls-key", "", "mutual TLS: the PEM private key of -tls-cert in `FILE`")
	fs.StringVar(&o.tokenFile, "token-file", "", "send the first line of `FILE` as a bearer token")
	fs.BoolVar(&o.json, "json", false, "JSON lines on stdout: one per token, then the verdict")
	fs.BoolVar(&o.info, "info", false, "print the daemon's model, policies and limits as JSON")
	fs.StringVar(&o.req.Policy, "policy", "", "a policy the daemon serves (default the daemon's)")
	fs.Func("max-tokens", "tokens to generate at most, >= 1 (default 256)", uintFlag(&o.req.MaxTokens, 1))
	fs.Float64Var(s.Temperature, "temperature", *s.Temperature, "0 = greedy")
	fs.Func("top-k", "0 = off (default 40)", func(v string) error {
		k, err := strconv.ParseInt(v, 10, 32)
		*s.TopK = int32(k)
		return err
	})
	fs.Float64Var(s.TopP, "top-p", *s.TopP, "1 = off")
	fs.Float64Var(s.MinP, "min-p", *s.MinP, "0 = off")
	fs.Func("seed", "sampling seed, 0 .. 2^32-1 (default random)", func(v string) error {
		o.req.Sampling.Seed = new(uint32)
		return uintFlag(o.req.Sampling.Seed, 0)(v)
	})
	fs.Func("stop", "a stop sequence (repeatable)", func(v string) error {
		o.req.Stop = append(o.req.Stop, v)
		return nil
	})
	fs.Func("timeout", "generation budget in `SECONDS`, > 0", func(v string) error {
		sec, err := strconv.ParseFloat(v, 64)
		ms := math.RoundToEven(sec * 1000) // timeout_ms = max(1, round(SECONDS * 1000)), as Python rounds
		if err != nil || !(sec > 0) || ms > math.MaxUint32 {
			return errors.New("must be a number of seconds > 0")
		}
		o.req.Timeout = time.Duration(max(1, ms)) * time.Millisecond
		return nil
	})
	fs.Func("cancel-after", "send Cancel after the `N`-th token, >= 1", uintFlag(&o.cancelAfter, 1))
	err := fs.Parse(args)
	o.req.Prompt = fs.Arg(0)
	switch {
	case err != nil:
		return nil, err
	case o.addr == "":
		err = errors.New("flag -addr is required")
	case o.tlsCert != "" && o.tlsKey == "":
		err = errors.New("flag -tls-key is required with -tls-cert")
	case o.tlsKey != "" && o.tlsCert == "":
		err = errors.New("flag -tls-cert is required with -tls-key")
	case o.tlsCert != "" && o.tlsCA == "":
		err = errors.New("flag -tls-ca is required with -tls-cert and -tls-key (mutual TLS is TLS)")
	case fs.NArg() > 1:
		err = fmt.Errorf("PROMPT: %d arguments given, want one (quote it; flags go before it)", fs.NArg())
	case !o.info && o.req.Prompt == "":
		err = errors.New("PROMPT: must not be empty")
	default:
		return o, nil
	}
	fmt.Fprintln(stderr, err) // as package flag reports its own errors
	fs.Usage()
	return nil, err
}

// uintFlag parses a decimal uint32 of at least least.
func uintFlag(dst *uint32, least uint64) func(string) error {
	return func(v string) error {
		n, err := strconv.ParseUint(v, 10, 32)
		if err != nil || n < least {
			return fmt.Errorf("must be an integer >= %d", least)
		}
		*dst = uint32(n)
		return nil
	}
}

func main() {
	// A reader that went away (`| head`) makes writes fail instead of killing us.
	signal.Ignore(syscall.SIGPIPE)
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run is the whole program but the process: testable with any writers.
func run(args []string, stdout, stderr io.Writer) int {
	o, err := parseArgs(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	} else if err != nil {
		return exitUsage
	}
	clientOpts, err := o.clientOptions()
	if err != nil {
		fmt.Fprintf(stderr, "guarded-generate: %v\n", err)
		return exitUsage
	}
	client, err := fse.NewClient(o.addr, clientOpts...)
	if err != nil {
		fmt.Fprintf(stderr, "guarded-generate: flag -addr: %v\n", err)
		return exitUsage
	}
	defer client.Close()
	fail := func(err error) int {
		// One line, whatever the server's message holds.
		line := strings.Join(strings.Fields(err.Error()), " ")
		fmt.Fprintf(stderr, "guarded-generate: error: %s\n", line)
		if errors.Is(err, fse.ErrInvalidArgument) {
			return exitUsage
		}
		return exitError
	}

	ctx := context.Background()
	if o.info {
		info, err := client.Info(ctx)
		if err != nil {
			return fail(err)
		}
		if json.NewEncoder(stdout).Encode(info) != nil {
			return exitError
		}
		return 0
	}

	stream, err := client.Generate(ctx, o.req)
	if err != nil {
		return fail(err)
	}
	defer stream.Close()
	// The first Ctrl-C cancels (verdict cancelled, exit 4); a second one kills.
	interrupts := make(chan os.Signal, 1)
	signal.Notify(interrupts, os.Interrupt)
	go func() {
		<-interrupts
		signal.Reset(os.Interrupt)
		stream.Cancel()
	}()

	colour := !o.json && useColour(stdout)
	lines := json.NewEncoder(stdout) // one JSON line per event
	var seen uint32
	for tok := range stream.Tokens() {
		if c, ok := colours[tok.Health]; ok && colour {
			tok.Text = c + tok.Text + "\x1b[0m"
		}
		if o.json {
			err = lines.Encode(tok)
		} else {
			_, err = io.WriteString(stdout, tok.Text)
		}
		if err != nil {
			return exitError // stdout is gone: nobody to tell
		}
		if seen++; seen == o.cancelAfter {
			stream.Cancel()
		}
	}
	verdict, err := stream.Verdict()
	if err != nil {
		return fail(err)
	}
	if o.json {
		err = lines.Encode(verdict)
	} else if _, err = io.WriteString(stdout, "\n"); err == nil {
		fmt.Fprintln(stderr, verdict) // its String: "[completed at max_tokens] 12 tokens released · ..."
	}
	if code, ok := exitCodes[verdict.Status]; ok && err == nil {
		return code
	}
	return exitError
}

// clientOptions reads the CA, the client certificate and its key, and the token file
// (its first line, trimmed).
func (o *options) clientOptions() ([]fse.Option, error) {
	var opts []fse.Option
	if o.tlsCA != "" {
		pem, err := os.ReadFile(o.tlsCA)
		if err != nil {
			return nil, fmt.Errorf("flag -tls-ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("flag -tls-ca: %s: no PEM certificate", o.tlsCA)
		}
		opts = append(opts, fse.WithRootCAs(pool))
	}
	if o.tlsCert != "" {
		certPEM, err := os.ReadFile(o.tlsCert)
		if err != nil {
			return nil, fmt.Errorf("flag -tls-cert: %w", err)
		}
		keyPEM, err := os.ReadFile(o.tlsKey)
		if err != nil {
			return nil, fmt.Errorf("flag -tls-key: %w", err)
		}
		if block, _ := pem.Decode(certPEM); block == nil || block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("flag -tls-cert: %s: no PEM certificate", o.tlsCert)
		}
		cert, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			return nil, fmt.Errorf("flag -tls-key: %s: %w", o.tlsKey, err)
		}
		opts = append(opts, fse.WithClientCertificate(cert))
	}
	if o.tokenFile != "" {
		data, err := os.ReadFile(o.tokenFile)
		if err != nil {
			return nil, fmt.Errorf("flag -token-file: %w", err)
		}
		line, _, _ := strings.Cut(string(data), "\n")
		if strings.TrimSpace(line) == "" {
			return nil, fmt.Errorf("flag -token-file: %s: no token on its first line", o.tokenFile)
		}
		opts = append(opts, fse.WithToken(strings.TrimSpace(line)))
	}
	return opts, nil
}

var colours = map[fse.Health]string{
	fse.HealthGreen: "\x1b[32m", fse.HealthYellow: "\x1b[33m", fse.HealthRed: "\x1b[31m",
}

// useColour: only on a terminal, and never when NO_COLOR is set (to anything).
func useColour(w io.Writer) bool {
	f, ok := w.(*os.File)
	if _, set := os.LookupEnv("NO_COLOR"); !ok || set {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}
