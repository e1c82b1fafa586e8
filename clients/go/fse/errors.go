package fse

import (
	"context"
	"errors"
	"io"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Error is every failure of a call: the gRPC status code and the server's message
// (or grpc-go's, when the daemon could not be reached). A policy halt is not an
// error: it is a [Verdict].
//
// Match a code with errors.Is and a sentinel, or read it with errors.As:
//
//	if errors.Is(err, fse.ErrInvalidArgument) { ... }
//	var e *fse.Error
//	if errors.As(err, &e) { log.Print(e.Code, e.Message) }
//
// When the caller's context ended the call, the context's error is wrapped too,
// so errors.Is(err, context.DeadlineExceeded) holds.
type Error struct {
	Code    codes.Code
	Message string
	cause   error
}

// Sentinels for errors.Is: an *Error matches any of them with the same code.
var (
	ErrInvalidArgument   = &Error{Code: codes.InvalidArgument}
	ErrUnavailable       = &Error{Code: codes.Unavailable}
	ErrUnauthenticated   = &Error{Code: codes.Unauthenticated}
	ErrPermissionDenied  = &Error{Code: codes.PermissionDenied}
	ErrResourceExhausted = &Error{Code: codes.ResourceExhausted}
	ErrInternal          = &Error{Code: codes.Internal}
	ErrCanceled          = &Error{Code: codes.Canceled}
	ErrDeadlineExceeded  = &Error{Code: codes.DeadlineExceeded}
)

// Error returns "CODE: MESSAGE", CODE being the canonical name (e.g. UNAVAILABLE).
func (e *Error) Error() string { return CodeName(e.Code) + ": " + e.Message }

// Is reports whether target is an *Error with the same code and either the same
// message or none (the sentinels have none).
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Code == e.Code && (t.Message == "" || t.Message == e.Message)
}

// Unwrap returns the context error that ended the call, if any.
func (e *Error) Unwrap() error { return e.cause }

// GRPCStatus lets status.FromError and status.Code read the error.
func (e *Error) GRPCStatus() *status.Status { return status.New(e.Code, e.Message) }

// canonicalNames are the gRPC codes' names as the gRPC spec and every other
// language spell them (codes.Code.String says "InvalidArgument").
var canonicalNames = [...]string{
	codes.OK:                 "OK",
	codes.Canceled:           "CANCELLED",
	codes.Unknown:            "UNKNOWN",
	codes.InvalidArgument:    "INVALID_ARGUMENT",
	codes.DeadlineExceeded:   "DEADLINE_EXCEEDED",
	codes.NotFound:           "NOT_FOUND",
	codes.AlreadyExists:      "ALREADY_EXISTS",
	codes.PermissionDenied:   "PERMISSION_DENIED",
	codes.ResourceExhausted:  "RESOURCE_EXHAUSTED",
	codes.FailedPrecondition: "FAILED_PRECONDITION",
	codes.Aborted:            "ABORTED",
	codes.OutOfRange:         "OUT_OF_RANGE",
	codes.Unimplemented:      "UNIMPLEMENTED",
	codes.Internal:           "INTERNAL",
	codes.Unavailable:        "UNAVAILABLE",
	codes.DataLoss:           "DATA_LOSS",
	codes.Unauthenticated:    "UNAUTHENTICATED",
}

// CodeName returns the canonical name of a gRPC code, e.g. "INVALID_ARGUMENT".
func CodeName(c codes.Code) string {
	if int(c) < len(canonicalNames) {
		return canonicalNames[c]
	}
	return "UNKNOWN"
}

// fromRPC turns what grpc-go returned into an *Error. ctx is the call's context:
// when it is done, its error becomes the cause. io.EOF is a stream the daemon at
// addr closed without its verdict.
func fromRPC(ctx context.Context, addr string, err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, io.EOF) {
		return &Error{Code: codes.Unknown, Message: "the daemon at " + addr + " ended the stream without a verdict"}
	}
	var already *Error
	if errors.As(err, &already) {
		return err
	}
	st := status.Convert(err)
	e := &Error{Code: st.Code(), Message: st.Message()}
	switch {
	case st.Code() != codes.Canceled && st.Code() != codes.DeadlineExceeded:
	case ctx.Err() != nil:
		e.cause = ctx.Err()
	case st.Code() == codes.DeadlineExceeded:
		// The server's timer (the grpc-timeout header) can fire before ctx's own.
		if d, ok := ctx.Deadline(); ok && !time.Now().Before(d) {
			e.cause = context.DeadlineExceeded
		}
	}
	return e
}
