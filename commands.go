package main

// What an agent types in a customer's conversation to run it: /end,
// /transfer AGENT, /queue, /help. A command never reaches the customer; its
// answer comes back inside the same conversation, marked as the bridge's
// (tellAgent, outbox.go). An unknown /word is answered with the help.

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
	"unicode"
)

// Command is an agent's command in a customer's conversation.
type Command struct {
	Agent  string // who typed it
	OpenID string // the customer whose conversation it was typed in
	Name   string // end, transfer, queue, help, or what the agent typed
	Arg    string
}

// commandHelp lists the commands, as /help answers.
const commandHelp = `Commands, typed in a customer's conversation (the customer never sees them):
/end: end the conversation; the customer is asked to rate it
/transfer AGENT: hand the conversation to another agent (%s)
/queue: who is waiting, and for how long
/help: this list`

// parseCommand returns the command a message is, if it is one: a single
// text element whose first word is "/" and letters.
func parseCommand(body []MsgElem) (name, arg string, ok bool) {
	if len(body) != 1 || body[0].MsgType != "TIMTextElem" {
		return "", "", false
	}
	text, _ := body[0].MsgContent["Text"].(string)
	text = strings.TrimSpace(text)
	word, rest, _ := strings.Cut(text, " ")
	name, isCmd := strings.CutPrefix(word, "/")
	if !isCmd || name == "" || strings.IndexFunc(name, func(r rune) bool { return !unicode.IsLetter(r) }) >= 0 {
		return "", "", false
	}
	return strings.ToLower(name), strings.TrimSpace(rest), true
}

// CommandDone says what a command changed, for the metrics.
type CommandDone struct {
	Duplicate bool
	Assigned  []Assignment // waiting customers given the place it freed
}

// AcceptCommand runs an agent's command, keyed by the IM message's key as a
// reply is, in one transaction: its effects, the customer's texts and the
// agent's answer are committed together. A key seen before commits nothing.
func (s *Store) AcceptCommand(ctx context.Context, key string, c Command, now time.Time) (CommandDone, error) {
	done, err := write(ctx, s, func(ctx context.Context, tx *sql.Tx) (CommandDone, error) {
		if err := s.lockCustomer(ctx, tx, c.OpenID); err != nil {
			return CommandDone{}, err
		}
		if _, dup, err := s.claimKey(ctx, tx, key, "", now); err != nil || dup {
			return CommandDone{Duplicate: dup}, err
		}
		return s.runCommand(ctx, tx, c, now)
	})
	if err != nil {
		return CommandDone{}, fmt.Errorf("accept command: %w", err)
	}
	return done, nil
}

// runCommand is AcceptCommand's write, once the key is claimed.
func (s *Store) runCommand(ctx context.Context, tx *sql.Tx, c Command, now time.Time) (CommandDone, error) {
	var done CommandDone
	switch c.Name {
	case "queue":
		text, err := s.queueText(ctx, tx, now)
		if err != nil {
			return done, err
		}
		return done, s.tellAgent(ctx, tx, c.OpenID, c.Agent, text, now)
	case "end", "transfer":
	default:
		return done, s.tellAgent(ctx, tx, c.OpenID, c.Agent, fmt.Sprintf(commandHelp, strings.Join(s.desk.Agents, ", ")), now)
	}
	conv, agent, open, err := s.lastConversation(ctx, tx, c.OpenID)
	switch {
	case errors.Is(err, errNoConversation) || (err == nil && (!open || agent == "")):
		return done, s.tellAgent(ctx, tx, c.OpenID, c.Agent, "No conversation with this customer is open with an agent: nothing to "+c.Name+".", now)
	case err != nil:
		return done, err
	case agent != c.Agent:
		return done, s.tellAgent(ctx, tx, c.OpenID, c.Agent, fmt.Sprintf("Not done: the conversation is %s's, and only they can %s it.", agent, c.Name), now)
	}
	if c.Name == "end" {
		return s.end(ctx, tx, c, conv, agent, now)
	}
	return s.transfer(ctx, tx, c, conv, agent, now)
}

// end closes the conversation: the customer reads CLOSED_TEXT and is asked
// for a rating, and the place it frees goes to the longest-waiting
// customer.
func (s *Store) end(ctx context.Context, tx *sql.Tx, c Command, conv int64, agent string, now time.Time) (CommandDone, error) {
	var done CommandDone
	if err := s.closeConversation(ctx, tx, c.OpenID, conv, agent, closedByAgent, now); err != nil {
		return done, err
	}
	text, answer := strings.TrimSpace(s.desk.Texts.Closed+"\n\n"+s.desk.Texts.Rating), "Conversation ended."
	d := Delivery{Kind: deliverWeChat, OpenID: c.OpenID, IMUser: s.desk.imUser(c.OpenID), Agent: agent, Text: text}
	if s.desk.Texts.Rating != "" {
		d.RatingConv = conv // their next message is their rating once the question reached them
	}
	state, err := s.toCustomer(ctx, tx, conv, d, "", now)
	if err != nil {
		return done, err
	}
	if d.RatingConv != 0 && state == stateQueued {
		answer = "Conversation ended; the customer is asked to rate it."
	}
	if err := s.tellAgent(ctx, tx, c.OpenID, c.Agent, answer, now); err != nil {
		return done, err
	}
	done.Assigned, err = s.drain(ctx, tx, now)
	return done, err
}

// summaryMessages is how many of the last messages a transfer's summary
// gives.
const summaryMessages = 10

// transfer hands the conversation to another agent of the desk, who first
// reads a summary of it; the customer reads TRANSFER_TEXT.
func (s *Store) transfer(ctx context.Context, tx *sql.Tx, c Command, conv int64, agent string, now time.Time) (CommandDone, error) {
	var done CommandDone
	to := c.Arg
	switch {
	case !s.desk.agentListed(to):
		return done, s.tellAgent(ctx, tx, c.OpenID, c.Agent, fmt.Sprintf("Not transferred: %q is not an agent. Agents: %s.", to, strings.Join(s.desk.Agents, ", ")), now)
	case to == agent:
		return done, s.tellAgent(ctx, tx, c.OpenID, c.Agent, "Not transferred: the conversation is "+to+"'s already.", now)
	}
	if err := s.lockDesk(ctx, tx); err != nil {
		return done, err
	}
	states, err := s.agentStates(ctx, tx)
	if err != nil {
		return done, err
	}
	switch st, known := states[to]; {
	case s.desk.MaxOpen > 0 && st.open >= s.desk.MaxOpen:
		return done, s.tellAgent(ctx, tx, c.OpenID, c.Agent, fmt.Sprintf("Not transferred: %s has %d open conversations, as many as IM_AGENT_MAX_OPEN allows.", to, st.open), now)
	case known && st.online == 0:
		// Their customers who write go to the next free agent (presence.go).
		return done, s.tellAgent(ctx, tx, c.OpenID, c.Agent, "Not transferred: "+to+" is offline.", now)
	}
	if _, err := s.exec(ctx, tx, `UPDATE conversations SET agent = ?, assigned_at = ?, first_reply_at = 0 WHERE id = ?`, to, now.UnixMilli(), conv); err != nil {
		return done, err
	}
	if _, err := s.exec(ctx, tx, `UPDATE agent_load SET open = open - 1 WHERE agent = ?`, agent); err != nil {
		return done, err
	}
	if err := s.assigned(ctx, tx, c.OpenID, to, now); err != nil {
		return done, err
	}
	var summary string
	summary, err = s.summary(ctx, tx, c.OpenID, conv, "Transferred to you by "+agent+".")
	if err != nil {
		return done, err
	}
	if err := s.tellAgent(ctx, tx, c.OpenID, to, summary, now); err != nil {
		return done, err
	}
	d := Delivery{Kind: deliverWeChat, OpenID: c.OpenID, IMUser: s.desk.imUser(c.OpenID), Agent: to, Text: s.desk.Texts.Transfer}
	if _, err := s.toCustomer(ctx, tx, conv, d, "", now); err != nil {
		return done, err
	}
	if err := s.tellAgent(ctx, tx, c.OpenID, c.Agent, "Transferred to "+to+".", now); err != nil {
		return done, err
	}
	done.Assigned, err = s.drain(ctx, tx, now)
	return done, err
}

// summary is what an agent given a conversation someone else had reads
// first: how it came to them (head), and its last messages, both sides.
func (s *Store) summary(ctx context.Context, tx *sql.Tx, openid string, conv int64, head string) (string, error) {
	if err := s.settleHistory(ctx, tx, openid, 0); err != nil { // history.go
		return "", err
	}
	rows, err := s.query(ctx, tx, `SELECT direction, agent, text FROM messages WHERE openid = ? AND conversation = ?
		ORDER BY id DESC LIMIT `+strconv.Itoa(summaryMessages), openid, conv)
	if err != nil {
		return "", err
	}
	defer rows.Close()
	var lines []string
	for rows.Next() {
		var dir, agent, text string
		if err := rows.Scan(&dir, &agent, &text); err != nil {
			return "", err
		}
		who := "customer"
		if dir == "out" {
			who = agent
			if who == "" {
				who = "bridge"
			}
		}
		lines = append(lines, who+": "+text)
	}
	if err := rows.Err(); err != nil {
		return "", err
	}
	var b strings.Builder
	b.WriteString(head + " The last messages:")
	for i := len(lines) - 1; i >= 0; i-- {
		b.WriteString("\n" + lines[i])
	}
	return b.String(), nil
}

// maxQueueListed bounds the customers /queue lists.
const maxQueueListed = 20

// queueText is /queue's answer: who waits, longest first, and for how long.
func (s *Store) queueText(ctx context.Context, tx *sql.Tx, now time.Time) (string, error) {
	n, err := s.queueLength(ctx, tx)
	if err != nil || n == 0 {
		return "Nobody is waiting.", err
	}
	rows, err := s.query(ctx, tx, `SELECT openid, queued_at FROM conversations WHERE closed_at IS NULL AND agent = ''
		ORDER BY id LIMIT `+strconv.Itoa(maxQueueListed))
	if err != nil {
		return "", err
	}
	defer rows.Close()
	var b strings.Builder
	fmt.Fprintf(&b, "%d waiting:", n)
	for rows.Next() {
		var openid string
		var at int64
		if err := rows.Scan(&openid, &at); err != nil {
			return "", err
		}
		fmt.Fprintf(&b, "\n%s for %s", s.desk.imUser(openid), now.Sub(time.UnixMilli(at)).Round(time.Second))
	}
	return b.String(), rows.Err()
}
