package main

// The one client that fetches URLs that came from outside (DESIGN.md,
// invariant 11): a customer's media at the links WeChat gives, an agent's
// picture, sound or video in IM's storage. Anyone who can send the bridge a
// message element chooses such a URL, so the client connects only to
// public addresses, checked on the address it dials (a name cannot resolve
// past the check), re-checks every redirect, reads no more than the type's
// limit, and spools what it reads to disk, never to memory.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"slices"
	"strings"
	"syscall"
	"time"
)

// fetcher fetches untrusted URLs into spools.
type fetcher struct {
	client  *http.Client
	timeout time.Duration // MEDIA_FETCH_TIMEOUT: all the fetching of one delivery
	dir     string        // where spools are written ("": the system's temporary folder)
}

// newFetcher returns a fetcher that connects to public addresses, and to
// the hosts of allow (MEDIA_FETCH_ALLOW: "host" or "host:port") whatever
// their address.
func newFetcher(allow []string, timeout time.Duration, dir string) *fetcher {
	guard := &net.Dialer{Timeout: timeout, Control: refusePrivate}
	open := &net.Dialer{Timeout: timeout}
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		if admitted(allow, addr) {
			return open.DialContext(ctx, network, addr)
		}
		return guard.DialContext(ctx, network, addr)
	}
	return &fetcher{timeout: timeout, dir: dir, client: &http.Client{
		Transport: &http.Transport{
			Proxy:                 nil, // a proxy would dial in the fetcher's place, past the check
			DialContext:           dial,
			TLSHandshakeTimeout:   timeout,
			ResponseHeaderTimeout: timeout,
			MaxIdleConnsPerHost:   4,
			IdleConnTimeout:       90 * time.Second,
		},
		CheckRedirect: func(req *http.Request, via []*http.Request) error {
			if len(via) >= 5 {
				return mediaError{"it is redirected more than 5 times", true}
			}
			return checkScheme(req.URL)
		},
	}}
}

// admitted reports whether addr ("host:port", as requested) is one of
// allow's hosts: "host" admits it on any port, "host:port" on that one.
func admitted(allow []string, addr string) bool {
	host, _, _ := net.SplitHostPort(addr)
	return slices.ContainsFunc(allow, func(a string) bool {
		return strings.EqualFold(a, addr) || strings.EqualFold(a, host)
	})
}

// refusePrivate refuses to connect to an address that is not public:
// loopback, private, link-local (cloud metadata at 169.254.169.254),
// shared (100.64.0.0/10), multicast or unspecified. It runs on the address
// being dialled, after the name was resolved.
func refusePrivate(network, address string, _ syscall.RawConn) error {
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return mediaError{fmt.Sprintf("its address %q cannot be checked", address), true}
	}
	if why := notPublic(ap.Addr().Unmap()); why != "" {
		// The address itself stays out of the reason, which the agent
		// reads: it would tell what names resolve to inside.
		return mediaError{"the bridge fetches media only from public addresses, and its host's is " + why, true}
	}
	return nil
}

// inward are the address blocks that lead inside a network, or nowhere,
// rather than to a public host (IANA's special-purpose registries), besides
// what netip's predicates tell: loopback, private, link-local, multicast,
// unspecified.
var inward = []struct {
	prefix netip.Prefix
	what   string
}{
	{netip.MustParsePrefix("0.0.0.0/8"), "\"this network\" (0.0.0.0/8)"},
	{netip.MustParsePrefix("100.64.0.0/10"), "shared (100.64.0.0/10)"},
	{netip.MustParsePrefix("192.0.0.0/24"), "reserved (192.0.0.0/24)"},
	{netip.MustParsePrefix("192.0.2.0/24"), "for documentation"},
	{netip.MustParsePrefix("198.18.0.0/15"), "for benchmarks (198.18.0.0/15)"},
	{netip.MustParsePrefix("198.51.100.0/24"), "for documentation"},
	{netip.MustParsePrefix("203.0.113.0/24"), "for documentation"},
	{netip.MustParsePrefix("240.0.0.0/4"), "reserved (240.0.0.0/4)"},
	{netip.MustParsePrefix("::/96"), "IPv4-compatible (::/96)"},
	{netip.MustParsePrefix("64:ff9b:1::/48"), "local NAT64 (64:ff9b:1::/48)"},
	{netip.MustParsePrefix("100::/64"), "a discard address (100::/64)"},
	{netip.MustParsePrefix("2001::/23"), "reserved (2001::/23, Teredo included)"},
	{netip.MustParsePrefix("2001:db8::/32"), "for documentation"},
	{netip.MustParsePrefix("fec0::/10"), "site-local (fec0::/10)"},
}

// Blocks that carry an IPv4 address inside an IPv6 one: the IPv4 address
// is where a connection goes, and is judged.
var (
	nat64     = netip.MustParsePrefix("64:ff9b::/96") // RFC 6052: the last 32 bits
	sixToFour = netip.MustParsePrefix("2002::/16")    // RFC 3056: bits 16 to 48
)

// notPublic says what kind of address a is, or "" if it is public.
func notPublic(a netip.Addr) string {
	a = a.Unmap()
	switch b := a.As16(); {
	case nat64.Contains(a):
		return notPublic(netip.AddrFrom4([4]byte(b[12:16])))
	case sixToFour.Contains(a):
		return notPublic(netip.AddrFrom4([4]byte(b[2:6])))
	case a.IsLoopback():
		return "loopback"
	case a.IsPrivate():
		return "private"
	case a.IsLinkLocalUnicast() || a.IsLinkLocalMulticast():
		return "link-local"
	case a.IsMulticast() || a.IsInterfaceLocalMulticast():
		return "multicast"
	case a.IsUnspecified():
		return "unspecified"
	}
	for _, b := range inward {
		if b.prefix.Contains(a) {
			return b.what
		}
	}
	return ""
}

// checkScheme refuses any URL but http(s).
func checkScheme(u *url.URL) error {
	if u.Scheme != "http" && u.Scheme != "https" {
		return mediaError{fmt.Sprintf("the bridge fetches media only over http(s), not %q", u.Scheme), true}
	}
	return nil
}

// mediaError is a failure of the file itself: too large, of a type the
// other side does not take, at a URL the bridge does not fetch or that
// answers 4xx, or too slow to download. No retry can fix it: the message
// crosses in its fallback form at the first attempt.
type mediaError struct {
	why         string
	unreachable bool // the bridge cannot fetch it at all: there is nothing to link to
}

func (e mediaError) Error() string { return e.why }

// errFetchSlow is the cause of a fetch cut off by MEDIA_FETCH_TIMEOUT.
var errFetchSlow = errors.New("media fetch timed out")

// deadline bounds all the fetching of one delivery by MEDIA_FETCH_TIMEOUT.
func (f *fetcher) deadline(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeoutCause(ctx, f.timeout, errFetchSlow)
}

// get fetches u into a spool of at most limit bytes. Errors of the file
// itself are mediaErrors; any other (a 5xx or 429, a broken connection)
// is the host's passing trouble, retried for mediaFetchTries attempts.
func (f *fetcher) get(ctx context.Context, service, u string, limit int64) (*spool, error) {
	pu, err := url.Parse(u)
	if err != nil {
		return nil, mediaError{fmt.Sprintf("its URL cannot be read: %v", redactErr(err)), true}
	}
	if err := checkScheme(pu); err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, mediaError{fmt.Sprintf("its URL cannot be read: %v", redactErr(err)), true}
	}
	resp, err := f.client.Do(req)
	if err != nil {
		return nil, fetchFailed(ctx, service, err)
	}
	return f.save(ctx, service, resp, limit)
}

// save spools resp's body, at most limit bytes, and closes it.
func (f *fetcher) save(ctx context.Context, service string, resp *http.Response, limit int64) (*spool, error) {
	defer resp.Body.Close()
	switch {
	case resp.StatusCode >= 500 || resp.StatusCode == http.StatusTooManyRequests:
		return nil, &HTTPStatusError{Service: service, Status: resp.StatusCode} // the host's passing trouble
	case resp.StatusCode != http.StatusOK:
		return nil, mediaError{fmt.Sprintf("its URL answers HTTP %d", resp.StatusCode), true}
	case resp.ContentLength > limit:
		return nil, mediaError{why: fmt.Sprintf("it has more than %s", megabytes(limit))}
	}
	sp, err := newSpool(f.dir)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", service, err)
	}
	n, err := io.Copy(sp.File, io.LimitReader(resp.Body, limit+1))
	switch {
	case err != nil:
		err = fetchFailed(ctx, service, err)
	case n > limit:
		err = mediaError{why: fmt.Sprintf("it has more than %s", megabytes(limit))}
	}
	if err != nil {
		sp.Close()
		return nil, err
	}
	sp.size, sp.contentType = n, resp.Header.Get("Content-Type")
	return sp, nil
}

// fetchFailed judges a fetch that failed with err: cut off by
// MEDIA_FETCH_TIMEOUT or refused by the guard, the file's own failure;
// anything else the host's.
func fetchFailed(ctx context.Context, service string, err error) error {
	var me mediaError
	switch {
	case errors.As(err, &me):
		return me
	case errors.Is(context.Cause(ctx), errFetchSlow):
		return mediaError{why: "it did not download within MEDIA_FETCH_TIMEOUT"}
	}
	return fmt.Errorf("%s: %w", service, redactErr(err))
}

// megabytes writes n bytes in MB.
func megabytes(n int64) string {
	if n < 1<<20 {
		return fmt.Sprintf("%d KB", n>>10)
	}
	return fmt.Sprintf("%d MB", n>>20)
}

// spool is a fetched file, on disk: media crosses the bridge without being
// held in memory. Close removes it unless the store kept it.
type spool struct {
	*os.File
	size        int64
	contentType string // as its source said
	path        string // "" once removed from its folder, or kept
}

// newSpool makes an empty spool in dir. In the system's temporary folder
// ("") it is unlinked at once, so that a crash leaves nothing there; in the
// media folder it is named *.tmp, and the store removes those at start.
func newSpool(dir string) (*spool, error) {
	if dir == "" {
		f, err := os.CreateTemp("", "wechat-im-bridge-*")
		if err != nil {
			return nil, fmt.Errorf("spool: %w", err)
		}
		os.Remove(f.Name())
		return &spool{File: f}, nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("spool: %w", err)
	}
	f, err := os.CreateTemp(dir, spoolPrefix+"*"+spoolSuffix)
	if err != nil {
		return nil, fmt.Errorf("spool: %w", err)
	}
	return &spool{File: f, path: f.Name()}, nil
}

// spoolPrefix and spoolSuffix name the spools in the media folder.
const spoolPrefix, spoolSuffix = "spool-", ".tmp"

// head returns the spool's first n bytes at most, by which a type is told.
func (s *spool) head(n int) []byte {
	b := make([]byte, min(int64(n), s.size))
	k, _ := s.ReadAt(b, 0)
	return b[:k]
}

// reader reads the whole spool from its start.
func (s *spool) reader() io.Reader { return io.NewSectionReader(s.File, 0, s.size) }

// Close closes the spool and removes its file, unless it was kept.
func (s *spool) Close() error {
	err := s.File.Close()
	if s.path != "" {
		os.Remove(s.path)
	}
	return err
}
