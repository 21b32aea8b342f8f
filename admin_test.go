package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
)

// adminCall makes an operator's request with token (none if empty) and
// returns its status and body.
func (h *harness) adminCall(method, path, token string) (int, string) {
	h.t.Helper()
	req, _ := http.NewRequest(method, h.base+path, nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		h.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestDeadLetterRetriedByOperator: an operator lists the dead letters and
// queues one again, which then reaches the customer, once; without the
// token the endpoints answer 401, and without ADMIN_TOKEN 404.
func TestDeadLetterRetriedByOperator(t *testing.T) {
	forStores(t, func(t *testing.T, pg bool) {
		const token = "admin-token-value"
		h := newHarness(t, harnessOptions{postgres: pg, env: map[string]string{"ADMIN_TOKEN": token}})
		ctx := context.Background()
		h.wx.SendText(ctx, customer, question)
		eventually(t, "the question in IM", func() bool { return len(h.messagesTo("agent_kim")) == 1 })
		h.wx.FailNext(1, 45047)
		h.im.SendAsAgent(ctx, "agent_kim", customerIM(customer), answer)
		eventually(t, "the dead letter", func() bool {
			_, body := h.adminCall("GET", "/admin/deadletters", token)
			return strings.Contains(body, "45047")
		})

		for _, tok := range []string{"", "wrong"} {
			if status, _ := h.adminCall("GET", "/admin/deadletters", tok); status != http.StatusUnauthorized {
				t.Errorf("token %q: %d, want 401", tok, status)
			}
		}
		_, body := h.adminCall("GET", "/admin/deadletters", token)
		var list []DeadLetter
		if err := json.Unmarshal([]byte(body), &list); err != nil {
			t.Fatal(err)
		}
		if len(list) != 1 || list[0].Delivery.Text != answer || !strings.Contains(list[0].Reason, "45047") {
			t.Fatalf("dead letters %+v, want the answer refused with 45047", list)
		}

		path := fmt.Sprintf("/admin/deadletters/%d/retry", list[0].ID)
		if status, _ := h.adminCall("POST", path, ""); status != http.StatusUnauthorized {
			t.Errorf("retry without the token: %d, want 401", status)
		}
		if status, _ := h.adminCall("POST", path, token); status != http.StatusAccepted {
			t.Fatalf("retry: %d, want 202", status)
		}
		eventually(t, "the answer in WeChat", func() bool { return len(h.sentTo(customer)) == 1 })
		if status, _ := h.adminCall("POST", path, token); status != http.StatusNotFound {
			t.Errorf("a second retry: %d, want 404", status)
		}
		if status, body := h.adminCall("GET", "/admin/deadletters", token); status != 200 || strings.Contains(body, "45047") {
			t.Errorf("after the retry the list is %d %s", status, body)
		}
		if status, _ := h.adminCall("POST", "/admin/deadletters/x/retry", token); status != http.StatusNotFound {
			t.Errorf("a bad id: %d, want 404", status)
		}
		// The history shows the reply delivered by the retry, once the
		// worker has recorded WeChat's answer.
		var convs []HistoryConversation
		eventually(t, "the history to show the reply delivered", func() bool {
			convs = h.history(customer)
			return len(convs) == 1 && len(convs[0].Messages) == 2 && convs[0].Messages[1].State != "pending"
		})
		if convs[0].Messages[1].Text != answer || convs[0].Messages[1].State != "delivered" {
			t.Errorf("history after the retry: %+v", convs)
		}
		if status, _ := h.adminCall("GET", "/admin/customers/"+customer+"/messages", ""); status != http.StatusUnauthorized {
			t.Errorf("history without the token: %d, want 401", status)
		}
		if status, _ := h.adminCall("GET", "/admin/customers/o_nobody/messages", token); status != http.StatusNotFound {
			t.Errorf("history of a stranger: %d, want 404", status)
		}
		if strings.Contains(h.logs.String(), token) {
			t.Error("the admin token is in the logs")
		}
	})
}

// TestAdminOffWithoutToken: without ADMIN_TOKEN the operator's endpoints
// are not there.
func TestAdminOffWithoutToken(t *testing.T) {
	h := newHarness(t, harnessOptions{})
	for _, c := range []struct{ method, path string }{{"GET", "/admin/deadletters"}, {"POST", "/admin/deadletters/1/retry"},
		{"GET", "/admin/customers/" + customer + "/messages"}} {
		if status, _ := h.adminCall(c.method, c.path, "anything"); status != http.StatusNotFound {
			t.Errorf("%s %s: %d, want 404", c.method, c.path, status)
		}
	}
}
