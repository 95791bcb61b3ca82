// Tasks: a page of /api/tasks with server-side filters, sorting, Flower's search syntax and
// cursor paging. Rows update in place from the event stream; the first page is refetched
// (throttled) as events arrive, so new and finished tasks show up without a reload.
import { download, get, getJson } from './api.js';
import { bulkPanel } from './bulk.js';
import {
  STATES, batched, clear, fmtDuration, fmtTime, h, lostBadge, paramValues, patchRows, short,
  stateBadge, text, toHash,
} from './util.js';

const COLUMNS_KEY = 'pollen.task-columns';
const MIN_GAP_MS = 300;

const link = (uuid, label) => h('a', { href: toHash(`/task/${encodeURIComponent(uuid)}`) },
  label ?? uuid);
const time = (f) => ({ label: f, render: (t) => fmtTime(t[f]), cls: 'time' });

export const COLUMNS = {
  name: { label: 'name', sort: 'name', render: (t) => t.name || '' },
  uuid: { label: 'uuid', render: (t) => link(t.uuid), cls: 'mono' },
  state: { label: 'state', sort: 'state',
    render: (t) => [stateBadge(t.state), t.lost ? [' ', lostBadge(t.lost_at)] : null] },
  args: { label: 'args', render: (t) => short(t.args, 60), cls: 'mono' },
  kwargs: { label: 'kwargs', render: (t) => short(t.kwargs, 60), cls: 'mono' },
  result: { label: 'result', render: (t) => short(t.result, 60), cls: 'mono' },
  exception: { label: 'exception', render: (t) => short(t.exception, 80), cls: 'mono' },
  received: { ...time('received'), sort: 'received' },
  started: { ...time('started'), sort: 'started' },
  succeeded: time('succeeded'),
  failed: time('failed'),
  retried: time('retried'),
  revoked: time('revoked'),
  timestamp: time('timestamp'),
  eta: { label: 'eta', render: (t) => text(t.eta) },
  expires: { label: 'expires', render: (t) => text(t.expires) },
  runtime: { label: 'runtime', render: (t) => fmtDuration(t.runtime), cls: 'num' },
  worker: { label: 'worker', render: (t) => t.worker || '' },
  retries: { label: 'retries', render: (t) => text(t.retries), cls: 'num' },
  routing_key: { label: 'routing key', render: (t) => text(t.routing_key) },
  root_id: { label: 'root', render: (t) => (t.root_id ? link(t.root_id) : ''), cls: 'mono' },
  parent_id: { label: 'parent', render: (t) => (t.parent_id ? link(t.parent_id) : ''),
    cls: 'mono' },
};
const DEFAULT_COLUMNS = ['name', 'uuid', 'state', 'args', 'result', 'received', 'started',
  'runtime', 'worker'];
const SORTS = [
  ['', 'newest event first'], ['-received', 'received, newest'], ['received', 'received, oldest'],
  ['-started', 'started, newest'], ['started', 'started, oldest'], ['name', 'name A→Z'],
  ['-name', 'name Z→A'], ['state', 'state A→Z'], ['-state', 'state Z→A'],
];
/** Fields an event sets on the task (besides state), by event type. */
const EVENT_FIELDS = {
  'task-received': ['args', 'kwargs', 'eta', 'expires', 'retries', 'root_id', 'parent_id'],
  'task-succeeded': ['result', 'runtime'],
  'task-failed': ['exception', 'traceback'],
  'task-retried': ['exception', 'traceback'],
};
const EVENT_TIME = {
  'task-received': 'received', 'task-started': 'started', 'task-succeeded': 'succeeded',
  'task-failed': 'failed', 'task-retried': 'retried', 'task-revoked': 'revoked',
  'task-rejected': 'rejected', 'task-sent': 'sent',
};

function chosenColumns() {
  try {
    const saved = JSON.parse(localStorage.getItem(COLUMNS_KEY) || 'null');
    if (Array.isArray(saved)) {
      const known = saved.filter((c) => COLUMNS[c]);
      if (known.length) return known;
    }
  } catch { /* fall back to the defaults */ }
  return [...DEFAULT_COLUMNS];
}

/** epoch seconds -> the value of an <input type=datetime-local> in the user's zone */
function toLocalInput(epoch) {
  if (!epoch) return '';
  const d = new Date(Number(epoch) * 1000);
  if (Number.isNaN(d.getTime())) return '';
  const p = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:`
    + `${p(d.getMinutes())}`;
}

function fromLocalInput(value) {
  if (!value) return '';
  const t = new Date(value).getTime();
  return Number.isFinite(t) ? String(Math.floor(t / 1000)) : '';
}

/** Apply one stream event to a task as /api/tasks shows it. */
export function applyEvent(task, ev) {
  if (ev.task_state) task.state = ev.task_state;
  if (ev.type === 'task-lost') {
    // Pollen's mark, not an event of the task: its hostname is the worker that lost it (not
    // the task's worker once cleared) and its timestamp that death (not the task's newest)
    if (ev.lost) {
      task.lost = true;
      task.lost_at = ev.lost_at;
    } else {
      delete task.lost;
      delete task.lost_at;
    }
    return;
  }
  const f = EVENT_TIME[ev.type];
  if (f) task[f] = ev.timestamp;
  for (const k of EVENT_FIELDS[ev.type] || []) if (ev[k] !== undefined) task[k] = ev[k];
  if (ev.task_name) task.name = ev.task_name;
  if (ev.type !== 'task-sent' && ev.hostname) task.worker = ev.hostname;
  task.timestamp = Math.max(task.timestamp || 0, ev.timestamp || 0);
}

export function tasksView(el, { params, app }) {
  const filters = paramValues(params, {
    state: '', taskname: '', workername: '', search: '', received_start: '', received_end: '',
    sort_by: '', limit: '25', lost: '', exception: '',
  });
  let columns = chosenColumns();
  const cursors = [null]; // cursors[i]: the cursor of page i (null: the first page)
  let nextCursor = null;
  let tasks = new Map(); // uuid -> task of this page, in order
  let inflight = false;
  let again = false;
  let lastRun = 0;
  let lastCost = 0;
  let timer = null;
  const missed = new Set(); // uuids of new tasks not shown (while on a later page)
  let controller = null;

  const setHash = () => {
    history.replaceState(null, '', toHash('/tasks', filters));
  };

  const select = (id, options, value, onchange) => h('select', { id, onchange },
    options.map(([v, label]) => h('option', { value: v, selected: v === value || null }, label)));

  const stateSel = select('f-state', [['', 'any state'], ...STATES.map((s) => [s, s])],
    filters.state, (e) => change('state', e.target.value));
  const nameSel = select('f-taskname', [['', 'any task']], filters.taskname,
    (e) => change('taskname', e.target.value));
  const workerSel = select('f-worker', [['', 'any worker']], filters.workername,
    (e) => change('workername', e.target.value));
  const sortSel = select('f-sort', SORTS, filters.sort_by, (e) => change('sort_by', e.target.value));
  const limitSel = select('f-limit', ['10', '25', '50', '100', '200'].map((n) => [n, `${n} / page`]),
    filters.limit, (e) => change('limit', e.target.value));
  const search = h('input', { id: 'f-search', type: 'search', value: filters.search,
    placeholder: 'search: words, name:…, args:…, result:…, state:FAILURE, kwargs:k=v, AND, OR',
    onkeydown: (e) => { if (e.key === 'Enter') change('search', search.value.trim()); },
    onchange: () => change('search', search.value.trim()) });
  const from = h('input', { id: 'f-from', type: 'datetime-local',
    value: toLocalInput(filters.received_start),
    onchange: (e) => change('received_start', fromLocalInput(e.target.value)) });
  const to = h('input', { id: 'f-to', type: 'datetime-local',
    value: toLocalInput(filters.received_end),
    onchange: (e) => change('received_end', fromLocalInput(e.target.value)) });
  const lostOnly = h('label', { title: 'RECEIVED or STARTED on a worker that died' },
    h('input', { type: 'checkbox', id: 'f-lost', checked: filters.lost === '1' || null,
      onchange: (e) => change('lost', e.target.checked ? '1' : '') }), ' Lost only');
  // set from the failures view's links: the tasks of one exception class
  const exceptionChip = h('button', { class: 'secondary', type: 'button', id: 'f-exception',
    hidden: !filters.exception || null, title: 'show tasks of every exception class',
    onclick: () => { exceptionChip.hidden = true; change('exception', ''); } },
  `exception: ${filters.exception} ✕`);
  const info = h('span', { class: 'muted', id: 'tasks-info' });
  const error = h('p', { class: 'error', id: 'tasks-error', hidden: true });
  const head = h('thead');
  const body = h('tbody');
  const newer = h('button', { id: 'page-newer', class: 'secondary', onclick: () => page(-1) },
    '← Newer');
  const older = h('button', { id: 'page-older', class: 'secondary', onclick: () => page(1) },
    'Older →');
  const pageLabel = h('span', { class: 'muted', id: 'page-label' });
  const banner = h('button', { class: 'link', id: 'new-tasks', hidden: true,
    onclick: () => { cursors.length = 1; refresh(); } });
  const picker = h('div', { class: 'column-picker', id: 'column-picker', hidden: true });
  const pickerButton = h('button', { class: 'secondary', id: 'columns-button', type: 'button',
    onclick: () => { picker.hidden = !picker.hidden; } }, 'Columns');
  // every task of the filters, not only this page: /api/tasks/export walks the whole query
  const exportButton = (format) => h('button', { class: 'secondary', type: 'button',
    id: `export-${format}`, title: `Every task of these filters, as ${format.toUpperCase()}`,
    onclick: async () => {
      const { limit, ...query } = filters;
      try {
        error.hidden = true;
        await download('/api/tasks/export', { ...query, format }, `tasks.${format}`);
      } catch (e) {
        error.textContent = `Export failed: ${e.message}`;
        error.hidden = false;
      }
    } }, `Export ${format.toUpperCase()}`);

  // the filters without the page's own size and position
  const bulk = bulkPanel({ app, onDone: () => refresh(),
    query: () => { const { limit, ...query } = filters; return query; } });
  const bulkButton = h('button', { class: 'secondary control', type: 'button', id: 'bulk-button',
    title: 'Revoke or re-send every task of these filters', hidden: !app.canControl || null,
    onclick: () => { bulk.hidden = !bulk.hidden; } }, 'Bulk…');

  el.append(
    h('div', { class: 'toolbar' }, h('h2', null, 'Tasks'), info, banner),
    h('form', { class: 'filters', onsubmit: (e) => { e.preventDefault(); } },
      stateSel, nameSel, workerSel, lostOnly, exceptionChip, search,
      h('label', null, 'received from ', from), h('label', null, 'to ', to), sortSel, limitSel,
      pickerButton, exportButton('csv'), exportButton('ndjson'), bulkButton,
      h('button', { class: 'link', type: 'button', id: 'f-reset',
        onclick: () => { location.hash = '#/tasks'; } }, 'reset')),
    picker, bulk, error,
    h('div', { class: 'table-wrap' }, h('table', { class: 'grid-table', id: 'tasks' }, head, body)),
    h('div', { class: 'pager' }, newer, pageLabel, older),
  );

  function renderPicker() {
    clear(picker);
    for (const [key, col] of Object.entries(COLUMNS)) {
      picker.append(h('label', null, h('input', { type: 'checkbox', value: key,
        checked: columns.includes(key) || null,
        onchange: (e) => {
          columns = e.target.checked ? [...columns, key] : columns.filter((c) => c !== key);
          columns = Object.keys(COLUMNS).filter((c) => columns.includes(c));
          localStorage.setItem(COLUMNS_KEY, JSON.stringify(columns));
          renderHead();
          renderBody(new Set());
        } }), ` ${col.label}`));
    }
  }

  function renderHead() {
    clear(head).append(h('tr', null, columns.map((c) => {
      const col = COLUMNS[c];
      if (!col.sort) return h('th', { dataset: { col: c } }, col.label);
      const active = filters.sort_by.replace('-', '') === col.sort;
      const desc = filters.sort_by.startsWith('-');
      return h('th', { dataset: { col: c }, class: 'sortable' },
        h('button', { class: 'link', onclick: () => change('sort_by',
          active && !desc ? `-${col.sort}` : col.sort) },
        col.label, active ? (desc ? ' ▼' : ' ▲') : ''));
    })));
  }

  function row(task, fresh) {
    return h('tr', { dataset: { uuid: task.uuid, state: task.state, key: task.uuid,
      lost: task.lost ? 'true' : 'false' },
      class: fresh ? 'fresh' : '' },
      columns.map((c) => h('td', { class: COLUMNS[c].cls || '', dataset: { col: c } },
        COLUMNS[c].render(task))));
  }

  function renderBody(before) {
    if (!tasks.size) {
      clear(body).append(h('tr', { dataset: { key: '' } }, h('td', { colspan: columns.length,
        class: 'muted empty' }, 'No tasks match.')));
      return;
    }
    patchRows(body, [...tasks.values()].map((task) =>
      row(task, before.size && !before.has(task.uuid))));
  }

  const redraw = batched(() => renderBody(new Set()));

  function change(key, value) {
    if (filters[key] === value) return;
    filters[key] = value;
    cursors.length = 1;
    // the page shown is of the old filters: its cursor must not page the new ones
    nextCursor = null;
    older.disabled = true;
    setHash();
    renderHead();
    refresh();
  }

  function page(delta) {
    if (delta > 0 && nextCursor) cursors.push(nextCursor);
    else if (delta < 0 && cursors.length > 1) cursors.pop();
    else return;
    refresh();
  }

  let seq = 0;
  /** Fetch the page now; a request still running for an older state of the view is dropped. */
  async function refresh() {
    if (controller) controller.abort();
    const mine = ++seq;
    inflight = true;
    again = false;
    const started = performance.now();
    const ctl = new AbortController();
    controller = ctl;
    try {
      const query = { ...filters };
      const cursor = cursors[cursors.length - 1];
      if (cursor) query.cursor = cursor;
      const { data, headers } = await get('/api/tasks', query, ctl.signal);
      if (mine !== seq) return;
      const before = new Set(tasks.keys());
      tasks = new Map(Object.entries(data).map(([uuid, t]) => [uuid, { uuid, ...t }]));
      nextCursor = headers.get('X-Pollen-Next-Cursor');
      const examined = headers.get('X-Pollen-Examined');
      const capped = headers.get('X-Pollen-Scan-Capped') === 'true';
      info.textContent = `${tasks.size} shown${examined && examined !== '0'
        ? `, ${Number(examined).toLocaleString()} examined` : ''}${capped
        ? ' (scan limit reached: narrow the filters)' : ''}`;
      error.hidden = true;
      renderBody(cursors.length === 1 ? before : new Set());
      newer.disabled = cursors.length === 1;
      older.disabled = !nextCursor;
      pageLabel.textContent = `page ${cursors.length}`;
      if (cursors.length === 1) { missed.clear(); banner.hidden = true; }
    } catch (err) {
      if (err.name !== 'AbortError' && mine === seq) {
        error.textContent = err.message;
        error.hidden = false;
      }
    } finally {
      if (mine === seq) {
        inflight = false;
        lastRun = performance.now();
        lastCost = lastRun - started;
        controller = null;
        if (again) schedule();
      }
    }
  }

  /** Refetch the first page soon, at most every MIN_GAP_MS (longer when queries are slow). */
  function schedule() {
    if (timer !== null) return;
    if (inflight) { again = true; return; }
    const gap = Math.max(MIN_GAP_MS, lastCost * 2);
    const wait = Math.max(0, lastRun + gap - performance.now());
    timer = setTimeout(() => { timer = null; refresh(); }, wait);
  }

  function onEvents(batch) {
    let visible = false;
    let relevant = false;
    for (const ev of batch) {
      if (!ev.type.startsWith('task-') || !ev.uuid) continue;
      const task = tasks.get(ev.uuid);
      if (task) {
        applyEvent(task, ev);
        visible = true;
      }
      if (filters.taskname && ev.task_name
        && ev.task_name.toLowerCase() !== filters.taskname.toLowerCase()) continue;
      relevant = true;
      if (!task && (ev.type === 'task-sent' || ev.type === 'task-received'
        || (filters.lost && ev.type === 'task-lost' && ev.lost))) missed.add(ev.uuid);
    }
    if (visible) redraw();
    if (!relevant) return;
    if (cursors.length === 1) schedule();
    else if (missed.size) {
      const n = missed.size;
      banner.textContent = `${n} new task${n === 1 ? '' : 's'}: show newest`;
      banner.hidden = false;
    }
  }

  async function options() {
    try {
      const [types, workers] = await Promise.all([getJson('/api/task/types'),
        getJson('/api/workers', { status: 1 })]);
      for (const name of types['task-types'] || []) {
        nameSel.append(h('option', { value: name, selected: name === filters.taskname || null },
          name));
      }
      for (const name of Object.keys(workers).sort()) {
        workerSel.append(h('option', { value: name,
          selected: name === filters.workername || null }, name));
      }
    } catch { /* the table reports errors */ }
  }

  renderPicker();
  renderHead();
  options();
  refresh();
  const unsubscribe = app.subscribe(onEvents);
  return {
    unmount() {
      unsubscribe();
      if (timer !== null) clearTimeout(timer);
      if (controller) controller.abort();
    },
  };
}
