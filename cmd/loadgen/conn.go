package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net"
	"strconv"
	"time"
)

// pushConn is one keep-alive HTTP/1.1 connection to the bridge. It speaks
// just enough of the protocol for a POST and its answer, as wrk does, so
// that the load generator takes little of the CPU it shares with the
// bridge; a net/http client costs several times more a request.
type pushConn struct {
	addr string
	conn net.Conn
	r    *bufio.Reader
	buf  []byte
}

// post sends body to path and returns the answer's status, having read the
// answer whole. On any error the connection is closed; the next post dials
// again.
func (p *pushConn) post(path, body string) (status int, err error) {
	defer func() {
		if err != nil {
			p.close()
		}
	}()
	if p.conn == nil {
		if p.conn, err = net.Dial("tcp", p.addr); err != nil {
			return 0, err
		}
		p.r = bufio.NewReader(p.conn)
	}
	p.conn.SetDeadline(time.Now().Add(10 * time.Second))
	p.buf = fmt.Appendf(p.buf[:0], "POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: text/xml\r\nContent-Length: %d\r\n\r\n%s",
		path, p.addr, len(body), body)
	if _, err := p.conn.Write(p.buf); err != nil {
		return 0, err
	}
	line, err := p.r.ReadSlice('\n')
	if err != nil {
		return 0, err
	}
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.1 ")) {
		return 0, fmt.Errorf("bad status line %q", line)
	}
	if status, err = strconv.Atoi(string(line[9:12])); err != nil {
		return 0, fmt.Errorf("bad status line %q", line)
	}
	length, keep := -1, true
	for {
		line, err := p.r.ReadSlice('\n')
		if err != nil {
			return 0, err
		}
		h := bytes.TrimRight(line, "\r\n")
		if len(h) == 0 {
			break
		}
		name, value, _ := bytes.Cut(h, []byte(":"))
		value = bytes.TrimSpace(value)
		switch {
		case bytes.EqualFold(name, []byte("Content-Length")):
			if length, err = strconv.Atoi(string(value)); err != nil {
				return 0, fmt.Errorf("bad Content-Length %q", value)
			}
		case bytes.EqualFold(name, []byte("Transfer-Encoding")):
			return 0, fmt.Errorf("answer with Transfer-Encoding %q: not spoken here", value)
		case bytes.EqualFold(name, []byte("Connection")) && bytes.EqualFold(value, []byte("close")):
			keep = false
		}
	}
	if length < 0 {
		return 0, errors.New("answer without Content-Length")
	}
	if _, err := p.r.Discard(length); err != nil {
		return 0, err
	}
	if !keep {
		p.close()
	}
	return status, nil
}

func (p *pushConn) close() {
	if p.conn != nil {
		p.conn.Close()
		p.conn, p.r = nil, nil
	}
}
