package main

import (
	"bytes"
	"context"
	"database/sql"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
	"wechat-im-bridge/fakes"

	_ "github.com/jackc/pgx/v5/stdlib" // the "pgx" driver, to find the bridge's PostgreSQL server
)

// fleet is the bridge processes of a load run, each on a loopback address
// of its own, all with one environment.
type fleet struct {
	exe    string
	env    []string
	stderr io.Writer
	addrs  []string
	procs  []*process // nil where none runs
}

// process is a running bridge; exited is closed once it has exited.
type process struct {
	cmd    *exec.Cmd
	exited chan struct{}
}

// newFleet picks n free loopback addresses for bridges to run exe on.
func newFleet(exe string, env []string, stderr io.Writer, n int) (*fleet, error) {
	f := &fleet{exe: exe, env: env, stderr: stderr, procs: make([]*process, n)}
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		f.addrs = append(f.addrs, ln.Addr().String())
		ln.Close()
	}
	return f, nil
}

// start runs bridge i, pacing its IM calls at rate a second (0: unpaced),
// and returns once it is ready, or once it has exited or 30 s have passed.
func (f *fleet) start(ctx context.Context, i, rate int) error {
	cmd := exec.Command(f.exe)
	cmd.Env = append(slices.Clip(f.env), "LISTEN_ADDR="+f.addrs[i], "IM_RATE_LIMIT="+strconv.Itoa(rate))
	cmd.Stderr = f.stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	p := &process{cmd: cmd, exited: make(chan struct{})}
	go func() { cmd.Wait(); close(p.exited) }()
	f.procs[i] = p
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := fakes.WaitReady(ctx, p.exited, "http://"+f.addrs[i]); err != nil {
		select {
		case <-p.exited:
			f.procs[i] = nil
			return fmt.Errorf("load: %s exited before it was ready (%s)", f.exe, p.cmd.ProcessState)
		default:
			f.end(i, syscall.SIGKILL)
			return fmt.Errorf("load: %s on %s: %w", f.exe, f.addrs[i], err)
		}
	}
	return nil
}

// end stops bridge i with sig (SIGKILL; SIGTERM to let it hand back its
// work) and waits until it has exited.
func (f *fleet) end(i int, sig os.Signal) {
	if p := f.procs[i]; p != nil {
		p.cmd.Process.Signal(sig)
		<-p.exited
		f.procs[i] = nil
	}
}

// endAll stops every bridge with sig.
func (f *fleet) endAll(sig os.Signal) {
	for i := range f.procs {
		f.end(i, sig)
	}
}

// peakMemory returns the largest peak resident set of the running bridges.
func (f *fleet) peakMemory() string {
	peak := -1
	for _, p := range f.procs {
		if p != nil {
			peak = max(peak, peakKB(p.cmd.Process.Pid))
		}
	}
	if peak < 0 {
		return "unknown"
	}
	return fmt.Sprintf("%d kB", peak)
}

// usage is what processes have spent: CPU time, user and system, and the
// bytes they sent to storage; known is false where /proc could not tell.
type usage struct {
	cpu     time.Duration
	written int64
	known   bool
}

// usage adds up what the running bridges have spent so far.
func (f *fleet) usage() usage {
	u := usage{known: true}
	for _, p := range f.procs {
		if p == nil {
			continue
		}
		pu := procUsage(p.cmd.Process.Pid)
		if !pu.known {
			return usage{}
		}
		u.cpu += pu.cpu
		u.written += pu.written
	}
	return u
}

// procUsage reads what a process has spent from /proc: its CPU time from
// the utime and stime fields of stat (procStat), and write_bytes from io.
func procUsage(pid int) usage {
	fields, ok := procStat(pid)
	if !ok {
		return usage{}
	}
	utime, err1 := strconv.ParseInt(fields[11], 10, 64)
	stime, err2 := strconv.ParseInt(fields[12], 10, 64)
	ioStats, err3 := os.ReadFile(fmt.Sprintf("/proc/%d/io", pid))
	if err1 != nil || err2 != nil || err3 != nil {
		return usage{}
	}
	for _, line := range strings.Split(string(ioStats), "\n") {
		if v, ok := strings.CutPrefix(line, "write_bytes:"); ok {
			if n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64); err == nil {
				return usage{cpu: time.Duration(utime+stime) * 10 * time.Millisecond, written: n, known: true}
			}
		}
	}
	return usage{}
}

// postmasterOf returns the pid of the PostgreSQL server the bridge's
// database dsn is served by, if that server runs on this machine: the
// parent of the backend a connection of its own is given.
func postmasterOf(ctx context.Context, dsn string) (int, bool) {
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		return 0, false
	}
	defer db.Close()
	var backend int
	if err := db.QueryRowContext(ctx, `SELECT pg_backend_pid()`).Scan(&backend); err != nil {
		return 0, false
	}
	f, ok := procStat(backend)
	if !ok {
		return 0, false
	}
	server, err := strconv.Atoi(f[1])
	return server, err == nil
}

// serverCPU adds up the CPU time of PostgreSQL's server process and of its
// children, the backends among them: those running, from their own
// counts, and those that ended, from what the server collected of them
// (cutime and cstime), so that the difference of two readings is what the
// server spent between them. Only stat is read, which anyone may.
func serverCPU(server int) (time.Duration, bool) {
	f, ok := procStat(server)
	if !ok {
		return 0, false
	}
	ticks := sumFields(f, 11, 12, 13, 14)
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0, false
	}
	parent := strconv.Itoa(server)
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if c, ok := procStat(pid); ok && c[1] == parent {
			ticks += sumFields(c, 11, 12)
		}
	}
	return time.Duration(ticks) * 10 * time.Millisecond, true
}

// procStat returns the fields of a process's /proc stat after its command
// (in parentheses, whose name may hold spaces and parentheses): state is
// the first, the parent's pid the second, utime the 12th, stime the 13th,
// cutime and cstime (its children's, once collected) the 14th and 15th,
// in clock ticks of 1/100 s.
func procStat(pid int) ([]string, bool) {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil, false
	}
	end := bytes.LastIndexByte(stat, ')')
	if end < 0 {
		return nil, false
	}
	fields := strings.Fields(string(stat[end+1:]))
	return fields, len(fields) >= 15
}

// sumFields adds up the numeric fields of f at the indexes given; one that
// does not parse counts 0.
func sumFields(f []string, at ...int) int64 {
	var n int64
	for _, i := range at {
		v, _ := strconv.ParseInt(f[i], 10, 64)
		n += v
	}
	return n
}

// String names the running bridges, for the report.
func (f *fleet) String() string {
	var each []string
	for i, p := range f.procs {
		if p != nil {
			each = append(each, fmt.Sprintf("pid %d on %s", p.cmd.Process.Pid, f.addrs[i]))
		}
	}
	if len(each) == 1 {
		return "bridge " + each[0]
	}
	return fmt.Sprintf("%d bridges: %s", len(each), strings.Join(each, ", "))
}

// peakKB reads a process's peak resident set size, in kB, from /proc; -1
// if it cannot.
func peakKB(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			if kb, err := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB"))); err == nil {
				return kb
			}
		}
	}
	return -1
}
