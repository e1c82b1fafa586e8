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
	case errors.Is(e, fse.ErrUnavailable):
		return fail(exitError, fmt.Errorf("UNAVAILABLE: cannot reach the daemon at %s (%s)", addr, e.Message))
	}
	return fail(exitError, e)
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
			return nil, &usageError{"--tls-ca", fileProblem(err), valueHelp["--tls-ca"]}
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
			return nil, &usageError{"--token-file", fileProblem(err), valueHelp["--token-file"]}
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

// fileProblem is "PATH: no such file or directory", without Go's "open " prefix.
func fileProblem(err error) string {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Path + ": " + pe.Err.Error()
	}
	return err.Error()
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
