package finetune

/*
#include "loader.h"
*/
import "C"

import (
	"fmt"
	"runtime"
)

// Status is a library status code (FT_ERR_*).
type Status int32

// The library's status codes.
const (
	StatusOK              Status = C.FT_OK
	StatusInvalidArgument Status = C.FT_ERR_INVALID_ARGUMENT
	StatusIO              Status = C.FT_ERR_IO
	StatusFormat          Status = C.FT_ERR_FORMAT
	StatusUnsupported     Status = C.FT_ERR_UNSUPPORTED
	StatusAdapterMismatch Status = C.FT_ERR_ADAPTER_MISMATCH
	StatusCancelled       Status = C.FT_ERR_CANCELLED
	StatusNonFinite       Status = C.FT_ERR_NON_FINITE
	StatusInternal        Status = C.FT_ERR_INTERNAL
	StatusDevice          Status = C.FT_ERR_DEVICE
	StatusOutOfMemory     Status = C.FT_ERR_OUT_OF_MEMORY
	// StatusCollective: a data-parallel group failed (another rank failed, died or timed out).
	StatusCollective Status = C.FT_ERR_COLLECTIVE
)

// String gives the status's C name, such as "FT_ERR_IO".
func (s Status) String() string {
	if load() != nil {
		return fmt.Sprintf("FT_STATUS_%d", int32(s))
	}
	return C.GoString(C.ftgo_status_name(C.ft_status(s)))
}

// Error is a failed library call: which function, its status, and the library's message.
// errors.Is(err, finetune.ErrCancelled) and the other Err* values match on the status; an
// error from a context's cancellation also matches that context's error.
type Error struct {
	Op      string // the C function, such as "ft_model_load"
	Status  Status
	Message string // ft_last_error()
	cause   error
}

func (e *Error) Error() string {
	return fmt.Sprintf("finetune: %s: %s: %s", e.Op, e.Status, e.Message)
}

// Is matches another *Error of the same status, so the Err* values work with errors.Is.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Op == "" && t.Status == e.Status
}

// Unwrap gives the context's error when a cancelled context stopped training.
func (e *Error) Unwrap() error { return e.cause }

// Values to compare with errors.Is.
var (
	ErrInvalidArgument = &Error{Status: StatusInvalidArgument}
	ErrIO              = &Error{Status: StatusIO}
	ErrFormat          = &Error{Status: StatusFormat}
	ErrUnsupported     = &Error{Status: StatusUnsupported}
	ErrAdapterMismatch = &Error{Status: StatusAdapterMismatch}
	ErrCancelled       = &Error{Status: StatusCancelled}
	ErrNonFinite       = &Error{Status: StatusNonFinite}
	ErrInternal        = &Error{Status: StatusInternal}
	ErrDevice          = &Error{Status: StatusDevice}
	ErrOutOfMemory     = &Error{Status: StatusOutOfMemory}
	ErrCollective      = &Error{Status: StatusCollective}
)

// call runs one C call and, on failure, reads ft_last_error on the same OS thread (the message
// is thread-local on the library's side).
func call(op string, f func() C.ft_status) error {
	if err := load(); err != nil {
		return err
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	st := f()
	if st == C.FT_OK {
		return nil
	}
	return &Error{Op: op, Status: Status(st), Message: C.GoString(C.ftgo_last_error())}
}
