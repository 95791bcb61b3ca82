// Pollen's dashboard: a hash router over its views, one live event stream shared by all of
// them, and the little chrome around (connection state, sign-in, confirmations, toasts).
import { ApiError, EventStream, getJson, setToken, token } from './api.js';
import { alertsView } from './alerts.js';
import { chartsView } from './chartsview.js';
import { failuresView } from './failures.js';
import { feedView } from './feed.js';
import { taskView } from './task.js';
import { tasksView } from './tasks.js';
import { TIME_ZONE, h, parseHash } from './util.js';
import { workerView, workersView } from './workers.js';

const ROUTES = [
  { re: /^\/workers$/, view: workersView, nav: 'workers' },
  { re: /^\/worker\/(.+)$/, view: workerView, nav: 'workers' },
  { re: /^\/tasks$/, view: tasksView, nav: 'tasks' },
  { re: /^\/task\/(.+)$/, view: taskView, nav: 'tasks' },
  { re: /^\/failures$/, view: failuresView, nav: 'failures' },
  { re: /^\/feed$/, view: feedView, nav: 'feed' },
  { re: /^\/charts$/, view: chartsView, nav: 'charts' },
  { re: /^\/alerts$/, view: alertsView, nav: 'alerts' },
];
/** Recent events of every kind, so the feed has something to show when opened. */
const RECENT_MAX = 2000;

const app = {
  canControl: false,
  canShutdown: false,
  who: null,
  recent: [],
  listeners: new Set(),
  stream: null,
  /** Subscribe to event batches; returns the unsubscribe function. */
  subscribe(fn) {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  },
  toast,
  confirm: confirmDialog,
  /** Run a control call after confirmation; toast its answer. */
  async control(title, textLine, call) {
    if (!(await confirmDialog(title, textLine))) return null;
    try {
      const answer = await call();
      toast(answer && answer.message ? answer.message : `${title}: done`, 'ok');
      return answer;
    } catch (err) {
      toast(`${title}: ${err.message}`, 'error');
      return null;
    }
  },
};
window.pollen = app; // for people poking around in the console, and for the tests

let current = null;

function route() {
  const { path, params } = parseHash(location.hash);
  for (const r of ROUTES) {
    const m = path.match(r.re);
    if (!m) continue;
    if (current && current.unmount) current.unmount();
    const el = document.getElementById('view');
    el.replaceChildren();
    el.dataset.view = r.nav;
    for (const a of document.querySelectorAll('nav a')) {
      a.classList.toggle('active', a.dataset.view === r.nav);
    }
    current = r.view(el, { params, arg: m[1] ? decodeURIComponent(m[1]) : null, app });
    return;
  }
  location.replace('#/workers');
}

function toast(message, kind = 'info') {
  const el = h('div', { class: `toast toast-${kind}`, role: 'status' }, message);
  document.getElementById('toasts').append(el);
  setTimeout(() => el.remove(), kind === 'error' ? 8000 : 4000);
}

function confirmDialog(title, message) {
  const dialog = document.getElementById('confirm');
  document.getElementById('confirm-title').textContent = title;
  document.getElementById('confirm-text').textContent = message;
  dialog.returnValue = '';
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => resolve(dialog.returnValue === 'ok'), { once: true });
  });
}

let signingIn = false;
function askToken(reason) {
  if (signingIn) return;
  signingIn = true;
  const dialog = document.getElementById('signin');
  document.getElementById('signin-reason').textContent = reason || 'This API needs a token.';
  dialog.showModal();
  dialog.addEventListener('close', () => {
    signingIn = false;
    const value = document.getElementById('signin-token').value.trim();
    if (value) {
      setToken(value);
      location.reload();
    }
  }, { once: true });
}

function setConn(state) {
  const el = document.getElementById('conn');
  el.dataset.state = state;
  el.textContent = state === 'live' ? 'live' : state;
  if (app.stream) el.dataset.connects = String(app.stream.connects);
}

function startStream() {
  let count = 0;
  app.stream = new EventStream({
    onStatus: setConn,
    onNotice: (ev) => toast(`Some events were trimmed from the stream before they could be `
      + `shown (shard ${ev.shard}).`, 'error'),
    onBatch: (batch) => {
      count += batch.length;
      app.recent.push(...batch);
      if (app.recent.length > RECENT_MAX) app.recent.splice(0, app.recent.length - RECENT_MAX);
      for (const fn of app.listeners) {
        try { fn(batch); } catch (err) { console.warn('event listener failed', err); }
      }
    },
  }).start();
  setInterval(() => {
    document.getElementById('rate').textContent = `${count} events/s`;
    count = 0;
  }, 1000);
}

async function summary() {
  try {
    const status = await getJson('/api/workers', { status: 1 });
    const all = Object.values(status);
    const online = all.filter(Boolean).length;
    document.getElementById('summary').textContent =
      `${online} of ${all.length} worker${all.length === 1 ? '' : 's'} online`;
  } catch { /* shown by the views */ }
}

async function main() {
  document.getElementById('tz').textContent = TIME_ZONE;
  window.addEventListener('pollen-auth', (e) => askToken(e.detail));
  document.getElementById('signout').addEventListener('click', () => {
    setToken('');
    location.reload();
  });
  try {
    app.who = await getJson('/api/whoami');
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return; // the sign-in dialog is open
    app.who = { name: '?', role: 'viewer', can_control: false, read_only: true };
    toast(`Cannot reach the API: ${err.message}`, 'error');
  }
  app.canControl = !!app.who.can_control;
  app.canShutdown = !!app.who.can_shutdown;
  document.body.classList.toggle('read-only', !app.canControl);
  // who is signed in and what they may do (an open API's caller is nobody in particular)
  const who = document.getElementById('who');
  const signedIn = app.who.name && !['anonymous', 'unauthenticated', '?'].includes(app.who.name);
  const can = app.canControl ? (app.who.role || '') : 'read-only';
  who.textContent = signedIn ? `${app.who.name.replace(/^(sso|user):/, '')} · ${can}` : (
    app.canControl ? '' : 'read-only');
  who.dataset.role = app.who.role || '';
  document.getElementById('signout').hidden = !token();
  startStream();
  summary();
  setInterval(summary, 10000);
  window.addEventListener('hashchange', route);
  route();
}

main();
