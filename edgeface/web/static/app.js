// edgeface web: the dashboard's live decisions and door states over Server-Sent Events (no framework, no CDN).
(function () {
  "use strict";
  var list = document.getElementById("decisions");
  if (!list || !window.EventSource) { return; }
  var status = document.getElementById("live-status");
  var source = new EventSource(list.getAttribute("data-events"));
  source.onopen = function () { if (status) { status.textContent = "(live)"; } };
  source.onerror = function () { if (status) { status.textContent = "(reconnecting…)"; } };
  source.onmessage = function (msg) {
    var data;
    try { data = JSON.parse(msg.data); } catch (e) { return; }
    if (data.type === "decision") {
      var empty = document.getElementById("no-decisions");
      if (empty) { empty.remove(); }
      var li = document.createElement("li");
      li.className = String(data.result || "");
      var b = document.createElement("b");
      b.textContent = String(data.result || "");
      var t = document.createElement("time");
      t.textContent = String(data.timestamp || "");
      li.appendChild(b);
      li.appendChild(document.createTextNode(" " + (data.person_name || "unknown visitor") + " "));
      li.appendChild(t);
      list.insertBefore(li, list.firstChild);
      while (list.children.length > 20) { list.removeChild(list.lastChild); }
    } else if (data.type === "state") {
      var el = document.getElementById("st-" + data.key);
      if (el) {
        var v = String(data.value);
        if (data.key === "outbox") { try { v = String(JSON.parse(v).waiting); } catch (e) { /* keep text */ } }
        el.textContent = v;
      }
    } else if (data.type === "broker") {
      var br = document.getElementById("st-broker");
      if (br) { br.textContent = data.connected ? "connected" : "not connected"; }
    }
  };
})();
// The live view: reload the snapshot at the daemon's rate; say so when there is none.
(function () {
  "use strict";
  var img = document.getElementById("live");
  if (!img) { return; }
  var status = document.getElementById("live-status");
  var every = Math.max(1, parseFloat(img.getAttribute("data-refresh-s")) || 2) * 1000;
  img.onerror = function () { if (status) { status.textContent = "No recent picture: is the daemon running?"; } };
  img.onload = function () { if (status) { status.textContent = "updated " + new Date().toLocaleTimeString(); } };
  setInterval(function () { img.src = "/live.jpg?t=" + Date.now(); }, every);
})();
