// Charts: tasks per minute by state and by task name, failure rate, runtime and wait
// percentiles per task name (in the range, beside a day before), queue lengths over time and
// each queue now (waiting, consumers, oldest message), from /api/stats/* and /api/queues/*,
// kept live by counting the stream's task events into the current minute between refreshes.
import { getJson } from './api.js';
import { PALETTE, lines, runtimeBars, stackedBars } from './charts.js';
import { fmtDuration, fmtNumber, h, toHash } from './util.js';

const REFRESH_MS = 15000;
const RANGES = [[15, 'last 15 minutes'], [60, 'last hour'], [360, 'last 6 hours'],
  [1440, 'last 24 hours']];
export const STATE_COLORS = {
  SUCCESS: '#16a34a', FAILURE: '#dc2626', RETRY: '#d97706', REVOKED: '#6b7280',
  REJECTED: '#7c3aed', STARTED: '#2563eb', RECEIVED: '#60a5fa', PENDING: '#94a3b8',
};
const FINISHED = ['SUCCESS', 'FAILURE', 'RETRY', 'REVOKED', 'REJECTED'];
const SUBJECT_STATE = {
  'task-sent': 'PENDING', 'task-received': 'RECEIVED', 'task-started': 'STARTED',
  'task-succeeded': 'SUCCESS', 'task-failed': 'FAILURE', 'task-retried': 'RETRY',
  'task-revoked': 'REVOKED', 'task-rejected': 'REJECTED',
};
const TOP_NAMES = 8;
const TOP_WAITS = 12;
const STAGES = { queue: 'in queue', prefetch: 'at worker' };
const PERCENTILES = [{ label: 'p50', color: '#93c5fd' }, { label: 'p95', color: '#3b82f6' },
  { label: 'p99', color: '#1e3a8a' }, { label: 'p95 a day before', color: '#d1d5db' }];

export function chartsView(el, { params, app }) {
  let minutes = Number(params.get('minutes')) || 60;
  if (!RANGES.some(([m]) => m === minutes)) minutes = 60;
  let perMinute = null; // {start, step, minutes, series: [{task, state, counts}]}
  let runtime = null;
  let waits = null;
  let queues = { times: [], names: [], values: {} };
  let queuesNow = [];
  let dirty = false;

  const range = h('select', { id: 'chart-range', onchange: (e) => {
    minutes = Number(e.target.value);
    history.replaceState(null, '', toHash('/charts', { minutes }));
    load();
  } }, RANGES.map(([m, label]) => h('option', { value: m, selected: m === minutes || null },
    label)));
  const totals = h('div', { class: 'totals', id: 'chart-totals' });
  const boxes = {
    byState: h('div', { class: 'card chart-box', id: 'chart-by-state' }),
    byName: h('div', { class: 'card chart-box', id: 'chart-by-name' }),
    failure: h('div', { class: 'card chart-box', id: 'chart-failure-rate' }),
    runtime: h('div', { class: 'card chart-box', id: 'chart-runtime' }),
    wait: h('div', { class: 'card chart-box', id: 'chart-wait' }),
    queues: h('div', { class: 'card chart-box', id: 'chart-queues' }),
    queuesNow: h('div', { class: 'card chart-box', id: 'chart-queues-now' }),
  };
  const error = h('p', { class: 'error', hidden: true });
  el.append(
    h('div', { class: 'toolbar' }, h('h2', null, 'Charts'), range, totals),
    error,
    h('div', { class: 'cards charts' }, Object.values(boxes)),
  );

  function sum(state, name) {
    const out = new Array(perMinute.minutes).fill(0);
    for (const sr of perMinute.series) {
      if (state && sr.state !== state) continue;
      if (!state && !FINISHED.includes(sr.state)) continue;
      if (name !== undefined && sr.task !== name) continue;
      sr.counts.forEach((v, i) => { out[i] += v; });
    }
    return out;
  }

  function draw() {
    dirty = false;
    if (!perMinute) return;
    const { start, step } = perMinute;
    const n = perMinute.minutes;
    stackedBars(boxes.byState, {
      title: 'Tasks finished per minute, by state', start, step, n,
      series: FINISHED.map((st) => ({ label: st, color: STATE_COLORS[st], values: sum(st) }))
        .filter((sr) => sr.values.some(Boolean)),
    });
    const byName = new Map();
    for (const sr of perMinute.series) {
      if (!FINISHED.includes(sr.state)) continue;
      const row = byName.get(sr.task) || new Array(n).fill(0);
      sr.counts.forEach((v, i) => { row[i] += v; });
      byName.set(sr.task, row);
    }
    const ranked = [...byName.entries()].map(([name, values]) => ({ name, values,
      total: values.reduce((a, b) => a + b, 0) })).sort((a, b) => b.total - a.total);
    const top = ranked.slice(0, TOP_NAMES);
    const rest = ranked.slice(TOP_NAMES);
    const nameSeries = top.map((r, i) => ({ label: r.name || '(unnamed)',
      color: PALETTE[i % PALETTE.length], values: r.values }));
    if (rest.length) {
      nameSeries.push({ label: `${rest.length} others`, color: '#9ca3af',
        values: rest.reduce((acc, r) => acc.map((v, i) => v + r.values[i]), new Array(n).fill(0)) });
    }
    stackedBars(boxes.byName, { title: 'Tasks finished per minute, by task name', start, step, n,
      series: nameSeries });
    const ok = sum('SUCCESS');
    const failed = sum('FAILURE');
    const times = ok.map((_, i) => start + i * step);
    const rate = ok.map((v, i) => (v + failed[i] ? (100 * failed[i]) / (v + failed[i]) : null));
    lines(boxes.failure, { title: 'Failure rate per minute (failed / finished)', times,
      series: [{ label: 'failure rate', color: STATE_COLORS.FAILURE, values: rate }],
      fmt: (v) => `${Math.round(v)}%`, max: 100 });
    const okTotal = ok.reduce((a, b) => a + b, 0);
    const failTotal = failed.reduce((a, b) => a + b, 0);
    const finished = FINISHED.reduce((acc, st) => acc + sum(st).reduce((a, b) => a + b, 0), 0);
    totals.replaceChildren(
      h('span', null, h('b', null, finished.toLocaleString()), ' finished'),
      h('span', null, h('b', null, failTotal.toLocaleString()), ' failed'),
      h('span', null, h('b', null, okTotal + failTotal
        ? `${((100 * failTotal) / (okTotal + failTotal)).toFixed(1)}%` : '–'), ' failure rate'),
    );
    const rangeText = RANGES.find(([m]) => m === minutes)[1];
    if (runtime) {
      // the same minutes a day earlier, for comparison
      const before = new Map(((runtime.day_before || {}).tasks || []).map((t) => [t.task, t]));
      const rows = runtime.tasks.filter((t) => t.count > 0)
        .sort((a, b) => (b.p50 || 0) - (a.p50 || 0))
        .map((t) => ({ label: t.task, values: [t.p50, t.p95, t.p99, before.get(t.task)?.p95],
          note: `(${t.count.toLocaleString()} runs)` }));
      runtimeBars(boxes.runtime, { title: `Runtime by task name (succeeded, ${rangeText})`,
        rows, measures: PERCENTILES });
    }
    if (waits) {
      // the longest waits first: where the queues back up
      const key = (w) => `${w.stage}\u001f${w.queue}\u001f${w.task}`;
      const before = new Map(((waits.day_before || {}).waits || []).map((w) => [key(w), w]));
      const rows = waits.waits.filter((w) => w.count > 0)
        .sort((a, b) => (b.p95 || 0) - (a.p95 || 0)).slice(0, TOP_WAITS)
        .map((w) => ({ label: `${w.task} ${STAGES[w.stage] || w.stage} (${w.queue || '?'})`,
          values: [w.p50, w.p95, w.p99, before.get(key(w))?.p95],
          note: `(${w.count.toLocaleString()})` }));
      runtimeBars(boxes.wait, { title: `Wait by task name and queue (${rangeText})`, rows,
        measures: PERCENTILES, empty: 'No task has waited yet.' });
    }
    lines(boxes.queues, { title: 'Queue lengths (messages waiting)', times: queues.times,
      series: queues.names.map((q, i) => ({ label: q, color: PALETTE[i % PALETTE.length],
        values: queues.values[q] })) });
    const now = Date.now() / 1000;
    const rows = queuesNow.map((q) => h('tr', { 'data-queue': q.name },
      h('td', null, q.name),
      h('td', { class: 'num' }, fmtNumber(q.messages)),
      h('td', { class: 'num' }, q.consumers === null ? '–' : fmtNumber(q.consumers)),
      h('td', { class: 'num oldest' }, oldestText(q.oldest, q.time, now))));
    const head = h('tr', null, ['queue', 'waiting', 'consumers', 'oldest message']
      .map((t) => h('th', null, t)));
    boxes.queuesNow.replaceChildren(
      h('h3', null, 'Queues now'),
      rows.length
        ? h('div', { class: 'table-wrap' }, h('table', { class: 'grid-table' },
          h('thead', null, head), h('tbody', null, rows)))
        : h('p', { class: 'muted chart-empty' }, 'No queue sampled yet.'),
    );
  }

  // the oldest message's age now (the sample's age plus the time since); '?' when the broker
  // cannot tell (RabbitMQ without timestamps, Redis without task-sent events)
  function oldestText(oldest, sampled, now) {
    if (!oldest) return '–';
    if (!Number.isFinite(oldest.age)) return '?';
    return fmtDuration(oldest.age + Math.max(0, now - (sampled || now)));
  }

  const redraw = () => { if (!dirty) { dirty = true; setTimeout(draw, 1000); } };

  let loading = false;
  async function load() {
    if (loading) return;
    loading = true;
    try {
      const [pm, rt, wt, qh, ql] = await Promise.all([
        getJson('/api/stats/tasks-per-minute', { minutes }),
        getJson('/api/stats/runtime', { minutes, compare: 1 }),
        getJson('/api/stats/wait', { minutes, compare: 1 }),
        getJson('/api/queues/history', { minutes }).catch(() => ({ history: [] })),
        getJson('/api/queues/length').catch(() => ({ active_queues: [] })),
      ]);
      perMinute = pm;
      runtime = rt;
      waits = wt;
      queuesNow = ql.active_queues;
      const points = [...qh.history];
      const now = ql.active_queues.filter((q) => Number.isFinite(q.messages));
      if (now.length) {
        points.push({ time: Math.max(...now.map((q) => q.time || 0)),
          queues: Object.fromEntries(now.map((q) => [q.name, q.messages])) });
      }
      const names = [...new Set(points.flatMap((p) => Object.keys(p.queues)))].sort();
      queues = { times: points.map((p) => p.time), names, values: Object.fromEntries(names.map(
        (q) => [q, points.map((p) => (p.queues[q] ?? null))])) };
      error.hidden = true;
      draw();
    } catch (err) {
      error.textContent = `Could not load chart data: ${err.message}`;
      error.hidden = false;
    } finally {
      loading = false;
    }
  }

  const unsubscribe = app.subscribe((batch) => {
    if (!perMinute) return;
    let changed = false;
    for (const ev of batch) {
      const state = SUBJECT_STATE[ev.type];
      if (!state || !Number.isFinite(ev.timestamp)) continue;
      const slot = Math.floor(ev.timestamp / 60) - perMinute.start / 60;
      if (slot < 0) continue;
      if (slot >= perMinute.minutes) { load(); return; } // a new minute: slide the window
      const name = ev.task_name || '';
      let sr = perMinute.series.find((x) => x.task === name && x.state === state);
      if (!sr) {
        sr = { task: name, state, counts: new Array(perMinute.minutes).fill(0) };
        perMinute.series.push(sr);
      }
      sr.counts[slot] += 1;
      changed = true;
    }
    if (changed) redraw();
  });
  const timer = setInterval(load, REFRESH_MS);
  load();
  return { unmount() { unsubscribe(); clearInterval(timer); } };
}
