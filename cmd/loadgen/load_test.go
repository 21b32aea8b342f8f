package main

import (
	"database/sql"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // registers the "pgx" driver
)

// build builds the program at path (an import path or a folder of this
// module) into a temporary folder, once a test binary, and returns it.
func build(t *testing.T, path string) string {
	t.Helper()
	builtMu.Lock()
	defer builtMu.Unlock()
	if exe, ok := built[path]; ok {
		return exe
	}
	dir, err := os.MkdirTemp("", "loadgen-test-")
	if err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(dir, filepath.Base(path))
	if out, err := exec.Command("go", "build", "-o", exe, path).CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", path, err, out)
	}
	built[path] = exe
	return exe
}

var (
	builtMu sync.Mutex
	built   = map[string]string{}
)

// forStores runs fn on SQLite, then on PostgreSQL.
func forStores(t *testing.T, fn func(t *testing.T, pg bool)) {
	t.Run("sqlite", func(t *testing.T) { fn(t, false) })
	t.Run("postgres", func(t *testing.T) { fn(t, true) })
}

// testPostgres returns a URL of a schema of its own in TEST_DATABASE_URL,
// dropped when the test ends, or skips the test without it.
func testPostgres(t *testing.T) string {
	t.Helper()
	base := os.Getenv("TEST_DATABASE_URL")
	if base == "" {
		t.Skip("TEST_DATABASE_URL is not set: skipping the PostgreSQL test (.ci/run sets it)")
	}
	db, err := sql.Open("pgx", base)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	schema := fmt.Sprintf("loadgen_test_%d", time.Now().UnixNano())
	if _, err := db.Exec("CREATE SCHEMA " + schema); err != nil {
		t.Fatalf("create schema in TEST_DATABASE_URL: %v", err)
	}
	t.Cleanup(func() {
		if db, err := sql.Open("pgx", base); err == nil {
			defer db.Close()
			db.Exec("DROP SCHEMA " + schema + " CASCADE")
		}
	})
	sep := "?"
	if strings.Contains(base, "?") {
		sep = "&"
	}
	return base + sep + "search_path=" + schema
}

// The load generator's own HTTP client reads whole answers over one
// connection, dials again after Connection: close, and refuses what it does
// not speak rather than miscount it.
func TestPushConn(t *testing.T) {
	var conns atomic.Int64
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		switch {
		case r.Method != http.MethodPost || r.URL.RawQuery != "a=1" || string(body) != "<xml/>":
			http.Error(w, "unexpected request", http.StatusBadRequest)
		case r.URL.Path == "/close":
			w.Header().Set("Connection", "close")
			w.Write([]byte("bye"))
		case r.URL.Path == "/chunked":
			w.Write([]byte("part"))
			w.(http.Flusher).Flush() // no Content-Length now: chunked
			w.Write([]byte("more"))
		case r.URL.Path == "/refused":
			http.Error(w, "no", http.StatusForbidden)
		default:
			w.Header().Set("Content-Length", "5000") // longer than one read
			w.Write([]byte(strings.Repeat("s", 5000)))
		}
	}))
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.Start()
	defer srv.Close()

	pc := &pushConn{addr: srv.Listener.Addr().String()}
	defer pc.close()
	for i := range 3 {
		if status, err := pc.post("/ok?a=1", "<xml/>"); status != 200 || err != nil {
			t.Fatalf("post %d: %d, %v", i, status, err)
		}
	}
	if status, err := pc.post("/refused?a=1", "<xml/>"); status != 403 || err != nil {
		t.Fatalf("refused: %d, %v; want 403", status, err)
	}
	if n := conns.Load(); n != 1 {
		t.Fatalf("%d connections for four posts, want 1", n)
	}
	if status, err := pc.post("/close?a=1", "<xml/>"); status != 200 || err != nil {
		t.Fatalf("close: %d, %v", status, err)
	}
	if status, err := pc.post("/ok?a=1", "<xml/>"); status != 200 || err != nil || conns.Load() != 2 {
		t.Fatalf("after Connection: close, got %d, %v on connection %d; want 200 on a second one", status, err, conns.Load())
	}
	if _, err := pc.post("/chunked?a=1", "<xml/>"); err == nil {
		t.Fatal("a chunked answer was taken")
	}
	if status, err := pc.post("/ok?a=1", "<xml/>"); status != 200 || err != nil || conns.Load() != 3 {
		t.Fatalf("after an error, got %d, %v on connection %d; want 200 on a new one", status, err, conns.Load())
	}
}

// A program run in the bridge's place cannot be paced, and one that does
// not start is reported.
func TestLoadOtherBridge(t *testing.T) {
	ctx := t.Context()
	err := runLoad(ctx, []string{"-bridge", "/bin/true", "-im-rate", "200"}, io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "-im-rate needs the bridge itself") {
		t.Errorf("-bridge with -im-rate: got %v, want refused", err)
	}
	err = runLoad(ctx, []string{"-forwards=false"}, io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "-forwards=false is for a program run with -bridge") {
		t.Errorf("-forwards=false without -bridge: got %v, want refused", err)
	}
	missing := filepath.Join(t.TempDir(), "no-such-program")
	if err := runLoad(ctx, []string{"-bridge", missing, "-duration", "1s"}, io.Discard, io.Discard); err == nil ||
		!strings.Contains(err.Error(), "no-such-program") {
		t.Errorf("-bridge with a missing program: got %v, want an error naming it", err)
	}
}

// An empty handler is measured as the bridge is; with -forwards=false the
// messages it answers are not counted as lost.
func TestLoadEmptyHandler(t *testing.T) {
	var out strings.Builder
	args := []string{"-bridge", build(t, "./testdata/empty"), "-forwards=false", "-duration", "300ms", "-connections", "2", "-customers", "3"}
	if err := runLoad(t.Context(), args, &out, io.Discard); err != nil {
		t.Fatalf("load: %v\n%s", err, &out)
	}
	for _, want := range []string{
		`pushes answered 200: +[1-9][0-9]* in [0-9.]+s = [0-9]+ pushes/s \(0 failed\)`,
		`WeChat's wait: +p50 [0-9.]+[µm]s, p99`,
		`delivery to IM: +none expected: the program forwards nothing \(0 forwards\)`,
		`forwards lost: +0; duplicated: 0`,
		`bridge CPU and disk: +[0-9]+\.[0-9] µs of CPU and [0-9]+\.[0-9]{2} KB written a push answered`,
	} {
		if !regexp.MustCompile(want).MatchString(out.String()) {
			t.Errorf("report lacks %q:\n%s", want, &out)
		}
	}
}

// On a PostgreSQL of this machine, the report tells the server's CPU a
// push beside the bridge's: some, as every push is committed there.
func TestLoadTellsPostgresCPU(t *testing.T) {
	dsn := testPostgres(t)
	if !(options{database: dsn}).localPostgres() {
		t.Skip("TEST_DATABASE_URL is not on this machine")
	}
	args := []string{"-database", dsn, "-im-rate", "200", "-duration", "300ms", "-connections", "2", "-customers", "3",
		"-exe", build(t, "wechat-im-bridge")}
	var out strings.Builder
	if err := runLoad(t.Context(), args, &out, io.Discard); err != nil {
		t.Fatalf("load: %v\n%s", err, &out)
	}
	want := `PostgreSQL's CPU: +[1-9][0-9]*\.[0-9] µs a push answered, while the pushes ran`
	if !regexp.MustCompile(want).MatchString(out.String()) {
		t.Errorf("report lacks %q:\n%s", want, &out)
	}
}

// Under -chaos the bridge is killed and restarted while the pushes run and
// IM fails by turns, and still every answered message reaches IM once and
// in order. On PostgreSQL two bridges share the pushes, and a push that one
// left unanswered is sent again to the other. With -replies the agents
// answer every message meanwhile; the answers whose callbacks found the
// bridge down come through its recovery, and none is lost or out of order.
func TestLoadChaos(t *testing.T) {
	forStores(t, func(t *testing.T, pg bool) {
		// IM drops a repeat for half a second only, standing for its two
		// minutes: many retries fall outside it.
		args := []string{"-chaos", "-replies", "-duration", "2s", "-connections", "4", "-customers", "10", "-im-dedup", "500ms"}
		if pg {
			args = append(args, "-database", testPostgres(t), "-instances", "2")
		}
		args = append(args, "-exe", build(t, "wechat-im-bridge"))
		var out strings.Builder
		if err := runLoad(t.Context(), args, &out, io.Discard); err != nil {
			t.Fatalf("load: %v\n%s", err, &out)
		}
		for _, want := range []string{
			`pushes answered 200: +[1-9][0-9]* in [0-9.]+s = [0-9]+ pushes/s \(0 failed\)`,
			`chaos: +3 kills \(SIGKILL, restarted on the same database\), [1-9][0-9]* IM faults in turn, [1-9][0-9]* pushes sent again`,
			`forwards lost: +0; duplicated: 0; out of order: 0`,
			`agents' answers: +[1-9][0-9]* sent from IM clients \(0 refused\), reached WeChat p50`,
			`answers lost: +0; duplicated: [0-9]+; customers with answers out of order: 0`,
			`bridge CPU and disk: +not told: /proc knows only the bridges running since the last restart`,
		} {
			if !regexp.MustCompile(want).MatchString(out.String()) {
				t.Errorf("report lacks %q:\n%s", want, &out)
			}
		}
		if pg && !strings.Contains(out.String(), "2 bridges: pid ") {
			t.Errorf("report does not name two bridges:\n%s", &out)
		}
	})
}

// -chaos checks every forward while the pushes run; several instances need
// PostgreSQL and the bridge itself; a program that exits at once is
// reported, not waited for.
func TestLoadRefusals(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"-chaos", "-im-rate", "200"}, "-chaos delivers while the pushes run"},
		{[]string{"-chaos", "-bridge", "/bin/true", "-forwards=false"}, "-chaos delivers while the pushes run"},
		{[]string{"-instances", "2"}, "it needs -database postgres://"},
		{[]string{"-instances", "2", "-database", "postgres://x/y", "-bridge", "/bin/true"}, "and not -bridge"},
		{[]string{"-instances", "9", "-database", "postgres://x/y"}, "-instances must be in [1, 8]"},
		{[]string{"-bridge", "/bin/false", "-duration", "1s"}, "/bin/false exited before it was ready (exit status 1)"},
		{[]string{"-replies", "-bridge", "/bin/true"}, "-replies needs the bridge itself"},
		{[]string{"-env", "GOGC"}, `want KEY=VALUE, got "GOGC"`},
	} {
		err := runLoad(t.Context(), c.args, io.Discard, io.Discard)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: got %v, want %q", c.args, err, c.want)
		}
	}
}

// A message is out of order when it reached IM before a message of the same
// customer that had been answered before it was sent; messages in flight at
// the same time may arrive either way.
func TestOutOfOrder(t *testing.T) {
	at := func(ms int) time.Time { return time.UnixMilli(int64(ms)) }
	pushes := []answeredPush{
		{1, "a", at(0), at(10)},
		{2, "a", at(20), at(30)}, // sent after 1 was answered
		{3, "b", at(0), at(10)},  // 3 and 4 were in flight together
		{4, "b", at(5), at(15)},
		{5, "c", at(40), at(50)}, // never arrived
		{6, "c", at(60), at(70)},
		{7, "a", at(40), at(45)}, // sent after 1 and 2 were answered
	}
	arrived := map[int64]arrival{1: {rank: 3}, 2: {rank: 1}, 3: {rank: 5}, 4: {rank: 4}, 6: {rank: 0}, 7: {rank: 2}}
	// 2 arrived before 1, and 7 before 1: two messages out of order.
	if n := outOfOrder(pushes, arrived); n != 2 {
		t.Errorf("outOfOrder = %d, want 2", n)
	}
	arrived[1], arrived[2], arrived[7] = arrival{rank: 1}, arrival{rank: 2}, arrival{rank: 3}
	if n := outOfOrder(pushes, arrived); n != 0 {
		t.Errorf("in order: outOfOrder = %d, want 0", n)
	}
}

// procUsage reads a process's CPU time and disk writes from /proc: a
// process that has worked shows more CPU time than before, and one that is
// gone is not known.
func TestProcUsage(t *testing.T) {
	if _, err := os.Stat("/proc/self/io"); err != nil {
		t.Skip("no /proc/self/io here:", err)
	}
	before := procUsage(os.Getpid())
	if !before.known || before.cpu < 0 || before.written < 0 {
		t.Fatalf("procUsage(self) = %+v, want known", before)
	}
	// Work until the kernel counts at least two more ticks, for 10 s at most.
	sum := 0
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); {
		for i := range 1_000_000 {
			sum += i % 7
		}
		if procUsage(os.Getpid()).cpu >= before.cpu+20*time.Millisecond {
			break
		}
	}
	if after := procUsage(os.Getpid()); after.cpu < before.cpu+20*time.Millisecond {
		t.Errorf("CPU time went from %v to %v after 10 s of work (sum %d)", before.cpu, after.cpu, sum)
	}
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	if u := procUsage(cmd.Process.Pid); u.known {
		t.Errorf("procUsage of an exited process = %+v, want unknown", u)
	}
}

// PostgreSQL's CPU is read from this machine's processes only when the
// bridge's database is on this machine.
func TestLocalPostgres(t *testing.T) {
	for url, want := range map[string]bool{
		"postgres://postgres@127.0.0.1:5432/load?sslmode=disable": true,
		"postgresql://localhost/load":                             true,
		"postgres://[::1]:5432/load":                              true,
		"postgres:///load?host=/var/run/postgresql":               true,
		"postgres://db.example.com:5432/load":                     false,
		"postgres://10.0.0.7/load":                                false,
		"postgres:///load?host=db.example.com":                    false,
		"":                                                        false,
	} {
		if got := (options{database: url}).localPostgres(); got != want {
			t.Errorf("localPostgres(%q) = %v, want %v", url, got, want)
		}
	}
}
