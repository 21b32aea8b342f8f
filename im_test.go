package main

import (
	"context"
	"testing"
	"time"
)

func TestUserSigRenewedBeforeItExpires(t *testing.T) {
	clock := &fakeClock{now: time.Now()}
	c := &IMClient{SDKAppID: 1400000001, SecretKey: "k", Admin: "administrator", SigLifetime: 10 * time.Hour, Now: clock.Now}
	if _, err := c.userSig(context.Background(), ""); err != nil {
		t.Fatal(err)
	}
	first := c.sigExpiry
	clock.Advance(7 * time.Hour)
	c.userSig(context.Background(), "")
	if c.sigExpiry != first {
		t.Error("the UserSig was renewed at 70% of its life")
	}
	clock.Advance(time.Hour + time.Second)
	c.userSig(context.Background(), "")
	if !c.sigExpiry.After(first) {
		t.Error("the UserSig was not renewed past 80% of its life")
	}
}
