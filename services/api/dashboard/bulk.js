// Bulk actions on the tasks view's filters: revoke (or terminate) or re-send every task they
// select, through /api/tasks/bulk/*. A dry run first lists what would be touched; acting
// asks for confirmation. Operators only (hidden with the other controls otherwise).
import { post } from './api.js';
import { h } from './util.js';

const ACTIONS = {
  revoke: { label: 'Revoke', path: '/api/tasks/bulk/revoke', verb: 'revoked', extra: {} },
  terminate: { label: 'Revoke and terminate', path: '/api/tasks/bulk/revoke',
    verb: 'revoked (running ones killed)', extra: { terminate: 'true' } },
  resend: { label: 'Re-send', path: '/api/tasks/bulk/resend', verb: 're-sent', extra: {} },
};
const SHOWN = 20;

/** The panel; ``query()`` gives the view's filters, ``onDone`` runs after an action. */
export function bulkPanel({ query, app, onDone }) {
  const action = h('select', { id: 'bulk-action', onchange: () => reset() },
    Object.entries(ACTIONS).map(([k, a]) => h('option', { value: k }, a.label)));
  const result = h('div', { id: 'bulk-result', class: 'muted' });
  const run = h('button', { id: 'bulk-run', class: 'danger', type: 'button', hidden: true });
  const dry = h('button', { id: 'bulk-dry-run', class: 'secondary', type: 'button',
    onclick: () => preview() }, 'Dry run');
  const panel = h('div', { class: 'card control bulk', id: 'bulk', hidden: true },
    h('strong', null, 'Every task of these filters: '), action, dry, run, result);
  let pending = null;

  function reset() {
    run.hidden = true;
    result.replaceChildren();
    pending = null;
  }

  async function preview() {
    const a = ACTIONS[action.value];
    reset();
    let body;
    try {
      body = await post(a.path, { ...query(), ...a.extra, dry_run: 'true' });
    } catch (err) {
      result.replaceChildren(h('p', { class: 'error' }, `Dry run failed: ${err.message}`));
      return;
    }
    const count = action.value === 'resend' ? body.resendable : body.matched;
    const lines = [`${body.matched} task(s) selected${body.capped
      ? ' (the limit: more match; run again after)' : ''}; ${count} would be ${a.verb}.`];
    result.replaceChildren(
      h('p', { id: 'bulk-summary' }, lines.join(' ')),
      h('ul', { id: 'bulk-tasks' }, body.tasks.slice(0, SHOWN).map((t) => h('li', {
        dataset: { uuid: t.uuid } }, h('code', null, t.uuid), ` ${t.name || ''} ${t.state}`,
      t.reason ? h('span', { class: 'error' }, ` — not re-sent: ${t.reason}`) : ''))),
      body.tasks.length > SHOWN ? h('p', null, `… and ${body.tasks.length - SHOWN} more`) : '',
    );
    if (count > 0) {
      pending = { a, count, params: { ...query(), ...a.extra, dry_run: 'false' } };
      run.textContent = `${a.label} ${count} task(s)`;
      run.hidden = false;
    }
  }

  run.onclick = async () => {
    if (!pending) return;
    const { a, count, params } = pending;
    const answer = await app.control(`${a.label} tasks`,
      `${a.label} the ${count} task(s) listed? This is recorded in the audit.`,
      () => post(a.path, params).then((body) => ({ ...body,
        message: `${body.revoked ?? body.resent} task(s) ${a.verb}` })));
    if (answer) {
      reset();
      result.replaceChildren(h('p', { id: 'bulk-summary' }, answer.message));
      onDone();
    }
  };

  return panel;
}
