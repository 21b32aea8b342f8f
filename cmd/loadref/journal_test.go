package main

import (
	"database/sql"
	"encoding/binary"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
)

// The journals, each with what it holds once it has answered.
var journals = []struct {
	name string
	open func(path string) (*journal, error)
	read func(t *testing.T, path string) []string
}{
	{"file", openJournal, readJournalFile},
	{"sqlite", openSQLiteJournal, readJournalDB},
}

// Every push answered "success" is in the journal, once, whole; concurrent
// pushes share flushes without losing or mixing records.
func TestJournalKeepsEveryAnsweredPush(t *testing.T) {
	for _, jk := range journals {
		t.Run(jk.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "journal")
			j, err := jk.open(path)
			if err != nil {
				t.Fatal(err)
			}
			testKeepsEveryAnsweredPush(t, j, func() []string { return jk.read(t, path) })
		})
	}
}

func testKeepsEveryAnsweredPush(t *testing.T, j *journal, read func() []string) {
	srv := httptest.NewServer(j.handler())
	defer srv.Close()

	const n = 64
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			body := fmt.Sprintf("<xml><Content>push %d</Content></xml>", i)
			resp, err := http.Post(srv.URL+"/wechat", "text/xml", strings.NewReader(body))
			if err != nil {
				errs <- err
				return
			}
			defer resp.Body.Close()
			got, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != http.StatusOK || string(got) != "success" {
				errs <- fmt.Errorf("push %d: got %d %q, want 200 success", i, resp.StatusCode, got)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}

	got := read()
	var want []string
	for i := range n {
		want = append(want, fmt.Sprintf("<xml><Content>push %d</Content></xml>", i))
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("journal holds %d records %q, want the %d pushes", len(got), got, n)
	}
}

// readJournalFile returns the records of the journal file at path.
func readJournalFile(t *testing.T, path string) []string {
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for len(data) > 0 {
		if len(data) < 4 || len(data) < 4+int(binary.BigEndian.Uint32(data)) {
			t.Fatalf("journal ends in a torn record: %q", data)
		}
		size := int(binary.BigEndian.Uint32(data))
		got = append(got, string(data[4:4+size]))
		data = data[4+size:]
	}
	return got
}

// readJournalDB returns the records of the SQLite journal at path, read
// through a connection of its own.
func readJournalDB(t *testing.T, path string) []string {
	db, err := sql.Open("sqlite", "file:"+path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	rows, err := db.Query(`SELECT body FROM pushes`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var got []string
	for rows.Next() {
		var b []byte
		if err := rows.Scan(&b); err != nil {
			t.Fatal(err)
		}
		got = append(got, string(b))
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return got
}

// A push that cannot be written is refused, not answered "success".
func TestJournalRefusesWhatItCannotWrite(t *testing.T) {
	for _, jk := range journals {
		t.Run(jk.name, func(t *testing.T) {
			j, err := jk.open(filepath.Join(t.TempDir(), "journal"))
			if err != nil {
				t.Fatal(err)
			}
			j.closer.Close()
			rec := httptest.NewRecorder()
			j.handler().ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/wechat", strings.NewReader("<xml/>")))
			if rec.Code != http.StatusInternalServerError || rec.Body.String() == "success" {
				t.Errorf("got %d %q, want 500 and no success", rec.Code, rec.Body.String())
			}
		})
	}
}
