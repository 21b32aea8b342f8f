package main

import (
	"database/sql"
	"encoding/binary"
	"errors"
	"io"
	"log"
	"net/http"
	"os"
	"sync"

	_ "modernc.org/sqlite" // the bridge's SQLite driver
)

// serveJournal answers every push with "success" once its body is on disk:
// the floor of a durable answer, which tells how fast the machine, its disk
// and the generator let any handler be that commits each push before it
// answers, as the bridge does. It checks, decodes and decides nothing.
// open is openJournal (a file) or openSQLiteJournal.
func serveJournal(open func(path string) (*journal, error), path string) {
	j, err := open(path)
	if err != nil {
		log.Fatal("journal: ", err)
	}
	log.Fatal(http.ListenAndServe(os.Getenv("LISTEN_ADDR"), j.handler()))
}

// A journal makes records durable, many at a time: records that arrive
// while one group is made durable share the next, as the bridge's group
// commits do.
type journal struct {
	flush  func(records []byte) error // makes records, each after its length, durable
	closer io.Closer                  // what flush writes to
	kick   chan struct{}              // a record waits

	mu      sync.Mutex
	pending []byte       // records not yet written, each after its length
	waiters []chan error // their callers
	spare   []byte       // the buffer last written, for reuse
}

// openJournal starts a journal in a new file at path: each group of
// records is appended in one write and fsynced.
func openJournal(path string) (*journal, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	flush := func(records []byte) error {
		if _, err := f.Write(records); err != nil {
			return err
		}
		return f.Sync()
	}
	return startJournal(flush, f), nil
}

// openSQLiteJournal starts a journal in a new SQLite database at path, on
// the bridge's driver and in its WAL mode: each group of records is
// inserted in one transaction, a row each into a table with no index, and
// the commit fsyncs the log (synchronous=FULL). It is the floor of a
// durable answer on SQLite: one statement a push, the least a store of
// record on SQLite can do.
func openSQLiteJournal(path string) (*journal, error) {
	for _, p := range []string{path, path + "-wal", path + "-shm"} {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, err
		}
	}
	db, err := sql.Open("sqlite", "file:"+path+"?_pragma=journal_mode(WAL)&_pragma=synchronous(FULL)")
	if err != nil {
		return nil, err
	}
	db.SetMaxOpenConns(1)
	if _, err := db.Exec(`CREATE TABLE pushes (body BLOB NOT NULL)`); err != nil {
		db.Close()
		return nil, err
	}
	insert, err := db.Prepare(`INSERT INTO pushes (body) VALUES (?)`)
	if err != nil {
		db.Close()
		return nil, err
	}
	flush := func(records []byte) error {
		tx, err := db.Begin()
		if err != nil {
			return err
		}
		stmt := tx.Stmt(insert)
		for len(records) > 0 {
			size := binary.BigEndian.Uint32(records)
			if _, err := stmt.Exec(records[4 : 4+size]); err != nil {
				tx.Rollback()
				return err
			}
			records = records[4+size:]
		}
		return tx.Commit()
	}
	return startJournal(flush, db), nil
}

// startJournal starts a journal that makes its records durable with flush.
func startJournal(flush func([]byte) error, closer io.Closer) *journal {
	j := &journal{flush: flush, closer: closer, kick: make(chan struct{}, 1)}
	go j.run()
	return j
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

// run makes whatever waits durable in one flush and answers its callers,
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
		err := j.flush(buf)
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
	mux := newMux()
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
