// The dmm dashboard: one page over the daemon's JSON API.
//
// Views: the overview (#/), one migration (#/m/ID) and the creation form
// (#/new). Updates come from /api/events, read through fetch so that the
// session cookie goes with it; a full refresh runs after every reconnect
// and every 10 s, so that nothing is missed while the stream was down.
// Every text comes from /ui/messages.json through t(); pages are built
// with DOM calls, never from HTML strings, so no value from a migration
// (paths, errors) can inject markup.
'use strict';

const DESTRUCTIVE = new Set(['halt --remove', 'delete', 'delete -f', 'rollback', 'commit']);
const LIVE_PROPERTIES = ['rate', 'schedule', 'priority', 'copies', 'after', 'above'];
// The kinds the creation form offers, each with the properties it needs.
const REQUIRED = {
  volume: ['source', 'target'],
  tree: ['source', 'target', 'access'],
  stream: ['orbit', 'access'],
};
const HISTORY_SECONDS = 1800;

let messages = { en: {} };
let lang = 'en';
let properties = [];
const views = new Map();
const samples = new Map();
let tab = 'attention';
// The start queue under maxrunning: GET /api/queue, then queue notices.
let queue = { maxrunning: 'unlimited', running: 0, queued: [] };
let page = { render() {}, update() {} };

// ---------------------------------------------------------------- text

function t(key, vars = {}) {
  const text = (messages[lang] && messages[lang][key]) ?? messages.en[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (_, name) => String(vars[name] ?? ''));
}

function pickLanguage() {
  const asked = new URLSearchParams(location.search).get('lang') || localStorage.getItem('dmm.lang');
  const wanted = [asked, ...(navigator.languages || [])].filter(Boolean);
  for (const tag of wanted) {
    const base = tag.toLowerCase().split('-')[0];
    if (messages[base]) return base;
  }
  return 'en';
}

function translateStatic() {
  document.documentElement.lang = lang;
  for (const node of document.querySelectorAll('[data-t]')) node.textContent = t(node.dataset.t);
}

// ----------------------------------------------------------------- DOM

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
    else if (name === 'text') node.textContent = value;
    else node.setAttribute(name, value === true ? '' : value);
  }
  for (const child of children.flat()) {
    if (child !== undefined && child !== null) node.append(child);
  }
  return node;
}

function toast(text, bad = false) {
  const note = el('div', { class: bad ? 'bad' : '', text });
  document.getElementById('toast').append(note);
  setTimeout(() => note.remove(), bad ? 8000 : 4000);
}

// ----------------------------------------------------------------- API

class ApiError extends Error {}

async function api(method, path, body) {
  const init = { method, credentials: 'same-origin', headers: { Accept: 'application/json' } };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 401) {
    loggedOut();
    throw new ApiError('401');
  }
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) throw new ApiError((data && data.error) || response.statusText);
  return data;
}

function loggedOut() {
  document.getElementById('main').replaceChildren(
    el('p', { text: 'Logged out. Run `dmm ui` on the daemon\'s machine and open the URL it prints.' }));
  stopped = true;
}

// ------------------------------------------------------------ figures

function progressOf(view) {
  return view.progress || {};
}

function fraction(view) {
  const p = progressOf(view);
  if (view.kind === 'volume' && p.chunks) return p.chunks_on_destination / p.chunks;
  if (view.kind === 'tree' && p.bytes_total) return p.bytes_done / p.bytes_total;
  if (view.kind === 'tree' && p.files_total) return p.files_done / p.files_total;
  if (view.kind === 'stream' && (p.streams || []).length) return (p.streams.length - p.pending) / p.streams.length;
  return view.state === 'committed' ? 1 : 0;
}

// What a migration moves from and to, as its row shows it.
function routeOf(view) {
  if (view.kind === 'stream') return view.properties.orbit || '';
  return `${view.properties.source || ''} → ${view.properties.target || ''}`;
}

function copiedOf(view) {
  const p = progressOf(view);
  if (view.kind === 'volume') return p.copied_bytes;
  if (view.kind === 'stream') return p.figures ? p.figures.drained + p.figures.redirected : 0;
  return p.bytes_written;
}

function rateOf(view) {
  const p = progressOf(view);
  return (view.kind === 'volume' ? p.bytes_per_second : p.rate) || 0;
}

function errorCount(view) {
  const p = progressOf(view);
  const failed = view.state === 'failed' ? 1 : 0;
  const mismatches = (p.mismatches || []).length;
  return failed + mismatches + (p.entries_in_error || 0);
}

function phaseOf(view) {
  const p = progressOf(view);
  if (!p.phase) return '';
  return p.activity && p.activity !== p.phase ? `${p.phase} (${p.activity})` : String(p.phase);
}

function category(view) {
  if (errorCount(view) > 0 || ['failed', 'switched-over', 'rolled-back'].includes(view.state)) return 'attention';
  if (['created', 'queued', 'running', 'paused', 'verifying'].includes(view.state)) return 'running';
  return 'done';
}

function bytes(n) {
  if (!Number.isFinite(n)) return '';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return '';
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function when(ms) {
  return new Date(ms).toLocaleString(lang);
}

// The charts' points: one series per migration, from the daemon's
// history when a page opens and from progress notices after.
function addPoint(id, raw) {
  const t = raw.at / 1000;
  const series = samples.get(id) || [];
  const last = series[series.length - 1];
  const span = last ? t - last.t : 0;
  if (last && span < 0.25) return;
  const requests = (raw.client_reads || 0) + (raw.client_writes || 0);
  series.push({
    t,
    rate: raw.rate || 0,
    clients: last && span > 0 ? Math.max(0, (requests - last.requests) / span) : 0,
    requests,
    dirty: raw.dirty_chunks || 0,
    files: raw.files_done || 0,
    left: Math.max(0, (raw.files_total || 0) - (raw.files_done || 0)),
    dirs: raw.dirs_done || 0,
    dirsLeft: Math.max(0, (raw.dirs_total || 0) - (raw.dirs_done || 0)),
  });
  while (series.length && series[0].t < t - HISTORY_SECONDS) series.shift();
  samples.set(id, series);
}

function sample(view) {
  if (!view.progress) return;
  const p = view.progress;
  addPoint(view.id, { ...p, at: Date.now(), rate: rateOf(view) });
}

async function loadHistory(id) {
  try {
    const points = await api('GET', `/api/migrations/${id}/history`);
    samples.set(id, []);
    for (const point of points) addPoint(id, point);
    redraw();
  } catch (err) { /* the notices fill the charts */ }
}

// ------------------------------------------------------------- charts

function drawChart(canvas, series, lines) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth * ratio;
  const height = canvas.clientHeight * ratio;
  if (!width || !height) return;
  canvas.width = width;
  canvas.height = height;
  const g = canvas.getContext('2d');
  g.clearRect(0, 0, width, height);
  g.font = `${11 * ratio}px system-ui, sans-serif`;
  g.strokeStyle = '#d9dde3';
  g.strokeRect(0.5, 0.5, width - 1, height - 1);
  canvas.dataset.last = JSON.stringify(series.length ? series[series.length - 1] : null);
  if (series.length < 2) return;
  const t0 = series[0].t;
  const span = Math.max(1, series[series.length - 1].t - t0);
  const top = Math.max(1, ...lines.flatMap((line) => series.map((s) => s[line.key])));
  lines.forEach((line, index) => {
    g.strokeStyle = line.color;
    g.lineWidth = 1.5 * ratio;
    g.beginPath();
    series.forEach((s, i) => {
      const x = ((s.t - t0) / span) * (width - 2) + 1;
      const y = height - 1 - (s[line.key] / top) * (height - 16 * ratio);
      if (i) g.lineTo(x, y); else g.moveTo(x, y);
    });
    g.stroke();
    g.fillStyle = line.color;
    g.fillText(`${line.label}: ${line.format(series[series.length - 1][line.key])}`, 6 * ratio, (14 + 13 * index) * ratio);
  });
  g.fillStyle = '#667085';
  g.fillText(`max ${lines[0].format(top)} · ${duration(span)}`, width - 160 * ratio, 14 * ratio);
}

// ----------------------------------------------------------- overview

function overview() {
  const main = document.getElementById('main');
  const tabs = el('div', { class: 'tabs', role: 'tablist' });
  const body = el('tbody');
  const head = el('thead');
  const table = el('table', { id: 'migrations' }, head, body);
  const order = queueCard();
  main.replaceChildren(tabs, order.card, table);

  // Built once, so that a click never lands on a button an update replaced.
  const buttons = Object.fromEntries(['attention', 'running', 'done', 'all'].map((name) => {
    const count = el('span', { class: 'count' });
    const button = el('button', {
      type: 'button', role: 'tab', 'data-tab': name,
      onclick: () => { tab = name; update(); },
    }, t(`tab.${name}`), count);
    tabs.append(button);
    return [name, { button, count }];
  }));

  function update() {
    const all = [...views.values()].sort((a, b) => b.id - a.id);
    const counts = { attention: 0, running: 0, done: 0, all: all.length };
    for (const view of all) counts[category(view)] += 1;
    for (const [name, { button, count }] of Object.entries(buttons)) {
      button.className = name === tab ? 'on' : '';
      button.setAttribute('aria-selected', String(name === tab));
      count.textContent = String(counts[name]);
    }
    order.update(tab === 'running');
    const done = tab === 'done';
    const columns = done ? DONE_COLUMNS : COLUMNS;
    if (head.dataset.columns !== columns.join()) {
      head.dataset.columns = columns.join();
      head.replaceChildren(el('tr', {}, columns.map((key) => el('th', { text: t(key) }))));
    }
    const shown = all.filter((view) => tab === 'all' || category(view) === tab);
    if (!shown.length) {
      body.replaceChildren(el('tr', {}, el('td', { colspan: String(columns.length), text: t('empty') })));
      return;
    }
    body.replaceChildren(...shown.map((view) => done ? doneRow(view) : row(view)));
  }
  return { update };
}

const COLUMNS = ['col.id', 'col.kind', 'col.route', 'col.state', 'col.phase', 'col.progress', 'col.rate', 'col.eta', 'col.errors'];
const DONE_COLUMNS = ['col.id', 'col.kind', 'col.route', 'col.state', 'col.ended', 'col.duration', 'col.copied', 'col.verification'];

// The first cells of every row: the migration, where it goes, its state.
function rowStart(view) {
  return [
    el('td', {}, el('a', { href: `#/m/${view.id}`, text: String(view.id) })),
    el('td', { text: t(`kind.${view.kind}`) }),
    el('td', { class: 'route', text: routeOf(view) }),
    el('td', {}, el('span', { class: `state state-${view.state}`, 'data-state': view.state, text: t(`state.${view.state}`) })),
  ];
}

function rowOf(view, cells) {
  return el('tr', { class: 'row', 'data-id': String(view.id), onclick: () => { location.hash = `#/m/${view.id}`; } },
    ...rowStart(view), ...cells);
}

// How long its run took: from the first start to its end (or now).
function runTime(view) {
  const s = view.summary;
  if (!s || !s.started_at) return '';
  return duration(((s.ended_at || Date.now()) - s.started_at) / 1000);
}

// A finished migration: when it ended, how long it ran, what it copied
// and what verification found (kept by the daemon after its engine closed).
function doneRow(view) {
  const s = view.summary || {};
  return rowOf(view, [
    el('td', { class: 'nowrap', text: s.ended_at ? when(s.ended_at) : '' }),
    el('td', { class: 'nowrap', 'data-field': 'duration', text: runTime(view) }),
    el('td', { class: 'nowrap', 'data-field': 'copied', text: bytes(s.bytes) }),
    el('td', { 'data-field': 'verification', text: s.verification || t('verification.none') }),
  ]);
}

// A migration under way or waiting: phase, progress, rate, ETA, errors.
function row(view) {
  const p = progressOf(view);
  const done = fraction(view);
  const errors = errorCount(view);
  return rowOf(view, [
    el('td', { text: phaseOf(view) }),
    el('td', { class: 'nowrap' }, el('progress', { max: '1', value: String(done) }), ` ${(done * 100).toFixed(1)} %`),
    el('td', { class: 'nowrap', text: view.progress ? `${bytes(rateOf(view))}/s` : '' }),
    el('td', { text: duration(p.eta_seconds) }),
    el('td', { class: errors ? 'errors' : '', text: String(errors) })]);
}

// The limit of migrations running at once and the queue's order, in the
// Running tab: built once, its list redrawn on every update (the limit's
// field is left alone while it has the focus).
function queueCard() {
  const limit = el('input', { id: 'maxrunning', type: 'text', inputmode: 'numeric', placeholder: t('queue.unlimited') });
  const error = el('div', { class: 'field-error' });
  const status = el('span', { class: 'help' });
  const list = el('ol', { id: 'queue', class: 'queue' });
  const apply = el('button', {
    type: 'submit', id: 'set-maxrunning', text: t('detail.apply'),
  });
  const form = el('form', {
    class: 'inline',
    onsubmit: async (event) => {
      event.preventDefault();
      error.textContent = '';
      const value = limit.value.trim() || 'unlimited';
      try {
        await api('PATCH', '/api/config', { maxrunning: value });
        await refreshQueue();
        toast(t('queue.set', { value }));
      } catch (err) {
        error.textContent = err.message;
      }
    },
  }, el('div', {}, el('label', { for: 'maxrunning', text: t('queue.limit') }), limit), apply);
  const card = el('section', { class: 'card queue-card' },
    el('h2', {}, t('queue.title'), ' ', status), form, error, list);

  async function move(id, position) {
    try {
      const answer = await api('POST', '/api/queue', { migration: id, position });
      setQueue(answer);
    } catch (err) {
      toast(err.message, true);
    }
  }

  function update(shown) {
    card.hidden = !shown;
    if (!shown) return;
    if (document.activeElement !== limit) limit.value = queue.maxrunning === 'unlimited' ? '' : queue.maxrunning;
    status.textContent = t('queue.status', {
      running: queue.running,
      max: queue.maxrunning === 'unlimited' ? t('queue.unlimited') : queue.maxrunning,
      queued: queue.queued.length,
    });
    const last = queue.queued.length;
    list.replaceChildren(...queue.queued.map((id, at) => {
      const view = views.get(id);
      const route = view ? routeOf(view) : '';
      return el('li', { 'data-id': String(id) },
        el('a', { href: `#/m/${id}`, text: `${id}` }), ' ',
        el('span', { class: 'route', text: route }), ' ',
        el('button', {
          type: 'button', class: 'move up', title: t('queue.up'), 'aria-label': t('queue.up'),
          disabled: at === 0, onclick: () => move(id, at),
        }, '↑'),
        el('button', {
          type: 'button', class: 'move down', title: t('queue.down'), 'aria-label': t('queue.down'),
          disabled: at === last - 1, onclick: () => move(id, at + 2),
        }, '↓'));
    }));
    if (!last) list.replaceChildren(el('li', { class: 'help', text: t('queue.empty') }));
  }
  return { card, update };
}

// ------------------------------------------------------ one migration

function detail(id) {
  const main = document.getElementById('main');
  const title = el('h1');
  const facts = el('dl', { class: 'facts' });
  const verbs = el('div', { class: 'verbs', id: 'verbs' });
  const settings = el('form', { class: 'inline', id: 'settings' });
  const rateChart = el('canvas', { id: 'chart-rate' });
  const ioChart = el('canvas', { id: 'chart-io' });
  const props = el('tbody');
  const errors = el('tbody');
  const log = el('pre', { class: 'log', id: 'log' });
  let logAfter = 0;
  let settingsFor = '';

  main.replaceChildren(
    el('p', {}, el('a', { href: '#/', text: t('detail.back') })),
    title,
    el('div', { class: 'grid' },
      el('section', { class: 'card' }, facts),
      el('section', { class: 'card' }, el('h2', { text: t('detail.verbs') }), verbs,
        el('h2', { text: t('detail.live') }), settings),
      el('section', { class: 'card' }, el('h2', { text: t('detail.chart.rate') }), rateChart),
      el('section', { class: 'card' }, el('h2', { id: 'io-title' }), ioChart),
      el('section', { class: 'card' }, el('h2', { text: t('detail.properties') }),
        el('table', {}, el('thead', {}, el('tr', {},
          el('th', { text: t('prop.name') }), el('th', { text: t('prop.value') }), el('th', { text: t('prop.source') }))), props)),
      el('section', { class: 'card', id: 'errors-card' }, el('h2', { text: t('detail.errors') }),
        el('table', {}, errors)),
      el('section', { class: 'card' }, el('h2', { text: t('detail.log') }), log)));

  function fact(name, value) {
    return [el('dt', { text: name }), el('dd', { text: value })];
  }

  function buildSettings(view) {
    const key = `${view.state}:${view.verbs.includes('set')}`;
    if (key === settingsFor) return;
    settingsFor = key;
    const live = properties.filter((p) => LIVE_PROPERTIES.includes(p.name) && p.live &&
      (!p.applies || p.applies.includes(view.kind)));
    if (!view.verbs.includes('set') || !live.length) {
      settings.replaceChildren();
      return;
    }
    settings.replaceChildren(...live.map((p) => el('div', {},
      el('label', { for: `set-${p.name}`, text: p.name }),
      el('input', { id: `set-${p.name}`, name: p.name, value: view.effective[p.name] || '', title: p.help }))),
    el('button', { type: 'submit', id: 'apply', text: t('detail.apply') }));
    settings.onsubmit = async (event) => {
      event.preventDefault();
      const current = views.get(id);
      const changes = {};
      for (const input of settings.querySelectorAll('input')) {
        if (input.value !== (current.effective[input.name] || '')) changes[input.name] = input.value;
      }
      if (!Object.keys(changes).length) return;
      try {
        views.set(id, await api('PATCH', `/api/migrations/${id}/properties`, changes));
        settingsFor = '';
        update();
      } catch (err) { toast(err.message, true); }
    };
  }

  async function loadLog() {
    try {
      const events = await api('GET', `/api/migrations/${id}/log?after=${logAfter}`);
      for (const event of events) appendLog(event);
    } catch (err) { /* shown by the next update */ }
  }

  function appendLog(event) {
    if (event.id <= logAfter) return;
    logAfter = event.id;
    log.append(el('div', { class: event.level, text: `${when(event.at || event.created_at)}  ${event.message}` }));
    log.scrollTop = log.scrollHeight;
  }

  function update() {
    const view = views.get(id);
    if (!view) {
      title.textContent = t('detail.title', { id });
      return;
    }
    const p = progressOf(view);
    title.replaceChildren(t('detail.title', { id }), ' ',
      el('span', { class: `state state-${view.state}`, id: 'state', 'data-state': view.state, text: t(`state.${view.state}`) }));
    const rows = [
      fact(t('col.kind'), t(`kind.${view.kind}`)),
      fact(t(view.kind === 'stream' ? 'col.orbit' : 'col.route'), routeOf(view)),
      fact(t('col.phase'), phaseOf(view)),
      fact(t('col.progress'), `${(fraction(view) * 100).toFixed(1)} %`),
      fact(t('col.rate'), view.progress ? `${bytes(rateOf(view))}/s` : ''),
      fact(t('col.eta'), duration(p.eta_seconds)),
      fact(t('detail.copied'), bytes(view.progress
        ? copiedOf(view)
        : (view.summary || {}).bytes)),
      fact(t('col.duration'), runTime(view)),
      fact(t('col.verification'), (view.summary || {}).verification || t('verification.none')),
      fact(t('col.updated'), when(view.updated_at)),
    ];
    if (view.kind === 'volume' && view.progress) {
      rows.push(fact(t('detail.pause'), `${(p.longest_pause_ms || 0).toFixed(1)} ms`));
      rows.push(fact(t('detail.verified'), String(p.verified_chunks || 0)));
    }
    for (const stream of (p.streams || []).slice(0, 50)) {
      const moving = stream.moving ? ` → ${stream.moving[1]} (${stream.moving[0]})` : '';
      rows.push(fact(stream.name, `${bytes(stream.bytes)} · ${stream.tier} (${bytes(stream.stored)})${moving}`));
    }
    if ((p.mismatches || []).length) rows.push(fact(t('detail.mismatches'), String(p.mismatches.length)));
    if (view.queue_position) rows.push(fact(t('detail.queued'), `${view.queue_position} / ${queue.queued.length}`));
    if (view.error) rows.push(fact(t('detail.error'), view.error));
    facts.replaceChildren(...rows.flat());

    // Rebuilt only when the verbs change, so that a click never lands on a
    // button an update replaced.
    const offered = view.verbs.filter((verb) => verb !== 'set');
    if (offered.join('|') !== verbs.dataset.offered) {
      verbs.dataset.offered = offered.join('|');
      verbs.replaceChildren(...offered.map((verb) => el('button', {
        type: 'button', class: DESTRUCTIVE.has(verb) ? 'verb danger' : 'verb', 'data-verb': verb,
        text: t(`verb.${verb}`), onclick: () => runVerb(id, verb),
      })));
    }
    buildSettings(view);

    props.replaceChildren(...Object.entries(view.effective).map(([name, value]) => el('tr', {},
      el('td', { text: name }), el('td', { class: 'route', text: value }),
      el('td', { text: name in view.properties ? t('prop.set') : t('prop.default') }))));

    // Rebuilt only when the list changes (a click never lands on a
    // replaced button); a retry is offered while the copy runs.
    const list = p.errors || [];
    const retrying = ['running', 'paused', 'verifying'].includes(view.state);
    const listed = JSON.stringify([retrying, list.map((e) => [e.path, e.attempts, e.message])]);
    document.getElementById('errors-card').hidden = !list.length;
    if (listed !== errors.dataset.listed) {
      errors.dataset.listed = listed;
      errors.replaceChildren(...list.map((e) => el('tr', { 'data-path': e.path },
        el('td', { class: 'route', text: e.path }), el('td', { text: e.message }), el('td', { text: String(e.attempts) }),
        el('td', {}, retrying ? el('button', {
          type: 'button', class: 'verb retry', text: t('detail.retry'),
          onclick: () => retryEntry(id, e.path),
        }) : ''))));
    }

    const series = samples.get(id) || [];
    drawChart(rateChart, series, [{ key: 'rate', label: t('col.rate'), color: '#2563eb', format: (v) => `${bytes(v)}/s` }]);
    if (view.kind === 'volume') {
      document.getElementById('io-title').textContent = `${t('detail.chart.clients')} · ${t('detail.chart.dirty')}`;
      drawChart(ioChart, series, [
        { key: 'clients', label: t('detail.chart.clients'), color: '#15803d', format: (v) => v.toFixed(0) },
        { key: 'dirty', label: t('detail.chart.dirty'), color: '#b45309', format: (v) => v.toFixed(0) },
      ]);
    } else {
      document.getElementById('io-title').textContent = t('detail.chart.tree');
      drawChart(ioChart, series, [
        { key: 'files', label: t('detail.chart.files'), color: '#15803d', format: (v) => v.toFixed(0) },
        { key: 'left', label: t('detail.chart.left'), color: '#b45309', format: (v) => v.toFixed(0) },
        { key: 'dirs', label: t('detail.chart.dirs'), color: '#2563eb', format: (v) => v.toFixed(0) },
        { key: 'dirsLeft', label: t('detail.chart.dirs-left'), color: '#7c3aed', format: (v) => v.toFixed(0) },
      ]);
    }
  }

  loadLog();
  loadHistory(id);
  return { update, log: (event) => { if (event.migration === id) appendLog(event); } };
}

async function runVerb(id, verb) {
  if (DESTRUCTIVE.has(verb) && !window.confirm(t('confirm', { verb: t(`verb.${verb}`), id }))) return;
  try {
    if (verb === 'delete' || verb === 'delete -f') {
      await api('DELETE', `/api/migrations/${id}${verb === 'delete -f' ? '?force=true' : ''}`);
      views.delete(id);
      location.hash = '#/';
      return;
    }
    const paths = { 'halt --remove': 'halt?remove=true', 'halt --keep': 'halt' };
    const path = `/api/migrations/${id}/${paths[verb] || verb}`;
    views.set(id, await api('POST', path));
    page.update();
  } catch (err) { toast(err.message, true); }
}

async function retryEntry(id, path) {
  try {
    views.set(id, await api('POST', `/api/migrations/${id}/retry`, { path }));
    toast(t('detail.retrying', { path }));
    page.update();
  } catch (err) { toast(err.message, true); }
}

// ------------------------------------------------------------- create

function create() {
  const main = document.getElementById('main');
  const form = el('form', { id: 'create', novalidate: true });
  const formError = el('div', { class: 'field-error', id: 'error-form' });
  let kind = 'volume';

  function field(p) {
    const input = el('input', {
      id: `field-${p.name}`, name: p.name, placeholder: p.default || '',
      required: REQUIRED[kind].includes(p.name),
    });
    return el('div', {}, el('label', { for: input.id, text: p.name }), input,
      el('div', { class: 'help', text: p.help }),
      el('div', { class: 'field-error', id: `error-${p.name}` }));
  }

  function build() {
    const kindSelect = el('select', { id: 'field-kind', name: 'kind', onchange: (e) => { kind = e.target.value; build(); } },
      ...Object.keys(REQUIRED).map((k) => el('option', { value: k, selected: k === kind, text: t(`kind.${k}`) })));
    const fields = properties.filter((p) => p.name !== 'kind' && (!p.applies || p.applies.includes(kind)));
    const first = fields.filter((p) => REQUIRED[kind].includes(p.name));
    const rest = fields.filter((p) => !first.includes(p));
    form.replaceChildren(
      el('h1', { text: t('create.title') }),
      el('div', { class: 'card' },
        el('label', { for: 'field-kind', text: t('create.kind') }), kindSelect,
        ...first.map(field),
        el('h2', { text: t('create.more') }),
        el('div', { class: 'grid' }, ...rest.map(field)),
        el('p', {}, el('label', {}, el('input', { type: 'checkbox', id: 'field-halted', class: 'check' }), ' ', t('create.halted'))),
        formError,
        el('button', { type: 'submit', id: 'submit', text: t('create.submit') })));
  }

  form.onsubmit = async (event) => {
    event.preventDefault();
    for (const node of form.querySelectorAll('.field-error')) node.textContent = '';
    const chosen = { kind };
    for (const input of form.querySelectorAll('input[name]')) {
      if (input.value.trim()) chosen[input.name] = input.value.trim();
    }
    const halted = form.querySelector('#field-halted').checked;
    try {
      const view = await api('POST', '/api/migrations', { properties: chosen, halted });
      views.set(view.id, view);
      toast(t('done.created', { id: view.id }));
      location.hash = `#/m/${view.id}`;
    } catch (err) {
      const names = properties.map((p) => p.name).sort((a, b) => b.length - a.length);
      const named = names.find((name) => new RegExp(`(^|[^a-z-])${name}([^a-z-]|$)`).test(err.message));
      const slot = (named && form.querySelector(`#error-${named}`)) || formError;
      slot.textContent = err.message;
    }
  };
  build();
  main.replaceChildren(form);
  return { update() {} };
}

// ------------------------------------------------------------ catalog

function catalog() {
  const main = document.getElementById('main');
  main.replaceChildren(el('h1', { text: t('catalog.title') }),
    el('p', { class: 'help', text: t('catalog.help', { path: 'catalog.db' }) }));
  api('GET', '/api/catalog?limit=200').then((tables) => {
    for (const table of tables) {
      main.append(el('section', { class: 'card', 'data-table': table.name },
        el('h2', {}, table.name, ' ', el('span', { class: 'help', text: t('catalog.rows', { shown: table.rows.length, total: table.total }) })),
        el('div', { class: 'scroll' }, el('table', {},
          el('thead', {}, el('tr', {}, table.columns.map((column) => el('th', { text: column })))),
          el('tbody', {}, table.rows.map((row) => el('tr', {},
            row.map((value) => el('td', { class: 'route', text: value === null ? 'NULL' : value })))))))));
    }
  }).catch((err) => toast(err.message, true));
  return { update() {} };
}

// ------------------------------------------------------------ nodes

// The cluster on etcd: every node, and where each volume lives. Read
// again every few seconds while shown.
function nodes() {
  const main = document.getElementById('main');
  main.replaceChildren(el('h1', { text: t('nodes.title') }),
    el('p', { class: 'help', text: t('nodes.help') }));
  const shown = el('div', { id: 'cluster' });
  main.append(shown);
  const address = (value) => value || '-';
  async function load() {
    let view;
    try {
      view = await api('GET', '/api/cluster/nodes');
    } catch (err) {
      toast(err.message, true);
      return;
    }
    const self = el('section', { class: 'card', id: 'this-node' },
      el('h2', { text: t('nodes.this', { node: view.node }) }),
      el('p', { class: view.fenced ? 'bad' : '', text: t(view.fenced ? 'nodes.fenced' : 'nodes.serving') }),
      el('p', { class: 'help', text: t('nodes.refused', { fenced: view.refused_fenced, owner: view.refused_not_owner, stale: view.refused_stale }) }));
    const table = el('section', { class: 'card' }, el('div', { class: 'scroll' }, el('table', { id: 'node-table' },
      el('thead', {}, el('tr', {}, ['nodes.col.node', 'nodes.col.state', 'nodes.col.api', 'nodes.col.nbd', 'nodes.col.free', 'nodes.col.volumes']
        .map((key) => el('th', { text: t(key) })))),
      el('tbody', {}, view.nodes.map((node) => el('tr', { 'data-node': node.name, 'data-up': String(node.up) },
        el('td', { text: node.name }),
        el('td', { class: node.up ? '' : 'bad', text: t(node.up ? 'nodes.up' : 'nodes.down') }),
        el('td', { class: 'route', text: address(node.record && node.record.api) }),
        el('td', { class: 'route', text: address(node.record && node.record.nbd) }),
        el('td', { text: node.record ? bytes(node.record.free_bytes) : '-' }),
        el('td', { class: 'route', text: node.owns.join(', ') })))))));
    const volumes = Object.entries(view.volumes);
    const owners = el('section', { class: 'card' }, el('h2', { text: t('nodes.volumes') }),
      volumes.length === 0 ? el('p', { class: 'help', text: t('nodes.none') }) :
        el('div', { class: 'scroll' }, el('table', { id: 'volume-table' },
          el('thead', {}, el('tr', {}, ['nodes.col.volume', 'nodes.col.owner', 'nodes.col.token', 'nodes.col.move']
            .map((key) => el('th', { text: t(key) })))),
          el('tbody', {}, volumes.map(([name, owner]) => el('tr', { 'data-volume': name, 'data-owner': owner.node },
            el('td', { class: 'route', text: name }),
            el('td', { text: owner.node }),
            el('td', { text: String(owner.token) }),
            el('td', { text: owner.moving ? t('nodes.moving', { from: owner.moving.from, to: owner.moving.to, phase: owner.moving.phase }) : '' })))))));
    shown.replaceChildren(self, table, owners);
  }
  load();
  const timer = setInterval(() => { if (location.hash === '#/nodes') load(); else clearInterval(timer); }, 3000);
  return { update() {} };
}

// Shows the Nodes link on a daemon that is in a cluster.
async function showNodesLink() {
  try {
    await api('GET', '/api/cluster/nodes');
    document.getElementById('nav-nodes').hidden = false;
  } catch (err) { /* not in a cluster */ }
}

// --------------------------------------------------- updates and routing

let stopped = false;
let drawing = false;

function redraw() {
  if (drawing) return;
  drawing = true;
  requestAnimationFrame(() => { drawing = false; page.update(); });
}

async function refresh(id) {
  try {
    const view = await api('GET', `/api/migrations/${id}`);
    views.set(view.id, view);
    sample(view);
  } catch (err) {
    if (err.message !== '401') views.delete(id);
  }
  redraw();
}

async function refreshAll() {
  const list = await api('GET', '/api/migrations');
  views.clear();
  for (const view of list) {
    views.set(view.id, view);
    sample(view);
  }
  await refreshQueue();
}

// The queue's order and limit; each queued view learns its place.
function setQueue(answer) {
  queue = answer;
  for (const view of views.values()) {
    const at = queue.queued.indexOf(view.id);
    view.queue_position = at >= 0 ? at + 1 : null;
  }
  redraw();
}

async function refreshQueue() {
  setQueue(await api('GET', '/api/queue'));
}

function handle(kind, notice) {
  if (kind === 'progress') {
    const view = views.get(notice.migration);
    if (!view) return refresh(notice.migration);
    view.progress = notice.progress;
    sample(view);
    redraw();
  } else if (kind === 'state') {
    refresh(notice.migration);
    refreshQueue().catch(() => {});
  } else if (kind === 'queue') {
    setQueue(notice);
  } else if (kind === 'log' && page.log) {
    page.log(notice.event);
  }
}

function setLive(on) {
  const live = document.getElementById('live');
  live.textContent = t(on ? 'live.on' : 'live.off');
  live.className = on ? 'live on' : 'live';
}

async function follow() {
  while (!stopped) {
    try {
      const response = await fetch('/api/events', { credentials: 'same-origin', headers: { Accept: 'text/event-stream' } });
      if (response.status === 401) { loggedOut(); return; }
      if (!response.ok) throw new Error(response.statusText);
      setLive(true);
      await refreshAll();
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf('\n\n')) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          let event = 'message';
          let data = '';
          for (const line of block.split('\n')) {
            if (line.startsWith('event:')) event = line.slice(6).trim();
            else if (line.startsWith('data:')) data += line.slice(5).trimStart();
          }
          if (data) handle(event, JSON.parse(data));
        }
      }
    } catch (err) { /* reconnect below */ }
    if (stopped) return;
    setLive(false);
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

function route() {
  const hash = location.hash || '#/';
  const one = hash.match(/^#\/m\/(\d+)$/);
  if (one) page = detail(Number(one[1]));
  else if (hash === '#/new') page = create();
  else if (hash === '#/catalog') page = catalog();
  else if (hash === '#/nodes') page = nodes();
  else page = overview();
  page.update();
}

async function start() {
  messages = await (await fetch('/ui/messages.json', { credentials: 'same-origin' })).json();
  lang = pickLanguage();
  const choose = document.getElementById('lang');
  choose.replaceChildren(...Object.keys(messages).map((code) => el('option', {
    value: code, selected: code === lang, text: messages[code].language || code,
  })));
  choose.onchange = () => {
    lang = choose.value;
    localStorage.setItem('dmm.lang', lang);
    translateStatic();
    route();
  };
  document.getElementById('logout').onclick = async () => {
    await fetch('/ui/logout', { method: 'POST', credentials: 'same-origin' });
    loggedOut();
  };
  translateStatic();
  try {
    properties = await api('GET', '/api/properties');
    await refreshAll();
  } catch (err) {
    return;
  }
  window.addEventListener('hashchange', route);
  route();
  showNodesLink();
  follow();
  setInterval(() => { if (!stopped) refreshAll().catch(() => {}); }, 10000);
}

start();
