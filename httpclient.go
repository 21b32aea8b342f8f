package main

// What both vendor clients share: posting JSON, keeping credentials out of
// errors, and sharing a credential between instances.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"time"
)

// maxAnswerBytes bounds a vendor's answer.
const maxAnswerBytes = 1 << 20

// postJSON posts body to u and returns the answer's body. A transport error
// is returned with the query string (where both vendors carry credentials)
// cut from its URL; an HTTP status other than 200 is an *HTTPStatusError.
// service names the call in errors, e.g. "im openim/sendmsg".
func postJSON(ctx context.Context, c *http.Client, service, u string, body []byte) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, bytes.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", service, redactErr(err))
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", service, redactErr(err))
	}
	defer resp.Body.Close()
	raw, err := readLimited(resp.Body, maxAnswerBytes)
	if err != nil {
		return nil, fmt.Errorf("%s: read answer: %w", service, redactErr(err))
	}
	if resp.StatusCode != http.StatusOK {
		return nil, &HTTPStatusError{Service: service, Status: resp.StatusCode}
	}
	return raw, nil
}

// HTTPStatusError is a vendor answer with an HTTP status other than 200.
type HTTPStatusError struct {
	Service string
	Status  int
}

func (e *HTTPStatusError) Error() string {
	return fmt.Sprintf("%s: http status %d", e.Service, e.Status)
}

// redactErr strips the query string, where both vendors carry credentials,
// from the URL Go's HTTP client writes into its errors.
func redactErr(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		if u, perr := url.Parse(ue.URL); perr == nil {
			u.RawQuery = ""
			if u.User != nil {
				u.User = nil
			}
			return &url.Error{Op: ue.Op, URL: u.String() + "?…", Err: ue.Err}
		}
		return &url.Error{Op: ue.Op, URL: "(redacted)", Err: ue.Err}
	}
	return err
}

// marshalJSON encodes v as compact JSON without escaping <, > and &, which
// vendors read as they are and which would garble a customer's text in logs.
func marshalJSON(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}

// sharedCredential fetches a credential through the store, so that one
// instance refreshes it for all; see Store.SharedCredential.
type sharedCredential func(ctx context.Context, name, stale string, now time.Time, fetch func() (string, time.Time, error)) (string, time.Time, error)

// notCalled marks an error met before the vendor's API was called (its
// credential could not be had): the vendor did nothing.
type notCalled struct{ error }

func (e notCalled) Unwrap() error { return e.error }
