// Alerts: what is firing or pending now (/api/alerts), the rules (/api/alerts/rules), which
// admins add, change and remove here, and the history of firings and deliveries
// (/api/alerts/history). Refreshed every few seconds.
import { getJson, send } from './api.js';
import { clear, fmtAgo, fmtTime, h } from './util.js';

const REFRESH_MS = 5000;
const HISTORY = 50;
const FIELDS = ['kind', 'match', 'threshold', 'window', 'for_seconds', 'percentile', 'severity'];

export function alertsView(el, { app }) {
  const admin = app.canControl && app.who && app.who.role === 'admin';
  const info = h('span', { class: 'muted', id: 'alerts-info' });
  const error = h('p', { class: 'error', id: 'alerts-error', hidden: true });
  const now = h('tbody');
  const rules = h('tbody');
  const history = h('tbody');
  const table = (id, heads, body) => h('div', { class: 'table-wrap' },
    h('table', { class: 'grid-table', id }, h('thead', null, h('tr', null,
      heads.map((t) => h('th', null, t)))), body));
  const form = admin ? ruleForm() : null;
  el.append(
    h('div', { class: 'toolbar' }, h('h2', null, 'Alerts'), info), error,
    h('h3', null, 'Now'),
    table('alerts-now', ['rule', 'subject', 'state', 'value', 'since', 'severity'], now),
    h('h3', null, 'Rules'),
    table('alert-rules', ['name', 'kind', 'match', 'threshold', 'window', 'for', 'severity',
      'receivers', ''], rules),
    form ? form.el : h('p', { class: 'muted' }, 'Admins add and change rules here.'),
    h('h3', null, 'History'),
    table('alerts-history', ['time', 'event', 'rule', 'subject', 'details'], history),
  );

  function ruleForm() {
    const inputs = {
      name: h('input', { id: 'rule-name', placeholder: 'name', required: true }),
      kind: h('select', { id: 'rule-kind' }),
      match: h('input', { id: 'rule-match', value: '*', title: 'pattern: * and ?' }),
      threshold: h('input', { id: 'rule-threshold', type: 'number', step: 'any', value: '1' }),
      window: h('input', { id: 'rule-window', type: 'number', value: '300', min: '60',
        title: 'seconds of counters (windowed kinds)' }),
      for_seconds: h('input', { id: 'rule-for', type: 'number', value: '0', min: '0',
        title: 'seconds at the threshold before it fires' }),
      percentile: h('input', { id: 'rule-percentile', type: 'number', step: 'any',
        value: '0.95', title: 'runtime only' }),
      severity: h('select', { id: 'rule-severity' },
        ['info', 'warning', 'critical'].map((v) => h('option', { value: v,
          selected: v === 'warning' || null }, v))),
      description: h('input', { id: 'rule-description', placeholder: 'description' }),
    };
    const receivers = h('span', { id: 'rule-receivers' });
    const save = h('button', { id: 'rule-save', type: 'submit' }, 'Save rule');
    const el = h('form', { class: 'card filters', id: 'alert-form', onsubmit: async (e) => {
      e.preventDefault();
      const rule = { receivers: [...receivers.querySelectorAll('input:checked')]
        .map((c) => c.value), description: inputs.description.value };
      for (const f of FIELDS) {
        const v = inputs[f].value;
        rule[f] = inputs[f].type === 'number' ? Number(v) : v;
      }
      try {
        await send('PUT', `/api/alerts/rules/${encodeURIComponent(inputs.name.value)}`, rule);
        app.toast(`Rule ${inputs.name.value} saved`, 'ok');
        load();
      } catch (err) {
        app.toast(`Rule not saved: ${err.message}`, 'error');
      }
    } }, inputs.name, inputs.kind, inputs.match, h('label', null, 'threshold ', inputs.threshold),
    h('label', null, 'window ', inputs.window), h('label', null, 'for ', inputs.for_seconds),
    h('label', null, 'percentile ', inputs.percentile), inputs.severity, receivers,
    inputs.description, save);
    return {
      el,
      fill(kinds, known) {
        if (!inputs.kind.options.length) {
          inputs.kind.append(...kinds.map((k) => h('option', { value: k }, k)));
        }
        if (!receivers.children.length) {
          receivers.append(...known.map((r) => h('label', null, h('input', { type: 'checkbox',
            value: r.name }), ` ${r.name} (${r.kind})`)));
        }
      },
      edit(name, rule) {
        inputs.name.value = name;
        for (const f of FIELDS) inputs[f].value = rule[f];
        inputs.description.value = rule.description || '';
        for (const c of receivers.querySelectorAll('input')) {
          c.checked = rule.receivers.includes(c.value);
        }
      },
    };
  }

  let inflight = false;
  async function load() {
    if (inflight) return;
    inflight = true;
    try {
      const [current, defined, past] = await Promise.all([getJson('/api/alerts'),
        getJson('/api/alerts/rules'), getJson('/api/alerts/history', { limit: HISTORY })]);
      error.hidden = true;
      clear(now);
      for (const a of current.alerts) {
        now.append(h('tr', { dataset: { rule: a.rule, subject: a.subject, state: a.state } },
          h('td', null, a.rule), h('td', { class: 'mono' }, a.subject),
          h('td', null, h('span', { class: `badge alert-${a.state}` }, a.state)),
          h('td', { class: 'num' }, String(Math.round(a.value * 1000) / 1000)),
          h('td', { title: fmtTime(a.since) }, fmtAgo(a.since)), h('td', null, a.severity)));
      }
      if (!current.alerts.length) {
        now.append(h('tr', null, h('td', { colspan: 6, class: 'muted empty' }, 'Nothing firing.')));
      }
      clear(rules);
      for (const [name, r] of Object.entries(defined.rules)) {
        rules.append(h('tr', { dataset: { rule: name } }, h('td', null, name), h('td', null, r.kind),
          h('td', { class: 'mono' }, r.match), h('td', { class: 'num' }, String(r.threshold)),
          h('td', { class: 'num' }, `${r.window} s`), h('td', { class: 'num' }, `${r.for_seconds} s`),
          h('td', null, r.severity), h('td', null, r.receivers.join(', ')),
          h('td', null, admin ? [
            h('button', { class: 'link', type: 'button', onclick: () => form.edit(name, r) }, 'edit'),
            ' · ',
            h('button', { class: 'link danger', type: 'button', dataset: { delete: name },
              onclick: () => app.control('Delete alert rule',
                `Delete the rule ${name}? Its firing alerts resolve.`,
                () => send('DELETE', `/api/alerts/rules/${encodeURIComponent(name)}`))
                .then(load) }, 'delete')] : null)));
      }
      if (form) form.fill(defined.kinds, defined.receivers);
      clear(history);
      for (const e of past.entries) {
        const details = e.event === 'delivery'
          ? `${e.status} to ${e.receiver}, attempt ${e.attempt}: ${e.ok ? 'ok' : (e.error || 'failed')}`
          : `value ${Math.round(e.value * 1000) / 1000}`;
        history.append(h('tr', { dataset: { event: e.event, rule: e.rule } },
          h('td', { class: 'time' }, fmtTime(e.time)), h('td', null, e.event),
          h('td', null, e.rule), h('td', { class: 'mono' }, e.subject), h('td', null, details)));
      }
      const firing = current.alerts.filter((a) => a.state === 'firing').length;
      info.textContent = `${firing} firing, ${Object.keys(defined.rules).length} rules`;
    } catch (err) {
      error.textContent = err.message;
      error.hidden = false;
    } finally {
      inflight = false;
    }
  }

  const timer = setInterval(load, REFRESH_MS);
  load();
  return { unmount() { clearInterval(timer); } };
}
