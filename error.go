package fleet

import (
	"errors"
	"fmt"
)

// Error codes. Each maps onto one HTTP status in the http package and is the
// "code" of the error envelope.
const (
	EUNAUTHORIZED     = "UNAUTHORIZED"
	EFORBIDDEN        = "FORBIDDEN"
	ENOTFOUND         = "NOT_FOUND"
	EVALIDATION       = "VALIDATION_ERROR"
	ECONFLICT         = "CONFLICT"
	ETOOLARGE         = "PAYLOAD_TOO_LARGE"
	ERATELIMITED      = "RATE_LIMITED"
	EINTERNAL         = "INTERNAL_ERROR"
	EMETHODNOTALLOWED = "METHOD_NOT_ALLOWED"
)

// Error is a domain error whose code and message are safe to show to the
// caller. Any other error is internal: it is logged, never returned.
type Error struct {
	Code    string
	Message string
	// Details names the offending field for validation errors: field -> reason.
	Details map[string]string
}

func (e *Error) Error() string {
	return fmt.Sprintf("fleet error: code=%s message=%s", e.Code, e.Message)
}

// Errorf returns an *Error with the given code and a formatted message.
func Errorf(code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// ErrorCode returns the code of the first *Error in err's chain, EINTERNAL for
// any other error and "" for nil.
func ErrorCode(err error) string {
	var e *Error
	if err == nil {
		return ""
	} else if errors.As(err, &e) {
		return e.Code
	}
	return EINTERNAL
}

// ErrorMessage returns the message of the first *Error in err's chain, or a
// generic message for internal errors.
func ErrorMessage(err error) string {
	var e *Error
	if err == nil {
		return ""
	} else if errors.As(err, &e) {
		return e.Message
	}
	return "Internal error."
}

// ValidationError collects per-field problems of one input.
type ValidationError struct{ fields map[string]string }

// Add records a problem with field, keeping the first one reported.
func (v *ValidationError) Add(field, reason string) {
	if v.fields == nil {
		v.fields = make(map[string]string)
	}
	if _, ok := v.fields[field]; !ok {
		v.fields[field] = reason
	}
}

// Err returns nil when nothing was added, or an EVALIDATION *Error whose
// details name every offending field.
func (v *ValidationError) Err() error {
	if len(v.fields) == 0 {
		return nil
	}
	return &Error{Code: EVALIDATION, Message: "Request validation failed.", Details: v.fields}
}
