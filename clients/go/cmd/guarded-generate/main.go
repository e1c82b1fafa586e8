// Command guarded-generate streams one guarded generation from the libfse daemon,
// with the flags, output and exit codes that every libfse client's example keeps
// (clients/README.md): a thin command line over package fse.
package main

import (
	"bufio"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"libfse/clients/go/fse"
)

// Exit codes of the contract.
const (
	exitCompleted = 0
	exitError     = 1
	exitUsage     = 2
	exitHalted    = 3
	exitCancelled = 4
)

func main() {
	// A reader that went away (`| head`) makes writes fail instead of killing us.
	signal.Ignore(syscall.SIGPIPE)
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run is the whole program but the process: testable with any writers.
func run(args []string, stdout, stderr io.Writer) int {
	fail := func(code int, err error) int {
		fmt.Fprintf(stderr, "guarded-generate: error: %s\n", oneLine(err.Error()))
		return code
	}
	o, err := parseArgs(args)
	if err != nil {
		return fail(exitUsage, err)
	}
	if o.help {
		fmt.Fprint(stdout, usage)
		return 0
	}
	clientOpts, err := o.clientOptions()
	if err != nil {
		return fail(exitUsage, err)
	}
	client, err := fse.NewClient(o.addr, clientOpts...)
	if err != nil {
		return fail(exitUsage, invalid("--addr", o.addr, valueHelp["--addr"]))
	}
	defer client.Close()

	ctx := context.Background()
	if o.info {
		info, err := client.Info(ctx)
		if err != nil {
			return failRPC(fail, o.addr, err)
		}
		if writeJSON(stdout, infoDoc(info)) != nil {
			return exitError
		}
		return 0
	}

	stream, err := client.Generate(ctx, o.request())
	if err != nil {
		return failRPC(fail, o.addr, err)
	}
	defer stream.Close()
	// The first Ctrl-C cancels (verdict cancelled, exit 4); a second one kills.
	interrupts, finished := make(chan os.Signal, 1), make(chan struct{})
	signal.Notify(interrupts, os.Interrupt)
	go func() {
		select {
		case <-interrupts:
			signal.Reset(os.Interrupt)
			stream.Cancel()
		case <-finished:
		}
	}()
	defer func() {
		signal.Stop(interrupts)
		close(finished)
	}()

	var r renderer = jsonRenderer{stdout}
	if !o.json {
		r = textRenderer{out: stdout, err: stderr, colour: useColour(stdout)}
	}
	seen := 0
	for tok := range stream.Tokens() {
		if r.token(tok) != nil {
			return exitError // stdout is gone: nobody to tell
		}
		if seen++; seen == o.cancelAfter {
			stream.Cancel()
		}
	}
	verdict, err := stream.Verdict()
	if err != nil {
		return failRPC(fail, o.addr, err)
	}
	if r.verdict(verdict) != nil {
		return exitError
	}
	return exitCode(verdict.Status)
}

func exitCode(s fse.Status) int {
	switch s {
	case fse.StatusCompleted:
		return exitCompleted
	case fse.StatusHalted:
		return exitHalted
	case fse.StatusCancelled:
		return exitCancelled
	}
	return exitError
}

// failRPC reports a failed call: INVALID_ARGUMENT is the user's input (exit 2),
// anything else exit 1; an unreachable daemon says where it looked.
func failRPC(fail func(int, error) int, addr string, err error) int {
	var e *fse.Error
	if !errors.As(err, &e) {
		return fail(exitError, err)
	}
	switch {
	case errors.Is(e, fse.ErrInvalidArgument):
		return fail(exitUsage, e)
	case errors.Is(e, fse.ErrUnavailable) && unreachable(e.Message):
		return fail(exitError, fmt.Errorf("UNAVAILABLE: cannot reach the daemon at %s (%s)", addr, e.Message))
	}
	return fail(exitError, e)
}

// unreachable tells grpc-go's own Unavailable (no connection: dial, TLS
// handshake, resolver) from the daemon's ("the model is still loading").
func unreachable(message string) bool {
	for _, mark := range []string{"connection error", "error while dialing", "name resolver",
		"produced zero addresses", "connection refused", "no such file", "handshake"} {
		if strings.Contains(strings.ToLower(message), mark) {
			return true
		}
	}
	return false
}

// oneLine keeps an error to the one line the contract allows.
func oneLine(s string) string {
	return strings.NewReplacer("\r\n", " ", "\n", " ", "\r", " ").Replace(s)
}

func (o *options) request() fse.Request {
	return fse.Request{
		Prompt:    o.prompt,
		MaxTokens: o.maxTokens,
		Sampling: fse.Sampling{
			Temperature: &o.temperature,
			TopK:        &o.topK,
			TopP:        &o.topP,
			MinP:        &o.minP,
			Seed:        o.seed,
		},
		Policy:  o.policy,
		Stop:    o.stop,
		Timeout: time.Duration(o.timeoutMS) * time.Millisecond,
	}
}

// clientOptions reads the CA and token files: unreadable ones are bad usage.
func (o *options) clientOptions() ([]fse.Option, error) {
	var opts []fse.Option
	if o.tlsCA != "" {
		pem, err := os.ReadFile(o.tlsCA)
		if err != nil {
			return nil, &usageError{what: "--tls-ca", problem: cannotRead(o.tlsCA, err)}
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, &usageError{"--tls-ca", o.tlsCA + ": no PEM certificate", valueHelp["--tls-ca"]}
		}
		opts = append(opts, fse.WithRootCAs(pool))
	}
	if o.tokenFile != "" {
		token, err := readToken(o.tokenFile)
		if err != nil {
			return nil, &usageError{what: "--token-file", problem: cannotRead(o.tokenFile, err)}
		}
		if token == "" {
			return nil, &usageError{"--token-file", o.tokenFile + ": no token on its first line", valueHelp["--token-file"]}
		}
		opts = append(opts, fse.WithToken(token))
	}
	return opts, nil
}

// readToken is the file's first line, whitespace trimmed.
func readToken(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	line, err := bufio.NewReader(f).ReadString('\n')
	if err != nil && !errors.Is(err, io.EOF) {
		return "", err
	}
	return strings.TrimSpace(line), nil
}

// cannotRead is "PATH: cannot read: No such file or directory", the errno's text
// as C's strerror (and so the Python client) spells it.
func cannotRead(path string, err error) string {
	var pe *os.PathError
	if errors.As(err, &pe) {
		err = pe.Err
	}
	why := err.Error()
	if why != "" {
		why = strings.ToUpper(why[:1]) + why[1:]
	}
	return path + ": cannot read: " + why
}

// useColour: only on a terminal, and never when NO_COLOR is set (to anything).
func useColour(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	if _, set := os.LookupEnv("NO_COLOR"); set {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}
