package main

// The states a message, a conversation and an outbox item go through, each
// a type of its own, named once here; the store's queries write them as
// the sql constants below. The schema files spell the same words.

// MessageState is a message's state in the history (messages.state).
type MessageState string

const (
	stateQueued  MessageState = "queued"   // in the outbox: its item says how it went (history.go)
	stateWaiting MessageState = "waiting"  // a customer's, waiting with its conversation for an agent (queue.go)
	stateHeld    MessageState = "held"     // a reply beyond WeChat's quota, until the customer writes again (quota.go)
	stateNotSent MessageState = "not_sent" // never to go: past WeChat's window, or its conversation closed waiting
	stateRating  MessageState = "rating"   // a customer's rating of the conversation an agent ended
	// stateDelivered is what the history shows of a queued message whose
	// item is done, or pruned once done; it is never stored.
	stateDelivered MessageState = "delivered"
)

// ItemState is an outbox item's state (outbox.state).
type ItemState string

const (
	itemPending ItemState = "pending" // to deliver, now or at next_at
	itemDone    ItemState = "done"    // delivered, or finished otherwise; pruned after a day
	itemFailed  ItemState = "failed"  // a dead letter
	itemRetried ItemState = "retried" // a dead letter an operator queued again as a new item
)

// ClosedBy is what closed a conversation (conversations.closed_by).
type ClosedBy string

const (
	closedByAgent    ClosedBy = "agent"    // /end
	closedByIdle     ClosedBy = "idle"     // SESSION_IDLE_TIMEOUT
	closedByUnfollow ClosedBy = "unfollow" // the customer unfollowed
)

// The states as SQL literals, for the store's queries.
const (
	sqlQueued  = "'" + string(stateQueued) + "'"
	sqlWaiting = "'" + string(stateWaiting) + "'"
	sqlHeld    = "'" + string(stateHeld) + "'"
	sqlNotSent = "'" + string(stateNotSent) + "'"
	sqlPending = "'" + string(itemPending) + "'"
	sqlDone    = "'" + string(itemDone) + "'"
	sqlFailed  = "'" + string(itemFailed) + "'"
	sqlRetried = "'" + string(itemRetried) + "'"
)
