// Live tunnel states (server-sent events) for the hub and the tunnel page, and the hub's "select all".
"use strict";
(function () {
  function badge(text) {
    var span = document.createElement("span");
    span.className = "badge " + String(text).toLowerCase();
    span.textContent = text;
    return span;
  }
  function showTime(iso) {
    var t = document.createElement("time");
    t.setAttribute("datetime", iso);
    t.textContent = iso.replace("T", " ").replace("Z", " UTC");
    return t;
  }
  function setCell(container, field, node) {
    var cell = container.querySelector('[data-field="' + field + '"]');
    if (cell && cell.textContent !== node.textContent) { cell.replaceChildren(node); }
  }
  var note = document.getElementById("live-note");
  function tell(text) {
    if (note) { note.textContent = text; note.hidden = false; }
  }
  var scope = document.querySelector("[data-tunnel]");
  if (!scope) { return; }
  var single = scope.tagName === "DL";
  var prefix = document.querySelector('link[rel="stylesheet"]').getAttribute("href").replace(/static\/console\.css$/, "");
  var url = single ? prefix + "tunnel/" + encodeURIComponent(scope.getAttribute("data-tunnel")) + "/events" : prefix + "events";
  var rows = new Map();
  document.querySelectorAll("[data-tunnel]").forEach(function (el) { rows.set(el.getAttribute("data-tunnel"), el); });
  var source = new EventSource(url);
  source.addEventListener("tunnel", function (event) {
    var data = JSON.parse(event.data);
    var row = rows.get(data.id);
    if (!row) {
      if (!single) { tell("New tunnels were opened: reload the page to see them."); }
      return;
    }
    setCell(row, "status", badge(data.status));
    setCell(row, "source", badge(data.source));
    setCell(row, "destination", badge(data.destination));
    setCell(row, "updated", showTime(data.updated));
  });
  source.addEventListener("gone", function (event) {
    var data = JSON.parse(event.data);
    var el = rows.get(data.id);
    if (el) {
      if (single) { tell("This tunnel was deleted."); } else { el.remove(); rows.delete(data.id); }
    }
  });
  source.addEventListener("signedout", function () {
    source.close();
    tell("Your session ended: sign in again.");
  });

  var all = document.getElementById("select-all");
  if (all) {
    all.addEventListener("change", function () {
      document.querySelectorAll('input[name="tunnel"]').forEach(function (box) { box.checked = all.checked; });
    });
  }
})();
