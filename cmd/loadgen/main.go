// Command loadgen measures the bridge under load, on loopback only: it
// starts fake WeChat and IM servers in this process, runs the bridge as a
// separate process (built from this module, or the binary -exe names),
// pushes signed text messages from many customers at it over several
// connections for a fixed time, waits for every accepted message to reach
// IM, and reports throughput, WeChat's wait, delivery latency, lost
// forwards, the bridge's peak memory and CPU a push, and PostgreSQL's CPU
// a push when the bridge runs on a PostgreSQL of this machine.
//
//	go run ./cmd/loadgen -im-rate 200
//
// With -im-rate N the bridge paces its IM calls at N a second, as it must
// against the real IM (200 by default), so the messages pile up in the
// outbox while the pushes run. Then the bridge is stopped, and a new one on
// the same database, unpaced, delivers the backlog: a forward is lost only
// if neither delivers it.
//
// With -chaos the run is a trial of the promise to lose nothing: the bridge
// is killed (SIGKILL) and restarted on the same database three times while
// the pushes run, IM fails on purpose by turns (HTTP 502, busy codes, calls
// held past the bridge's time-out and then carried out), and a push left
// without an answer is sent again, as WeChat does, until it gets one. Every
// answered message must reach IM exactly once.
//
// With -media N the run carries media instead: N customers each send a
// video of 10 MB while their agents each send one back, at once, and the
// bridge's peak memory is reported (media.go).
//
// With -replies the agents answer every message, and every answer must
// reach WeChat (replies.go). With -bridge PROGRAM another program stands in
// the bridge's place: the speed reference in cmd/loadref, or an empty
// handler.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	quietCollector()
	if err := runLoad(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

// quietCollector holds the generator's own garbage collector off until it
// holds 1 GiB, unless GOGC or GOMEMLIMIT is set: its pauses would otherwise
// be timed as the wait of the program it measures, which shares its fakes.
func quietCollector() {
	if os.Getenv("GOGC") != "" || os.Getenv("GOMEMLIMIT") != "" {
		return
	}
	debug.SetMemoryLimit(1 << 30)
	debug.SetGCPercent(-1)
}

// envFlag collects KEY=VALUE settings, given once each.
type envFlag []string

func (e *envFlag) String() string { return strings.Join(*e, " ") }
func (e *envFlag) Set(kv string) error {
	if k, _, ok := strings.Cut(kv, "="); !ok || k == "" {
		return fmt.Errorf("want KEY=VALUE, got %q", kv)
	}
	*e = append(*e, kv)
	return nil
}

// options are the generator's flags.
type options struct {
	duration   time.Duration
	conns      int
	customers  int
	database   string
	imRate     int
	imDedup    time.Duration
	exe        string // the bridge's binary ("" : build it)
	other      string // a program in the bridge's place
	forwards   bool
	instances  int
	chaos      bool
	replies    bool
	media      int  // -media: videos each way at once, instead of pushes
	itselfRuns bool // the bridge runs, not another program
	env        envFlag
}

// parseOptions reads the flags and refuses the combinations no run can
// honour.
func parseOptions(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("loadgen", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.DurationVar(&o.duration, "duration", 10*time.Second, "how long to push")
	fs.IntVar(&o.conns, "connections", 32, "concurrent connections pushing")
	fs.IntVar(&o.customers, "customers", 1000, "distinct customers writing")
	fs.StringVar(&o.database, "database", "", "DATABASE_URL for the bridge (default: SQLite in a temporary folder)")
	fs.IntVar(&o.imRate, "im-rate", 0, "IM calls a second the bridge makes while the pushes run (IM_RATE_LIMIT; 0: unpaced)")
	fs.DurationVar(&o.imDedup, "im-dedup", 120*time.Second, "how long IM drops a repeated sendmsg (IM_DEDUP_WINDOW; IM's is 120s): shorter stands for a longer run")
	fs.StringVar(&o.exe, "exe", "", "the bridge's binary (default: built from this module with go build)")
	fs.StringVar(&o.other, "bridge", "", "a program to run in the bridge's place, with its environment (the reference in cmd/loadref)")
	fs.BoolVar(&o.forwards, "forwards", true, "with -bridge: the program forwards each message to IM (false for an empty handler, whose pushes reach no one)")
	fs.IntVar(&o.instances, "instances", 1, "bridges on one PostgreSQL database (-database postgres://…), the connections spread over them")
	fs.BoolVar(&o.chaos, "chaos", false, "kill and restart the bridge while the pushes run, make IM fail by turns, and send unanswered pushes again")
	fs.BoolVar(&o.replies, "replies", false, "agents answer each message that reaches IM, from IM clients, and every answer must reach WeChat")
	fs.IntVar(&o.media, "media", 0, "instead of pushes: this many customers send a 10 MB video while their agents send one back, at once, and the bridge's peak memory is told")
	fs.Var(&o.env, "env", "KEY=VALUE added to the bridge's environment (GOGC=400, GOMAXPROCS=3, …); may be repeated")
	if err := fs.Parse(args); err != nil {
		return options{}, err
	}
	o.itselfRuns = o.other == ""
	postgres := o.postgres()
	switch {
	case o.duration <= 0 || o.duration > 10*time.Minute || o.conns < 1 || o.conns > 1024 || o.customers < 1 || o.imRate < 0 || o.imDedup <= 0:
		return options{}, errors.New("load: -duration must be in (0, 10m], -connections in [1, 1024], -customers at least 1, -im-rate at least 0, -im-dedup positive")
	case !o.itselfRuns && o.imRate > 0:
		return options{}, errors.New("load: -im-rate needs the bridge itself, which can stop and hand its backlog to a restarted one")
	case !o.forwards && o.itselfRuns:
		return options{}, errors.New("load: -forwards=false is for a program run with -bridge: the bridge itself forwards every message")
	case o.instances < 1 || o.instances > 8:
		return options{}, errors.New("load: -instances must be in [1, 8]")
	case o.instances > 1 && (!o.itselfRuns || !postgres):
		return options{}, errors.New("load: -instances runs several bridges, which share one PostgreSQL: it needs -database postgres://… and not -bridge")
	case o.replies && !o.itselfRuns:
		return options{}, errors.New("load: -replies needs the bridge itself, which takes IM's callbacks")
	case o.media < 0 || o.media > 64 || o.media > 0 && (!o.itselfRuns || o.chaos || o.replies || o.instances > 1):
		return options{}, errors.New("load: -media must be in [0, 64], and runs one bridge itself, without -chaos or -replies")
	case o.chaos && (o.imRate > 0 || !o.forwards):
		return options{}, errors.New("load: -chaos delivers while the pushes run, and checks every forward: not with -im-rate or -forwards=false")
	}
	return o, nil
}

// postgres reports whether the bridge runs on PostgreSQL.
func (o options) postgres() bool {
	return strings.HasPrefix(o.database, "postgres://") || strings.HasPrefix(o.database, "postgresql://")
}

// localPostgres reports whether the bridge runs on a PostgreSQL of this
// machine: on loopback, or on its Unix socket.
func (o options) localPostgres() bool {
	u, err := url.Parse(o.database)
	if !o.postgres() || err != nil {
		return false
	}
	h := u.Hostname()
	if q := u.Query().Get("host"); q != "" { // libpq's host parameter, which wins
		h = q
	}
	switch {
	case h == "" || h == "localhost" || strings.HasPrefix(h, "/"):
		return true
	default:
		ip := net.ParseIP(h)
		return ip != nil && ip.IsLoopback()
	}
}
