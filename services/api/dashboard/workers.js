// Workers: a live table of every worker, and one worker's page with its inspect data and
// control actions (hidden when the caller may not use them).
import { getJson, post } from './api.js';
import {
  batched, clear, fmtAgo, fmtDuration, fmtNumber, fmtTime, h, patchRows, text, toHash,
} from './util.js';

const REFRESH_MS = 10000;
const EVENT_COLUMNS = ['task-received', 'task-started', 'task-succeeded', 'task-failed',
  'task-retried', 'task-revoked', 'task-rejected'];

/** Worker state kept live from /api/stats/workers and the event stream. */
class WorkerState {
  constructor() {
    this.workers = new Map();
    this.inspect = {};
    this.skew = 0; // server clock - browser clock (seconds)
    this.loaded = false;
  }

  now() { return Date.now() / 1000 + this.skew; }

  async load(workername) {
    const params = workername ? { workername } : undefined;
    const [stats, inspect] = await Promise.all([
      getJson('/api/stats/workers'),
      getJson('/api/workers', params).catch((err) => {
        if (err.status === 404) return {};
        throw err;
      }),
    ]);
    this.skew = stats.time - Date.now() / 1000;
    this.workers = new Map(stats.workers.map((w) => [w.hostname, w]));
    this.inspect = inspect;
    this.loaded = true;
  }

  /** Apply events; true when something shown changed. */
  apply(batch) {
    let changed = false;
    for (const ev of batch) {
      const host = ev.hostname;
      if (!host) continue;
      let w = this.workers.get(host);
      if (!w) {
        w = { hostname: host, alive: false, events: {}, executing: 0, lost: 0, freq: 60,
          last_heartbeat: null };
        this.workers.set(host, w);
      }
      if (ev.type === 'task-lost') {
        // Pollen's announcement about the worker (that died), not an event it sent: it says
        // nothing of its liveness and is no event by type; each one marks or clears one task
        w.lost = Math.max(0, (w.lost || 0) + (ev.lost ? 1 : -1));
        changed = true;
        continue;
      }
      w.events[ev.type] = (w.events[ev.type] || 0) + 1;
      changed = true;
      if (ev.type.startsWith('worker-')) {
        for (const f of ['active', 'processed', 'loadavg', 'freq', 'sw_ident', 'sw_ver',
          'sw_sys', 'pid']) {
          if (ev[f] !== undefined) w[f] = ev[f];
        }
        // as Flower: executing is what the worker's heartbeat says
        if (ev.active !== undefined) w.executing = ev.active;
        if (ev.type === 'worker-offline') {
          w.alive = false;
        } else {
          w.alive = true;
          w.last_heartbeat = ev.local_received || ev.timestamp;
        }
      } else if (ev.type.startsWith('task-')) {
        if (ev.type !== 'task-sent') {
          w.alive = true;
          w.last_heartbeat = Math.max(w.last_heartbeat || 0, ev.timestamp || 0);
        }
      }
    }
    return changed;
  }

  /** celery's Worker.alive from the newest heartbeat we know (2 x freq). */
  tick() {
    let changed = false;
    const now = this.now();
    for (const w of this.workers.values()) {
      const alive = w.last_heartbeat !== null && now < w.last_heartbeat + (w.freq || 60) * 2;
      if (w.alive && !alive) { w.alive = false; changed = true; }
    }
    return changed;
  }
}

function statusDot(alive) {
  return h('span', { class: `dot ${alive ? 'online' : 'offline'}`,
    dataset: { status: alive ? 'online' : 'offline' } }, alive ? 'online' : 'offline');
}

function load(loadavg) {
  return Array.isArray(loadavg) ? loadavg.map((v) => Number(v).toFixed(2)).join(' ') : '';
}

function pool(stats) {
  const p = stats && stats.pool;
  if (!p) return '';
  // 'celery.concurrency.prefork:TaskPool' -> 'prefork'
  const impl = String(p.implementation || '').split(':')[0].split('.').pop();
  const procs = Array.isArray(p.processes) ? p.processes.length : p['max-concurrency'];
  return `${impl || 'pool'} × ${procs ?? '?'}`;
}

function queues(info) {
  return (info && Array.isArray(info.active_queues))
    ? info.active_queues.map((q) => q.name).join(', ') : '';
}

export function workersView(el, { app }) {
  const state = new WorkerState();
  const body = h('tbody');
  const note = h('p', { class: 'muted' }, 'Loading workers…');
  el.append(
    h('div', { class: 'toolbar' }, h('h2', null, 'Workers'), note),
    h('div', { class: 'table-wrap' }, h('table', { class: 'grid-table', id: 'workers' },
      h('thead', null, h('tr', null,
        ['Status', 'Worker', 'Executing', 'Active', 'Processed', 'Lost', 'Load', 'Pool', 'Queues',
          'Registered', ...EVENT_COLUMNS.map((c) => c.replace('task-', '')), 'Last heartbeat',
          'Version'].map((c) => h('th', null, c)))),
      body)),
  );

  const render = batched(() => {
    const rows = [...state.workers.values()].sort((a, b) =>
      (b.alive - a.alive) || a.hostname.localeCompare(b.hostname));
    note.textContent = rows.length ? `${rows.filter((w) => w.alive).length} online, `
      + `${rows.filter((w) => !w.alive).length} offline` : 'No workers seen yet.';
    patchRows(body, rows.map((w) => {
      const info = state.inspect[w.hostname] || {};
      const registered = Array.isArray(info.registered) ? info.registered.length : '';
      return h('tr', { dataset: { worker: w.hostname, key: w.hostname } },
        h('td', null, statusDot(w.alive)),
        h('td', null, h('a', { href: toHash(`/worker/${encodeURIComponent(w.hostname)}`) },
          w.hostname)),
        h('td', { class: 'num' }, fmtNumber(w.executing)),
        h('td', { class: 'num' }, fmtNumber(w.active)),
        h('td', { class: 'num' }, fmtNumber(w.processed)),
        h('td', { class: 'num lost-count', title: 'its tasks marked lost now' }, w.lost
          ? h('a', { href: toHash('/tasks', { workername: w.hostname, lost: '1' }) },
            fmtNumber(w.lost)) : fmtNumber(w.lost || 0)),
        h('td', { class: 'num' }, load(w.loadavg)),
        h('td', null, pool(info.stats)),
        h('td', null, queues(info)),
        h('td', { class: 'num' }, registered),
        EVENT_COLUMNS.map((c) => h('td', { class: `num ev-${c}` }, fmtNumber(w.events[c] || 0))),
        h('td', { title: fmtTime(w.last_heartbeat) }, fmtAgo(w.last_heartbeat, state.now())),
        h('td', null, w.sw_ver ? `${w.sw_ident || ''} ${w.sw_ver}` : ''),
      );
    }));
  });

  const refresh = () => state.load().then(render).catch((err) => {
    note.textContent = `Could not load workers: ${err.message}`;
  });
  const unsubscribe = app.subscribe((batch) => { if (state.loaded && state.apply(batch)) render(); });
  const timers = [setInterval(refresh, REFRESH_MS),
    setInterval(() => { state.tick(); render(); }, 1000)];
  refresh();
  return { unmount() { unsubscribe(); timers.forEach(clearInterval); } };
}

function section(title, ...content) {
  return h('section', { class: 'card' }, h('h3', null, title), ...content);
}

function kv(obj) {
  const entries = Object.entries(obj || {});
  if (!entries.length) return h('p', { class: 'muted' }, 'nothing');
  return h('table', { class: 'kv' }, h('tbody', null, entries.map(([k, v]) =>
    h('tr', null, h('th', null, k), h('td', null, h('code', null, text(v)))))));
}

function taskList(items) {
  if (!Array.isArray(items) || !items.length) return h('p', { class: 'muted' }, 'none');
  return h('ul', { class: 'plain' }, items.map((t) => {
    const req = t.request || t;
    const id = req.id || req.uuid || (typeof t === 'string' ? t : '');
    return h('li', null, h('a', { href: toHash(`/task/${encodeURIComponent(id)}`) }, id), ' ',
      h('span', { class: 'muted' }, req.name || ''));
  }));
}

export function workerView(el, { arg: name, app }) {
  const state = new WorkerState();
  const enc = encodeURIComponent(name);
  let busy = false;

  const numberInput = (id, value, min = 1) =>
    h('input', { type: 'number', id, value, min, class: 'small' });

  function controls(w, info) {
    if (!app.canControl) return null;
    const n = numberInput('pool-n', 1);
    const min = numberInput('autoscale-min', 1, 0);
    const max = numberInput('autoscale-max', 4, 1);
    const act = (title, line, path, params) => app.control(title, line, () => post(path, params))
      .then((answer) => { if (answer) setTimeout(refresh, 1000); });
    return section('Control',
      h('div', { class: 'controls', id: 'worker-controls' },
        h('div', { class: 'control-group' }, h('label', null, 'Pool processes ', n),
          h('button', { id: 'pool-grow', onclick: () => act('Grow pool',
            `Add ${n.value} process(es) to the pool of ${name}?`,
            `/api/worker/pool/grow/${enc}`, { n: n.value }) }, 'Grow'),
          h('button', { id: 'pool-shrink', onclick: () => act('Shrink pool',
            `Remove ${n.value} process(es) from the pool of ${name}?`,
            `/api/worker/pool/shrink/${enc}`, { n: n.value }) }, 'Shrink')),
        h('div', { class: 'control-group' }, h('label', null, 'Autoscale min ', min),
          h('label', null, ' max ', max),
          h('button', { id: 'autoscale', onclick: () => act('Autoscale',
            `Autoscale ${name} between ${min.value} and ${max.value} processes?`,
            `/api/worker/pool/autoscale/${enc}`, { min: min.value, max: max.value }) },
          'Apply')),
        // shutting a worker down is the admin role's (operators control, admins also stop)
        app.canShutdown ? h('div', { class: 'control-group' },
          h('button', { id: 'shutdown', class: 'danger', onclick: () => act('Shut down worker',
            `Shut down ${name}? It will not come back by itself.`,
            `/api/worker/shutdown/${enc}`) }, 'Shut down')) : null));
  }

  function queueSection(info) {
    const list = Array.isArray(info.active_queues) ? info.active_queues : [];
    const act = (title, line, path, params) => app.control(title, line, () => post(path, params))
      .then((answer) => { if (answer) setTimeout(refresh, 1000); });
    const add = h('input', { id: 'consumer-queue', placeholder: 'queue name' });
    return section('Queues',
      list.length ? h('table', { class: 'grid-table', id: 'worker-queues' },
        h('thead', null, h('tr', null, ['Queue', 'Exchange', 'Routing key', ''].map((c) =>
          h('th', null, c)))),
        h('tbody', null, list.map((q) => h('tr', { dataset: { queue: q.name } },
          h('td', null, q.name),
          h('td', null, q.exchange ? `${q.exchange.name} (${q.exchange.type})` : ''),
          h('td', null, q.routing_key || ''),
          h('td', null, app.canControl ? h('button', { class: 'secondary control',
            onclick: () => act('Cancel consumer', `Stop ${name} consuming from ${q.name}?`,
              `/api/worker/queue/cancel-consumer/${enc}`, { queue: q.name }) },
          'Cancel consumer') : null)))))
        : h('p', { class: 'muted' }, 'No inspect answer yet.'),
      app.canControl ? h('div', { class: 'controls control' }, add,
        h('button', { id: 'add-consumer', onclick: () => add.value.trim() && act('Add consumer',
          `Make ${name} consume from ${add.value.trim()}?`,
          `/api/worker/queue/add-consumer/${enc}`, { queue: add.value.trim() }) },
        'Add consumer')) : null);
  }

  function render() {
    const w = state.workers.get(name) || { hostname: name, events: {} };
    const info = state.inspect[name] || {};
    const stats = info.stats || {};
    const registered = Array.isArray(info.registered) ? info.registered : [];
    clear(el);
    el.append(
      h('div', { class: 'toolbar' }, h('a', { href: '#/workers' }, '← Workers'),
        h('h2', null, name), statusDot(w.alive),
        h('a', { href: toHash('/tasks', { workername: name }) }, 'its tasks'),
        w.lost ? h('a', { href: toHash('/tasks', { workername: name, lost: '1' }),
          id: 'lost-tasks' }, `its lost tasks (${fmtNumber(w.lost)})`) : null),
      h('div', { class: 'cards' },
        section('Status', kv({
          'last heartbeat': w.last_heartbeat ? `${fmtTime(w.last_heartbeat)} (${fmtAgo(
            w.last_heartbeat, state.now())})` : 'never',
          executing: w.executing, active: w.active, processed: w.processed, lost: w.lost,
          load: load(w.loadavg), pid: w.pid ?? stats.pid, 'heartbeat every': fmtDuration(w.freq),
          software: w.sw_ver ? `${w.sw_ident} ${w.sw_ver} (${w.sw_sys})` : '',
          uptime: stats.uptime !== undefined ? fmtDuration(stats.uptime) : '',
          'inspected at': info.timestamp ? fmtTime(info.timestamp) : 'not yet',
        })),
        controls(w, info),
        section('Pool', kv(stats.pool || {})),
        section('Events by type', kv(w.events)),
        queueSection(info),
        section(`Registered tasks (${registered.length})`, registered.length
          ? h('ul', { class: 'plain', id: 'registered' }, registered.map((t) => h('li', null,
            h('a', { href: toHash('/tasks', { taskname: String(t).split(' ')[0] }) }, t))))
          : h('p', { class: 'muted' }, 'No inspect answer yet.')),
        section('Processed by task (since start)', kv(stats.total || {})),
        section('Active', taskList(info.active)),
        section('Reserved', taskList(info.reserved)),
        section('Scheduled', taskList(info.scheduled)),
        section('Broker', kv(stats.broker || {})),
        section('Configuration', kv(info.conf || {})),
      ),
    );
  }

  const draw = batched(() => { if (!busy) render(); });
  async function refresh() {
    try {
      await state.load(name);
      render();
    } catch (err) {
      clear(el).append(h('p', { class: 'error' }, `Could not load ${name}: ${err.message}`));
    }
  }
  // typing in an input of this page must not be interrupted by a live re-render
  el.addEventListener('focusin', () => { busy = true; });
  el.addEventListener('focusout', () => { busy = false; });
  const unsubscribe = app.subscribe((batch) => {
    const mine = batch.filter((ev) => ev.hostname === name);
    if (state.loaded && mine.length && mine.some((ev) => ev.type.startsWith('worker-')
      || ev.type === 'task-lost')) {
      state.apply(mine);
      draw();
    } else if (state.loaded) {
      state.apply(mine);
    }
  });
  const timer = setInterval(() => { if (!busy) refresh(); }, REFRESH_MS);
  refresh();
  return { unmount() { unsubscribe(); clearInterval(timer); } };
}
