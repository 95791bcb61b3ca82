// Small helpers shared by the views: DOM building (never innerHTML with data), formatting
// in the user's time zone, and a frame-batched scheduler.

/** h('tr', {class: 'x', onclick: f, dataset: {...}}, child, 'text', [more]) */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  if (attrs) {
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') el.className = v;
      else if (k === 'dataset') Object.assign(el.dataset, v);
      else if (k === 'style') el.style.cssText = v; // CSSOM: allowed by the page's CSP
      else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
      else if (k === 'value') el.value = v;
      else if (k === 'checked') el.checked = v;
      else el.setAttribute(k, v === true ? '' : String(v));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === undefined || c === null || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/** An SVG element: s('rect', {x: 1, ...}). */
export function s(tag, attrs, ...children) {
  const el = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

export const TIME_ZONE = Intl.DateTimeFormat().resolvedOptions().timeZone || 'local time';

const dateTime = new Intl.DateTimeFormat(undefined, {
  year: 'numeric', month: '2-digit', day: '2-digit',
  hour: '2-digit', minute: '2-digit', second: '2-digit', hourCycle: 'h23',
});
const clockTime = new Intl.DateTimeFormat(undefined, {
  hour: '2-digit', minute: '2-digit', second: '2-digit', hourCycle: 'h23',
});
const minuteTime = new Intl.DateTimeFormat(undefined, {
  hour: '2-digit', minute: '2-digit', hourCycle: 'h23',
});

/** Epoch seconds -> date and time in the user's zone (with milliseconds). */
export function fmtTime(ts) {
  if (ts === null || ts === undefined || !Number.isFinite(ts)) return '';
  const d = new Date(ts * 1000);
  return `${dateTime.format(d)}.${String(d.getMilliseconds()).padStart(3, '0')}`;
}

export function fmtClock(ts) {
  if (!Number.isFinite(ts)) return '';
  const d = new Date(ts * 1000);
  return `${clockTime.format(d)}.${String(d.getMilliseconds()).padStart(3, '0')}`;
}

export function fmtMinute(ts) {
  return minuteTime.format(new Date(ts * 1000));
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return '';
  if (seconds < 0.001) return `${(seconds * 1e6).toFixed(0)} µs`;
  if (seconds < 1) return `${(seconds * 1000).toFixed(seconds < 0.01 ? 2 : 0)} ms`;
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 2 : 1)} s`;
  const m = Math.floor(seconds / 60);
  return m < 60 ? `${m} m ${Math.round(seconds % 60)} s` : `${Math.floor(m / 60)} h ${m % 60} m`;
}

export function fmtAgo(ts, now = Date.now() / 1000) {
  if (!Number.isFinite(ts)) return 'never';
  const d = Math.max(0, now - ts);
  if (d < 60) return `${d.toFixed(0)} s ago`;
  if (d < 3600) return `${Math.floor(d / 60)} min ago`;
  if (d < 86400) return `${Math.floor(d / 3600)} h ago`;
  return `${Math.floor(d / 86400)} d ago`;
}

export function fmtNumber(n) {
  return Number.isFinite(n) ? n.toLocaleString() : '';
}

/** A value from a task field (JSON) as short text. */
export function text(v) {
  if (v === null || v === undefined) return '';
  return typeof v === 'string' ? v : JSON.stringify(v);
}

export function short(v, n = 80) {
  const t = text(v);
  return t.length > n ? `${t.slice(0, n - 1)}…` : t;
}

/** Runs fn at most once per animation frame (or per `ms` when the page is hidden). */
export function batched(fn, ms = 250) {
  let pending = false;
  return () => {
    if (pending) return;
    pending = true;
    const run = () => { pending = false; fn(); };
    if (document.hidden) setTimeout(run, ms);
    else requestAnimationFrame(run);
  };
}

export const STATES = ['PENDING', 'RECEIVED', 'STARTED', 'SUCCESS', 'FAILURE', 'RETRY',
  'REVOKED', 'REJECTED'];

export function stateBadge(state) {
  return h('span', { class: `badge state-${String(state || 'PENDING').toLowerCase()}` },
    state || 'PENDING');
}

/** A task marked lost (RECEIVED or STARTED on a worker that died): said in words, not colour. */
export function lostBadge(lostAt) {
  return h('span', { class: 'badge lost', title: Number.isFinite(lostAt)
    ? `lost: its worker died at ${fmtTime(lostAt)}` : 'lost: its worker died' }, 'lost');
}

/** Parse '#/path?a=1&b=2' into {path, params}. */
export function parseHash(hash) {
  const raw = (hash || '').replace(/^#/, '') || '/workers';
  const [path, query] = raw.split('?', 2);
  return { path, params: new URLSearchParams(query || '') };
}

// The view's filters from the URL's parameters: each name's value, or its default ('').
export function paramValues(params, defaults) {
  const out = {};
  for (const [name, fallback] of Object.entries(defaults)) out[name] = params.get(name) || fallback;
  return out;
}

export function toHash(path, params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== undefined && v !== null && v !== '') q.set(k, v);
  }
  const qs = q.toString();
  return `#${path}${qs ? `?${qs}` : ''}`;
}

/**
 * Make `tbody` show `rows` (keyed by data-key), keeping the elements of unchanged rows and
 * cells, so links under the pointer stay put while live data changes around them.
 */
export function patchRows(tbody, rows) {
  const old = new Map([...tbody.children].map((tr) => [tr.dataset.key, tr]));
  let at = tbody.firstElementChild;
  for (const tr of rows) {
    const existing = old.get(tr.dataset.key);
    let keep = tr;
    if (existing && existing.cells.length === tr.cells.length) {
      old.delete(tr.dataset.key);
      for (let i = 0; i < tr.cells.length; i++) {
        if (existing.cells[i].innerHTML !== tr.cells[i].innerHTML) {
          existing.cells[i].replaceWith(tr.cells[i].cloneNode(true));
        }
      }
      for (const [k, v] of Object.entries(tr.dataset)) existing.dataset[k] = v;
      existing.className = tr.className;
      keep = existing;
    }
    if (keep !== at) tbody.insertBefore(keep, at);
    else at = at.nextElementSibling;
  }
  for (const tr of old.values()) tr.remove();
}
