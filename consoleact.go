package main

// What the learner may do in the console, as a customer or an agent, each
// done as their WeChat or IM client does it, through the fakes; and as the
// operator of both consoles: WeChat's encryption mode, IM failing.

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"

	"wechat-im-bridge/fakes"
)

// consoleActions are the actions the page may ask for, by name; reset and
// tutorial are the console's own (console.action).
var consoleActions = map[string]func(c *console, ctx context.Context, w *demoWorld, a consoleAction) error{
	"follow": func(c *console, ctx context.Context, w *demoWorld, a consoleAction) error {
		return pushed(w.wx.Follow(ctx, a.Who))
	},
	"unfollow": func(c *console, ctx context.Context, w *demoWorld, a consoleAction) error {
		return pushed(w.wx.Unfollow(ctx, a.Who))
	},
	"write": func(c *console, ctx context.Context, w *demoWorld, a consoleAction) error {
		return pushed(w.wx.SendText(ctx, a.Who, a.Text))
	},
	"photo": func(c *console, ctx context.Context, w *demoWorld, a consoleAction) error {
		id, picURL := w.wx.AddMedia(samplePNG(), "image/png")
		return pushed(w.wx.SendMessage(ctx, a.Who, "image", map[string]string{"PicUrl": picURL, "MediaId": id}))
	},
	"voice": func(c *console, ctx context.Context, w *demoWorld, a consoleAction) error {
		id, _ := w.wx.AddMedia(sampleAMR(150), "audio/amr")
		return pushed(w.wx.SendMessage(ctx, a.Who, "voice", map[string]string{"MediaId": id, "Format": "amr", "Recognition": "주문한 옷은 언제 도착하나요?"}))
	},
	"location": func(c *console, ctx context.Context, w *demoWorld, a consoleAction) error {
		return pushed(w.wx.SendMessage(ctx, a.Who, "location",
			map[string]string{"Location_X": "37.5665", "Location_Y": "126.978", "Scale": "15", "Label": "Seoul City Hall"}))
	},
	"reply": func(c *console, ctx context.Context, w *demoWorld, a consoleAction) error {
		_, err := w.im.SendAsAgent(ctx, a.Who, a.To, a.Text)
		return err
	},
	"picture": func(c *console, ctx context.Context, w *demoWorld, a consoleAction) error {
		_, err := sendPicture(ctx, w.im, a.Who, a.To)
		return err
	},
	"login": func(c *console, ctx context.Context, w *demoWorld, a consoleAction) error {
		return answered(w.im.Login(ctx, a.Who))
	},
	"logout": func(c *console, ctx context.Context, w *demoWorld, a consoleAction) error {
		return answered(w.im.Logout(ctx, a.Who))
	},
	"safe": func(c *console, ctx context.Context, w *demoWorld, a consoleAction) error {
		mode, on := fakes.ModePlaintext, a.Text == "on"
		if on {
			mode = fakes.ModeSafe
		}
		gen, sec := c.current()
		if err := w.wx.SetEncryption(mode, sec.AESKey); err != nil {
			return err
		}
		c.set(gen, func() { c.safe = on })
		// Saving the mode in WeChat's console checks the URL again.
		return w.wx.Verify(ctx)
	},
	"imfail": func(c *console, ctx context.Context, w *demoWorld, a consoleAction) error {
		on := a.Text == "on"
		if on {
			w.im.FailNextStatus(1<<30, http.StatusServiceUnavailable) // until switched off
		} else {
			w.im.FailNext(0, 0)
		}
		gen, _ := c.current()
		c.set(gen, func() { c.imDown = on })
		return nil
	},
}

// check refuses an action that names no one it may act for, or that its
// customer could not do in WeChat: only a follower writes, and follows once.
func (a consoleAction) check(prefix string, follows bool) error {
	customer := a.Who == demoCustomer || a.Who == demoSecondCustomer
	agent := a.Who == demoAgent || a.Who == demoSecondAgent
	switch a.Do {
	case "follow", "unfollow", "write", "photo", "voice", "location":
		switch {
		case !customer:
			return fmt.Errorf("%s is not one of the console's customers", a.Who)
		case a.Do == "follow" && follows:
			return errors.New("the customer follows the Official Account already")
		case a.Do != "follow" && !follows:
			return errors.New("the customer follows the Official Account first")
		case a.Do == "write" && strings.TrimSpace(a.Text) == "":
			return errors.New("a customer writes a text that is not empty")
		}
	case "reply", "picture":
		to, ok := strings.CutPrefix(a.To, prefix)
		if !agent || !ok || (to != demoCustomer && to != demoSecondCustomer) || (a.Do == "reply" && strings.TrimSpace(a.Text) == "") {
			return errors.New("an agent writes a text that is not empty to one of the customers")
		}
	case "login", "logout":
		if !agent {
			return fmt.Errorf("%s is not one of the console's agents", a.Who)
		}
	}
	return nil
}

// pushed reports a push WeChat gave up on.
func pushed(r fakes.PushResult) error {
	if r.Failed {
		return fmt.Errorf("WeChat gave up on the push after %d attempts (last answer %d %q)", r.Attempts, r.Status, r.Body)
	}
	return nil
}

// answered reports a callback the bridge did not take.
func answered(r fakes.CallbackResult) error {
	if r.Err != nil {
		return fmt.Errorf("%s: %w", r.Command, r.Err)
	}
	return nil
}
