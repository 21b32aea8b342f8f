package main

import (
	"testing"
	"time"
)

func TestUserSigRenewedBeforeItExpires(t *testing.T) {
	clock := &fakeClock{now: time.Now()}
	c := &IMClient{SDKAppID: 1400000001, SecretKey: "k", Admin: "administrator", SigLifetime: 10 * time.Hour, Now: clock.Now}
	if _, err := c.userSig(false); err != nil {
		t.Fatal(err)
	}
	first := c.sigExpiry
	clock.Advance(7 * time.Hour)
	c.userSig(false)
	if c.sigExpiry != first {
		t.Error("the UserSig was renewed at 70% of its life")
	}
	clock.Advance(time.Hour + time.Second)
	c.userSig(false)
	if !c.sigExpiry.After(first) {
		t.Error("the UserSig was not renewed past 80% of its life")
	}
}
