"use strict";
// What the chat page (index.html) and the arena (arena.html) share: element lookup, the API key (kept in
// localStorage), request headers, error text, and the message box (Enter sends, Shift+Enter is a new line).
const $ = (id) => document.getElementById(id);
$("key").value = localStorage.getItem("chatrl-key") || "";
$("key").addEventListener("change", () => localStorage.setItem("chatrl-key", $("key").value));

function headers() {
  const h = {"Content-Type": "application/json"};
  if ($("key").value) h["Authorization"] = "Bearer " + $("key").value;
  return h;
}

async function errorText(resp) {
  try { const body = await resp.json(); return body.error ? body.error.message : JSON.stringify(body); }
  catch (e) { return resp.status + " " + resp.statusText; }
}

// Calls send(text) with the typed message when the form is submitted, unless the box is empty or busy() is true.
function onMessage(send, busy) {
  $("form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("input").value.trim();
    if (!text || busy()) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("form").requestSubmit(); }
  });
}
