// Live feed: the event stream, newest first, with filters and pause. The page's one
// EventStream resumes after a dropped connection from the last event it handed out, so the
// feed has no gap and no duplicate across reconnects.
import {
  batched, fmtClock, fmtTime, h, paramValues, short, stateBadge, text, toHash,
} from './util.js';

const MAX_ROWS = 1000;
const MAX_HELD = 20000;
const TYPES = ['', 'task-*', 'worker-*', 'task-sent', 'task-received', 'task-started',
  'task-succeeded', 'task-failed', 'task-retried', 'task-revoked', 'task-rejected', 'task-lost',
  'worker-online', 'worker-heartbeat', 'worker-offline'];
const SKIP = new Set(['type', 'hostname', 'timestamp', 'local_received', 'uuid', 'task_name',
  'task_state', 'stream_id', 'cursor', 'clock', 'pid', 'utcoffset', 'sw_ident', 'sw_ver',
  'sw_sys']);

function matcher(f) {
  const type = f.type;
  const prefix = type.endsWith('*') ? type.slice(0, -1) : null;
  const name = f.taskname.toLowerCase();
  const worker = f.worker.toLowerCase();
  const textQ = f.text.toLowerCase();
  return (ev) => {
    if (f.hideHeartbeats && ev.type === 'worker-heartbeat') return false;
    if (type && (prefix ? !ev.type.startsWith(prefix) : ev.type !== type)) return false;
    if (name && !(ev.task_name || '').toLowerCase().includes(name)) return false;
    if (worker && !(ev.hostname || '').toLowerCase().includes(worker)) return false;
    if (f.state && ev.task_state !== f.state) return false;
    if (textQ && !JSON.stringify(ev).toLowerCase().includes(textQ)) return false;
    return true;
  };
}

function row(ev) {
  const details = Object.entries(ev).filter(([k]) => !SKIP.has(k))
    .map(([k, v]) => `${k}=${short(text(v), 60)}`).join('  ');
  return h('tr', { dataset: { sid: ev.stream_id || '', type: ev.type } },
    h('td', { class: 'time', title: fmtTime(ev.timestamp) }, fmtClock(ev.timestamp)),
    h('td', null, ev.type),
    h('td', null, ev.hostname || ''),
    h('td', null, ev.task_name || ''),
    h('td', { class: 'mono' }, ev.uuid ? h('a', { href: toHash(`/task/${encodeURIComponent(
      ev.uuid)}`) }, ev.uuid) : ''),
    h('td', null, ev.task_state ? stateBadge(ev.task_state) : ''),
    h('td', { class: 'mono details' }, details));
}

export function feedView(el, { params, app }) {
  const f = {
    ...paramValues(params, { type: '', taskname: '', worker: '', state: '', text: '' }),
    hideHeartbeats: params.get('heartbeats') === '0',
  };
  let match = matcher(f);
  let paused = false;
  let held = [];
  let dropped = 0;
  let pending = [];
  let shown = 0;

  const body = h('tbody');
  const status = h('span', { class: 'muted', id: 'feed-status' });
  const pause = h('button', { id: 'feed-pause', onclick: () => setPaused(!paused) }, 'Pause');
  const input = (key, placeholder) => h('input', { id: `feed-${key}`, value: f[key], placeholder,
    oninput: (e) => { f[key] = e.target.value.trim(); refilter(); } });
  const select = (key, options) => h('select', { id: `feed-${key}`,
    onchange: (e) => { f[key] = e.target.value; refilter(); } },
  options.map((o) => h('option', { value: o, selected: o === f[key] || null }, o || `any ${key}`)));

  el.append(
    h('div', { class: 'toolbar' }, h('h2', null, 'Live feed'), status),
    h('div', { class: 'filters' },
      select('type', TYPES), input('taskname', 'task name'), input('worker', 'worker'),
      select('state', ['', 'PENDING', 'RECEIVED', 'STARTED', 'SUCCESS', 'FAILURE', 'RETRY',
        'REVOKED', 'REJECTED']),
      input('text', 'contains (uuid, args, …)'),
      h('label', null, h('input', { type: 'checkbox', id: 'feed-heartbeats',
        checked: f.hideHeartbeats || null,
        onchange: (e) => { f.hideHeartbeats = e.target.checked; refilter(); } }),
      ' hide heartbeats'),
      pause,
      h('button', { class: 'secondary', id: 'feed-clear', onclick: () => {
        body.replaceChildren(); shown = 0; held = []; dropped = 0; showStatus();
      } }, 'Clear')),
    h('div', { class: 'table-wrap' }, h('table', { class: 'grid-table feed', id: 'feed' },
      h('thead', null, h('tr', null, ['time', 'event', 'host', 'task', 'uuid', 'state',
        'details'].map((c) => h('th', null, c)))), body)),
  );

  function showStatus() {
    const conn = document.getElementById('conn').dataset.state;
    status.textContent = paused
      ? `paused: ${held.length} new event${held.length === 1 ? '' : 's'} held`
        + `${dropped ? `, ${dropped} dropped (over ${MAX_HELD})` : ''}`
      : `${shown} shown (newest first, at most ${MAX_ROWS}); connection ${conn}`;
  }

  /** Prepend events (oldest first in `list`) and keep at most MAX_ROWS rows. */
  function prepend(list) {
    if (!list.length) return;
    const start = Math.max(0, list.length - MAX_ROWS);
    const frag = document.createDocumentFragment();
    for (let i = list.length - 1; i >= start; i--) frag.append(row(list[i]));
    body.prepend(frag);
    while (body.childElementCount > MAX_ROWS) body.lastElementChild.remove();
    shown = body.childElementCount;
  }

  const flush = batched(() => {
    const list = pending;
    pending = [];
    prepend(list);
    showStatus();
  });

  function refilter() {
    match = matcher(f);
    body.replaceChildren();
    pending = [];
    prepend(app.recent.filter(match));
    showStatus();
  }

  function setPaused(value) {
    paused = value;
    pause.textContent = paused ? 'Resume' : 'Pause';
    pause.classList.toggle('active', paused);
    if (paused) {
      // events waiting for the next frame are held too: nothing moves once paused
      held = pending.concat(held);
      pending = [];
    } else {
      pending.push(...held);
      held = [];
      dropped = 0;
      flush();
    }
    showStatus();
  }

  const unsubscribe = app.subscribe((batch) => {
    const matched = batch.filter(match);
    if (!matched.length) return;
    if (paused) {
      held.push(...matched);
      if (held.length > MAX_HELD) {
        dropped += held.length - MAX_HELD;
        held.splice(0, held.length - MAX_HELD);
      }
      showStatus();
      return;
    }
    pending.push(...matched);
    flush();
  });
  refilter();
  const timer = setInterval(showStatus, 1000);
  return { unmount() { unsubscribe(); clearInterval(timer); } };
}
