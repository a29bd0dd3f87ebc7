// Listen in: the call's two directions, 8 kHz μ-law frames from WS /v1/calls/{sid}/listen,
// decoded here and played together (WebAudio mixes them).

// G.711 μ-law -> linear, as floats in [-1, 1).
export const ULAW = (() => {
  const t = new Float32Array(256);
  for (let i = 0; i < 256; i++) {
    const u = ~i & 0xff;
    let s = (((u & 0x0f) << 3) + 0x84) << ((u & 0x70) >> 4);
    s = u & 0x80 ? 0x84 - s : s - 0x84;
    t[i] = s / 32768;
  }
  return t;
})();

export const CLOSE_REASONS = {
  4401: 'wrong or missing API key',
  4404: 'unknown call',
  4409: 'the call has ended',
  1013: 'the gateway is at CONSOLE_MAX_STREAMS: try again shortly',
};

const RATE = 8000;
const JITTER_S = 0.1; // played this far behind the first frame of a run, to absorb jitter
const MAX_AHEAD_S = 0.6; // queued further ahead than this: the frame is dropped (we fell behind)

export class Listener {
  // onState(state, message): state is 'connecting' | 'listening' | 'closed' | 'error'.
  constructor({ url, key, onState, onFrame }) {
    this.url = url;
    this.key = key;
    this.onState = onState || (() => {});
    this.onFrame = onFrame || (() => {});
    this.frames = [0, 0];
    this.dropped = 0;
    this.clock = [0, 0];
    this.ws = null;
    this.ctx = null;
    this.stopped = false;
  }

  // Call from a click: browsers start audio only on a user gesture.
  start() {
    const Ctx = window.AudioContext || window.webkitAudioContext;
    if (Ctx) {
      this.ctx = new Ctx({ latencyHint: 'interactive' });
      this.gain = [0, 1].map(() => {
        const g = this.ctx.createGain();
        g.connect(this.ctx.destination);
        return g;
      });
      this.ctx.resume().catch(() => {});
    }
    this.onState('connecting', 'connecting…');
    const ws = new WebSocket(this.url);
    this.ws = ws;
    ws.binaryType = 'arraybuffer';
    ws.onopen = () => {
      ws.send(JSON.stringify({ key: this.key }));
      this.onState('listening', this.ctx ? 'listening' : 'receiving (no audio output in this browser)');
    };
    ws.onmessage = (ev) => {
      if (!(ev.data instanceof ArrayBuffer) || ev.data.byteLength < 2) return;
      const bytes = new Uint8Array(ev.data);
      const dir = bytes[0] === 1 ? 1 : 0;
      this.frames[dir] += 1;
      this.onFrame(dir, this.frames);
      if (this.ctx) this.play(dir, bytes.subarray(1));
    };
    ws.onclose = (ev) => {
      this.teardown();
      if (this.stopped) return;
      const why = CLOSE_REASONS[ev.code] || (ev.code === 1000 ? 'stream closed' : `closed (${ev.code}${ev.reason ? ': ' + ev.reason : ''})`);
      this.onState(ev.code === 1000 || ev.code === 4409 ? 'closed' : 'error', why, ev.code);
    };
    ws.onerror = () => {}; // onclose follows with the code
  }

  play(dir, ulaw) {
    const ctx = this.ctx;
    const n = ulaw.length;
    const buf = ctx.createBuffer(1, n, RATE);
    const pcm = buf.getChannelData(0);
    for (let i = 0; i < n; i++) pcm[i] = ULAW[ulaw[i]];
    const now = ctx.currentTime;
    let at = this.clock[dir];
    if (at < now + 0.005) at = now + JITTER_S; // first frame, or a gap: build the buffer again
    else if (at > now + MAX_AHEAD_S) { this.dropped += 1; return; } // audio late is audio lost
    const src = ctx.createBufferSource();
    src.buffer = buf;
    src.connect(this.gain[dir]);
    src.start(at);
    this.clock[dir] = at + n / RATE;
  }

  mute(dir, muted) {
    if (this.gain) this.gain[dir].gain.value = muted ? 0 : 1;
  }

  stop() {
    this.stopped = true;
    if (this.ws && this.ws.readyState <= 1) this.ws.close(1000);
    this.teardown();
    this.onState('closed', 'stopped');
  }

  teardown() {
    if (this.ctx) {
      this.ctx.close().catch(() => {});
      this.ctx = null;
    }
  }
}
