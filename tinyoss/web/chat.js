// The chat page of `tinyoss serve`: keeps the conversation in memory, POSTs all of it to
// v1/chat/completions with every message and reads the reply as Server-Sent Events.
// Model output only ever goes into the page as text (textContent, Text nodes), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const view = $("messages"), prompt = $("prompt"), sendButton = $("send"), stopButton = $("stop");
const effort = $("effort"), statusLine = $("status"), keyInput = $("api-key"), maxTokens = $("max-tokens");

let conversation = [];  // [{role, content}]: what the model sees; "New chat" starts a new array
let model = null;       // the id GET v1/models lists first
let controller = null;  // the AbortController of the reply streaming now, null when idle

// The API key: ?key=... in the page's address, else the one saved from the settings field.
const KEY = "tinyoss-api-key";
keyInput.value = new URLSearchParams(location.search).get("key") ?? localStorage.getItem(KEY) ?? "";
keyInput.addEventListener("change", () => {
  if (keyInput.value) localStorage.setItem(KEY, keyInput.value); else localStorage.removeItem(KEY);
});

function headers() {
  const h = {"Content-Type": "application/json"};
  if (keyInput.value) h.Authorization = `Bearer ${keyInput.value}`;
  return h;
}

// A non-2xx response carries an OpenAI error body: {"error": {"message", "type", "param", "code"}}.
async function errorMessage(response) {
  const text = await response.text();
  try {
    return JSON.parse(text).error.message;
  } catch {
    return `${response.status} ${response.statusText} ${text.slice(0, 200)}`.trim();
  }
}

async function modelId(signal) {
  if (!model) {
    const response = await fetch("v1/models", {headers: headers(), signal});
    if (!response.ok) throw new Error(await errorMessage(response));
    model = (await response.json()).data[0].id;
    $("model").textContent = model;
  }
  return model;
}

// Yields the data of each event of an SSE body ("data: ..." lines, events apart by a blank line).
async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();  // rejects with an AbortError once Stop aborts
    if (done) return;
    buffer = (buffer + value).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const lines = buffer.slice(0, end).split("\n");
      buffer = buffer.slice(end + 2);
      const data = lines.filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, ""));
      if (data.length) yield data.join("\n");
    }
  }
}

// The conversation view --------------------------------------------------------------------------

// Appends to the page, and keeps the end of the conversation in view if the reader was there.
function append(parent, child) {
  const atEnd = view.scrollHeight - view.scrollTop - view.clientHeight < 60;
  parent.append(child);  // a string becomes a Text node: never parsed as HTML
  if (atEnd) view.scrollTop = view.scrollHeight;
  return child;
}

function element(tag, className, text = "") {
  const e = document.createElement(tag);
  e.className = className;
  e.textContent = text;
  return e;
}

function assistantBubble() {
  const bubble = element("div", "msg assistant");
  bubble.dataset.state = "streaming";
  bubble.innerHTML = '<details class="reasoning" open hidden><summary>Reasoning</summary>' +
    '<div class="reasoning-text"></div></details><div class="answer"></div>';  // fixed markup only
  return append(view, bubble);
}

const note = (bubble, text) => append(bubble, element("span", "note", text));

// Tokens/s counts the chunks that carried reasoning or content, over the time from the first to
// the latest of them; the time to the first one (prompt processing) is shown apart.
function showStats(s) {
  const parts = [];
  if (s.first !== null) {
    const seconds = (s.last - s.first) / 1000;
    parts.push(`${s.tokens > 1 && seconds > 0 ? ((s.tokens - 1) / seconds).toFixed(1) : "–"} tok/s`);
    parts.push(`first token ${((s.first - s.start) / 1000).toFixed(2)} s`);
  }
  const u = s.usage;
  if (u) {
    const reasoning = u.completion_tokens_details?.reasoning_tokens;
    parts.push(`${u.completion_tokens} tokens` + (reasoning ? ` (${reasoning} reasoning)` : ""));
    const cached = u.prompt_tokens_details?.cached_tokens;
    if (cached != null) parts.push(`${cached} of ${u.prompt_tokens} prompt tokens cached`);
  }
  statusLine.textContent = parts.join(" · ");
}

function setBusy(busy) {
  view.setAttribute("aria-busy", busy);  // screen readers read the reply once, when it's whole
  sendButton.disabled = busy;
  stopButton.disabled = !busy;
}

// One turn: the user's message, then the reply streamed into a new assistant bubble ----------------

async function send() {
  const text = prompt.value.trim();
  if (!text || controller) return;
  prompt.value = "";
  const turn = conversation;  // "New chat" mid-reply swaps the array: this reply then lands nowhere
  const userBubble = append(view, element("div", "msg user", text));
  turn.push({role: "user", content: text});
  const bubble = assistantBubble();
  const details = bubble.querySelector(".reasoning");
  const reasoningText = bubble.querySelector(".reasoning-text"), answer = bubble.querySelector(".answer");
  const mine = controller = new AbortController();
  setBusy(true);
  const stats = {start: performance.now(), first: null, last: null, tokens: 0, usage: null};
  let content = "", state = "done";
  statusLine.textContent = "waiting for the first token…";
  try {
    const body = {
      model: await modelId(mine.signal), messages: turn, stream: true,
      stream_options: {include_usage: true}, reasoning_effort: effort.value,
    };
    if (maxTokens.value) body.max_tokens = Number(maxTokens.value);
    const response = await fetch("v1/chat/completions",
      {method: "POST", headers: headers(), body: JSON.stringify(body), signal: mine.signal});
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const data of sseData(response.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices?.[0];
      const delta = choice?.delta ?? {};
      const reasoning = delta.reasoning_content ?? delta.reasoning;  // both carry the same text
      if (reasoning || delta.content) {
        stats.last = performance.now();
        if (stats.first === null) stats.first = stats.last;
        stats.tokens += 1;
      }
      if (reasoning) {
        details.hidden = false;
        append(reasoningText, reasoning);
      }
      if (delta.content) {
        if (!content) details.open = false;  // the answer starts: fold the reasoning away
        content += delta.content;
        append(answer, delta.content);
      }
      if (choice?.finish_reason === "length") note(bubble, "(max tokens reached)");
      if (chunk.usage) stats.usage = chunk.usage;
      showStats(stats);
    }
  } catch (error) {
    state = error.name === "AbortError" ? "stopped" : "error";
    if (state === "error") {
      bubble.classList.add("error");
      // fetch, and reading a body, fail with a TypeError when the network does
      note(bubble, error instanceof TypeError ? `Network error: ${error.message}` : error.message);
    }
  } finally {
    if (controller === mine) controller = null;
    setBusy(false);
  }
  bubble.dataset.state = state;
  details.open = !content && reasoningText.textContent !== "";
  if (state === "stopped") note(bubble, "(stopped)");
  if (state === "error" || !content && state === "stopped") {
    turn.pop();  // unanswered: the model won't see this message again, and it's back in the box
    userBubble.classList.add("unsent");
    if (!prompt.value) prompt.value = text;
  } else {
    turn.push({role: "assistant", content});  // the answer only: the server drops old reasoning
  }
  if (state !== "error") showStats(stats);
}

// Controls ---------------------------------------------------------------------------------------

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
stopButton.addEventListener("click", () => controller?.abort());
$("new-chat").addEventListener("click", () => {
  controller?.abort();
  conversation = [];
  view.replaceChildren();
  statusLine.textContent = "";
  prompt.focus();
});

modelId().catch((error) => { statusLine.textContent = error.message; });
prompt.focus();
