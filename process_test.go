package main

import (
	"context"
	"errors"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"wechat-im-bridge/fakes"
)

// bridgeProcess is the bridge running as a real subprocess.
type bridgeProcess struct {
	cmd  *exec.Cmd
	logs *syncBuffer
	base string
	done chan error
}

// buildBridge builds the bridge's binary into a temporary folder.
func buildBridge(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "wechat-im-bridge")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// startProcess runs the binary with the harness's environment, points the
// fakes at it, and waits until it is ready.
func (h *harness) startProcess(bin string) *bridgeProcess {
	h.t.Helper()
	p := &bridgeProcess{cmd: exec.Command(bin), logs: &syncBuffer{}, done: make(chan error, 1)}
	p.cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	for k, v := range h.env {
		p.cmd.Env = append(p.cmd.Env, k+"="+v)
	}
	p.cmd.Stderr = p.logs
	if err := p.cmd.Start(); err != nil {
		h.t.Fatal(err)
	}
	go func() { p.done <- p.cmd.Wait() }()
	h.t.Cleanup(func() {
		p.cmd.Process.Kill()
		<-p.done
		if h.t.Failed() {
			h.t.Logf("bridge process logs:\n%s", p.logs.String())
		}
	})
	addr := regexp.MustCompile(`msg=listening addr=(\S+)`)
	eventually(h.t, "the bridge process to listen", func() bool { return addr.MatchString(p.logs.String()) })
	p.base = "http://" + addr.FindStringSubmatch(p.logs.String())[1]
	h.wx.SetTarget(p.base + "/wechat")
	h.im.SetCallbackURL(p.base + "/imcallback")
	eventually(h.t, "the bridge process to be ready", func() bool {
		resp, err := http.Get(p.base + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	return p
}

// wait returns the process's exit error, failing the test after limit.
func (p *bridgeProcess) wait(t *testing.T, limit time.Duration) error {
	t.Helper()
	select {
	case err := <-p.done:
		p.done <- err // for the cleanup
		return err
	case <-time.After(limit):
		t.Fatalf("the bridge process did not exit within %s", limit)
		return nil
	}
}

// TestKilledBetweenAnswerAndDelivery: the bridge answers WeChat, is killed
// (SIGKILL) while its call to IM is in flight, and, restarted on the same
// database, delivers everything once.
func TestKilledBetweenAnswerAndDelivery(t *testing.T) {
	forStores(t, func(t *testing.T, pg bool) {
		h := newHarness(t, harnessOptions{postgres: pg, external: true, env: fastRetries})
		bin := buildBridge(t)
		p := h.startProcess(bin)
		release := h.im.Hold()
		ctx := context.Background()
		for _, text := range []string{"one", "two"} {
			if r := h.wx.SendText(ctx, customer, text); r.Status != 200 {
				t.Fatalf("push got %d %q", r.Status, r.Body)
			}
		}
		eventually(t, "the call to IM in flight", func() bool { return len(h.im.Requests()) > 0 })
		p.cmd.Process.Signal(syscall.SIGKILL)
		p.wait(t, 10*time.Second)
		release() // IM may still act on the call whose answer nobody reads
		h.startProcess(bin)
		eventually(t, "both messages in IM", func() bool { return len(h.messagesTo("agent_kim")) >= 2 })
		h.wx.SendText(ctx, customer, "three")
		eventually(t, "the next message in IM", func() bool { return len(h.messagesTo("agent_kim")) >= 3 })
		if got := h.textsTo("agent_kim", " "); got != "one two three" {
			t.Errorf("agent got %q, want each message once, in order", got)
		}
	})
}

// TestSIGTERMDrains: on SIGTERM the bridge stops taking pushes, finishes
// or hands back the deliveries in flight within SHUTDOWN_GRACE, and exits 0;
// restarted, it delivers what was left, once.
func TestSIGTERMDrains(t *testing.T) {
	env := map[string]string{"SHUTDOWN_GRACE": "1s"}
	for k, v := range fastRetries {
		env[k] = v
	}
	h := newHarness(t, harnessOptions{external: true, env: env})
	bin := buildBridge(t)
	p := h.startProcess(bin)
	ctx := context.Background()
	h.wx.Follow(ctx, customer)
	eventually(t, "the account imported", func() bool { return h.im.Imported(customerIM(customer)) })
	h.im.Delay(200 * time.Millisecond)
	for _, text := range []string{"one", "two", "three"} {
		h.wx.SendText(ctx, customer, text)
	}
	eventually(t, "a call to IM in flight", func() bool { return len(h.im.RequestsTo("/v4/openim/sendmsg")) > 0 })
	start := time.Now()
	p.cmd.Process.Signal(syscall.SIGTERM)
	eventually(t, "pushes refused", func() bool {
		_, err := http.Post(p.base+"/wechat", "text/xml", strings.NewReader("<xml/>"))
		return err != nil
	})
	if err := p.wait(t, 10*time.Second); err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			t.Fatalf("the bridge exited %d, want 0", ee.ExitCode())
		}
		t.Fatal(err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("the bridge took %s to stop, past its grace of 1s", took)
	}
	if !strings.Contains(p.logs.String(), "msg=stopped") {
		t.Errorf("the bridge did not log its stop:\n%s", p.logs.String())
	}
	h.im.Delay(0)
	h.startProcess(bin)
	eventually(t, "every message in IM", func() bool { return len(h.messagesTo("agent_kim")) >= 3 })
	h.wx.SendText(ctx, customer, "four")
	eventually(t, "the next message in IM", func() bool { return len(h.messagesTo("agent_kim")) >= 4 })
	if got := h.textsTo("agent_kim", " "); got != "one two three four" {
		t.Errorf("agent got %q, want each message once, in order", got)
	}
}

// TestCrashCostsSecondsNotALease: on PostgreSQL, with the default timeouts
// (a claim's lease of 57 s), a message in flight when its bridge is killed
// is delivered within 15 s of the restart; with a second bridge running, it
// takes the dead one's lanes within 15 s of the kill. The dead instance's
// liveness decides, not the lease.
func TestCrashCostsSecondsNotALease(t *testing.T) {
	for _, tc := range []struct {
		name   string
		second bool // a second bridge runs before the kill
	}{{"restart", false}, {"second instance", true}} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, harnessOptions{postgres: true, external: true})
			bin := buildBridge(t)
			p := h.startProcess(bin)
			release := h.im.Hold()
			ctx := context.Background()
			for _, text := range []string{"one", "two"} {
				if r := h.wx.SendText(ctx, customer, text); r.Status != 200 {
					t.Fatalf("push got %d %q", r.Status, r.Body)
				}
			}
			// A delivery's call, not the presence reading IM answers at start.
			eventually(t, "the call to IM in flight", func() bool {
				return slices.ContainsFunc(h.im.Requests(), func(r fakes.Request) bool { return r.Path != "/v4/openim/query_online_status" })
			})
			if tc.second {
				h.startProcess(bin)
			}
			p.cmd.Process.Signal(syscall.SIGKILL)
			p.wait(t, 10*time.Second)
			release()
			from := time.Now()
			if !tc.second {
				h.startProcess(bin)
			}
			within(t, 15*time.Second, "both messages in IM", func() bool { return len(h.messagesTo("agent_kim")) >= 2 })
			t.Logf("delivered %s after the %s", time.Since(from).Round(100*time.Millisecond), map[bool]string{false: "restart", true: "kill"}[tc.second])
			if got := h.textsTo("agent_kim", " "); got != "one two" {
				t.Errorf("agent got %q, want each message once, in order", got)
			}
		})
	}
}

// within waits for cond, failing the test if it does not hold within limit:
// for a bound the bridge promises, where eventually's is a test's patience.
func within(t testing.TB, limit time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s not within %s", what, limit)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestLapsedLivenessCutsAttempts: an instance that cannot record its
// liveness for 6 s, its write failing or hanging, cuts its attempts in
// flight, as another may take their claims 10 s after its last record, and
// takes up its work again once it records it; the message reaches IM once.
func TestLapsedLivenessCutsAttempts(t *testing.T) {
	for _, hang := range []bool{false, true} {
		t.Run(map[bool]string{false: "failing", true: "hanging"}[hang], func(t *testing.T) {
			h := newHarness(t, harnessOptions{postgres: true})
			db := h.openDB()
			defer db.Close()
			release := h.im.Hold()
			ctx := context.Background()
			h.wx.SendText(ctx, customer, "one")
			// A delivery's call, not the presence reading IM answers at start.
			eventually(t, "the call to IM in flight", func() bool {
				return slices.ContainsFunc(h.im.Requests(), func(r fakes.Request) bool { return r.Path != "/v4/openim/query_online_status" })
			})
			var back func() error
			if hang {
				tx, err := db.Begin()
				if err != nil {
					t.Fatal(err)
				}
				if _, err := tx.Exec(`LOCK TABLE instances IN ACCESS EXCLUSIVE MODE`); err != nil {
					t.Fatal(err)
				}
				back = tx.Rollback
				// Should the test stop first, the lock must not outlive it:
				// dropping its schema would wait for it.
				t.Cleanup(func() { tx.Rollback() })
			} else {
				if _, err := db.Exec(`ALTER TABLE instances RENAME TO instances_away`); err != nil {
					t.Fatal(err)
				}
				back = func() error { _, err := db.Exec(`ALTER TABLE instances_away RENAME TO instances`); return err }
			}
			within(t, 15*time.Second, "the attempt cut off", func() bool {
				return strings.Contains(h.logs.String(), "attempts in flight are cut off")
			})
			if err := back(); err != nil {
				t.Fatal(err)
			}
			release()
			eventually(t, "the message in IM", func() bool { return len(h.messagesTo("agent_kim")) >= 1 })
			if got := h.textsTo("agent_kim", " "); got != "one" {
				t.Errorf("agent got %q, want the message once", got)
			}
		})
	}
}
