// Command loadref is what the bridge's speed is measured against: a push
// handler written the usual way, on the usual WeChat SDK
// (github.com/silenceper/wechat), that forwards each customer's message to
// Tencent IM inside the handler, as the tutorial the bridge began from does.
// It commits nothing, retries nothing and keeps its state in a map.
//
// It reads the bridge's own environment (LISTEN_ADDR, WECHAT_TOKEN,
// WECHAT_APPID, WECHAT_APPSECRET, IM_SDKAPPID, IM_SECRET_KEY, IM_API_BASE,
// IM_ADMIN, IM_AGENTS, IM_USER_PREFIX), so the load generator (cmd/loadgen) can
// run it in the bridge's place:
//
//	(cd cmd/loadref && go build -o /tmp/loadref .) && go run ./cmd/loadgen -bridge /tmp/loadref
//
// It is tuned as the SDK's users tune it: the SDK's debug logging off and a
// connection pool sized for the load. LOADREF_UNTUNED=1 leaves the SDK's
// defaults (debug logs on stderr, two idle connections to IM).
//
// LOADREF_EMPTY=1 makes it the floor instead: an empty net/http handler that
// answers "success" and does nothing else, which tells how fast the machine
// and the generator are:
//
//	LOADREF_EMPTY=1 go run ./cmd/loadgen -bridge /tmp/loadref -forwards=false
//
// LOADREF_JOURNAL=PATH makes it the floor of a durable answer: the empty
// handler, but each push's body is appended to the file at PATH and answered
// only once an fsync covers it, many pushes to an fsync (journal.go):
//
//	LOADREF_JOURNAL=/tmp/loadref.journal go run ./cmd/loadgen -bridge /tmp/loadref -forwards=false
//
// LOADREF_SQLITE=PATH does the same in an SQLite database at PATH, on the
// bridge's driver: the pushes that wait are inserted in one transaction, a
// row each into a table with no index, and answered once its commit is
// fsynced. It is the floor of a durable answer on SQLite, whatever a
// handler does besides:
//
//	LOADREF_SQLITE=/tmp/loadref.db go run ./cmd/loadgen -bridge /tmp/loadref -forwards=false
//
// It is a module of its own so that the bridge does not depend on the SDK.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/silenceper/wechat/v2"
	"github.com/silenceper/wechat/v2/cache"
	offConfig "github.com/silenceper/wechat/v2/officialaccount/config"
	"github.com/silenceper/wechat/v2/officialaccount/message"
	"github.com/sirupsen/logrus"
	"github.com/tencentyun/tls-sig-api-v2-golang/tencentyun"
)

func main() {
	if os.Getenv("LOADREF_EMPTY") == "1" {
		serveEmpty()
		return
	}
	if path := os.Getenv("LOADREF_JOURNAL"); path != "" {
		serveJournal(openJournal, path)
		return
	}
	if path := os.Getenv("LOADREF_SQLITE"); path != "" {
		serveJournal(openSQLiteJournal, path)
		return
	}
	env := func(name, def string) string {
		if v := os.Getenv(name); v != "" {
			return v
		}
		return def
	}
	sdkAppID, err := strconv.Atoi(os.Getenv("IM_SDKAPPID"))
	if err != nil {
		log.Fatal("IM_SDKAPPID must be a number")
	}
	admin := env("IM_ADMIN", "administrator")
	sig, err := tencentyun.GenUserSig(sdkAppID, os.Getenv("IM_SECRET_KEY"), admin, 86400)
	if err != nil {
		log.Fatal("UserSig: ", err)
	}
	im := &imClient{
		base:   os.Getenv("IM_API_BASE"),
		query:  url.Values{"sdkappid": {strconv.Itoa(sdkAppID)}, "identifier": {admin}, "usersig": {sig}, "contenttype": {"json"}},
		http:   &http.Client{Timeout: 5 * time.Second},
		prefix: env("IM_USER_PREFIX", "wx_"),
		agent:  strings.Split(os.Getenv("IM_AGENTS"), ",")[0],
	}

	wc := wechat.NewWechat() // sets the SDK's logging to debug
	if os.Getenv("LOADREF_UNTUNED") != "1" {
		logrus.SetLevel(logrus.WarnLevel)
		im.http.Transport = &http.Transport{MaxIdleConnsPerHost: 64}
	}
	oa := wc.GetOfficialAccount(&offConfig.Config{
		AppID: os.Getenv("WECHAT_APPID"), AppSecret: os.Getenv("WECHAT_APPSECRET"),
		Token: os.Getenv("WECHAT_TOKEN"), Cache: cache.NewMemory(),
	})

	mux := newMux()
	mux.HandleFunc("/wechat", func(w http.ResponseWriter, r *http.Request) {
		srv := oa.GetServer(r, w)
		srv.SetMessageHandler(func(msg *message.MixMessage) *message.Reply {
			if msg.MsgType == message.MsgTypeText {
				if err := im.forward(string(msg.FromUserName), msg.Content); err != nil {
					log.Print("forward: ", err)
				}
			}
			return nil // "success"
		})
		if err := srv.Serve(); err != nil {
			log.Print("serve: ", err)
		}
	})
	log.Fatal(http.ListenAndServe(os.Getenv("LISTEN_ADDR"), mux))
}

// newMux returns a mux that answers /readyz, which the load generator
// waits on before it pushes.
func newMux() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
	return mux
}

// serveEmpty answers every push with "success" and nothing more.
func serveEmpty() {
	mux := newMux()
	mux.HandleFunc("/wechat", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "success") })
	log.Fatal(http.ListenAndServe(os.Getenv("LISTEN_ADDR"), mux))
}

// imClient calls Tencent IM's REST API as the admin.
type imClient struct {
	base   string
	query  url.Values
	http   *http.Client
	prefix string
	agent  string

	imported sync.Map // IM UserID → true, once account_import succeeded
}

// forward imports the customer's IM account the first time and sends text
// from it to the agent.
func (c *imClient) forward(openid, text string) error {
	from := c.prefix + openid
	if _, ok := c.imported.Load(from); !ok {
		if err := c.call("im_open_login_svc/account_import", map[string]any{"UserID": from}); err != nil {
			return err
		}
		c.imported.Store(from, true)
	}
	return c.call("openim/sendmsg", map[string]any{
		"SyncOtherMachine": 2, "From_Account": from, "To_Account": c.agent,
		"MsgRandom": rand.Uint32(), "MsgLifeTime": 604800,
		"MsgBody": []any{map[string]any{"MsgType": "TIMTextElem", "MsgContent": map[string]string{"Text": text}}},
	})
}

func (c *imClient) call(command string, req any) error {
	body, err := json.Marshal(req)
	if err != nil {
		return err
	}
	q := url.Values{"random": {strconv.FormatUint(uint64(rand.Uint32()), 10)}}
	for k, v := range c.query {
		q[k] = v
	}
	resp, err := c.http.Post(c.base+"/v4/"+command+"?"+q.Encode(), "application/json", bytes.NewReader(body))
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // not the URL: it carries the UserSig
		}
		return fmt.Errorf("%s: %w", command, err)
	}
	defer resp.Body.Close()
	var ans struct {
		ErrorCode int
		ErrorInfo string
	}
	if err := json.NewDecoder(resp.Body).Decode(&ans); err != nil {
		return fmt.Errorf("%s: %w", command, err)
	}
	if ans.ErrorCode != 0 {
		return fmt.Errorf("%s: %d %s", command, ans.ErrorCode, ans.ErrorInfo)
	}
	return nil
}
