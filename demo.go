package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"image"
	"image/png"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"wechat-im-bridge/fakes"
)

// The exchange the demo plays: the one in Tencent's tutorial.
const (
	demoCustomer = "o6_bmjrPTlm6_2sgVt7hMZOPfL2M"
	demoAgent    = "agent_kim"
	// The customer service the demo plays after the exchange: a second
	// customer waits, a second agent logs in, takes them, and is handed
	// the first customer.
	demoSecondCustomer = "oJqxQwYRyZMXFTc8sipB5TSe6Vw4"
	demoSecondAgent    = "agent_lee"
	demoQuestion       = "아동복 신상품은 언제쯤 나오나요?"
	demoAnswer         = "5월에 출시될 예정이오니, 많은 관심 부탁드립니다!"
)

// runDemo starts fake WeChat and IM servers and the bridge in this process,
// and plays the tutorial's exchange through them, printing each hop.
func runDemo(ctx context.Context, stdout, stderr io.Writer) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	var outMu sync.Mutex
	say := func(line string) {
		outMu.Lock()
		defer outMu.Unlock()
		fmt.Fprintln(stdout, line)
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	w, err := startWorld(ctx, fakes.WeChatOptions{Trace: say}, fakes.IMOptions{Trace: say}, nil, log)
	if err != nil {
		return err
	}
	defer w.close()
	say("wechat-im-bridge demo: fake WeChat at " + w.wx.URL + ", fake IM at " + w.im.URL + ", bridge at " + w.base)
	say("")
	if err := playTutorial(ctx, w, func(string) *http.Client { return http.DefaultClient }, say); err != nil {
		return err
	}
	if err := w.close(); err != nil {
		return err
	}
	say("")
	say(fmt.Sprintf("Done: the customer asked %q in WeChat, agent %s answered in IM, and the customer read %q.",
		demoQuestion, demoAgent, w.wx.Sent()[0].Text))
	return nil
}

// playTutorial plays the demo's steps in w; say narrates them, and
// client("agent") is the HTTP client of the agent's IM client,
// client("someone") a forger's.
func playTutorial(ctx context.Context, w *demoWorld, client func(who string) *http.Client, say func(string)) error {
	customerIM := w.cfg.IMUserPrefix + demoCustomer
	if err := playExchange(ctx, w.wx, w.im, customerIM, say); err != nil {
		return err
	}
	if err := playPhoto(ctx, w.wx, w.im, client("agent"), customerIM, say); err != nil {
		return err
	}
	if err := playForgery(ctx, client("someone"), w.base, w.cfg, say); err != nil {
		return err
	}
	return playDesk(ctx, w, say)
}

// demoWorld is the demo's offline world: fake WeChat and IM, and the bridge
// between them on SQLite in a folder of its own.
type demoWorld struct {
	wx   *fakes.WeChat
	im   *fakes.IM
	cfg  Config
	base string // the bridge's URL
	dir  string

	dt     *fakes.Standalone
	stop   context.CancelFunc // stops the bridge
	served chan error
	once   sync.Once
	err    error
}

// startWorld starts the fakes with wopts and iopts (the demo's agents, and
// a callback token unless one is set) and the bridge between them, its configuration
// demoConfig's with env on top, and waits until the bridge is ready.
func startWorld(ctx context.Context, wopts fakes.WeChatOptions, iopts fakes.IMOptions, env map[string]string, log *slog.Logger) (*demoWorld, error) {
	w := &demoWorld{dt: &fakes.Standalone{}, served: make(chan error, 1), stop: func() {}}
	w.wx = fakes.NewWeChat(w.dt, wopts)
	// IM signs each callback with the token of its console's callback
	// authentication; the bridge takes no other (IM_CALLBACK_TOKEN).
	iopts.Accounts, iopts.Online = []string{demoAgent, demoSecondAgent}, []string{demoAgent}
	if iopts.CallbackToken == "" {
		iopts.CallbackToken = randomToken()
	}
	w.im = fakes.NewIM(w.dt, iopts)
	var err error
	if w.dir, err = os.MkdirTemp("", "wechat-im-bridge-demo-"); err != nil {
		w.dt.Close()
		return nil, err
	}
	cfg, ln, err := demoConfig(w.wx, w.im, w.dir, env)
	if err != nil {
		w.close()
		return nil, err
	}
	w.cfg, w.base = cfg, "http://"+ln.Addr().String()
	w.wx.SetTarget(w.base + "/wechat")
	w.im.SetCallbackURL(w.base + "/imcallback")
	bridgeCtx, stop := context.WithCancel(context.WithoutCancel(ctx))
	exited := make(chan struct{})
	w.stop = stop
	go func() { w.served <- serve(bridgeCtx, cfg, ln, log); close(exited) }()
	if err := fakes.WaitReady(ctx, exited, w.base); err != nil {
		select {
		case err = <-w.served:
			err = fmt.Errorf("demo: the bridge stopped: %w", err)
			w.served <- nil
		default:
		}
		w.close()
		return nil, err
	}
	return w, nil
}

// randomToken is 32 random hex digits.
func randomToken() string {
	b := make([]byte, 16)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// close stops the bridge, then the fakes, and removes the world's folder;
// it returns the bridge's error or the problems the fakes saw. Later calls
// return the first call's answer.
func (w *demoWorld) close() error {
	w.once.Do(func() {
		w.stop()
		if w.base != "" {
			if err := <-w.served; err != nil {
				w.err = fmt.Errorf("demo: bridge: %w", err)
			}
		}
		w.dt.Close()
		if errs := w.dt.Errors(); len(errs) > 0 && w.err == nil {
			w.err = errors.New("demo: the fakes saw a problem:\n  " + strings.Join(errs, "\n  "))
		}
		os.RemoveAll(w.dir)
	})
	return w.err
}

// demoConfig is the bridge's configuration for the fakes, on SQLite in
// dir, with env on top, and a loopback listener for it.
func demoConfig(wx *fakes.WeChat, im *fakes.IM, dir string, extra map[string]string) (Config, net.Listener, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return Config{}, nil, err
	}
	wopts, iopts := wx.Options(), im.Options()
	env := map[string]string{
		"PUBLIC_URL":   "http://" + ln.Addr().String(), // where the agent's client downloads photos
		"WECHAT_TOKEN": wopts.Token, "WECHAT_APPID": wopts.AppID, "WECHAT_APPSECRET": wopts.AppSecret,
		"WECHAT_API_BASE": wx.URL, "IM_SDKAPPID": fmt.Sprint(iopts.SDKAppID), "IM_SECRET_KEY": iopts.SecretKey,
		"IM_AGENTS": demoAgent + "," + demoSecondAgent, "IM_ADMIN": iopts.Admin, "IM_API_BASE": im.URL,
		"IM_AGENT_MAX_OPEN": "1", // so that a second customer waits
		"IM_CALLBACK_TOKEN": iopts.CallbackToken,
		"ADMIN_TOKEN":       randomToken(), // the demo reads what the bridge recorded
		"DATABASE_URL":      "sqlite:" + filepath.Join(dir, "bridge.db"),
		// The fakes serve media on loopback, where the bridge fetches
		// nothing it is not told to.
		"MEDIA_FETCH_ALLOW": strings.TrimPrefix(wx.URL, "http://") + "," + strings.TrimPrefix(im.URL, "http://"),
	}
	maps.Copy(env, extra)
	cfg, err := loadConfig(mapEnv(env))
	if err != nil {
		ln.Close()
		return Config{}, nil, err
	}
	return cfg, ln, nil
}

// playExchange plays the tutorial's exchange: a follow, a question, the
// agent's answer, each waited for where it lands.
func playExchange(ctx context.Context, wx *fakes.WeChat, im *fakes.IM, customerIM string, say func(string)) error {
	step := func(title string) { say(""); say("── " + title) }
	step("1. The customer follows the Official Account")
	if r := wx.Follow(ctx, demoCustomer); r.Reply == nil {
		return fmt.Errorf("demo: follow got no welcome (status %d %q)", r.Status, r.Body)
	}
	if err := fakes.WaitFor(ctx, "the customer's IM account", func() bool { return im.Imported(customerIM) }); err != nil {
		return err
	}
	step("2. The customer asks a question")
	if r := wx.SendText(ctx, demoCustomer, demoQuestion); r.Reply == nil {
		return fmt.Errorf("demo: message got no passive reply (status %d %q)", r.Status, r.Body)
	}
	if err := fakes.WaitFor(ctx, "the question to reach the agent", func() bool { return len(im.Messages()) == 1 }); err != nil {
		return err
	}
	step("3. The agent answers from an IM client")
	if _, err := im.SendAsAgent(ctx, demoAgent, customerIM, demoAnswer); err != nil {
		return err
	}
	return fakes.WaitFor(ctx, "the answer to reach the customer", func() bool { return len(wx.Sent()) == 1 })
}

// playForgery posts an agent's reply as IM would, but without IM's
// signature, and shows that the bridge refuses it.
func playForgery(ctx context.Context, client *http.Client, base string, cfg Config, say func(string)) error {
	say("")
	say("── 6. Someone else posts a reply to the callback URL, without IM's signature")
	q := url.Values{"SdkAppid": {strconv.FormatUint(cfg.IMSDKAppID, 10)}, "CallbackCommand": {cbAfterSendMsg}, "contenttype": {"json"}}
	body := fmt.Sprintf(`{"CallbackCommand":%q,"From_Account":%q,"To_Account":%q,"MsgKey":"forged","MsgBody":[{"MsgType":"TIMTextElem","MsgContent":{"Text":"forged"}}]}`,
		cbAfterSendMsg, demoAgent, cfg.IMUserPrefix+demoCustomer)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+"/imcallback?"+q.Encode(), strings.NewReader(body))
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	answer, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		return fmt.Errorf("demo: an unsigned callback got %d %s, want 403", resp.StatusCode, answer)
	}
	say(fmt.Sprintf("   bridge → %d %s", resp.StatusCode, answer))
	return nil
}

// playPhoto sends a photo from the customer, downloads it as the agent's IM
// client does, from the URL its TIMImageElem gives, and sends it back.
func playPhoto(ctx context.Context, wx *fakes.WeChat, im *fakes.IM, client *http.Client, customerIM string, say func(string)) error {
	say("")
	say("── 4. The customer sends a photo")
	photo := samplePNG()
	mediaID, picURL := wx.AddMedia(photo, "image/png")
	if r := wx.SendMessage(ctx, demoCustomer, "image", map[string]string{"PicUrl": picURL, "MediaId": mediaID}); r.Status != http.StatusOK {
		return fmt.Errorf("demo: photo push got %d %q", r.Status, r.Body)
	}
	var got fakes.Message
	if err := fakes.WaitFor(ctx, "the photo to reach the agent", func() bool {
		ms := im.Messages()
		got = ms[len(ms)-1]
		return got.To == demoAgent && got.Text == ""
	}); err != nil {
		return err
	}
	var body []struct {
		MsgContent struct {
			ImageInfoArray []struct{ URL string }
		}
	}
	if err := json.Unmarshal(got.Body, &body); err != nil || len(body) == 0 || len(body[0].MsgContent.ImageInfoArray) == 0 {
		return fmt.Errorf("demo: the agent got no image: %s", got.Body)
	}
	u := body[0].MsgContent.ImageInfoArray[0].URL
	data, ct, err := download(ctx, client, u)
	if err != nil {
		return err
	}
	if !bytes.Equal(data, photo) {
		return errors.New("demo: the agent's client downloaded other bytes than the customer sent")
	}
	say(fmt.Sprintf("agent     → bridge    GET %s → %s, %d bytes: the customer's photo", strings.TrimPrefix(u, "http://"), ct, len(data)))

	say("")
	say("── 5. The agent sends a photo back")
	if _, err := sendPicture(ctx, im, demoAgent, customerIM); err != nil {
		return err
	}
	return fakes.WaitFor(ctx, "the photo to reach the customer", func() bool {
		sent := wx.Sent()
		return len(sent) == 2 && sent[1].MsgType == "image"
	})
}

// playDesk plays the customer service: a second customer waits while the
// only agent online is busy, a second agent logs in and takes them, the
// first agent hands the first customer over, and the second agent ends
// that conversation, which the customer rates.
func playDesk(ctx context.Context, w *demoWorld, say func(string)) error {
	wx, im := w.wx, w.im
	step := func(title string) { say(""); say("── " + title) }
	first, second := w.cfg.IMUserPrefix+demoCustomer, w.cfg.IMUserPrefix+demoSecondCustomer
	step("7. A second customer writes while " + demoAgent + " is busy and " + demoSecondAgent + " is away: they wait")
	wx.Follow(ctx, demoSecondCustomer)
	if r := wx.SendText(ctx, demoSecondCustomer, "Is the store open on Sunday?"); r.Reply == nil || !strings.Contains(r.Reply.Content, "number 1") {
		return fmt.Errorf("demo: the waiting customer was not told their place (status %d %q)", r.Status, r.Body)
	}
	received := func(agent, from, text string) func() bool {
		return func() bool {
			for _, m := range im.Messages() {
				if m.To == agent && m.From == from && strings.Contains(m.Text, text) {
					return true
				}
			}
			return false
		}
	}
	step("8. " + demoSecondAgent + " logs in, takes the waiting customer, and ends that conversation")
	im.Login(ctx, demoSecondAgent)
	if err := fakes.WaitFor(ctx, "the waiting message to reach "+demoSecondAgent, received(demoSecondAgent, second, "Sunday")); err != nil {
		return err
	}
	// A transfer goes only to an agent below IM_AGENT_MAX_OPEN: the second
	// agent ends their conversation first.
	if _, err := im.SendAsAgent(ctx, demoSecondAgent, second, "/end"); err != nil {
		return err
	}
	if err := fakes.WaitFor(ctx, "the second conversation closed", received(demoSecondAgent, second, "Conversation ended")); err != nil {
		return err
	}
	step("9. " + demoAgent + " hands the first customer to " + demoSecondAgent + ", who reads a summary first")
	if _, err := im.SendAsAgent(ctx, demoAgent, first, "/transfer "+demoSecondAgent); err != nil {
		return err
	}
	if err := fakes.WaitFor(ctx, "the summary to reach "+demoSecondAgent, received(demoSecondAgent, first, "Transferred to you")); err != nil {
		return err
	}
	step("10. " + demoSecondAgent + " ends the conversation, and the customer rates it")
	if _, err := im.SendAsAgent(ctx, demoSecondAgent, first, "/end"); err != nil {
		return err
	}
	// The customer's next message is a rating once the bridge has recorded
	// the question delivered, which comes after WeChat took it.
	if err := fakes.WaitFor(ctx, "the rating request delivered", func() bool {
		return w.delivered(ctx, demoCustomer, "How did we do?")
	}); err != nil {
		return err
	}
	wx.SendText(ctx, demoCustomer, "5")
	return fakes.WaitFor(ctx, "the rating shown to "+demoSecondAgent, received(demoSecondAgent, first, "rated the conversation 5 of 5"))
}

// delivered reports whether the bridge has recorded a message to openid
// containing text delivered, as its operator's endpoint tells.
func (w *demoWorld) delivered(ctx context.Context, openid, text string) bool {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, w.base+"/admin/customers/"+openid+"/messages", nil)
	if err != nil {
		return false
	}
	req.Header.Set("Authorization", "Bearer "+w.cfg.AdminToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	var h struct{ Conversations []HistoryConversation }
	if json.NewDecoder(resp.Body).Decode(&h) != nil {
		return false
	}
	for _, c := range h.Conversations {
		for _, m := range c.Messages {
			if m.Direction == "out" && strings.Contains(m.Text, text) && m.State == "delivered" {
				return true
			}
		}
	}
	return false
}

// samplePNG is the photo the demo's customer and agents send: 4×3 pixels.
func samplePNG() []byte {
	img := image.NewRGBA(image.Rect(0, 0, 4, 3))
	for i := range img.Pix {
		img.Pix[i] = byte(60 * i)
	}
	var b bytes.Buffer
	png.Encode(&b, img)
	return b.Bytes()
}

// sampleAMR is an AMR-NB file of n frames of 20 ms (mode 12.2 kbit/s): a
// voice note.
func sampleAMR(n int) []byte {
	b := []byte("#!AMR\n")
	for i := range n {
		frame := make([]byte, 32)
		frame[0] = 7<<3 | 0x04
		frame[1] = byte(i)
		b = append(b, frame...)
	}
	return b
}

// sendPicture sends the sample photo from agent to customerIM as an IM
// client does: the file in IM's storage, a TIMImageElem naming it.
func sendPicture(ctx context.Context, im *fakes.IM, agent, customerIM string) (fakes.Message, error) {
	photo := samplePNG()
	info := map[string]any{"Type": 1, "Size": len(photo), "Width": 4, "Height": 3, "URL": im.AddFile(photo, "image/png")}
	elem := map[string]any{"MsgType": "TIMImageElem", "MsgContent": map[string]any{"UUID": "demo", "ImageFormat": 3,
		"ImageInfoArray": []any{info, info, info}}}
	return im.SendElemsAsAgent(ctx, agent, customerIM, false, elem)
}

// download fetches u as the agent's IM client does: its body, at most
// maxMediaBytes, and its type.
func download(ctx context.Context, client *http.Client, u string) ([]byte, string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, "", err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, "", err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, "", fmt.Errorf("demo: GET %s: %s", u, resp.Status)
	}
	data, err := readLimited(resp.Body, maxMediaBytes)
	return data, resp.Header.Get("Content-Type"), err
}
