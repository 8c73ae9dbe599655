// lm4lv comparison page: means, per-image table (sort, filter, pages) and a before/after viewer
// with synchronised zoom and pan. Data: window.LM4LV_PAGE (written by lm4lv next to the page).
(function () {
  "use strict";
  var D = window.LM4LV_PAGE, M = D.metrics, F = D.labels, NF = F.length, NM = M.length;
  var $ = function (id) { return document.getElementById(id); };
  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    for (var k in (attrs || {})) e.setAttribute(k, attrs[k]);
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }
  function fmt(v, m) { return v === null || v === undefined ? "–" : v.toFixed(m === "psnr" ? 2 : 4); }
  function sgn(v, m) { return v === null || v === undefined ? "–" : (v >= 0 ? "+" : "") + fmt(v, m); }
  function arrow(i) { return D.higher[i] ? " ↑" : " ↓"; }
  function better(d, i) { return d === 0 || d === null ? "" : ((d > 0) === D.higher[i] ? "pos" : "neg"); }
  // a row: [name, group, gt, [preds], [values k*NM+m], thumb]
  var R = D.rows.map(function (r, i) {
    return {i: i, name: r[0], group: D.groups[r[1]] || "", gt: r[2] === null ? null : D.prefixes[0] + r[2],
      preds: r[3].map(function (p, k) { return p === null ? null : D.prefixes[k + 1] + p; }),
      v: r[4], thumb: r[5] ? D.thumbPrefix + r[5] : null};
  });
  function val(r, k, m) { var x = r.v[k * NM + m]; return x === undefined ? null : x; }
  function gain(r, k, m) { var a = val(r, k, m), b = val(r, 0, m); return a === null || b === null ? null : a - b; }

  // ---------------------------------------------------------------- means, settings, unmatched
  function meansTables() {
    var box = $("means");
    D.means.forEach(function (g) {
      if (D.means.length > 1) box.appendChild(el("h3", {}, g.group));
      var t = el("table"), h = el("tr");
      h.appendChild(el("th", {"class": "l"}, "metric"));
      F.forEach(function (f, k) {
        h.appendChild(el("th", {}, f));
        if (k) h.appendChild(el("th", {}, "Δ vs " + F[0]));
      });
      t.appendChild(h);
      M.forEach(function (m, j) {
        var tr = el("tr");
        tr.appendChild(el("td", {"class": "l"}, m.toUpperCase() + arrow(j)));
        F.forEach(function (f, k) {
          tr.appendChild(el("td", {}, fmt(g.mean[k] ? g.mean[k][j] : null, m)));
          if (k) { var d = g.diff[k] ? g.diff[k][j] : null; tr.appendChild(el("td", {"class": better(d, j)}, sgn(d, m))); }
        });
        t.appendChild(tr);
      });
      var c = el("tr");
      c.appendChild(el("td", {"class": "l"}, "images"));
      F.forEach(function (f, k) { c.appendChild(el("td", {}, String(g.count[k]))); if (k) c.appendChild(el("td")); });
      t.appendChild(c);
      box.appendChild(t);
    });
    var s = $("settings");
    Object.keys(D.settings).forEach(function (k) {
      s.appendChild(el("li", {}, k + ": " + JSON.stringify(D.settings[k])));
    });
    var u = $("unmatched"), any = false;
    D.unmatched.forEach(function (x) {
      [["gt", "ground-truth images without a prediction"], ["pred", "predictions without a ground-truth image"]]
        .forEach(function (w) {
          var names = x[w[0]] || [];
          if (!names.length) return;
          any = true;
          var d = el("details"); d.appendChild(el("summary", {}, names.length + " " + w[1] + " (" + x.label + ")"));
          d.appendChild(el("pre", {}, names.join("\n")));
          u.appendChild(d);
        });
    });
    if (!any) u.appendChild(el("p", {"class": "muted"}, "none: every image was matched"));
  }

  // ---------------------------------------------------------------- per-image table
  var cols = [{key: "name", label: "name", get: function (r) { return r.name; }, text: true}];
  if (D.groups.length > 1) cols.push({key: "group", label: "group", get: function (r) { return r.group; }, text: true});
  F.forEach(function (f, k) {
    M.forEach(function (m, j) {
      cols.push({key: "v" + k + "_" + m, label: f + " " + m.toUpperCase() + arrow(j), get: function (r) { return val(r, k, j); }, m: m});
    });
  });
  for (var k0 = 1; k0 < NF; k0++) (function (k) {
    M.forEach(function (m, j) {
      cols.push({key: "gain" + k + "_" + m, label: m.toUpperCase() + " gain " + F[k], get: function (r) { return gain(r, k, j); },
        m: m, gain: j});
    });
  })(k0);
  var st = {sort: null, dir: 1, page: 0, size: 50, filter: "", group: "", shown: R, cur: 0};

  function applyView() {
    var q = st.filter.toLowerCase();
    var out = R.filter(function (r) {
      return (!q || r.name.toLowerCase().indexOf(q) >= 0) && (!st.group || r.group === st.group);
    });
    if (st.sort) {
      var c = cols.filter(function (c) { return c.key === st.sort; })[0], d = st.dir;
      out.sort(function (a, b) {
        var x = c.get(a), y = c.get(b);
        if (x === null) return 1; if (y === null) return -1;
        return (c.text ? String(x).localeCompare(String(y)) : x - y) * d || a.i - b.i;
      });
    }
    st.shown = out;
    var pages = Math.max(1, Math.ceil(out.length / st.size));
    st.page = Math.min(st.page, pages - 1);
    renderTable(pages);
  }
  function renderTable(pages) {
    var t = $("rows"), head = el("tr");
    t.innerHTML = "";
    head.appendChild(el("th", {"class": "l"}, ""));
    cols.forEach(function (c) {
      var th = el("th", {"data-key": c.key, "class": c.text ? "l" : ""}, c.label);
      if (st.sort === c.key) th.className += st.dir > 0 ? " sorted-asc" : " sorted-desc";
      th.addEventListener("click", function () { sortBy(c.key); });
      head.appendChild(th);
    });
    var thead = el("thead"); thead.appendChild(head); t.appendChild(thead);
    var body = el("tbody"), from = st.page * st.size;
    st.shown.slice(from, from + st.size).forEach(function (r) {
      var tr = el("tr", {"data-index": String(r.i)});
      if (r.i === R[st.cur].i) tr.className = "cur";
      var td = el("td", {"class": "l"}), src = r.thumb || r.preds[NF - 1] || r.gt;
      if (src) td.appendChild(el("img", {src: src, loading: "lazy", alt: r.name}));
      tr.appendChild(td);
      cols.forEach(function (c) {
        var v = c.get(r);
        tr.appendChild(el("td", {"class": c.text ? "l" : (c.gain !== undefined ? better(v, c.gain) : "")},
          c.text ? v : (c.gain !== undefined ? sgn(v, c.m) : fmt(v, c.m))));
      });
      tr.addEventListener("click", function () { show(r.i); });
      body.appendChild(tr);
    });
    t.appendChild(body);
    $("pageinfo").textContent = "page " + (st.page + 1) + " of " + pages + " · " + st.shown.length + " of " + R.length + " images";
  }
  function sortBy(key) {
    if (st.sort === key) st.dir = -st.dir; else { st.sort = key; st.dir = 1; }
    st.page = 0; applyView();
  }

  // ---------------------------------------------------------------- the viewer
  var sides = F.map(function (f, k) { return {label: f, k: k}; }).concat([{label: "ground truth", k: -1}]);
  var V = {left: 0, right: NF > 1 ? 1 : NF, z: 1, x: 0, y: 0, w: 1, h: 1, split: 50, fitted: true};
  function srcOf(r, side) { var s = sides[side]; return s.k < 0 ? r.gt : r.preds[s.k]; }
  function fillSelect(sel, which) {
    sides.forEach(function (s, i) { sel.appendChild(el("option", {value: String(i)}, s.label)); });
    sel.value = String(V[which]);
    sel.addEventListener("change", function () { V[which] = +sel.value; show(R[st.cur].i); });
  }
  function transform() {
    var t = "translate(" + V.x + "px," + V.y + "px) scale(" + V.z + ")";
    $("stageL").style.transform = t; $("stageR").style.transform = t;
    $("view").classList.toggle("pix", V.z > 1);
    $("zoominfo").textContent = (V.z >= 1 ? V.z.toFixed(V.z < 10 ? 2 : 0).replace(/\.?0+$/, "") : V.z.toFixed(2)) + "×";
  }
  function fit() {
    var vw = $("view").clientWidth, vh = $("view").clientHeight;
    V.z = Math.min(vw / V.w, vh / V.h);
    if (V.z > 1) V.z = Math.max(1, Math.floor(V.z));
    V.x = (vw - V.w * V.z) / 2; V.y = (vh - V.h * V.z) / 2; V.fitted = true;
    transform();
  }
  function zoomAt(f, cx, cy) {
    var z = Math.min(64, Math.max(0.05, V.z * f));
    V.x = cx - (cx - V.x) * z / V.z; V.y = cy - (cy - V.y) * z / V.z; V.z = z; V.fitted = false;
    transform();
  }
  function setSplit(p) {
    V.split = Math.max(0, Math.min(100, p));
    $("layerR").style.clipPath = "inset(0 0 0 " + V.split + "%)";
    $("divider").style.left = V.split + "%";
    $("slider").value = String(V.split);
  }
  function show(i) {
    var pos = R.indexOf(R[i]);
    st.cur = pos;
    var r = R[pos], a = srcOf(r, V.left), b = srcOf(r, V.right), imgL = $("imgL"), imgR = $("imgR");
    $("selL").value = String(V.left); $("selR").value = String(V.right);
    $("tagL").textContent = sides[V.left].label; $("tagR").textContent = sides[V.right].label;
    $("curname").textContent = r.name + (r.group ? "  [" + r.group + "]" : "");
    imgL.onload = function () {
      if (imgL.naturalWidth !== V.w || imgL.naturalHeight !== V.h || V.fitted) {
        V.w = imgL.naturalWidth; V.h = imgL.naturalHeight; fit();
      }
    };
    imgL.src = a || ""; imgR.src = b || "";
    if (!a) imgL.removeAttribute("src"); if (!b) imgR.removeAttribute("src");
    var s = $("scores"); s.innerHTML = "";
    var h = el("tr"); h.appendChild(el("th", {"class": "l"}, ""));
    M.forEach(function (m, j) { h.appendChild(el("th", {}, m.toUpperCase() + arrow(j))); });
    if (NF > 1) M.forEach(function (m) { h.appendChild(el("th", {}, "Δ " + m.toUpperCase() + " vs " + F[0])); });
    s.appendChild(h);
    F.forEach(function (f, k) {
      var tr = el("tr"); tr.appendChild(el("td", {"class": "l"}, f));
      M.forEach(function (m, j) { tr.appendChild(el("td", {}, fmt(val(r, k, j), m))); });
      if (NF > 1) M.forEach(function (m, j) { var g = k ? gain(r, k, j) : null; tr.appendChild(el("td", {"class": better(g, j)}, k ? sgn(g, m) : "")); });
      s.appendChild(tr);
    });
    var rows = $("rows").querySelectorAll("tbody tr");
    for (var n = 0; n < rows.length; n++) rows[n].className = +rows[n].getAttribute("data-index") === r.i ? "cur" : "";
  }
  function step(d) {
    var list = st.shown.length ? st.shown : R, p = list.indexOf(R[st.cur]);
    var next = list[(p < 0 ? 0 : p + d + list.length) % list.length];
    var at = list.indexOf(next);
    if (Math.floor(at / st.size) !== st.page) { st.page = Math.floor(at / st.size); applyView(); }
    show(next.i);
  }
  function cycle(which, d) { V[which] = (V[which] + d + sides.length) % sides.length; show(R[st.cur].i); }

  function viewer() {
    fillSelect($("selL"), "left"); fillSelect($("selR"), "right");
    var view = $("view"), drag = null;
    view.addEventListener("mousedown", function (e) { drag = {x: e.clientX - V.x, y: e.clientY - V.y}; view.classList.add("drag"); });
    window.addEventListener("mouseup", function () { drag = null; view.classList.remove("drag"); });
    window.addEventListener("mousemove", function (e) {
      if (!drag) return; V.x = e.clientX - drag.x; V.y = e.clientY - drag.y; V.fitted = false; transform();
    });
    view.addEventListener("wheel", function (e) {
      e.preventDefault(); var b = view.getBoundingClientRect();
      zoomAt(e.deltaY < 0 ? 2 : 0.5, e.clientX - b.left, e.clientY - b.top);
    }, {passive: false});
    function centre(f) { zoomAt(f, view.clientWidth / 2, view.clientHeight / 2); }
    $("zin").onclick = function () { centre(2); }; $("zout").onclick = function () { centre(0.5); };
    $("zfit").onclick = fit; $("prev").onclick = function () { step(-1); }; $("next").onclick = function () { step(1); };
    $("swap").onclick = function () { var t = V.left; V.left = V.right; V.right = t; show(R[st.cur].i); };
    $("slider").addEventListener("input", function () { setSplit(+$("slider").value); });
    document.addEventListener("keydown", function (e) {
      var t = e.target.tagName;
      if (t === "INPUT" && e.target.type !== "range" || t === "SELECT" || t === "TEXTAREA" || e.ctrlKey || e.metaKey || e.altKey) return;
      var k = e.key, done = true;
      if (k === "j" || k === "n" || k === "ArrowDown") step(1);
      else if (k === "k" || k === "p" || k === "ArrowUp") step(-1);
      else if (k === "a") cycle("left", 1); else if (k === "A") cycle("left", -1);
      else if (k === "b") cycle("right", 1); else if (k === "B") cycle("right", -1);
      else if (k === "s") $("swap").onclick();
      else if (k === "+" || k === "=") centre(2); else if (k === "-") centre(0.5); else if (k === "0") fit();
      else if (k === "ArrowLeft" && t !== "INPUT") setSplit(V.split - 5);
      else if (k === "ArrowRight" && t !== "INPUT") setSplit(V.split + 5);
      else done = false;
      if (done) e.preventDefault();
    });
    window.addEventListener("resize", function () { if (V.fitted) fit(); });
    setSplit(50);
  }

  function controls() {
    $("filter").addEventListener("input", function () { st.filter = this.value; st.page = 0; applyView(); });
    var g = $("group");
    if (D.groups.length > 1) D.groups.forEach(function (x) { g.appendChild(el("option", {value: x}, x)); });
    else g.style.display = "none";
    g.addEventListener("change", function () { st.group = g.value; st.page = 0; applyView(); });
    $("psize").addEventListener("change", function () { st.size = +this.value; st.page = 0; applyView(); });
    $("pprev").onclick = function () { if (st.page > 0) { st.page--; applyView(); } };
    $("pnext").onclick = function () { st.page++; applyView(); };
  }

  document.title = D.title;
  $("title").textContent = D.title;
  (D.notes || []).forEach(function (n) { $("notes").appendChild(el("p", {}, n)); });
  meansTables(); controls(); viewer(); applyView();
  if (R.length) show(0);
  window.lm4lv = {rows: R, state: st, view: V, show: show, step: step, sortBy: sortBy, fit: fit, setSplit: setSplit,
    zoom: function (f) { zoomAt(f, $("view").clientWidth / 2, $("view").clientHeight / 2); },
    images: function () {
      var s = {};
      R.forEach(function (r) { if (r.gt) s[r.gt] = 1; r.preds.forEach(function (p) { if (p) s[p] = 1; }); if (r.thumb) s[r.thumb] = 1; });
      return Object.keys(s);
    }};
  document.body.setAttribute("data-ready", "1");
})();
