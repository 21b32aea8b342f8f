'use strict';
// The teaching console's page. The server streams the world (/events):
// "reset" when a new world starts, "wire" for each exchange, "state" for
// the panes; the learner's actions are posted to /act. Every text from the
// world is set as text, never as HTML.

const $ = (id) => document.getElementById(id);
const customers = [...document.querySelectorAll('[data-customer]')].map((b) => b.dataset.customer);
let state = null;
let customer = customers[0];
let agent = document.querySelector('[data-agent]').dataset.agent;
const openConv = {}; // the conversation shown, by agent

// el makes an element with attributes and children (strings become text).
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null && v !== false) e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k instanceof Node ? k : String(k));
  return e;
}

function say(text) { $('status').textContent = text; }

async function act(body) {
  const r = await fetch('/act', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body) });
  if (r.status !== 202) {
    say(await r.text());
    if (state) render(); // the switches as the world has them
  }
}

// customerName is how the page names a customer's openid or IM account.
function customerName(id) {
  if (state && state.prefix && id.startsWith(state.prefix)) id = id.slice(state.prefix.length);
  const i = customers.indexOf(id);
  return i < 0 ? id : 'Customer ' + 'AB'[i] + ' (' + id.slice(0, 8) + '…)';
}

// The wire, in the order the exchanges began: an exchange is sent when its
// answer came, after the calls it made meanwhile.
function addWire(e) {
  const list = $('exchanges');
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  let li;
  if (e.kind !== 'http') {
    li = el('li', { class: e.kind }, e.kind === 'step' ? e.title : '⚠ ' + e.title);
  } else {
    const bad = e.status === 0 || e.status >= 400;
    const summary = el('summary', {},
      el('span', { class: 'at' }, e.at), ' ',
      el('span', { class: 'party ' + e.from }, e.from), ' → ', el('span', { class: 'party ' + e.to }, e.to), '  ',
      e.title, '  ', el('span', { class: bad ? 'code bad' : 'code' }, e.status ? e.status : 'no answer'));
    const what = el('div', { class: 'what' }, e.what || '');
    if (e.link) what.append(' ', el('a', { href: e.link, target: '_blank', rel: 'noopener' }, 'source'));
    summary.append(what);
    const details = el('details', {}, summary,
      el('div', { class: 'label' }, 'request'), el('pre', {}, e.req));
    if (e.inner) details.append(el('div', { class: 'label' }, 'Encrypt, decrypted with the EncodingAESKey'), el('pre', { class: 'inner' }, e.inner));
    if (e.sign) details.append(el('div', { class: 'label' }, 'how the signature is made'), el('pre', { class: 'sign' }, e.sign));
    details.append(el('div', { class: 'label' }, 'answer'), el('pre', {}, e.resp));
    if (e.respInner) details.append(el('div', { class: 'label' }, 'the answer\'s Encrypt, decrypted'), el('pre', { class: 'inner' }, e.respInner));
    li = el('li', { class: 'http' }, details);
  }
  li.dataset.t = e.t;
  let next = null; // the first of those that began later
  for (let x = list.lastElementChild; x && +x.dataset.t > e.t; x = x.previousElementSibling) next = x;
  list.insertBefore(li, next);
  while (list.childElementCount > 400) list.firstElementChild.remove(); // as many as the server keeps
  if (atBottom) list.scrollTop = list.scrollHeight;
}

// The panes.
function render() {
  const s = state;
  $('play').disabled = s.playing;
  $('safe').checked = s.safe;
  $('imfail').checked = s.imDown;
  // While the tutorial plays, only a reset may interrupt it.
  for (const x of document.querySelectorAll('.actions button, .compose input, .compose button, .who button, #safe, #imfail')) {
    x.disabled = s.playing;
  }
  if (s.playing) say('Playing the tutorial…');
  else if ($('status').textContent === 'Playing the tutorial…') say('');
  renderCustomer(s);
  renderOutbox(s);
  renderAgents(s);
}

function renderCustomer(s) {
  for (const b of document.querySelectorAll('[data-customer]')) b.classList.toggle('on', b.dataset.customer === customer);
  const c = s.customers.find((c) => c.openid === customer);
  $('customer-who').textContent = 'openid ' + c.openid + (c.followed ? ' · follows the Official Account' : ' · follow first to write');
  if (!s.playing) {
    for (const x of document.querySelectorAll('#customer .actions button, #customer-form input, #customer-form button')) x.disabled = !c.followed;
    document.querySelector('#customer [data-do="follow"]').disabled = c.followed;
  }
  fill($('chat'), (c.chat || []).map((l) => el('li', { class: l.from === 'customer' ? 'mine' : l.from },
    l.text, l.note ? el('small', {}, l.note) : '')));
}

function renderOutbox(s) {
  $('queue').textContent = s.queue.length ? 'Waiting in the queue: ' + s.queue.map(customerName).join(', ') : 'No one waits in the queue.';
  fill($('outbox-rows'), (s.outbox || []).map((o) => el('tr', { class: o.state },
    el('td', {}, o.id), el('td', {}, o.lane), el('td', {}, o.what), el('td', {}, o.state === 'failed' ? 'dead letter' : o.state),
    el('td', {}, o.attempts), el('td', {}, o.nextIn || ''), el('td', {}, o.error || ''))));
}

function renderAgents(s) {
  const a = s.agents.find((a) => a.id === agent);
  if (!a) return;
  for (const b of document.querySelectorAll('[data-agent]')) {
    b.classList.toggle('on', b.dataset.agent === agent);
    const st = s.agents.find((x) => x.id === b.dataset.agent);
    b.querySelector('.dot').className = 'dot ' + (st ? st.status : '');
  }
  $('agent-status').textContent = agent + ' is ' + a.status;
  if (!(a.convs = a.convs || []).some((c) => c.peer === openConv[agent])) openConv[agent] = a.convs.length ? a.convs[0].peer : null;
  fill($('convs'), a.convs.map((c) => el('button', { 'data-peer': c.peer, class: c.peer === openConv[agent] ? 'on' : null },
    c.peer.startsWith(s.prefix) ? customerName(c.peer) : c.peer + ' (notices)')));
  const conv = a.convs.find((c) => c.peer === openConv[agent]);
  fill($('im-chat'), conv ? conv.msgs.map((m) => el('li', { class: m.mine ? 'mine' : null }, m.text))
    : [el('li', { class: 'system' }, 'No conversation yet.')]);
  const toCustomer = !!conv && conv.peer.startsWith(s.prefix);
  if (!s.playing) {
    for (const b of [...$('agent-form').querySelectorAll('button'), document.querySelector('[data-do="picture"]')]) b.disabled = !toCustomer;
    $('login').disabled = a.status === 'Online';
    $('logout').disabled = a.status !== 'Online';
  }
}

// fill replaces list's children, keeping it scrolled to the end if it was.
function fill(list, kids) {
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  list.replaceChildren(...kids);
  if (atBottom) list.scrollTop = list.scrollHeight;
}

// The controls.
document.querySelector('header').addEventListener('click', (e) => {
  const b = e.target.closest('button[data-do]');
  if (b) { say(''); act({ do: b.dataset.do }); }
});
$('safe').addEventListener('change', (e) => act({ do: 'safe', text: e.target.checked ? 'on' : 'off' }));
$('imfail').addEventListener('change', (e) => act({ do: 'imfail', text: e.target.checked ? 'on' : 'off' }));
$('customer-tabs').addEventListener('click', (e) => {
  const b = e.target.closest('[data-customer]');
  if (b) { customer = b.dataset.customer; if (state) render(); }
});
$('agent-tabs').addEventListener('click', (e) => {
  const b = e.target.closest('[data-agent]');
  if (b) { agent = b.dataset.agent; if (state) render(); }
});
$('convs').addEventListener('click', (e) => {
  const b = e.target.closest('[data-peer]');
  if (b) { openConv[agent] = b.dataset.peer; render(); }
});
$('customer').querySelector('.actions').addEventListener('click', (e) => {
  const b = e.target.closest('button[data-do]');
  if (b) act({ do: b.dataset.do, who: customer });
});
$('customer-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const text = $('customer-text').value;
  if (text.trim()) { act({ do: 'write', who: customer, text }); $('customer-text').value = ''; }
});
$('agents').addEventListener('click', (e) => {
  const b = e.target.closest('.who button[data-do], .actions button[data-do]');
  if (b) act({ do: b.dataset.do, who: agent, to: openConv[agent] || '' });
});
$('agent-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const text = $('agent-text').value;
  if (text.trim() && openConv[agent]) { act({ do: 'reply', who: agent, to: openConv[agent], text }); $('agent-text').value = ''; }
});

const events = new EventSource('/events');
events.addEventListener('reset', () => $('exchanges').replaceChildren());
events.addEventListener('wire', (m) => addWire(JSON.parse(m.data)));
events.addEventListener('state', (m) => { state = JSON.parse(m.data); render(); });
events.onerror = () => say('The console stopped: start it again with go run . demo -web');
events.onopen = () => { if ($('status').textContent.startsWith('The console stopped')) say(''); };
