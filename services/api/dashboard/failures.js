// Failures: failed and retried tasks grouped by exception class (/api/failures), the latest
// first, each with a sparkline of its events per minute, the task names and workers it hit,
// and links to its tasks (/tasks?exception=...). Refreshed as failure events arrive.
import { getJson } from './api.js';
import { clear, fmtAgo, fmtNumber, fmtTime, h, s, toHash } from './util.js';

const MINUTES = 60;
const REFRESH_MS = 10000;
const MIN_GAP_MS = 1000;
const TOP = 3;

/** An SVG sparkline of counts, oldest first: one bar per minute. */
function sparkline(counts) {
  const width = 180;
  const height = 28;
  const max = Math.max(1, ...counts);
  const step = width / counts.length;
  return s('svg', { class: 'sparkline', width, height, viewBox: `0 0 ${width} ${height}`,
    role: 'img', 'aria-label': `${counts.reduce((a, b) => a + b, 0)} in the last ${counts.length} minutes` },
  counts.map((n, i) => (n ? s('rect', { x: (i * step).toFixed(1), width: Math.max(1, step - 1).toFixed(1),
    y: (height - (n / max) * height).toFixed(1), height: ((n / max) * height).toFixed(1) }) : null)));
}

const top = (counts) => {
  const entries = Object.entries(counts);
  const shown = entries.slice(0, TOP).map(([k, n]) => `${k} (${fmtNumber(n)})`).join(', ');
  return entries.length > TOP ? `${shown}, +${entries.length - TOP} more` : shown;
};

export function failuresView(el, { app }) {
  const info = h('span', { class: 'muted', id: 'failures-info' });
  const error = h('p', { class: 'error', id: 'failures-error', hidden: true });
  const body = h('tbody');
  el.append(
    h('div', { class: 'toolbar' }, h('h2', null, 'Failures'), info),
    error,
    h('div', { class: 'table-wrap' }, h('table', { class: 'grid-table', id: 'failures' },
      h('thead', null, h('tr', null, ['exception', 'events', `last ${MINUTES} min`, 'last seen',
        'first seen', 'tasks', 'workers', ''].map((t) => h('th', null, t)))),
      body)),
  );

  let inflight = false;
  let lastRun = 0;
  async function load() {
    if (inflight) return;
    inflight = true;
    lastRun = Date.now();
    try {
      const data = await getJson('/api/failures', { minutes: MINUTES });
      error.hidden = true;
      clear(body);
      if (!data.classes.length) {
        body.append(h('tr', null, h('td', { colspan: 8, class: 'muted empty' },
          'No failed or retried task seen.')));
      }
      for (const c of data.classes) {
        const link = (label, params) => h('a', { href: toHash('/tasks',
          { exception: c.exception, ...params }) }, label);
        body.append(h('tr', { dataset: { exception: c.exception } },
          h('td', { class: 'mono', dataset: { col: 'exception' } }, c.exception),
          h('td', { class: 'num', dataset: { col: 'count' },
            title: `${c.failed} failed, ${c.retried} retried` },
          fmtNumber(c.count), c.retried ? h('span', { class: 'muted' }, ` (${fmtNumber(c.retried)} retries)`) : null),
          h('td', { dataset: { col: 'spark' } }, sparkline(c.per_minute)),
          h('td', { title: fmtTime(c.last_seen) }, fmtAgo(c.last_seen)),
          h('td', { class: 'time' }, fmtTime(c.first_seen)),
          h('td', { dataset: { col: 'names' } }, top(c.task_names)),
          h('td', { dataset: { col: 'workers' } }, top(c.workers)),
          h('td', null, link(`${fmtNumber(c.tasks_kept)} tasks →`, {}))));
      }
      info.textContent = `${data.classes.length} exception classes`;
    } catch (e) {
      error.textContent = e.message;
      error.hidden = false;
    } finally {
      inflight = false;
    }
  }

  let pending = null;
  const unsubscribe = app.subscribe((batch) => {
    if (!batch.some((ev) => ev.type === 'task-failed' || ev.type === 'task-retried')) return;
    if (pending) return;
    pending = setTimeout(() => { pending = null; load(); },
      Math.max(0, MIN_GAP_MS - (Date.now() - lastRun)));
  });
  const timer = setInterval(load, REFRESH_MS);
  load();
  return { unmount() { unsubscribe(); clearInterval(timer); if (pending) clearTimeout(pending); } };
}
