package main

import (
	"strings"
	"testing"
	"time"
)

func validEnv() map[string]string {
	return map[string]string{
		"WECHAT_TOKEN": "token123", "WECHAT_APPID": "wx0123", "WECHAT_APPSECRET": "app-secret-value",
		"IM_SDKAPPID": "1400000001", "IM_SECRET_KEY": "im-secret-value", "IM_AGENTS": "agent_kim, agent_lee",
		"IM_CALLBACK_TOKEN": "callback-token-value",
	}
}

func TestLoadConfigDefaults(t *testing.T) {
	env := validEnv()
	c, err := loadConfig(mapEnv(env))
	if err != nil {
		t.Fatal(err)
	}
	if c.ListenAddr != ":8080" || c.WeChatAPIBase != "https://api.weixin.qq.com" || c.IMAPIBase != "https://console.tim.qq.com" ||
		c.IMAdmin != "administrator" || c.IMUserPrefix != "wx_" || c.DatabaseURL != "sqlite:bridge.db" ||
		c.WelcomeText != defaultWelcomeText || c.ConnectingText != defaultConnectingText || c.DatabaseMaxConns != defaultPGConns {
		t.Errorf("defaults: got %+v", c)
	}
	if !c.IMCallbackAuth {
		t.Error("callback authentication is off by default")
	}
	if strings.Join(c.IMAgents, ",") != "agent_kim,agent_lee" || c.IMSDKAppID != 1400000001 {
		t.Errorf("got agents %v, sdkappid %d", c.IMAgents, c.IMSDKAppID)
	}
}

func TestLoadConfigProblems(t *testing.T) {
	for _, tc := range []struct {
		name string
		set  map[string]string
		want string
	}{
		{"missing token", map[string]string{"WECHAT_TOKEN": ""}, "WECHAT_TOKEN is required"},
		{"short token", map[string]string{"WECHAT_TOKEN": "ab"}, "WECHAT_TOKEN must be"},
		{"missing secret", map[string]string{"WECHAT_APPSECRET": ""}, "WECHAT_APPSECRET is required"},
		{"sdkappid not a number", map[string]string{"IM_SDKAPPID": "14x"}, "IM_SDKAPPID must be a positive integer"},
		{"duplicate agent", map[string]string{"IM_AGENTS": "a1,a1"}, `IM_AGENTS lists "a1" twice`},
		{"agent with prefix", map[string]string{"IM_AGENTS": "wx_a"}, "must not be IM_ADMIN nor start with IM_USER_PREFIX"},
		{"bad API base", map[string]string{"IM_API_BASE": "console.tim.qq.com"}, "IM_API_BASE must be an http or https URL"},
		{"bad database", map[string]string{"DATABASE_URL": "mysql://x"}, "DATABASE_URL: want sqlite:PATH or postgres://"},
		{"long prefix", map[string]string{"IM_USER_PREFIX": "wechat_"}, "IM_USER_PREFIX must be"},
		{"postgres password hidden", map[string]string{"DATABASE_URL": "mysql://u:short@h/db"}, "mysql://u:xxxxx@h/db"},
		{"bad duration", map[string]string{"VENDOR_TIMEOUT": "soon"}, "VENDOR_TIMEOUT must be a positive duration"},
		{"bad rate", map[string]string{"IM_RATE_LIMIT": "-1"}, "IM_RATE_LIMIT must be"},
		{"bad AES key", map[string]string{"WECHAT_AES_KEY": "short"}, "WECHAT_AES_KEY must be the 43-character"},
		{"no connections", map[string]string{"DATABASE_URL": "postgres://h/db", "DATABASE_MAX_CONNS": "0"}, "DATABASE_MAX_CONNS must be a whole number"},
		{"no callback token", map[string]string{"IM_CALLBACK_TOKEN": ""}, "IM_CALLBACK_TOKEN is required"},
		{"bad callback auth", map[string]string{"IM_CALLBACK_AUTH": "maybe"}, "IM_CALLBACK_AUTH must be on or off"},
		{"connections on sqlite", map[string]string{"DATABASE_MAX_CONNS": "4"}, "DATABASE_MAX_CONNS applies to PostgreSQL only"},
		{"bad hours", map[string]string{"BUSINESS_HOURS": "weekdays 9-6"}, "BUSINESS_HOURS: "},
		{"bad time zone", map[string]string{"BUSINESS_TIMEZONE": "Mars/Olympus"}, "BUSINESS_TIMEZONE must be an IANA time zone"},
		{"bad cap", map[string]string{"IM_AGENT_MAX_OPEN": "-1"}, "IM_AGENT_MAX_OPEN must be"},
		{"bad idle", map[string]string{"SESSION_IDLE_TIMEOUT": "a while"}, "SESSION_IDLE_TIMEOUT must be a positive duration"},
		{"no quota", map[string]string{"WECHAT_REPLY_QUOTA": "0"}, "WECHAT_REPLY_QUOTA must be"},
		{"bad retention", map[string]string{"HISTORY_RETENTION": "half a year"}, "HISTORY_RETENTION must be 0 (keep everything) or at least 7 days"},
		{"negative retention", map[string]string{"HISTORY_RETENTION": "-5d"}, "HISTORY_RETENTION must be"},
		{"short retention", map[string]string{"HISTORY_RETENTION": "6d"}, "HISTORY_RETENTION must be"},
		{"an hour's retention", map[string]string{"HISTORY_RETENTION": "1h"}, "HISTORY_RETENTION must be"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := validEnv()
			for k, v := range tc.set {
				env[k] = v
			}
			_, err := loadConfig(mapEnv(env))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error containing %q", err, tc.want)
			}
			for _, secret := range []string{"app-secret-value", "im-secret-value", "callback-token-value", "short"} {
				if strings.Contains(err.Error(), secret) {
					t.Errorf("error echoes a secret value: %v", err)
				}
			}
		})
	}
}

func TestLoadConfigDatabaseMaxConns(t *testing.T) {
	env := validEnv()
	env["DATABASE_URL"], env["DATABASE_MAX_CONNS"] = "postgres://bridge@db.internal/bridge", "4"
	c, err := loadConfig(mapEnv(env))
	if err != nil {
		t.Fatal(err)
	}
	if c.DatabaseMaxConns != 4 {
		t.Errorf("got DatabaseMaxConns %d, want 4", c.DatabaseMaxConns)
	}
}

func TestLoadConfigDesk(t *testing.T) {
	env := validEnv()
	c, err := loadConfig(mapEnv(env))
	if err != nil {
		t.Fatal(err)
	}
	d := c.Desk
	if d.MaxOpen != 10 || d.Hours != nil || d.IdleTimeout != 30*time.Minute || d.ReplyQuota != 5 || d.Texts != defaultDeskTexts ||
		strings.Join(d.Agents, ",") != "agent_kim,agent_lee" || d.UserPrefix != "wx_" {
		t.Errorf("desk defaults: got %+v", d)
	}
	env["BUSINESS_HOURS"], env["BUSINESS_TIMEZONE"], env["SESSION_IDLE_TIMEOUT"] = "Mon-Fri 09:00-18:00", "Europe/Berlin", "off"
	env["QUEUED_TEXT"] = "Place {position}."
	if c, err = loadConfig(mapEnv(env)); err != nil {
		t.Fatal(err)
	}
	monday9 := time.Date(2026, 12, 7, 9, 0, 0, 0, time.UTC) // 10:00 in Berlin
	if !c.Desk.Hours.Open(monday9) || c.Desk.Hours.Open(monday9.Add(8*time.Hour)) || c.Desk.IdleTimeout != 0 ||
		c.Desk.Texts.queuedText(3) != "Place 3." {
		t.Errorf("desk: got %+v", c.Desk)
	}
}

func TestLoadConfigHistoryRetention(t *testing.T) {
	for v, want := range map[string]time.Duration{"": 180 * 24 * time.Hour, "0": 0, "30d": 30 * 24 * time.Hour, "720h": 720 * time.Hour, "7d": 7 * 24 * time.Hour} {
		env := validEnv()
		env["HISTORY_RETENTION"] = v
		c, err := loadConfig(mapEnv(env))
		if err != nil {
			t.Fatal(err)
		}
		if c.HistoryRetention != want {
			t.Errorf("HISTORY_RETENTION=%q: got %s, want %s", v, c.HistoryRetention, want)
		}
	}
}
