package http

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"

	"github.com/labstack/echo/v4"

	"github.com/distributedcompute/fleet"
)

// statusOf maps the domain's error codes onto HTTP statuses.
var statusOf = map[string]int{
	fleet.EUNAUTHORIZED:     http.StatusUnauthorized,
	fleet.EFORBIDDEN:        http.StatusForbidden,
	fleet.ENOTFOUND:         http.StatusNotFound,
	fleet.EVALIDATION:       http.StatusBadRequest,
	fleet.ECONFLICT:         http.StatusConflict,
	fleet.ETOOLARGE:         http.StatusRequestEntityTooLarge,
	fleet.ERATELIMITED:      http.StatusTooManyRequests,
	fleet.EINTERNAL:         http.StatusInternalServerError,
	fleet.EMETHODNOTALLOWED: http.StatusMethodNotAllowed,
}

// errUnauthorized is the one answer to every authentication failure, so that
// a caller learns nothing about why a token was refused.
var errUnauthorized = fleet.Errorf(fleet.EUNAUTHORIZED, "Invalid or expired token")

type envelope struct {
	Success bool       `json:"success"`
	Data    any        `json:"data,omitempty"`
	Meta    any        `json:"meta,omitempty"`
	Error   *errorBody `json:"error,omitempty"`
}

type errorBody struct {
	Code    string            `json:"code"`
	Message string            `json:"message"`
	Details map[string]string `json:"details,omitempty"`
}

func ok(c echo.Context, status int, data any) error {
	return c.JSON(status, envelope{Success: true, Data: data})
}

func okList(c echo.Context, data, meta any) error {
	return c.JSON(http.StatusOK, envelope{Success: true, Data: data, Meta: meta})
}

// handleError is Echo's error handler: every error leaves as the envelope.
// Internal errors are logged with the request ID and answered generically.
func (s *Server) handleError(err error, c echo.Context) {
	if c.Response().Committed {
		return
	}
	var he *echo.HTTPError
	if errors.As(err, &he) {
		err = fromEchoError(he)
	}
	code := fleet.ErrorCode(err)
	var details map[string]string
	var fe *fleet.Error
	if errors.As(err, &fe) {
		details = fe.Details
	}
	if code == fleet.EINTERNAL {
		s.log.LogAttrs(c.Request().Context(), slog.LevelError, "internal error",
			slog.String("request_id", requestID(c)), slog.String("error", err.Error()))
	}
	body := envelope{Error: &errorBody{Code: code, Message: fleet.ErrorMessage(err), Details: details}}
	if c.Request().Method == http.MethodHead {
		_ = c.NoContent(statusOf[code])
		return
	}
	_ = c.JSON(statusOf[code], body)
}

// fromEchoError turns Echo's own errors (routing, body limit) into domain
// errors with the documented codes.
func fromEchoError(he *echo.HTTPError) error {
	switch he.Code {
	case http.StatusNotFound:
		return fleet.Errorf(fleet.ENOTFOUND, "Route not found.")
	case http.StatusMethodNotAllowed:
		return fleet.Errorf(fleet.EMETHODNOTALLOWED, "Method not allowed.")
	case http.StatusRequestEntityTooLarge:
		return fleet.Errorf(fleet.ETOOLARGE, "Request body too large.")
	case http.StatusUnauthorized:
		return errUnauthorized
	case http.StatusTooManyRequests:
		return fleet.Errorf(fleet.ERATELIMITED, "Too many requests.")
	case http.StatusBadRequest:
		return fleet.Errorf(fleet.EVALIDATION, "Bad request.")
	}
	if he.Internal != nil {
		return fmt.Errorf("echo: %w", he.Internal)
	}
	return fmt.Errorf("echo: %v", he.Message)
}

// bind decodes a JSON body strictly into v: one JSON object, known fields
// only, each type error naming its field.
func bind(c echo.Context, v any) error {
	req := c.Request()
	if ct := req.Header.Get(echo.HeaderContentType); ct != "" && !strings.HasPrefix(ct, echo.MIMEApplicationJSON) {
		return &fleet.Error{Code: fleet.EVALIDATION, Message: "Request body must be JSON.",
			Details: map[string]string{"body": "Content-Type must be application/json"}}
	}
	dec := json.NewDecoder(req.Body)
	dec.DisallowUnknownFields()
	err := dec.Decode(v)
	if err == nil {
		if dec.More() {
			err = errors.New("trailing data after the JSON object")
		} else if _, terr := dec.Token(); terr != io.EOF {
			err = errors.New("trailing data after the JSON object")
		}
	}
	if err == nil {
		return nil
	}
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		return fleet.Errorf(fleet.ETOOLARGE, "Request body too large.")
	}
	field, reason := "body", "must be a JSON object"
	var te *json.UnmarshalTypeError
	switch {
	case errors.As(err, &te) && te.Field != "":
		field, reason = te.Field, "must be of type "+jsonType(te.Type.Kind().String())
	case strings.HasPrefix(err.Error(), "json: unknown field "):
		field = strings.Trim(strings.TrimPrefix(err.Error(), "json: unknown field "), `"`)
		reason = "is not a known or editable field"
	case errors.Is(err, io.EOF):
		reason = "is required"
	}
	return &fleet.Error{Code: fleet.EVALIDATION, Message: "Request validation failed.", Details: map[string]string{field: reason}}
}

func jsonType(kind string) string {
	switch {
	case strings.HasPrefix(kind, "int"), strings.HasPrefix(kind, "uint"), strings.HasPrefix(kind, "float"):
		return "number"
	case kind == "struct", kind == "map", kind == "ptr":
		return "object"
	case kind == "slice":
		return "array"
	}
	return kind
}
