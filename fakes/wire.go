package fakes

// The wire: every HTTP request between WeChat, the bridge and IM, with its
// answer, handed to a function as it completes (the demo's console shows
// them). The fakes see all of them: they serve the bridge's calls and make
// the pushes and callbacks.

import (
	"bytes"
	"io"
	"net/http"
	"time"
)

// Exchange is one request and its answer.
type Exchange struct {
	From, To string // "WeChat", "bridge", "IM", or "agent" for an agent's client
	Method   string
	URL      string // path and query
	ReqType  string // the request's Content-Type
	Req      []byte
	Status   int    // 0: no answer came
	RespType string // the answer's Content-Type
	Resp     []byte
	At       time.Time // when the request was made
}

// maxWireBody is how much of a body an Exchange keeps.
const maxWireBody = 64 << 10

// wired calls fn with each exchange h serves, from the caller from to to.
func wired(fn func(Exchange), from, to string, h http.Handler) http.Handler {
	if fn == nil {
		return h
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		at := time.Now()
		req, _ := io.ReadAll(io.LimitReader(r.Body, 4<<20))
		r.Body = io.NopCloser(bytes.NewReader(req))
		rec := &capture{ResponseWriter: w, status: http.StatusOK}
		h.ServeHTTP(rec, r)
		fn(Exchange{From: from, To: to, Method: r.Method, URL: r.URL.RequestURI(), ReqType: r.Header.Get("Content-Type"),
			Req: clip(req), Status: rec.status, RespType: w.Header().Get("Content-Type"), Resp: rec.body.Bytes(), At: at})
	})
}

// capture keeps the status and the first maxWireBody bytes of an answer.
type capture struct {
	http.ResponseWriter
	status int
	body   bytes.Buffer
}

func (c *capture) WriteHeader(status int) {
	c.status = status
	c.ResponseWriter.WriteHeader(status)
}

func (c *capture) Write(b []byte) (int, error) {
	if room := maxWireBody - c.body.Len(); room > 0 {
		c.body.Write(b[:min(room, len(b))])
	}
	return c.ResponseWriter.Write(b)
}

// WiredClient is an HTTP client with timeout whose exchanges, from from to
// to, are handed to fn; with fn nil, a plain client.
func WiredClient(fn func(Exchange), from, to string, timeout time.Duration) *http.Client {
	c := &http.Client{Timeout: timeout}
	if fn != nil {
		c.Transport = wiredTransport{fn: fn, from: from, to: to}
	}
	return c
}

type wiredTransport struct {
	fn       func(Exchange)
	from, to string
}

func (t wiredTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	x := Exchange{From: t.from, To: t.to, Method: r.Method, URL: r.URL.RequestURI(), ReqType: r.Header.Get("Content-Type"), At: time.Now()}
	if r.Body != nil {
		b, err := io.ReadAll(r.Body)
		r.Body.Close()
		if err != nil {
			return nil, err
		}
		x.Req = clip(b)
		r = r.Clone(r.Context())
		r.Body = io.NopCloser(bytes.NewReader(b))
	}
	resp, err := http.DefaultTransport.RoundTrip(r)
	if err != nil {
		t.fn(x)
		return nil, err
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	resp.Body = io.NopCloser(bytes.NewReader(b))
	x.Status, x.RespType, x.Resp = resp.StatusCode, resp.Header.Get("Content-Type"), clip(b)
	t.fn(x)
	return resp, err
}

func clip(b []byte) []byte { return b[:min(len(b), maxWireBody)] }
