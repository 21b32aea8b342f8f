package main

// The open conversations in memory, on SQLite: the writer remembers the
// agent of each open conversation it has met, as committed, so that a known
// customer's message skips the look-up of their conversation
// (docs/SPEED.md). PostgreSQL, shared by several instances, looks it up.

// maxOpenConv bounds the conversations SQLite's writer keeps in memory;
// past it, it starts again from none. 50,000 take about 5 MB.
const maxOpenConv = 50_000

// convChange is a change a transaction made to the open conversations:
// the customer's conversation id goes to agent, or is closed or forgotten
// ("").
type convChange struct {
	openid string
	conv   openConversation
}

// openConversation is an open conversation with an agent, as remembered.
type openConversation struct {
	id    int64
	agent string
}

// noteConversation records, on SQLite, that the transaction running found
// or opened the customer's open conversation id with agent, or closed it
// or needs it looked up again next time (agent ""). What it found or opened is remembered once the transaction
// commits (settleConversations): until then it may yet be rolled back. A
// closing is forgotten at once, so that a later write of the same
// transaction looks the customer up again.
func (s *Store) noteConversation(openid string, id int64, agent string) {
	if s.postgres {
		return
	}
	if agent == "" {
		delete(s.openConv, openid)
	}
	s.convLog = append(s.convLog, convChange{openid, openConversation{id, agent}})
}

// settleConversations applies the changes the transaction made to the
// open conversations it remembers if it committed, and drops them either
// way. The writer calls it after each transaction.
func (s *Store) settleConversations(committed bool) {
	if committed {
		if len(s.openConv)+len(s.convLog) > maxOpenConv {
			clear(s.openConv)
		}
		for _, c := range s.convLog {
			if c.conv.agent == "" {
				delete(s.openConv, c.openid)
			} else {
				s.openConv[c.openid] = c.conv
			}
		}
	}
	s.convLog = s.convLog[:0]
}
