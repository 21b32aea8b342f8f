package main

import (
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

// Every push answered "success" is in the file, once, whole; concurrent
// pushes share fsyncs without losing or mixing records.
func TestJournalKeepsEveryAnsweredPush(t *testing.T) {
	path := filepath.Join(t.TempDir(), "journal")
	j, err := openJournal(path)
	if err != nil {
		t.Fatal(err)
	}
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

// A push that cannot be written is refused, not answered "success".
func TestJournalRefusesWhatItCannotWrite(t *testing.T) {
	j, err := openJournal(filepath.Join(t.TempDir(), "journal"))
	if err != nil {
		t.Fatal(err)
	}
	j.f.Close()
	rec := httptest.NewRecorder()
	j.handler().ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/wechat", strings.NewReader("<xml/>")))
	if rec.Code != http.StatusInternalServerError || rec.Body.String() == "success" {
		t.Errorf("got %d %q, want 500 and no success", rec.Code, rec.Body.String())
	}
}
