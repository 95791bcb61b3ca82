// One task: every field of /api/task/info, its traceback, parent/root/children links, its own
// events replayed from the stream (/api/events?uuid=...&since=...) and then live, and
// revoke/terminate behind a confirmation.
import { ApiError, EventStream, getJson, post } from './api.js';
import {
  clear, fmtClock, fmtDuration, fmtTime, h, lostBadge, stateBadge, text, toHash,
} from './util.js';

const TIME_FIELDS = new Set(['sent', 'received', 'started', 'succeeded', 'failed', 'retried',
  'revoked', 'rejected', 'timestamp']);
/** Seconds before the task's earliest time the replay starts (clock skew between hosts). */
const REPLAY_MARGIN = 30;
const COMMON = new Set(['type', 'hostname', 'timestamp', 'local_received', 'uuid', 'task_name',
  'task_state', 'stream_id', 'cursor', 'clock', 'pid', 'utcoffset']);

const taskLink = (id) => h('a', { href: toHash(`/task/${encodeURIComponent(id)}`) }, id);

function value(field, v) {
  if (v === null || v === undefined) return h('span', { class: 'muted' }, '—');
  if (TIME_FIELDS.has(field) || field === 'lost_at') {
    return h('span', { title: String(v) }, fmtTime(v));
  }
  if (field === 'lost') return v ? lostBadge() : text(v);
  if (field === 'runtime') return fmtDuration(v);
  if (field === 'state') return stateBadge(v);
  if (field === 'parent' || field === 'root' || field === 'parent_id' || field === 'root_id') {
    return taskLink(v);
  }
  if (field === 'children') {
    return Array.isArray(v) && v.length ? h('ul', { class: 'plain', id: 'children' },
      v.map((c) => h('li', null, taskLink(c)))) : h('span', { class: 'muted' }, 'none');
  }
  if (field === 'worker') {
    return h('a', { href: toHash(`/worker/${encodeURIComponent(v)}`) }, v);
  }
  if (field === 'traceback') return h('span', { class: 'muted' }, 'below');
  return h('code', { class: 'wrap' }, text(v));
}

export function taskView(el, { arg: uuid, app }) {
  let task = null;
  let stream = null;
  let timer = null;
  const events = [];
  const seen = new Set();
  const title = h('h2', null, uuid);
  const badge = h('span');
  const actions = h('div', { class: 'controls', id: 'task-controls' });
  const fields = h('tbody');
  const traceback = h('pre', { class: 'traceback', id: 'traceback', hidden: true });
  const evBody = h('tbody');
  const evNote = h('p', { class: 'muted', id: 'events-note' }, 'Replaying this task\'s events…');
  const error = h('p', { class: 'error', hidden: true });

  el.append(
    h('div', { class: 'toolbar' }, h('a', { href: '#/tasks' }, '← Tasks'), title, badge),
    error,
    actions,
    h('div', { class: 'cards two' },
      h('section', { class: 'card' }, h('h3', null, 'Fields'),
        h('table', { class: 'kv', id: 'task-fields' }, fields)),
      h('section', { class: 'card' }, h('h3', null, 'Events'), evNote,
        h('table', { class: 'grid-table', id: 'task-events' },
          h('thead', null, h('tr', null, ['time', 'event', 'host', 'state', 'details']
            .map((c) => h('th', null, c)))), evBody))),
    h('section', { class: 'card' }, h('h3', null, 'Traceback'), traceback),
  );

  function renderActions() {
    clear(actions);
    if (!app.canControl || !task) return;
    const signal = h('select', { id: 'terminate-signal' },
      ['SIGTERM', 'SIGKILL'].map((s) => h('option', { value: s }, s)));
    const done = ['SUCCESS', 'FAILURE', 'REVOKED', 'REJECTED'].includes(task.state);
    actions.append(
      h('button', { id: 'revoke', class: 'secondary', disabled: done || null,
        onclick: () => app.control('Revoke task',
          `Revoke ${task.name || ''} ${uuid}? Workers will discard it if it has not started.`,
          () => post(`/api/task/revoke/${encodeURIComponent(uuid)}`)) }, 'Revoke'),
      h('button', { id: 'terminate', class: 'danger', disabled: done || null,
        onclick: () => app.control('Terminate task',
          `Terminate ${task.name || ''} ${uuid} with ${signal.value}? A running task is killed.`,
          () => post(`/api/task/revoke/${encodeURIComponent(uuid)}`,
            { terminate: 'true', signal: signal.value })) }, 'Terminate'),
      signal,
    );
  }

  function render() {
    if (!task) return;
    title.textContent = task.name || uuid;
    clear(badge).append(stateBadge(task.state), ' ');
    if (task.lost) badge.append(lostBadge(task.lost_at), ' ');
    badge.append(h('code', null, uuid));
    clear(fields);
    for (const [k, v] of Object.entries(task)) {
      fields.append(h('tr', { dataset: { field: k } }, h('th', null, k), h('td', null,
        value(k, v))));
    }
    traceback.hidden = !task.traceback;
    traceback.textContent = task.traceback || '';
    renderActions();
  }

  function renderEvents() {
    clear(evBody);
    for (const ev of events) {
      const details = Object.entries(ev).filter(([k]) => !COMMON.has(k))
        .map(([k, v]) => `${k}=${text(v)}`).join('  ');
      evBody.append(h('tr', { dataset: { type: ev.type, sid: ev.stream_id || '' } },
        h('td', { title: fmtTime(ev.timestamp) }, fmtClock(ev.timestamp)),
        h('td', null, ev.type), h('td', null, ev.hostname || ''),
        h('td', null, ev.task_state ? stateBadge(ev.task_state) : ''),
        h('td', { class: 'mono wrap' }, details.length > 400 ? `${details.slice(0, 399)}…`
          : details)));
    }
    evNote.textContent = events.length ? `${events.length} event${events.length === 1 ? ''
      : 's'}, live` : 'No events in the stream yet.';
  }

  async function load() {
    try {
      task = await getJson(`/api/task/info/${encodeURIComponent(uuid)}`);
      error.hidden = true;
      render();
    } catch (err) {
      error.hidden = false;
      error.textContent = err instanceof ApiError && err.status === 404
        ? 'Unknown task (not seen yet, or evicted). Its events will show here if they arrive.'
        : `Could not load the task: ${err.message}`;
    }
  }

  function startEvents() {
    const times = task ? [...TIME_FIELDS].map((f) => task[f]).filter(Number.isFinite) : [];
    const earliest = times.length ? Math.min(...times) : Date.now() / 1000;
    const since = `${Math.floor((earliest - REPLAY_MARGIN) * 1000)}-0`;
    stream = new EventStream({
      params: { uuid },
      since,
      onNotice: () => {
        evNote.textContent = 'Older events of this task were trimmed from the stream.';
      },
      onBatch: (batch) => {
        let fresh = false;
        for (const ev of batch) {
          if (seen.has(ev.stream_id)) continue;
          seen.add(ev.stream_id);
          events.push(ev);
          fresh = true;
        }
        if (!fresh) return;
        events.sort((a, b) => (a.timestamp - b.timestamp) || 0);
        renderEvents();
        if (timer === null) timer = setTimeout(() => { timer = null; load(); }, 300);
      },
    }).start();
    setTimeout(() => { if (!events.length) renderEvents(); }, 1500);
  }

  load().then(startEvents);
  return {
    unmount() {
      if (stream) stream.stop();
      if (timer !== null) clearTimeout(timer);
    },
  };
}
