// Server-sent events read with fetch(): EventSource cannot send an Authorization header.

export class HttpError extends Error {
  constructor(status, detail) {
    super(detail ? `HTTP ${status}: ${detail}` : `HTTP ${status}`);
    this.status = status;
    this.detail = detail;
  }
}

// The API's error detail as one line: a string, or FastAPI's list of {loc, msg}.
export function detailText(body) {
  if (body == null) return '';
  const d = typeof body === 'object' && 'detail' in body ? body.detail : body;
  if (typeof d === 'string') return d;
  if (Array.isArray(d)) {
    return d.map((e) => {
      if (e && typeof e === 'object') {
        const loc = Array.isArray(e.loc) ? e.loc.filter((p) => p !== 'body').join('.') : '';
        return (loc ? `${loc}: ` : '') + (typeof e.msg === 'string' ? e.msg : JSON.stringify(e));
      }
      return String(e);
    }).join('; ');
  }
  return JSON.stringify(d);
}

const MAX_LINE = 1 << 20; // a line longer than 1 MiB is not an event we can use

// The text/event-stream format (WHATWG HTML, "Parsing an event stream"), fed chunk by chunk.
export class SSEParser {
  constructor(onEvent, onComment) {
    this.onEvent = onEvent;
    this.onComment = onComment || (() => {});
    this.buf = '';
    this.skipLF = false;
    this.event = '';
    this.data = [];
  }

  push(text) {
    if (this.skipLF && text[0] === '\n') text = text.slice(1); // a CRLF split between chunks
    this.skipLF = false;
    this.buf += text;
    let start = 0;
    for (;;) {
      const cr = this.buf.indexOf('\r', start);
      const lf = this.buf.indexOf('\n', start);
      const end = cr < 0 ? lf : lf < 0 ? cr : Math.min(cr, lf);
      if (end < 0) break;
      let next = end + 1;
      if (this.buf[end] === '\r') {
        if (end + 1 === this.buf.length) this.skipLF = true; // its LF may start the next chunk
        else if (this.buf[end + 1] === '\n') next = end + 2;
      }
      this.line(this.buf.slice(start, end));
      start = next;
    }
    this.buf = this.buf.slice(start);
    if (this.buf.length > MAX_LINE) throw new Error('event stream line too long');
  }

  line(line) {
    if (line === '') {
      if (this.data.length) this.onEvent(this.event || 'message', this.data.join('\n'));
      this.event = '';
      this.data = [];
      return;
    }
    if (line[0] === ':') {
      this.onComment(line.slice(1).trim());
      return;
    }
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value[0] === ' ') value = value.slice(1);
    if (field === 'event') this.event = value;
    else if (field === 'data') this.data.push(value);
    // id and retry: the feeds start over with a snapshot/view on every connection, so unused
  }
}

// Read one event stream until it ends (resolves) or fails (rejects: HttpError for an HTTP
// error answer, before any event). `onEvent(name, data)` gets parsed JSON data. A stream that
// sends nothing, not even its 15 s keepalive, for `idleMs` is given up as dead.
export async function readEventStream(url, key, { signal, onOpen, onEvent, idleMs = 40000 }) {
  const ctl = new AbortController();
  const abort = () => ctl.abort();
  if (signal) {
    if (signal.aborted) throw new DOMException('aborted', 'AbortError');
    signal.addEventListener('abort', abort, { once: true });
  }
  let last = Date.now();
  let idle = false;
  const watchdog = setInterval(() => {
    if (Date.now() - last > idleMs) { idle = true; ctl.abort(); }
  }, 1000);
  try {
    const res = await fetch(url, {
      headers: { Authorization: `Bearer ${key}`, Accept: 'text/event-stream' },
      cache: 'no-store',
      signal: ctl.signal,
    });
    if (!res.ok) {
      let body = null;
      try { body = await res.json(); } catch { /* not JSON */ }
      throw new HttpError(res.status, detailText(body) || res.statusText);
    }
    if (!res.body) throw new Error('this browser cannot stream a response body');
    if (onOpen) onOpen(res);
    const parser = new SSEParser((name, raw) => {
      let data;
      try { data = JSON.parse(raw); } catch { return; } // not ours: ignore
      try { onEvent(name, data); } catch (err) { console.error('console: bad event', name, err); }
    }, () => {});
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      last = Date.now();
      parser.push(value);
    }
  } catch (err) {
    if (idle) throw new Error('the stream went quiet (no keepalive)');
    throw err;
  } finally {
    clearInterval(watchdog);
    if (signal) signal.removeEventListener('abort', abort);
    ctl.abort();
  }
}
