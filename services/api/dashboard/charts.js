// Charts drawn as SVG by this file: stacked bars over time, lines over time and horizontal
// bars on a log scale. Each chart has a legend, axes in the user's time zone and a tooltip
// (SVG <title>) on every mark.
import { clear, fmtDuration, fmtMinute, h, s } from './util.js';

const W = 640;
const H = 220;
const PAD = { l: 44, r: 10, t: 10, b: 24 };

export const PALETTE = ['#2563eb', '#16a34a', '#dc2626', '#d97706', '#7c3aed', '#0891b2',
  '#db2777', '#65a30d', '#9ca3af', '#4b5563'];

/** 0, nice step, ... covering max. */
function ticks(max, count = 4) {
  if (!(max > 0)) return [0, 1];
  const raw = max / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((v) => v >= raw) || raw;
  const out = [];
  for (let v = 0; v <= max + step * 0.999; v += step) out.push(+v.toPrecision(12));
  return out;
}

function legend(series) {
  return h('div', { class: 'legend' }, series.map((sr) => h('span', { class: 'legend-item' },
    h('i', { style: `background:${sr.color}` }), sr.label)));
}

function frame(el, title, series, empty) {
  clear(el);
  el.append(h('h3', null, title));
  if (empty) {
    el.append(h('p', { class: 'muted chart-empty' }, 'No data in this time range yet.'));
    return null;
  }
  el.append(legend(series));
  const svg = s('svg', { viewBox: `0 0 ${W} ${H}`, class: 'chart', role: 'img',
    'aria-label': title });
  el.append(svg);
  return svg;
}

function timeAxis(svg, start, step, n, x) {
  const every = Math.max(1, Math.ceil(n / 8));
  for (let i = 0; i < n; i += every) {
    const t = start + i * step;
    svg.append(s('text', { x: x(i) , y: H - 6, class: 'axis', 'text-anchor': 'middle' },
      fmtMinute(t)));
  }
}

function valueAxis(svg, max, y, fmt) {
  for (const v of ticks(max)) {
    svg.append(s('line', { x1: PAD.l, x2: W - PAD.r, y1: y(v), y2: y(v), class: 'grid' }));
    svg.append(s('text', { x: PAD.l - 6, y: y(v) + 4, class: 'axis', 'text-anchor': 'end' },
      fmt(v)));
  }
}

/**
 * Stacked bars per minute.
 * opts: {title, start, step, n, series: [{label, color, values: [n per slot]}], fmt}
 */
export function stackedBars(el, { title, start, step, n, series, fmt = (v) => String(v) }) {
  const totals = Array.from({ length: n }, (_, i) =>
    series.reduce((acc, sr) => acc + (sr.values[i] || 0), 0));
  const max = Math.max(0, ...totals);
  const svg = frame(el, title, series, max === 0);
  if (!svg) return;
  const top = ticks(max).at(-1);
  const bw = (W - PAD.l - PAD.r) / n;
  const x = (i) => PAD.l + bw * (i + 0.5);
  const y = (v) => H - PAD.b - (v / top) * (H - PAD.t - PAD.b);
  valueAxis(svg, max, y, fmt);
  for (let i = 0; i < n; i++) {
    let acc = 0;
    for (const sr of series) {
      const v = sr.values[i] || 0;
      if (!v) continue;
      const y0 = y(acc);
      acc += v;
      const y1 = y(acc);
      svg.append(s('rect', {
        x: PAD.l + bw * i + Math.min(1, bw * 0.1), y: y1,
        width: Math.max(1, bw - Math.min(2, bw * 0.2)), height: Math.max(0.5, y0 - y1),
        fill: sr.color,
      }, s('title', null, `${fmtMinute(start + i * step)}  ${sr.label}: ${fmt(v)}`)));
    }
  }
  timeAxis(svg, start, step, n, x);
}

/**
 * Lines over time; values may be null (no sample).
 * opts: {title, times: [epoch s], series: [{label, color, values}], fmt, max}
 */
export function lines(el, { title, times, series, fmt = (v) => String(v), max: fixedMax }) {
  const all = series.flatMap((sr) => sr.values.filter((v) => v !== null && v !== undefined));
  const svg = frame(el, title, series, !times.length || !all.length);
  if (!svg) return;
  const max = fixedMax ?? Math.max(1, ...all);
  const top = fixedMax ?? ticks(max).at(-1);
  const t0 = times[0];
  const t1 = Math.max(times[times.length - 1], t0 + 60);
  const x = (t) => PAD.l + ((t - t0) / (t1 - t0)) * (W - PAD.l - PAD.r);
  const y = (v) => H - PAD.b - (v / top) * (H - PAD.t - PAD.b);
  valueAxis(svg, top, y, fmt);
  const every = Math.max(1, Math.ceil(times.length / 8));
  times.forEach((t, i) => {
    if (i % every === 0) {
      svg.append(s('text', { x: x(t), y: H - 6, class: 'axis', 'text-anchor': 'middle' },
        fmtMinute(t)));
    }
  });
  for (const sr of series) {
    let d = '';
    let pen = false;
    sr.values.forEach((v, i) => {
      if (v === null || v === undefined) { pen = false; return; }
      d += `${pen ? 'L' : 'M'}${x(times[i]).toFixed(1)},${y(v).toFixed(1)}`;
      pen = true;
    });
    svg.append(s('path', { d, class: 'line', stroke: sr.color }));
    sr.values.forEach((v, i) => {
      if (v === null || v === undefined) return;
      svg.append(s('circle', { cx: x(times[i]), cy: y(v), r: 2.5, fill: sr.color },
        s('title', null, `${fmtMinute(times[i])}  ${sr.label}: ${fmt(v)}`)));
    });
  }
}

/**
 * Horizontal bars on a log scale (runtimes): one group per row, one bar per measure.
 * opts: {title, rows: [{label, values: [..], note}], measures: [{label, color}], empty}
 */
export function runtimeBars(el, { title, rows, measures, empty = 'No finished tasks yet.' }) {
  const all = rows.flatMap((r) => r.values).filter((v) => v > 0);
  clear(el);
  el.append(h('h3', null, title));
  if (!all.length) {
    el.append(h('p', { class: 'muted chart-empty' }, empty));
    return;
  }
  el.append(legend(measures.map((m) => ({ label: m.label, color: m.color }))));
  const lo = 10 ** Math.floor(Math.log10(Math.min(...all)));
  const hi = 10 ** Math.ceil(Math.log10(Math.max(...all) * 1.0001));
  const labelW = 190;
  const rowH = 8 * measures.length + 10;
  const height = rows.length * rowH + 30;
  const svg = s('svg', { viewBox: `0 0 ${W} ${height}`, class: 'chart', role: 'img',
    'aria-label': title });
  el.append(svg);
  const x = (v) => labelW + (Math.log10(Math.max(v, lo) / lo) / Math.log10(hi / lo))
    * (W - labelW - 60);
  for (let d = lo; d <= hi * 1.0001; d *= 10) {
    svg.append(s('line', { x1: x(d), x2: x(d), y1: 4, y2: height - 22, class: 'grid' }));
    svg.append(s('text', { x: x(d), y: height - 8, class: 'axis', 'text-anchor': 'middle' },
      fmtDuration(d)));
  }
  rows.forEach((row, i) => {
    const y0 = 6 + i * rowH;
    const name = row.label.length > 30 ? `…${row.label.slice(-29)}` : row.label;
    svg.append(s('text', { x: labelW - 8, y: y0 + rowH / 2, class: 'label',
      'text-anchor': 'end' }, name, s('title', null, row.label)));
    const last = row.values.reduce((at, v, j) => (v > 0 ? j : at), -1);
    row.values.forEach((v, j) => {
      if (!(v > 0)) return;
      const y = y0 + j * 8;
      svg.append(s('rect', { x: labelW, y, width: Math.max(1, x(v) - labelW), height: 7,
        fill: measures[j].color },
        s('title', null, `${row.label} ${measures[j].label}: ${fmtDuration(v)}`)));
      if (j === last) {
        svg.append(s('text', { x: x(v) + 4, y: y + 7, class: 'axis' },
          `${fmtDuration(v)}${row.note ? ` ${row.note}` : ''}`));
      }
    });
  });
}
