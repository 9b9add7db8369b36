// The browser terminal: xterm.js on a WebSocket to the console, which runs the SSH client.
// Credentials go in the WebSocket's first message only; the form is cleared as soon as it is sent.
"use strict";
(function () {
  var form = document.getElementById("ssh-login");
  if (!form) { return; }
  var statusLine = document.getElementById("ssh-status");
  var warning = document.getElementById("ssh-hostkey");
  var wrap = document.getElementById("terminal-wrap");
  if (typeof Terminal === "undefined" || typeof FitAddon === "undefined") {
    statusLine.textContent = "The terminal's code (xterm.js) did not load: ask the operator to install it (npm ci --prefix tunnelkit/service/console/vendor).";
    return;
  }
  // xterm.js adds <style> elements of its own: give them this page's CSP nonce.
  var nonceMeta = document.querySelector('meta[name="tunnelkit-style-nonce"]');
  var nonce = nonceMeta ? nonceMeta.getAttribute("content") : "";
  var createElement = document.createElement.bind(document);
  document.createElement = function (name, options) {
    var element = createElement(name, options);
    if (nonce && String(name).toLowerCase() === "style") { element.setAttribute("nonce", nonce); }
    return element;
  };

  var term = null, fit = null, socket = null, ended = false;
  var encoder = new TextEncoder();
  function say(text) { statusLine.textContent = text; }
  function send(message) {
    if (socket && socket.readyState === WebSocket.OPEN) { socket.send(JSON.stringify(message)); }
  }
  function resized() {
    if (!fit) { return; }
    fit.fit();
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    if (socket) { return; }
    var user = form.querySelector("#ssh-user").value;
    var password = form.querySelector("#ssh-password").value;
    var key = form.querySelector("#ssh-key").value;
    var passphrase = form.querySelector("#ssh-passphrase").value;
    form.querySelector("#ssh-password").value = "";
    form.querySelector("#ssh-key").value = "";
    form.querySelector("#ssh-passphrase").value = "";
    form.hidden = true;
    wrap.hidden = false;
    term = new Terminal({ cursorBlink: true, fontSize: 14, scrollback: 5000, allowProposedApi: false,
                          theme: { background: "#000000" } });
    fit = new FitAddon.FitAddon();
    term.loadAddon(fit);
    term.open(document.getElementById("terminal"));
    fit.fit();
    term.attachCustomKeyEventHandler(function (e) {
      if (e.type === "keydown" && e.ctrlKey && e.shiftKey && (e.key === "C" || e.key === "c")) {
        if (navigator.clipboard) { navigator.clipboard.writeText(term.getSelection()); }
        return false;
      }
      if (e.type === "keydown" && e.ctrlKey && e.shiftKey && (e.key === "V" || e.key === "v")) {
        if (navigator.clipboard) { navigator.clipboard.readText().then(function (t) { term.paste(t); }); }
        return false;
      }
      return true;
    });
    var url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + form.getAttribute("data-ws") +
      "?tunnel=" + encodeURIComponent(form.getAttribute("data-tunnel"));
    socket = new WebSocket(url);
    socket.binaryType = "arraybuffer";
    socket.addEventListener("open", function () {
      send({ type: "connect", csrf: form.getAttribute("data-csrf"), user: user, password: password, key: key,
             passphrase: passphrase, cols: term.cols, rows: term.rows });
      user = password = key = passphrase = null;
    });
    socket.addEventListener("message", function (event) {
      if (typeof event.data !== "string") {
        term.write(new Uint8Array(event.data));
        return;
      }
      var message = JSON.parse(event.data);
      if (message.type === "status") { say(message.text); }
      else if (message.type === "hostkey") {
        if (message.status === "changed") {
          warning.textContent = "WARNING: the device's host key changed: was " + message.expected_type + " " +
            message.expected + ", now " + message.key_type + " " + message.fingerprint + ".";
          warning.hidden = false;
        } else {
          var how = { "new": message.scope === "tunnel" ?
                        "first connection: remembered for this tunnel only (it has no thing)" :
                        "first connection: remembered for this thing",
                      "known": "matches the remembered key" }[message.status] || message.status;
          var shown = document.getElementById("ssh-fingerprint");
          shown.textContent = "Host key of the device: " + message.key_type + " " + message.fingerprint + " (" + how + ")";
          shown.setAttribute("data-fingerprint", message.fingerprint);
        }
      } else if (message.type === "ready") {
        say(statusLine.textContent + " Terminal ready.");
        term.focus();
      } else if (message.type === "closed") {
        ended = true;
        say(message.text);
        term.write("\r\n\x1b[1;33m[" + message.text.replace(/[\x00-\x1f]/g, " ") + "]\x1b[0m\r\n");
      }
    });
    socket.addEventListener("close", function (event) {
      if (!ended) {
        ended = true;
        var text = event.reason ? "Disconnected: " + event.reason : "Disconnected from the console.";
        say(text);
        term.write("\r\n\x1b[1;33m[" + text + "]\x1b[0m\r\n");
      }
    });
    term.onData(function (data) {
      if (socket.readyState === WebSocket.OPEN) { socket.send(encoder.encode(data)); }
    });
    term.onResize(function (size) { send({ type: "resize", cols: size.cols, rows: size.rows }); });
    window.addEventListener("resize", resized);
  });
})();
