package main

import (
	"context"
	"database/sql"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestSchemaFilesRunAsTheyAre: each schema file runs in its database's own
// client on an empty database, twice (every statement is idempotent), and
// the bridge's store then opens on the result.
func TestSchemaFilesRunAsTheyAre(t *testing.T) {
	t.Run("sqlite3", func(t *testing.T) {
		client := lookClient(t, "sqlite3")
		path := filepath.Join(t.TempDir(), "bridge.db")
		for range 2 {
			runClient(t, exec.Command(client, "-bail", path, ".read schema_sqlite.sql"))
		}
		openAndClose(t, "sqlite:"+path)
	})
	t.Run("psql", func(t *testing.T) {
		client := lookClient(t, "psql")
		dsn := testPostgres(t)
		u, err := url.Parse(dsn)
		if err != nil {
			t.Fatal(err)
		}
		q := u.Query()
		schema := q.Get("search_path")
		q.Del("search_path")
		u.RawQuery = q.Encode()
		for range 2 {
			cmd := exec.Command(client, "-v", "ON_ERROR_STOP=1", "-q", "-f", "schema_postgres.sql", u.String())
			cmd.Env = append(os.Environ(), "PGOPTIONS=-c search_path="+schema+" -c client_min_messages=warning")
			runClient(t, cmd)
		}
		openAndClose(t, dsn)
	})
}

// lookClient returns the path of a database's command-line client; CI
// installs both, elsewhere the test skips without one.
func lookClient(t *testing.T, name string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s is not installed: .ci/run installs it", name)
		}
		t.Skipf("%s is not installed here", name)
	}
	return path
}

func runClient(t *testing.T, cmd *exec.Cmd) {
	t.Helper()
	if out, err := cmd.CombinedOutput(); err != nil || len(out) > 0 {
		t.Fatalf("%s: %v\n%s", cmd.Args, err, out)
	}
}

func openAndClose(t *testing.T, dsn string) {
	t.Helper()
	st, err := openStore(context.Background(), dsn, storeOptions{})
	if err != nil {
		t.Fatalf("open the store on the schema the client made: %v", err)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestHeldRepliesRenamed: a database made when recovery's deferred replies
// were held_replies keeps them, as deferred_replies, on both databases.
func TestHeldRepliesRenamed(t *testing.T) {
	for _, kind := range []string{"sqlite", "postgres"} {
		t.Run(kind, func(t *testing.T) {
			dsn := "sqlite:" + filepath.Join(t.TempDir(), "bridge.db")
			driver, source := "sqlite", strings.TrimPrefix(dsn, "sqlite:")
			if kind == "postgres" {
				dsn = testPostgres(t)
				driver, source = "pgx", dsn
			}
			db, err := sql.Open(driver, source)
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			id := map[string]string{"sqlite": "INTEGER", "postgres": "BIGSERIAL"}[kind] // as the older schemas made it
			if _, err := db.Exec(`CREATE TABLE held_replies (id ` + id + ` PRIMARY KEY, openid TEXT NOT NULL, key TEXT NOT NULL,
				delivery TEXT NOT NULL, created_at BIGINT NOT NULL)`); err != nil {
				t.Fatal(err)
			}
			if _, err := db.Exec(`INSERT INTO held_replies VALUES (1, 'o1', 'im:k1', '{}', 1)`); err != nil {
				t.Fatal(err)
			}
			st, err := openStore(context.Background(), dsn, storeOptions{})
			if err != nil {
				t.Fatal(err)
			}
			st.Close()
			// An older instance, started again, makes held_replies again.
			if _, err := db.Exec(`CREATE TABLE held_replies (id BIGINT PRIMARY KEY, openid TEXT NOT NULL, key TEXT NOT NULL,
				delivery TEXT NOT NULL, created_at BIGINT NOT NULL)`); err != nil {
				t.Fatal(err)
			}
			if _, err := db.Exec(`INSERT INTO held_replies VALUES (1, 'o2', 'im:k2', '{}', 2)`); err != nil {
				t.Fatal(err)
			}
			if kind == "postgres" { // the schema is applied again only when it changed
				db.Exec(`DELETE FROM schema_applied`)
			}
			st, err = openStore(context.Background(), dsn, storeOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			var n int
			if err := st.rdb.QueryRow(`SELECT count(*) FROM deferred_replies WHERE key IN ('im:k1', 'im:k2')`).Scan(&n); err != nil || n != 2 {
				t.Errorf("deferred_replies: %d rows, %v; want both older replies", n, err)
			}
		})
	}
}
