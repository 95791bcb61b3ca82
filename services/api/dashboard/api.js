// The dashboard's only way to data: the public REST API and the /api/events WebSocket.
// Credentials: basic auth is answered by the browser itself; a bearer token entered in the
// sign-in dialog is kept for this tab (sessionStorage) and sent as a header (REST) or as the
// token parameter (WebSocket), as any other client of the API would.

const TOKEN_KEY = 'pollen.token';
// Where the API lives: the page is served at <POLLEN_URL_PREFIX>/, so every API path is taken
// relative to the page's own directory ('' at the host root, '/flower' under a prefix).
export const BASE = new URL('.', document.baseURI).pathname.replace(/\/$/, '');

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || '';
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

function headers(extra) {
  const out = { Accept: 'application/json', ...(extra || {}) };
  const t = token();
  if (t) out.Authorization = `Bearer ${t}`;
  return out;
}

async function failure(resp) {
  let message = `${resp.status} ${resp.statusText}`;
  try {
    const body = await resp.json();
    if (body && body.error) message = body.error;
  } catch { /* not JSON */ }
  if (resp.status === 401) window.dispatchEvent(new CustomEvent('pollen-auth', { detail: message }));
  return new ApiError(resp.status, message);
}

function url(path, params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== undefined && v !== null && v !== '') q.set(k, v);
  }
  const qs = q.toString();
  return qs ? `${BASE}${path}?${qs}` : `${BASE}${path}`;
}

/** GET a JSON endpoint: {data, headers}. */
export async function get(path, params, signal) {
  const resp = await fetch(url(path, params), { headers: headers(), signal });
  if (!resp.ok) throw await failure(resp);
  return { data: await resp.json(), headers: resp.headers };
}

export async function getJson(path, params, signal) {
  return (await get(path, params, signal)).data;
}

/**
 * Save what a GET answers as a file. Without a token a plain link does it (the browser streams
 * it to disk, sending basic auth or the SSO cookie itself); a bearer token can only go in a
 * header, so then the answer is fetched and handed over whole.
 */
export async function download(path, params, filename) {
  const a = document.createElement('a');
  a.download = filename;
  if (!token()) {
    a.href = url(path, params);
    a.click();
    return;
  }
  const resp = await fetch(url(path, params), { headers: headers({ Accept: '*/*' }) });
  if (!resp.ok) throw await failure(resp);
  a.href = URL.createObjectURL(await resp.blob());
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 60000);
}

/** POST a control endpoint with form parameters: the answer's JSON. */
export async function post(path, params) {
  const body = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== undefined && v !== null && v !== '') body.set(k, v);
  }
  const resp = await fetch(url(path), { method: 'POST', headers: headers(), body });
  if (!resp.ok) throw await failure(resp);
  return resp.json();
}

/** A JSON request with another method (PUT, DELETE): the answer's JSON. */
export async function send(method, path, body) {
  const resp = await fetch(url(path), { method,
    headers: headers(body === undefined ? {} : { 'Content-Type': 'application/json' }),
    body: body === undefined ? undefined : JSON.stringify(body) });
  if (!resp.ok) throw await failure(resp);
  return resp.json();
}

export function eventsUrl(params) {
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const q = { ...(params || {}) };
  if (token()) q.token = token();
  return `${proto}//${location.host}${url('/api/events', q)}`;
}

/**
 * A WebSocket on /api/events that reconnects by itself and resumes after the last event it
 * handed out (since=<cursor>), so a dropped connection leaves no gap and no duplicate.
 * Events are handed out in batches (onBatch) at most every `flushMs`, so a fast stream
 * costs one DOM update per batch, not one per event.
 */
export class EventStream {
  constructor({ params = {}, since = null, onBatch, onStatus = () => {}, onNotice = () => {},
    flushMs = 100 }) {
    this.params = params;
    this.cursor = since;
    this.onBatch = onBatch;
    this.onStatus = onStatus;
    this.onNotice = onNotice;
    this.flushMs = flushMs;
    this.pending = [];
    this.timer = null;
    this.ws = null;
    this.closed = false;
    this.delay = 250;
    this.connects = 0;
    this.received = 0;
  }

  start() {
    this.closed = false;
    this.open();
    return this;
  }

  open() {
    if (this.closed) return;
    const params = { ...this.params };
    if (this.cursor) params.since = this.cursor;
    this.onStatus('connecting');
    const ws = new WebSocket(eventsUrl(params));
    this.ws = ws;
    ws.onopen = () => {
      this.connects += 1;
      this.delay = 250;
      this.onStatus('live');
    };
    ws.onmessage = (msg) => {
      let ev;
      try { ev = JSON.parse(msg.data); } catch { return; }
      if (ev.type === 'pollen-events-lost') { this.onNotice(ev); return; }
      this.pending.push(ev);
      if (this.timer === null) this.timer = setTimeout(() => this.flush(), this.flushMs);
    };
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.flush();
      if (this.closed) return;
      this.onStatus('reconnecting');
      setTimeout(() => this.open(), this.delay);
      this.delay = Math.min(this.delay * 2, 5000);
    };
    ws.onerror = () => { /* onclose follows */ };
  }

  flush() {
    if (this.timer !== null) { clearTimeout(this.timer); this.timer = null; }
    if (!this.pending.length) return;
    const batch = this.pending;
    this.pending = [];
    const last = batch[batch.length - 1];
    // the cursor moves only past events handed out: a resume starts right after them
    this.cursor = last.cursor || last.stream_id || this.cursor;
    this.received += batch.length;
    this.onBatch(batch);
  }

  /** Drop the connection (it comes back by itself, resuming after the last event). */
  drop() {
    if (this.ws) this.ws.close(4000, 'dropped by the page');
  }

  stop() {
    this.closed = true;
    if (this.ws) { const ws = this.ws; this.ws = null; ws.close(1000); }
    if (this.timer !== null) { clearTimeout(this.timer); this.timer = null; }
    this.pending = [];
  }
}
