package main

import (
	"context"
	"database/sql"
	"path/filepath"
	"slices"
	"testing"
)

// A write may run twice: in a batch that fails, then alone. Its caller gets
// what its last run returned, and the batch's failure fails only the write
// that caused it.
func TestGroupCommitRunsAWriteAgainAlone(t *testing.T) {
	db, err := sql.Open("sqlite", "file:"+filepath.Join(t.TempDir(), "c.db")+"?_pragma=journal_mode(WAL)")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.Exec(`CREATE TABLE t (v INTEGER NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	var settled []bool
	g := &groupCommit{db: db, settle: func(committed bool) { settled = append(settled, committed) },
		harmless: func(error) bool { return false }}

	runs := 0
	good := func(ctx context.Context, tx *sql.Tx) (any, error) {
		runs++
		_, err := tx.ExecContext(ctx, `INSERT INTO t (v) VALUES (1)`)
		return runs, err
	}
	bad := func(ctx context.Context, tx *sql.Tx) (any, error) {
		_, err := tx.ExecContext(ctx, `INSERT INTO t (v) VALUES (NULL)`) // NOT NULL
		return "bad", err
	}
	results := g.commit([]commitOp{{fn: good}, {fn: bad}})
	if results[0].err != nil || results[1].err == nil {
		t.Fatalf("got %+v; want only the bad write to fail", results)
	}
	if runs != 2 || results[0].v != 2 {
		t.Errorf("the good write ran %d times and returned %v; want twice, and its second run's 2", runs, results[0].v)
	}
	var n int
	if err := db.QueryRow(`SELECT count(*) FROM t`).Scan(&n); err != nil || n != 1 {
		t.Errorf("the table holds %d rows (%v), want the good write's one", n, err)
	}
	if want := []bool{false, true, false}; !slices.Equal(settled, want) {
		t.Errorf("settle was told %v, want %v: the batch rolled back, then each write alone", settled, want)
	}
}

// gather takes what waits, up to its limit, and stops at a closed channel.
func TestGather(t *testing.T) {
	ch := make(chan int, 5)
	ch <- 2
	ch <- 3
	if got := gather(1, ch, 10); !slices.Equal(got, []int{1, 2, 3}) {
		t.Errorf("gather = %v, want [1 2 3]", got)
	}
	ch <- 2
	ch <- 3
	if got := gather(1, ch, 2); !slices.Equal(got, []int{1, 2}) {
		t.Errorf("gather with limit 2 = %v, want [1 2]", got)
	}
	close(ch)
	if got := gather(1, ch, 10); !slices.Equal(got, []int{1, 3}) {
		t.Errorf("gather on a closed channel = %v, want [1 3]", got)
	}
}
