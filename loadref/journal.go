package main

import (
	"encoding/binary"
	"io"
	"log"
	"net/http"
	"os"
	"sync"
)

// serveJournal answers every push with "success" once its body is on disk:
// the floor of a durable answer, which tells how fast the machine, its disk
// and the generator let any handler be that commits each push before it
// answers, as the bridge does. It checks, decodes and decides nothing.
func serveJournal(path string) {
	j, err := openJournal(path)
	if err != nil {
		log.Fatal("journal: ", err)
	}
	log.Fatal(http.ListenAndServe(os.Getenv("LISTEN_ADDR"), j.handler()))
}

// A journal appends records to a file and fsyncs them. Records that arrive
// while an fsync runs share the next one, as the bridge's group commits do.
type journal struct {
	f    *os.File
	kick chan struct{} // a record waits

	mu      sync.Mutex
	pending []byte       // records not yet written, each after its length
	waiters []chan error // their callers
	spare   []byte       // the buffer last written, for reuse
}

// openJournal starts a journal in a new file at path.
func openJournal(path string) (*journal, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	j := &journal{f: f, kick: make(chan struct{}, 1)}
	go j.run()
	return j, nil
}

// append adds record and returns once an fsync has covered it.
func (j *journal) append(record []byte) error {
	done := make(chan error, 1)
	j.mu.Lock()
	j.pending = binary.BigEndian.AppendUint32(j.pending, uint32(len(record)))
	j.pending = append(j.pending, record...)
	j.waiters = append(j.waiters, done)
	j.mu.Unlock()
	select {
	case j.kick <- struct{}{}:
	default: // the writer is kicked already, and takes this record with the others
	}
	return <-done
}

// run writes whatever waits in one write, fsyncs it and answers its callers,
// for the life of the process.
func (j *journal) run() {
	for range j.kick {
		j.mu.Lock()
		if len(j.waiters) == 0 { // taken by the last round already
			j.mu.Unlock()
			continue
		}
		buf, waiters := j.pending, j.waiters
		j.pending, j.waiters, j.spare = j.spare[:0], nil, nil
		j.mu.Unlock()
		_, err := j.f.Write(buf)
		if err == nil {
			err = j.f.Sync()
		}
		for _, w := range waiters {
			w <- err
		}
		j.mu.Lock()
		j.spare = buf
		j.mu.Unlock()
	}
}

// handler answers pushes on /wechat, and /readyz for the load generator.
func (j *journal) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
	mux.HandleFunc("/wechat", func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
		if err == nil {
			err = j.append(body)
		}
		if err != nil {
			http.Error(w, "push not written", http.StatusInternalServerError)
			return
		}
		io.WriteString(w, "success")
	})
	return mux
}
