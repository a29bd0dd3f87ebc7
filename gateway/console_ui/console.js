// The callbridge call console: live calls, one call's transcript, timeline, turn latency and
// audio health, steering (hang up, say, transfer) and listen-in, all through the call API.
// No framework, no build step. Everything that comes from the API is put in the page as text
// (textContent / text nodes), never as HTML: numbers and transcripts come from callers.

import { HttpError, detailText, readEventStream } from './sse.js';
import { Listener } from './listen.js';

const KEY_STORE = 'callbridge.console.key';
const SID_RE = /^CA[0-9a-fA-F]{32}$/;
const SVG = 'http://www.w3.org/2000/svg';
const HEALTH_KEEP = 900; // seconds of health kept (the timeline; the sparklines show the last 60)
const RECENT_LIMIT = 50;
const SLOW_MS = 1500; // a turn slower than this is flagged (amber), twice this red
const VOICE_DBFS = -45; // a caller second louder than this counts as speech on the timeline

const $ = (id) => document.getElementById(id);

const state = {
  key: sessionStorage.getItem(KEY_STORE) || '',
  gen: 0, // bumped on sign-in/out: stale loops stop
  live: new Map(), // sid -> {row, tr, cells}
  recent: [],
  feedAbort: null,
  call: null, // the open CallView
  skew: 0, // server clock - browser clock, seconds
  recentTimer: 0,
};

// ---- helpers ---------------------------------------------------------------------------------

// Build an element. Children that are not nodes become text nodes (never parsed as HTML).
function h(tag, props, ...kids) {
  const el = document.createElement(tag);
  setProps(el, props);
  for (const kid of kids.flat()) {
    if (kid == null || kid === false) continue;
    el.append(kid instanceof Node ? kid : String(kid));
  }
  return el;
}

function s(tag, props, ...kids) {
  const el = document.createElementNS(SVG, tag);
  setProps(el, props);
  for (const kid of kids.flat()) if (kid) el.append(kid);
  return el;
}

function setProps(el, props) {
  if (!props) return;
  for (const [k, v] of Object.entries(props)) {
    if (v == null || v === false) continue;
    if (k === 'class') el.setAttribute('class', v);
    else if (k === 'text') el.textContent = String(v);
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
}

function svgTitle(text) {
  const t = document.createElementNS(SVG, 'title');
  t.textContent = text;
  return t;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const nowS = () => Date.now() / 1000 + state.skew;
const num = (v) => (typeof v === 'number' && Number.isFinite(v) ? v : null);
const str = (v) => (typeof v === 'string' ? v : v == null ? '' : String(v));

function fmtDur(sec) {
  if (sec == null || !Number.isFinite(sec)) return '–';
  sec = Math.max(0, Math.floor(sec));
  const hh = Math.floor(sec / 3600), mm = Math.floor((sec % 3600) / 60), ss = sec % 60;
  const p = (n) => String(n).padStart(2, '0');
  return hh ? `${hh}:${p(mm)}:${p(ss)}` : `${mm}:${p(ss)}`;
}

function fmtClock(at) {
  if (at == null) return '–';
  const d = new Date((at - state.skew) * 1000);
  return d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false });
}

function fmtDay(at) {
  if (at == null) return '–';
  const d = new Date((at - state.skew) * 1000);
  const today = new Date();
  const same = d.toDateString() === today.toDateString();
  return same ? fmtClock(at) : `${d.toLocaleDateString([], { month: 'short', day: 'numeric' })} ${fmtClock(at)}`;
}

function fmtRel(sec) {
  if (sec == null || !Number.isFinite(sec)) return '';
  const sign = sec < 0 ? '-' : '';
  sec = Math.abs(sec);
  const m = Math.floor(sec / 60);
  return `${sign}${m}:${(sec - m * 60).toFixed(1).padStart(4, '0')}`;
}

const fmtMs = (ms) => (num(ms) == null ? '–' : String(Math.round(ms)));

// The far party: the caller of an inbound call, the callee of an outbound one.
function parties(row) {
  const out = row.direction === 'outbound';
  return { far: str(out ? row.to : row.from) || 'unknown', line: str(out ? row.from : row.to) };
}

function latencyClass(ms) {
  if (num(ms) == null) return '';
  return ms >= 2 * SLOW_MS ? 'bad' : ms >= SLOW_MS ? 'warn' : '';
}

function callHash(sid) { return `#/calls/${sid}`; }

// ---- API ---------------------------------------------------------------------------------------

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${state.key}` };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const res = await fetch(path, {
    method, headers, cache: 'no-store', body: body === undefined ? undefined : JSON.stringify(body),
  });
  noteServerDate(res);
  let data = null;
  try { data = await res.json(); } catch { /* empty or not JSON */ }
  if (res.status === 401) {
    signOut('Wrong API key: the gateway refused it (401).');
    throw new HttpError(401, 'wrong API key');
  }
  if (!res.ok) throw new HttpError(res.status, detailText(data) || res.statusText);
  return data;
}

function noteServerDate(res) {
  const d = Date.parse(res.headers.get('Date') || '');
  if (!Number.isNaN(d)) {
    const skew = d / 1000 + 0.5 - Date.now() / 1000; // the header has whole seconds
    if (Math.abs(skew - state.skew) > 1.5) state.skew = skew;
  }
}

// ---- sign in / out -----------------------------------------------------------------------------

function showLogin(message) {
  $('app').hidden = true;
  $('login').hidden = false;
  $('signout').hidden = true;
  const err = $('login-error');
  err.hidden = !message;
  err.textContent = message || '';
  setConn('off', 'signed out');
  $('key').value = '';
  $('key').focus();
}

async function signIn(key) {
  state.key = key;
  const gen = ++state.gen;
  $('login-go').disabled = true;
  try {
    // Check the key before showing anything: a wrong key shows an error, never data.
    const res = await fetch(`/v1/calls?status=ended&limit=${RECENT_LIMIT}`, {
      headers: { Authorization: `Bearer ${key}` }, cache: 'no-store',
    });
    noteServerDate(res);
    if (res.status === 401) { signOut('Wrong API key: the gateway refused it (401).'); return; }
    let data = null;
    try { data = await res.json(); } catch { /* not JSON */ }
    if (!res.ok) {
      signOut(`The gateway answered ${res.status}: ${detailText(data) || res.statusText}`, false);
      return;
    }
    if (gen !== state.gen) return;
    sessionStorage.setItem(KEY_STORE, key);
    $('login').hidden = true;
    $('app').hidden = false;
    $('signout').hidden = false;
    setRecent(Array.isArray(data && data.calls) ? data.calls : []);
    runFeed(gen);
    route();
  } catch (err) {
    signOut(`Could not reach the gateway: ${err.message}`, false);
  } finally {
    $('login-go').disabled = false;
  }
}

function signOut(message, forget = true) {
  state.gen += 1;
  if (forget) sessionStorage.removeItem(KEY_STORE);
  state.key = '';
  if (state.feedAbort) state.feedAbort.abort();
  closeCall();
  for (const sid of [...state.live.keys()]) removeLive(sid);
  setRecent([]);
  showLogin(message);
}

// ---- connection state ----------------------------------------------------------------------------

function setConn(kind, text) {
  const el = $('conn');
  el.dataset.state = kind;
  $('conn-text').textContent = text;
}

// ---- live calls ------------------------------------------------------------------------------

async function runFeed(gen) {
  let delay = 0;
  while (gen === state.gen) {
    const ctl = new AbortController();
    state.feedAbort = ctl;
    setConn('connecting', delay ? 'reconnecting…' : 'connecting…');
    let why = 'stream closed';
    try {
      await readEventStream('/v1/feed', state.key, {
        signal: ctl.signal,
        onOpen: (res) => { noteServerDate(res); },
        onEvent: (name, data) => {
          if (gen !== state.gen) return;
          if (name === 'snapshot') {
            delay = 0;
            replaceLive(Array.isArray(data.calls) ? data.calls : []);
            setConn('live', 'live');
          } else if (name === 'call' && data && data.call) {
            upsertLive(data.call, str(data.kind));
          }
        },
      });
    } catch (err) {
      if (gen !== state.gen) return; // signed out meanwhile (that aborted the request)
      if (err instanceof HttpError && err.status === 401) {
        signOut('Wrong API key: the gateway refused it (401).');
        return;
      }
      why = err instanceof HttpError ? err.message : `connection lost (${err.message || err})`;
    }
    if (gen !== state.gen) return;
    delay = Math.min(delay ? delay * 2 : 500, 15000);
    const wait = Math.round(delay * (0.75 + Math.random() * 0.5));
    const until = Date.now() + wait;
    while (Date.now() < until && gen === state.gen) {
      setConn('down', `${why}; retrying in ${Math.ceil((until - Date.now()) / 1000)} s`);
      await sleep(Math.min(250, until - Date.now()));
    }
  }
}

function replaceLive(rows) {
  const seen = new Set();
  for (const row of rows) {
    if (!row || !SID_RE.test(str(row.call_sid))) continue;
    seen.add(row.call_sid);
    upsertLive(row, 'snapshot');
  }
  let gone = false;
  for (const sid of [...state.live.keys()]) {
    if (!seen.has(sid)) { removeLive(sid); gone = true; }
  }
  if (gone) scheduleRecentRefresh(); // calls that ended while we were away
}

function upsertLive(row, kind) {
  const sid = str(row.call_sid);
  if (!SID_RE.test(sid)) return;
  if (row.status === 'ended') {
    removeLive(sid);
    addRecent(row);
    scheduleRecentRefresh();
    if (state.call && state.call.sid === sid) state.call.onSummary(row);
    return;
  }
  let item = state.live.get(sid);
  if (!item) {
    const cells = {
      number: h('td', { class: 'number' }), dir: h('td', { class: 'dir' }), assistant: h('td', { class: 'ellipsis' }),
      age: h('td', { class: 'num age' }), status: h('td'), worker: h('td', { class: 'ellipsis worker' }),
      turn: h('td', { class: 'num' }), barge: h('td', { class: 'num' }),
    };
    const tr = h('tr', { tabindex: '0', dataset: { sid } }, Object.values(cells));
    tr.addEventListener('click', () => { location.hash = callHash(sid); });
    tr.addEventListener('keydown', (ev) => { if (ev.key === 'Enter') location.hash = callHash(sid); });
    item = { row, tr, cells };
    state.live.set(sid, item);
    insertSorted(item);
    if (kind !== 'snapshot') flash(tr);
  } else if (kind === 'turn-latency' || kind === 'barge-in' || kind === 'takeover' || kind === 'transfer-requested') {
    flash(kind === 'turn-latency' ? item.cells.turn : kind === 'barge-in' ? item.cells.barge : item.tr);
  }
  item.row = row;
  renderLiveRow(item);
  if (state.call && state.call.sid === sid && kind !== 'snapshot') state.call.onSummary(row);
  updateCounts();
}

function insertSorted(item) {
  const body = $('live-body');
  const t = num(item.row.started_at) ?? Infinity;
  for (const tr of body.children) {
    const other = state.live.get(tr.dataset.sid);
    if (other && (num(other.row.started_at) ?? Infinity) < t) { body.insertBefore(item.tr, tr); return; }
  }
  body.append(item.tr);
}

function renderLiveRow(item) {
  const { row, cells, tr } = item;
  const p = parties(row);
  cells.number.replaceChildren(h('span', { class: 'far' }, p.far), p.line ? h('span', { class: 'via' }, p.line) : null);
  cells.number.title = `${str(row.from)} → ${str(row.to)}`;
  cells.dir.textContent = row.direction === 'outbound' ? 'out' : 'in';
  cells.dir.title = str(row.direction);
  cells.assistant.textContent = str(row.assistant_id) || '–';
  cells.assistant.title = str(row.assistant_id);
  cells.status.replaceChildren(statusPill(row));
  cells.worker.textContent = str(row.worker) || '–';
  cells.worker.title = str(row.worker);
  cells.turn.textContent = fmtMs(row.last_turn_ms);
  cells.turn.className = `num ${latencyClass(row.last_turn_ms)}`;
  cells.barge.textContent = num(row.barge_ins) == null ? '–' : String(row.barge_ins);
  tr.classList.toggle('selected', !!(state.call && state.call.sid === row.call_sid));
  tickRow(item);
}

function tickRow(item) {
  const started = num(item.row.started_at);
  item.cells.age.textContent = started == null ? '–' : fmtDur(nowS() - started);
}

function statusPill(row) {
  const st = str(row.status) || 'unknown';
  const label = st === 'ended' && row.end_reason ? `ended · ${str(row.end_reason)}` : st;
  return h('span', { class: `pill ${st}`, title: row.answered_by ? `answered by ${str(row.answered_by)}` : null }, label);
}

function removeLive(sid) {
  const item = state.live.get(sid);
  if (!item) return;
  item.tr.remove();
  state.live.delete(sid);
  updateCounts();
}

function updateCounts() {
  const n = state.live.size;
  $('live-count').textContent = String(n);
  $('live-empty').hidden = n > 0;
  document.title = n ? `(${n}) callbridge console` : 'callbridge console';
}

function flash(el) {
  el.classList.remove('flash');
  void el.offsetWidth; // restart the animation
  el.classList.add('flash');
}

// ---- recent (ended) calls -----------------------------------------------------------------------

function setRecent(rows) {
  state.recent = rows.filter((r) => r && SID_RE.test(str(r.call_sid))).slice(0, RECENT_LIMIT);
  renderRecent();
}

function addRecent(row) {
  state.recent = [row, ...state.recent.filter((r) => r.call_sid !== row.call_sid)].slice(0, RECENT_LIMIT);
  renderRecent();
}

function scheduleRecentRefresh() {
  clearTimeout(state.recentTimer);
  state.recentTimer = setTimeout(refreshRecent, 1200);
}

async function refreshRecent() {
  if (!state.key) return;
  const gen = state.gen;
  const btn = $('recent-refresh');
  btn.disabled = true;
  try {
    const data = await api('GET', `/v1/calls?status=ended&limit=${RECENT_LIMIT}`);
    if (gen === state.gen) setRecent(Array.isArray(data && data.calls) ? data.calls : []);
  } catch (err) {
    if (!(err instanceof HttpError && err.status === 401)) btn.title = `refresh failed: ${err.message}`;
  } finally {
    btn.disabled = false;
  }
}

function renderRecent() {
  const body = $('recent-body');
  const rows = state.recent.map((row) => {
    const sid = str(row.call_sid);
    const p = parties(row);
    const len = num(row.ended_at) != null && num(row.started_at) != null ? row.ended_at - row.started_at : null;
    const tr = h('tr', { tabindex: '0', dataset: { sid } },
      h('td', { class: 'num' }, fmtDay(num(row.ended_at) ?? num(row.started_at))),
      h('td', { class: 'number', title: `${str(row.from)} → ${str(row.to)}` }, h('span', { class: 'far' }, p.far)),
      h('td', { class: 'dir' }, row.direction === 'outbound' ? 'out' : 'in'),
      h('td', { class: 'num' }, fmtDur(len)),
      h('td', { class: 'ellipsis', title: str(row.end_reason) }, str(row.end_reason) || '–'),
      h('td', { class: 'ellipsis', title: str(row.assistant_id) }, str(row.assistant_id) || '–'));
    tr.addEventListener('click', () => { location.hash = callHash(sid); });
    tr.addEventListener('keydown', (ev) => { if (ev.key === 'Enter') location.hash = callHash(sid); });
    if (state.call && state.call.sid === sid) tr.classList.add('selected');
    return tr;
  });
  body.replaceChildren(...rows);
  $('recent-empty').hidden = rows.length > 0;
}

// ---- routing -----------------------------------------------------------------------------------

function route() {
  if (!state.key || $('app').hidden) return;
  const m = /^#\/calls\/([^/?#]+)$/.exec(location.hash);
  const sid = m && SID_RE.test(m[1]) ? m[1] : null;
  if (state.call && state.call.sid === sid) return;
  closeCall();
  if (sid) state.call = new CallView(sid);
  markSelected();
}

function markSelected() {
  const sid = state.call ? state.call.sid : null;
  for (const tr of document.querySelectorAll('#live-body tr, #recent-body tr')) {
    tr.classList.toggle('selected', tr.dataset.sid === sid);
  }
  $('call-none').hidden = !!sid;
}

function closeCall() {
  if (state.call) state.call.close();
  state.call = null;
  const panel = $('call');
  for (const el of [...panel.children]) if (el.id !== 'call-none') el.remove();
  $('call-none').hidden = false;
}

// ---- one call ------------------------------------------------------------------------------------

const EVENT_STYLE = {
  'barge-in': ['bad', 'barge-in'],
  'transfer-requested': ['violet', 'transfer asked'],
  'api-transfer': ['violet', 'transfer (API)'],
  'transfer-refused': ['bad', 'transfer refused'],
  takeover: ['amber', 'takeover'],
  'stream-start': ['muted', 'stream start'],
  'stream-lost': ['bad', 'stream lost'],
  'vapi-connected': ['ok', 'Vapi connected'],
  'api-say': ['blue', 'say (API)'],
  'api-hangup': ['bad', 'hang up (API)'],
  'call-ended': ['ink', 'call ended'],
  'twilio-status': ['muted', 'Twilio status'],
  'answered-by': ['muted', 'answered by'],
  dtmf: ['blue', 'keypad'],
  'keypad-entry': ['blue', 'keypad entry'],
};

function eventSummary(ev) {
  const d = ev.data && typeof ev.data === 'object' ? ev.data : {};
  switch (ev.kind) {
    case 'transcript': return `${d.role === 'user' ? 'caller' : 'assistant'}: ${str(d.text)}`;
    case 'turn-latency': return `turn ${d.turn}: ${fmtMs(d.ms)} ms`;
    case 'barge-in': return `turn ${d.turn} cut (${str(d.source)}): sent ${fmtMs(d.sent_ms)} ms, heard ${fmtMs(d.heard_ms)} ms, dropped ${fmtMs(d.dropped_ms)} ms`;
    case 'dtmf': return `digit ${str(d.digit)}`;
    case 'keypad-entry': return `digits ${str(d.digits)}`;
    case 'transfer-requested': case 'transfer-refused': return `to ${str(d.target)}`;
    case 'api-transfer': return `to ${str(d.target)}`;
    case 'api-say': return `${d.respond ? 'respond to' : 'say'} “${str(d.text)}”`;
    case 'takeover': return `by ${str(d.worker)} (epoch ${str(d.epoch)})`;
    case 'vapi-connected': return `setup ${fmtMs(d.setup_ms)} ms${d.takeover ? ', after a takeover' : ''}`;
    case 'call-ended': return `${str(d.reason)} (${str(d.side)})${d.detail ? ': ' + str(d.detail) : ''}`;
    case 'assistant-turns': return `${Array.isArray(d.turns) ? d.turns.length : 0} assistant turns recorded`;
    default: {
      const text = Object.keys(d).length ? JSON.stringify(d) : '';
      return text.length > 160 ? text.slice(0, 157) + '…' : text;
    }
  }
}

class CallView {
  constructor(sid) {
    this.sid = sid;
    this.summary = null;
    this.events = [];
    this.seen = new Set();
    this.bareTranscript = []; // lines of view.transcript older than the events we have
    this.turns = new Map();
    this.health = [];
    this.underrunsTotal = 0;
    this.ended = false;
    this.closed = false;
    this.abort = null;
    this.listener = null;
    this.plot = null;
    this.renderQueued = false;
    this.build();
    this.run();
  }

  // -- DOM --
  build() {
    const el = (this.el = {});
    el.title = h('h2', { class: 'sid' }, this.sid);
    el.status = h('span');
    el.dir = h('span', { class: 'tag' });
    el.meta = h('dl', { class: 'meta' });
    el.feed = h('span', { class: 'feed-state muted small' }, 'connecting…');
    el.hangup = h('button', { type: 'button', class: 'danger', id: 'act-hangup' }, 'Hang up');
    el.sayText = h('input', { type: 'text', id: 'say-text', placeholder: 'Text for the assistant to say', maxlength: '2000' });
    el.sayRespond = h('input', { type: 'checkbox', id: 'say-respond' });
    el.sayGo = h('button', { type: 'submit', id: 'act-say' }, 'Say');
    el.xferTo = h('input', { type: 'tel', id: 'transfer-to', placeholder: '+15551230000', pattern: '^(\\+[1-9][0-9]{6,14}|sip:.+)$', size: '15' });
    el.xferGo = h('button', { type: 'submit', id: 'act-transfer' }, 'Transfer');
    el.actMsg = h('p', { class: 'act-msg', id: 'act-msg', role: 'status' });
    el.listen = h('button', { type: 'button', id: 'listen', class: 'listen' }, '▶ Listen in');
    el.listenState = h('span', { class: 'muted small', id: 'listen-state' });
    el.listenFrames = h('span', { class: 'mono small', id: 'listen-frames' });
    el.muteCaller = h('input', { type: 'checkbox', id: 'mute-caller', title: 'mute the caller' });
    el.muteAsst = h('input', { type: 'checkbox', id: 'mute-assistant', title: 'mute the assistant' });
    el.timeline = h('div', { class: 'timeline', id: 'timeline' });
    el.transcript = h('ol', { class: 'transcript', id: 'transcript' });
    el.transcriptEmpty = h('p', { class: 'empty' }, 'Nothing said yet.');
    el.chart = h('div', { class: 'chart', id: 'latency-chart' });
    el.chartStats = h('span', { class: 'muted small mono' });
    el.health = h('div', { class: 'health', id: 'health' });
    el.events = h('ol', { class: 'events', id: 'events' });
    el.eventCount = h('span', { class: 'count' }, '0');

    el.hangup.addEventListener('click', () => this.hangup());
    const sayForm = h('form', { class: 'say' }, el.sayText,
      h('label', { class: 'check', title: 'the assistant responds to the text instead of saying it verbatim' }, el.sayRespond, 'respond'), el.sayGo);
    sayForm.addEventListener('submit', (ev) => { ev.preventDefault(); this.say(); });
    const xferForm = h('form', { class: 'xfer' }, el.xferTo, el.xferGo);
    xferForm.addEventListener('submit', (ev) => { ev.preventDefault(); this.transfer(); });
    el.listen.addEventListener('click', () => this.toggleListen());
    el.muteCaller.addEventListener('change', () => this.listener && this.listener.mute(0, el.muteCaller.checked));
    el.muteAsst.addEventListener('change', () => this.listener && this.listener.mute(1, el.muteAsst.checked));

    this.tiles = {};
    for (const [key, label, unit] of [['in', 'frames in', '/s'], ['out', 'frames out', '/s'], ['under', 'underruns', '/s'],
      ['callerDb', 'caller level', 'dBFS'], ['asstDb', 'assistant level', 'dBFS']]) {
      const value = h('span', { class: 'v mono' }, '–');
      const canvas = h('canvas', { class: 'spark', width: '120', height: '22' });
      const extra = h('span', { class: 'x muted small' });
      this.tiles[key] = { value, canvas, extra };
      el.health.append(h('div', { class: `tile t-${key}`, dataset: { tile: key } },
        h('span', { class: 'k' }, label, h('small', null, ` ${unit}`)), value, extra, canvas));
    }

    const root = (this.root = h('div', { class: 'call-view', dataset: { sid: this.sid } },
      h('div', { class: 'call-head' },
        h('a', { href: '#/', class: 'close', title: 'close' }, '×'),
        el.title, el.status, el.dir, el.feed,
        h('span', { class: 'listen-box' }, el.listenState, el.listenFrames, h('span', { class: 'muted small' }, 'mute'),
          h('label', { class: 'check small', title: 'mute the caller' }, el.muteCaller, 'caller'),
          h('label', { class: 'check small', title: 'mute the assistant' }, el.muteAsst, 'assistant'),
          el.listen)),
      el.meta,
      h('div', { class: 'actions' },
        el.hangup, h('span', { class: 'sep' }), sayForm, h('span', { class: 'sep' }), xferForm),
      el.actMsg,
      h('div', { class: 'panel tl-panel' },
        h('div', { class: 'panel-head' }, h('h3', null, 'Timeline'), legend()),
        el.timeline),
      h('div', { class: 'panel' },
        h('div', { class: 'panel-head' }, h('h3', null, 'Audio health ', h('small', { class: 'muted' }, 'each second, measured on the call’s audio streams'))),
        el.health),
      h('div', { class: 'call-grid' },
        h('div', { class: 'panel' },
          h('div', { class: 'panel-head' }, h('h3', null, 'Transcript'),
            h('span', { class: 'muted small' }, h('i', { class: 'sw caller' }), 'caller ', h('i', { class: 'sw assistant' }), 'assistant')),
          h('div', { class: 'transcript-wrap' }, el.transcript, el.transcriptEmpty)),
        h('div', { class: 'panel' },
          h('div', { class: 'panel-head' }, h('h3', null, 'Turn latency ', h('small', { class: 'muted' }, 'ms')), el.chartStats),
          el.chart,
          h('p', { class: 'note muted small' }, 'From the end of the caller’s speech to the assistant’s first audio sent, per assistant turn; ○ the turn was interrupted.'))),
      h('details', { class: 'panel events-panel' },
        h('summary', null, h('h3', null, 'Events ', el.eventCount)),
        el.events)));
    $('call').append(root);
    this.setActionsEnabled(false);

    this.resize = new ResizeObserver(() => this.layoutChart());
    this.resize.observe(el.chart);
    this.resizeTl = new ResizeObserver(() => this.queueRender());
    this.resizeTl.observe(el.timeline);
    this.makeChart();
  }

  setActionsEnabled(on) {
    for (const b of [this.el.hangup, this.el.sayGo, this.el.xferGo, this.el.sayText, this.el.xferTo, this.el.sayRespond]) b.disabled = !on;
    if (!on && this.listener == null) this.el.listen.disabled = !!this.ended;
  }

  // -- the feed --
  async run() {
    let delay = 0;
    while (!this.closed && !this.ended) {
      const ctl = new AbortController();
      this.abort = ctl;
      this.setFeed(delay ? 'reconnecting…' : 'connecting…', 'connecting');
      let why = 'stream closed';
      try {
        await readEventStream(`/v1/calls/${this.sid}/feed`, state.key, {
          signal: ctl.signal,
          onEvent: (name, data) => {
            if (this.closed) return;
            if (name === 'view') { delay = 0; this.onView(data); if (!this.ended) this.setFeed('live', 'live'); }
            else if (name === 'event') this.onEvent(data, true);
            else if (name === 'call') this.onSummary(data);
            else if (name === 'health') this.onHealth(data);
            else if (name === 'end') this.onEnd();
          },
        });
      } catch (err) {
        if (this.closed) return;
        if (err instanceof HttpError && err.status === 401) { signOut('Wrong API key: the gateway refused it (401).'); return; }
        if (err instanceof HttpError && err.status === 404) {
          this.setFeed('unknown call', 'error');
          this.showNotFound(err.detail);
          return;
        }
        why = err instanceof HttpError ? err.message : `connection lost (${err.message || err})`;
        if (err instanceof HttpError && err.status === 503 && !this.summary) this.loadOnce();
      }
      if (this.closed || this.ended) return;
      delay = Math.min(delay ? delay * 2 : 500, 15000);
      const wait = Math.round(delay * (0.75 + Math.random() * 0.5));
      this.setFeed(`${why}; retrying in ${Math.ceil(wait / 1000)} s`, 'down');
      await sleep(wait);
    }
  }

  // The feed is refused (e.g. 503 at CONSOLE_MAX_STREAMS): show the call as it is meanwhile.
  async loadOnce() {
    try {
      const v = await api('GET', `/v1/calls/${this.sid}`);
      if (!this.closed && !this.summary) this.onView(v);
    } catch { /* the feed's retry says why */ }
  }

  setFeed(text, kind) {
    this.el.feed.textContent = text;
    this.el.feed.dataset.state = kind;
  }

  showNotFound(detail) {
    this.el.meta.replaceChildren(h('p', { class: 'error' }, `Unknown call, or its record has expired${detail ? ` (${detail})` : ''}.`));
    this.setActionsEnabled(false);
    this.el.listen.disabled = true;
  }

  onView(v) {
    if (!v || typeof v !== 'object') return;
    this.onSummary(v);
    this.events = [];
    this.seen = new Set();
    this.turns = new Map();
    for (const t of Array.isArray(v.turns) ? v.turns : []) {
      if (t && Number.isInteger(t.turn)) this.turns.set(t.turn, { ...t });
    }
    for (const ev of Array.isArray(v.events) ? v.events : []) this.onEvent(ev, false);
    // view.transcript is complete; view.events only the newest 200: older lines have no time.
    const lines = Array.isArray(v.transcript) ? v.transcript : [];
    const timed = this.events.filter((e) => e.kind === 'transcript').length;
    this.bareTranscript = lines.slice(0, Math.max(0, lines.length - timed));
    this.renderTranscript();
    this.renderEvents();
    this.updateChart();
    this.queueRender();
  }

  onSummary(row) {
    if (!row || typeof row !== 'object') return;
    this.summary = { ...(this.summary || {}), ...row };
    const r = this.summary;
    const p = parties(r);
    this.el.status.replaceChildren(statusPill(r));
    this.el.dir.textContent = r.direction === 'outbound' ? 'outbound' : 'inbound';
    const meta = [
      [r.direction === 'outbound' ? 'callee → from line' : 'caller → line', `${p.far} → ${p.line || '?'}`],
      ['assistant', str(r.assistant_id) || '–'],
      ['worker', str(r.worker) || '–'],
      ['started', fmtDay(num(r.started_at))],
      ['length', null],
      ['last turn', num(r.last_turn_ms) == null ? '–' : `${fmtMs(r.last_turn_ms)} ms`],
      ['barge-ins', num(r.barge_ins) == null ? '–' : String(r.barge_ins)],
    ];
    if (r.answered_by) meta.push(['answered by', str(r.answered_by)]);
    if (r.end_reason) meta.push(['end reason', str(r.end_reason)]);
    this.el.meta.replaceChildren(...meta.flatMap(([k, v]) => {
      const dd = h('dd', { dataset: { field: k } }, v);
      if (k === 'length') this.el.length = dd;
      return [h('div', null, h('dt', null, k), dd)];
    }));
    this.tick();
    const ended = r.status === 'ended';
    this.setActionsEnabled(!ended);
    if (ended) this.markEnded();
  }

  onEvent(ev, live) {
    if (!ev || typeof ev.kind !== 'string') return;
    const at = num(ev.at);
    const data = ev.data && typeof ev.data === 'object' && !Array.isArray(ev.data) ? ev.data : {};
    const key = `${ev.kind}|${at}|${JSON.stringify(data)}`;
    if (this.seen.has(key)) return; // a view and the first events may overlap
    this.seen.add(key);
    const e = { kind: ev.kind, at, data };
    this.events.push(e);
    if (this.events.length > 5000) this.events.splice(0, this.events.length - 5000);
    this.applyTurns(e);
    if (!live) return;
    if (e.kind === 'transcript') this.appendLine(e);
    this.appendEvent(e);
    if (e.kind === 'turn-latency' || e.kind === 'barge-in' || e.kind === 'assistant-turns') this.updateChart();
    this.queueRender();
  }

  applyTurns(e) {
    const d = e.data;
    const turn = (n) => {
      if (!Number.isInteger(n) || n < 0) return null;
      if (!this.turns.has(n)) this.turns.set(n, { turn: n, latency_ms: null, sent_ms: null, heard_ms: null, interrupted: false });
      return this.turns.get(n);
    };
    if (e.kind === 'turn-latency') {
      const t = turn(d.turn);
      if (t) { t.latency_ms = num(d.ms); t.started = e.at; }
    } else if (e.kind === 'barge-in') {
      const t = turn(d.turn);
      if (t) { t.interrupted = true; t.sent_ms = num(d.sent_ms); t.heard_ms = num(d.heard_ms); t.cut = e.at; }
    } else if (e.kind === 'assistant-turns' && Array.isArray(d.turns)) {
      for (const item of d.turns) {
        const t = item && turn(item.turn);
        if (t) { t.sent_ms = num(item.sent_ms); t.heard_ms = num(item.heard_ms); t.interrupted = t.interrupted || item.interrupted === true; }
      }
    }
  }

  onHealth(hl) {
    if (!hl || num(hl.at) == null) return;
    state.skew = hl.at - Date.now() / 1000;
    this.health.push(hl);
    if (this.health.length > HEALTH_KEEP) this.health.shift();
    this.underrunsTotal += num(hl.underruns) || 0;
    this.renderHealth();
    this.queueRender();
  }

  onEnd() {
    this.ended = true;
    if (this.summary && this.summary.status !== 'ended') this.summary.status = 'ended';
    this.markEnded();
    this.setFeed('call ended', 'ended');
    if (this.abort) this.abort.abort();
    // The record now has the final status, end reason and turns.
    api('GET', `/v1/calls/${this.sid}`).then((v) => { if (!this.closed) this.onView(v); }).catch(() => {});
  }

  markEnded() {
    this.ended = true;
    this.root.classList.add('ended');
    this.setActionsEnabled(false);
    if (!this.listener) this.el.listen.disabled = true;
    this.renderHealth();
    this.queueRender();
  }

  // -- actions --
  message(text, kind) {
    this.el.actMsg.textContent = text;
    this.el.actMsg.className = `act-msg ${kind || ''}`;
  }

  async act(what, path, body) {
    this.message(`${what}…`, 'pending');
    try {
      await api('POST', `/v1/calls/${this.sid}/${path}`, body);
      this.message(`${what}: accepted`, 'ok');
      return true;
    } catch (err) {
      if (err instanceof HttpError && err.status !== 401) this.message(`${what} failed — ${err.status}: ${err.detail || err.message}`, 'error');
      else this.message(`${what} failed — ${err.message}`, 'error');
      return false;
    }
  }

  hangup() {
    const b = this.el.hangup;
    if (!b.classList.contains('armed')) { // two clicks: a misclick must not drop a caller
      b.classList.add('armed');
      b.textContent = 'Confirm hang up';
      clearTimeout(this.armTimer);
      this.armTimer = setTimeout(() => { b.classList.remove('armed'); b.textContent = 'Hang up'; }, 4000);
      return;
    }
    clearTimeout(this.armTimer);
    b.classList.remove('armed');
    b.textContent = 'Hang up';
    this.act('Hang up', 'hangup');
  }

  async say() {
    const text = this.el.sayText.value.trim();
    if (!text) { this.message('Say: type something first', 'error'); return; }
    if (await this.act('Say', 'say', { text, respond: this.el.sayRespond.checked })) this.el.sayText.value = '';
  }

  async transfer() {
    const to = this.el.xferTo.value.trim();
    if (!to) { this.message('Transfer: give a number (+1…) or a sip: URI', 'error'); return; }
    await this.act(`Transfer to ${to}`, 'transfer', { to });
  }

  toggleListen() {
    if (this.listener) { this.listener.stop(); return; }
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    window.__listenFrames = 0;
    const l = new Listener({
      url: `${proto}//${location.host}/v1/calls/${this.sid}/listen`,
      key: state.key,
      onState: (st, text) => {
        this.el.listenState.textContent = text;
        this.el.listenState.dataset.state = st;
        if (st === 'closed' || st === 'error') {
          if (this.listener === l) this.listener = null;
          this.el.listen.textContent = '▶ Listen in';
          this.el.listen.classList.remove('on');
          this.el.listen.disabled = this.ended;
        }
      },
      onFrame: (_dir, frames) => {
        window.__listenFrames = frames[0] + frames[1];
        this.el.listen.dataset.frames = String(window.__listenFrames);
        if ((window.__listenFrames & 15) === 0) this.el.listenFrames.textContent = `caller ${frames[0]} · assistant ${frames[1]} frames`;
      },
    });
    this.listener = l;
    this.el.listen.textContent = '■ Stop';
    this.el.listen.classList.add('on');
    l.start();
    l.mute(0, this.el.muteCaller.checked);
    l.mute(1, this.el.muteAsst.checked);
  }

  // -- rendering --
  t0() {
    const started = this.summary && num(this.summary.started_at);
    if (started != null) return started;
    const first = this.events.find((e) => e.at != null);
    return first ? first.at : nowS();
  }

  line(e) {
    const role = e.data.role === 'assistant' ? 'assistant' : 'caller';
    const at = e.at == null ? '' : fmtRel(e.at - this.t0());
    return h('li', { class: `line ${role}`, dataset: { role: e.data.role === 'assistant' ? 'assistant' : 'user' } },
      h('span', { class: 't mono' }, at), h('span', { class: 'who' }, role), h('span', { class: 'text' }, str(e.data.text)));
  }

  renderTranscript() {
    const lines = [
      ...this.bareTranscript.map((l) => this.line({ at: null, data: l || {} })),
      ...this.events.filter((e) => e.kind === 'transcript').map((e) => this.line(e)),
    ];
    this.el.transcript.replaceChildren(...lines);
    this.el.transcriptEmpty.hidden = lines.length > 0;
    const wrap = this.el.transcript.parentElement;
    wrap.scrollTop = wrap.scrollHeight;
  }

  appendLine(e) {
    const wrap = this.el.transcript.parentElement;
    const stick = wrap.scrollHeight - wrap.scrollTop - wrap.clientHeight < 40;
    this.el.transcript.append(this.line(e));
    this.el.transcriptEmpty.hidden = true;
    if (stick) wrap.scrollTop = wrap.scrollHeight;
  }

  eventItem(e) {
    const [cls] = EVENT_STYLE[e.kind] || ['muted'];
    return h('li', { class: `ev ${cls}` },
      h('span', { class: 't mono' }, e.at == null ? '' : fmtRel(e.at - this.t0())),
      h('span', { class: 'k' }, e.kind), h('span', { class: 'd' }, eventSummary(e)));
  }

  renderEvents() {
    this.el.events.replaceChildren(...this.events.slice(-1000).map((e) => this.eventItem(e)));
    this.el.eventCount.textContent = String(this.events.length);
  }

  appendEvent(e) {
    this.el.events.append(this.eventItem(e));
    while (this.el.events.childElementCount > 1000) this.el.events.firstElementChild.remove();
    this.el.eventCount.textContent = String(this.events.length);
  }

  makeChart() {
    if (!window.uPlot) { this.el.chart.append(h('p', { class: 'empty' }, 'chart library not loaded')); return; }
    const w = Math.max(200, this.el.chart.clientWidth || 360);
    this.plot = new window.uPlot({
      width: w, height: 150,
      legend: { show: false },
      cursor: { drag: { x: false, y: false }, points: { size: 7 } },
      scales: { x: { time: false }, y: { range: (_u, _min, max) => [0, Math.max(500, Math.ceil((max || 0) * 1.15 / 100) * 100)] } },
      axes: [
        { stroke: '#667085', grid: { stroke: '#eef0f3' }, ticks: { stroke: '#e4e7ec' }, incrs: [1, 2, 5, 10, 20, 50, 100], values: (_u, v) => v.map((x) => (Number.isInteger(x) ? String(x) : '')), size: 24, font: '11px system-ui' },
        { stroke: '#667085', grid: { stroke: '#eef0f3' }, ticks: { stroke: '#e4e7ec' }, size: 44, font: '11px system-ui' },
      ],
      series: [
        { label: 'turn' },
        { label: 'latency', stroke: '#2563eb', width: 1.5, fill: 'rgba(37,99,235,0.06)', points: { size: 6, fill: '#2563eb', stroke: '#2563eb' }, value: (_u, v) => (v == null ? '–' : `${Math.round(v)} ms`) },
        { label: 'interrupted', stroke: 'transparent', width: 0, paths: () => null, points: { show: true, size: 9, fill: '#fff', stroke: '#dc2626', width: 2 } },
      ],
    }, [[], [], []], this.el.chart);
  }

  layoutChart() {
    if (this.plot) this.plot.setSize({ width: Math.max(200, this.el.chart.clientWidth), height: 150 });
  }

  updateChart() {
    const rows = [...this.turns.values()].filter((t) => num(t.latency_ms) != null).sort((a, b) => a.turn - b.turn);
    const xs = rows.map((t) => t.turn);
    const ys = rows.map((t) => t.latency_ms);
    const cut = rows.map((t) => (t.interrupted ? t.latency_ms : null));
    if (this.plot) this.plot.setData([xs, ys, cut]);
    this.el.chart.dataset.points = String(xs.length);
    if (ys.length) {
      const sorted = [...ys].sort((a, b) => a - b);
      const med = sorted[Math.floor((sorted.length - 1) / 2)];
      this.el.chartStats.textContent = `${ys.length} turns · median ${Math.round(med)} · max ${Math.round(sorted[sorted.length - 1])}`;
    } else this.el.chartStats.textContent = 'no turns measured yet';
  }

  renderHealth() {
    const last = this.health[this.health.length - 1];
    const live = last && !this.ended && nowS() - last.at < 5;
    const fmt = {
      in: (x) => fmtMs(x), out: (x) => fmtMs(x), under: (x) => fmtMs(x),
      callerDb: (x) => (num(x) == null ? '–' : x.toFixed(0)), asstDb: (x) => (num(x) == null ? '–' : x.toFixed(0)),
    };
    const field = { in: 'frames_in_per_s', out: 'frames_out_per_s', under: 'underruns', callerDb: 'caller_level_dbfs', asstDb: 'assistant_level_dbfs' };
    for (const [key, tile] of Object.entries(this.tiles)) {
      const series = this.health.slice(-60).map((x) => num(x[field[key]]));
      tile.value.textContent = live ? fmt[key](last[field[key]]) : '–';
      tile.value.classList.toggle('bad', key === 'under' && live && (num(last.underruns) || 0) > 0);
      if (key === 'under') tile.extra.textContent = `${this.underrunsTotal} seen`;
      const isDb = key === 'callerDb' || key === 'asstDb';
      spark(tile.canvas, series, isDb ? [-70, 0] : key === 'under' ? [0, 5] : [0, 60],
        key === 'under' ? '#dc2626' : key === 'callerDb' || key === 'in' ? '#2563eb' : '#059669');
    }
    this.el.health.dataset.samples = String(this.health.length);
    this.el.health.classList.toggle('stale', !live);
  }

  queueRender() {
    if (this.renderQueued || this.closed) return;
    this.renderQueued = true;
    requestAnimationFrame(() => { this.renderQueued = false; if (!this.closed) this.renderTimeline(); });
  }

  tick() {
    const r = this.summary;
    if (!r || !this.el.length) return;
    const start = num(r.started_at);
    const end = num(r.ended_at) ?? (r.status === 'ended' ? null : nowS());
    this.el.length.textContent = start != null && end != null ? fmtDur(end - start) : '–';
    if (!this.ended) { this.queueRender(); if (this.health.length) this.renderHealth(); }
  }

  // Who spoke when: caller speech (level), assistant audio sent vs heard per turn, the wait
  // before each turn, barge-ins, keypad, transfers, takeovers and the call's other events.
  renderTimeline() {
    const box = this.el.timeline;
    const W = Math.max(300, box.clientWidth);
    const lanes = [['caller', 'Caller'], ['assistant', 'Assistant'], ['events', 'Events']];
    const LABEL = 72, LANE = 20, AXIS = 16, PAD = 6;
    const H = AXIS + lanes.length * LANE + 4;
    const t0 = this.t0();
    const sm = this.summary || {};
    const endAt = num(sm.ended_at) ?? (this.ended ? Math.max(t0 + 1, ...this.events.map((e) => e.at || 0)) : nowS());
    const span = Math.max(10, endAt - t0);
    const x = (at) => LABEL + ((at - t0) / span) * (W - LABEL - PAD);
    const laneY = (i) => AXIS + i * LANE;
    const svg = s('svg', { width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: 'tl', role: 'img', 'aria-label': 'call timeline' });

    // axis
    const step = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600].find((st) => span / st <= (W - LABEL) / 70) || 3600;
    for (let t = 0; t <= span; t += step) {
      const px = x(t0 + t);
      svg.append(s('line', { x1: px, x2: px, y1: AXIS - 4, y2: H, class: 'grid' }));
      svg.append(s('text', { x: px + 2, y: 10, class: 'axis' }, document.createTextNode(fmtRel(t).replace(/\.\d$/, ''))));
    }
    lanes.forEach(([, label], i) => {
      svg.append(s('text', { x: 4, y: laneY(i) + 14, class: 'lane' }, document.createTextNode(label)));
      svg.append(s('line', { x1: LABEL, x2: W - PAD, y1: laneY(i) + LANE, y2: laneY(i) + LANE, class: 'sep' }));
    });
    const rect = (lane, a, b, cls, title, inset = 3) => {
      const x1 = x(a), x2 = Math.max(x(b), x1 + 1.5);
      if (x2 < LABEL || x1 > W) return;
      svg.append(s('rect', { x: x1, y: laneY(lane) + inset, width: x2 - x1, height: LANE - 2 * inset, class: cls }, title && svgTitle(title)));
    };
    const mark = (lane, at, cls, title, glyph) => {
      if (at == null) return;
      const px = x(at);
      const g = s('g', { class: `mk ${cls}` }, svgTitle(title));
      if (glyph) g.append(s('text', { x: px, y: laneY(lane) + 14, 'text-anchor': 'middle' }, document.createTextNode(glyph)));
      else g.append(s('line', { x1: px, x2: px, y1: laneY(lane) + 2, y2: laneY(lane) + LANE - 2 }), s('circle', { cx: px, cy: laneY(lane) + 4, r: 2.5 }));
      svg.append(g);
    };

    // caller speech, as measured: seconds whose caller level is above VOICE_DBFS
    for (const hl of this.health) {
      const lvl = num(hl.caller_level_dbfs);
      if (lvl != null && lvl > VOICE_DBFS) rect(0, hl.at - 1, hl.at, 'voice', `caller ${lvl.toFixed(0)} dBFS`);
      const out = num(hl.frames_out_per_s);
      if (out) {
        const x1 = x(hl.at - 1), x2 = x(hl.at);
        if (x2 > LABEL) svg.append(s('rect', { x: x1, y: laneY(1) + LANE - 3, width: Math.max(1, x2 - x1 - 0.5), height: 2, class: 'outsec' }, svgTitle(`${out} assistant frames out in this second`)));
      }
    }
    // assistant turns: sent (pale) and heard (solid), from the turn's first audio
    const firstStart = this.events.find((e) => e.kind === 'vapi-connected' || e.kind === 'stream-start');
    const turns = [...this.turns.values()];
    if (!this.turns.has(0)) turns.push({ turn: 0, latency_ms: null, sent_ms: null, heard_ms: null, interrupted: false });
    for (const t of turns) {
      const start = t.started ?? (t.turn === 0 && firstStart ? firstStart.at : null);
      if (start == null) continue;
      if (num(t.latency_ms) != null && t.started != null) {
        rect(1, start - t.latency_ms / 1000, start, 'wait', `turn ${t.turn}: waited ${fmtMs(t.latency_ms)} ms for the assistant`, 8);
        mark(0, start - t.latency_ms / 1000, 'eos', `end of caller speech (turn ${t.turn})`);
      }
      const sent = num(t.sent_ms), heard = num(t.heard_ms);
      if (sent != null) rect(1, start, start + sent / 1000, 'sent', `turn ${t.turn}: ${fmtMs(sent)} ms sent`);
      if (heard != null) rect(1, start, start + heard / 1000, t.interrupted ? 'heard cut' : 'heard', `turn ${t.turn}: ${fmtMs(heard)} ms heard${t.interrupted ? ' (interrupted)' : ''}`);
      if (sent == null) {
        // Not measured yet (the worker records sent/heard at a barge-in or at the end): from
        // the turn's first audio to the assistant's transcript of it, or to now.
        const said = this.events.find((e) => e.kind === 'transcript' && e.data.role === 'assistant' && e.at != null && e.at > start);
        const until = said ? said.at : this.ended ? null : nowS();
        if (until != null) rect(1, start, until, 'speaking', `turn ${t.turn}: assistant speaking${said ? '' : ' (so far)'}`);
      }
    }
    for (const e of this.events) {
      if (e.at == null) continue;
      const d = e.data;
      if (e.kind === 'transcript') mark(d.role === 'assistant' ? 1 : 0, e.at, d.role === 'assistant' ? 'said-a' : 'said-c', `${d.role === 'assistant' ? 'assistant' : 'caller'}: ${str(d.text)}`);
      else if (e.kind === 'dtmf' || e.kind === 'keypad-entry') mark(0, e.at, 'keypad', eventSummary(e), '#');
      else if (e.kind === 'barge-in') { mark(1, e.at, 'barge', `barge-in: ${eventSummary(e)}`); mark(2, e.at, 'barge', `barge-in: ${eventSummary(e)}`); }
      else if (e.kind !== 'turn-latency' && e.kind !== 'assistant-turns') {
        const [cls, label] = EVENT_STYLE[e.kind] || ['muted', e.kind];
        const summary = eventSummary(e);
        mark(2, e.at, cls, summary ? `${label}: ${summary}` : label);
      }
    }
    if (!this.ended) svg.append(s('line', { x1: x(nowS()), x2: x(nowS()), y1: AXIS - 4, y2: H, class: 'now' }));
    box.replaceChildren(svg);
    box.dataset.events = String(this.events.length);
  }

  close() {
    this.closed = true;
    if (this.abort) this.abort.abort();
    if (this.listener) this.listener.stop();
    this.listener = null;
    if (this.plot) this.plot.destroy();
    this.resize.disconnect();
    this.resizeTl.disconnect();
    clearTimeout(this.armTimer);
    this.root.remove();
  }
}

function legend() {
  const item = (cls, text) => h('span', { class: 'lg' }, h('i', { class: `sw ${cls}` }), text);
  return h('span', { class: 'legend muted small' },
    item('voice', 'caller speaking'), item('wait', 'waiting for the assistant'), item('speaking', 'assistant speaking'), item('sent', 'sent'),
    item('heard', 'heard by the caller'), item('cut', 'interrupted'), item('barge', 'barge-in'));
}

// A sparkline: the series' values on a fixed range, nulls as gaps.
function spark(canvas, values, [lo, hi], color) {
  const ctx = canvas.getContext('2d');
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 120, hgt = canvas.clientHeight || 22;
  if (canvas.width !== Math.round(w * dpr)) { canvas.width = Math.round(w * dpr); canvas.height = Math.round(hgt * dpr); }
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, hgt);
  const n = 60;
  const top = Math.max(hi, ...values.filter((v) => v != null));
  ctx.strokeStyle = color;
  ctx.lineWidth = 1.25;
  ctx.beginPath();
  let pen = false;
  values.forEach((v, i) => {
    const px = ((n - values.length + i) / (n - 1)) * (w - 2) + 1;
    if (v == null) { pen = false; return; }
    const py = hgt - 2 - ((Math.min(Math.max(v, lo), top) - lo) / (top - lo)) * (hgt - 4);
    if (pen) ctx.lineTo(px, py); else ctx.moveTo(px, py);
    pen = true;
  });
  ctx.stroke();
}

// ---- start -------------------------------------------------------------------------------------

function tick() {
  for (const item of state.live.values()) tickRow(item);
  if (state.call) state.call.tick();
}

function main() {
  $('login-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const key = $('key').value.trim();
    if (key) signIn(key);
  });
  $('signout').addEventListener('click', () => signOut(''));
  $('recent-refresh').addEventListener('click', refreshRecent);
  window.addEventListener('hashchange', route);
  setInterval(tick, 1000);
  if (state.key) signIn(state.key);
  else showLogin('');
}

main();
