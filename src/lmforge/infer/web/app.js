// The web chat: plain JavaScript over the server's own OpenAI API (no build step, no external resources).
// The conversation lives in `history` and is sent whole with every request, as the API is stateless.
// Replies stream over server-sent events read with fetch + ReadableStream, so the Stop button can abort
// the fetch; the server sees the disconnect and frees the model's batch slot.
// Images (for a vision-language model) are attached with the Image button and sent inside the user's message as
// OpenAI `image_url` content parts holding data URLs, so the server reads nothing but the request.

"use strict";

const $ = (id) => document.getElementById(id);
const history = [];        // [{role, content}], what the model sees
let model = null;          // the id /v1/models reports
let controller = null;     // AbortController of the reply being streamed, if any
let agent = null;          // /v1/agent's answer when the server runs the agent: {system_prompt, max_steps}
const attachments = [];    // data URLs of the images attached to the next message
// The server takes request bodies of 2 MB by default (--max-body-bytes), and the conversation is sent whole with
// every turn: an image file larger than this (as a data URL), or in a format the server may not decode, is
// redrawn in the page at most MAX_SIDE pixels a side, as a JPEG. The model squeezes it far smaller anyway.
const MAX_IMAGE_CHARS = 1_000_000;
const MAX_SIDE = 1024;
const SENT_AS_IS = ["image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp"];
// a fresh id for this conversation's interpreter on the server (getRandomValues: randomUUID needs https)
const sessionId = () => Array.from(crypto.getRandomValues(new Uint8Array(16)),
                                   (b) => b.toString(16).padStart(2, "0")).join("");
let agentSession = sessionId();
const emptyHint = $("empty");

function headers() {
  const key = $("api-key").value.trim();
  return { "Content-Type": "application/json", ...(key ? { Authorization: `Bearer ${key}` } : {}) };
}

async function errorMessage(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) throw new Error(await errorMessage(response));
  model = (await response.json()).data[0].id;
  $("model-name").textContent = model;
  const info = await (await fetch("/v1/agent", { headers: headers() })).json();
  if (info.enabled && !agent) {  // the conversation opens with the agent's system prompt (not shown)
    agent = info;
    history.unshift({ role: "system", content: agent.system_prompt });
    $("model-name").textContent = `${model} · agent`;
  }
}

function addMessage(role, text, images = []) {
  emptyHint.remove();
  const element = document.createElement("div");
  element.className = `message ${role}`;
  element.textContent = text;  // textContent, never innerHTML: model output is not trusted markup
  if (images.length) {
    const strip = document.createElement("div");
    strip.className = "images";
    strip.append(...images.map((url, i) => imageElement(url, `image ${i + 1}`)));
    element.prepend(strip);
  }
  $("messages").append(element);
  element.scrollIntoView({ block: "end" });
  return element;
}

function addNote(element, text) {
  const note = document.createElement("span");
  note.className = "note";
  note.textContent = text;
  element.append(note);
}

// Yield the `data:` payload of each server-sent event as it arrives (events end with a blank line).
async function* serverSentEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// Stream one reply into `bubble`. Returns {reply, stopped, ...timings}, or null when the request failed (the
// bubble then shows the error).
async function streamReply(bubble) {
  bubble.classList.add("streaming");
  controller = new AbortController();
  // Text is shown at most every 40 ms, not per token: each update costs the browser a layout of the
  // whole reply, and a long reply streamed token by token would keep the page busy.
  const shown = bubble.appendChild(document.createTextNode(""));
  let unshown = "", timer = null;
  const show = () => {
    shown.appendData(unshown);
    unshown = "";
    timer = null;
    bubble.scrollIntoView({ block: "end" });
  };

  const started = performance.now();
  let reply = "", firstTokenAt = null, chunks = 0, usage = null, stopped = false, failed = false;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      signal: controller.signal,
      body: JSON.stringify({
        model,
        messages: history,
        stream: true,
        stream_options: { include_usage: true },
        temperature: Number($("temperature").value),
        max_tokens: Number($("max-tokens").value),
      }),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const data of serverSentEvents(response.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices) {
        if (!choice.delta.content) continue;
        firstTokenAt ??= performance.now();
        chunks += 1;
        reply += choice.delta.content;
        unshown += choice.delta.content;
        timer ??= setTimeout(show, 40);
      }
    }
  } catch (error) {
    if (error.name === "AbortError") {
      stopped = true;
    } else {
      failed = true;
      bubble.classList.add("error");
      bubble.textContent = `Error: ${error.message}`;
    }
  } finally {
    clearTimeout(timer);
    if (!failed) show();
    controller = null;
    bubble.classList.remove("streaming");
  }
  if (failed) return null;
  return { reply, stopped, shown, started, firstTokenAt, chunks, usage };
}

// Agent mode (`lmforge serve --agent true`): the server finds the reply's ```python block, runs it in this
// conversation's sandboxed interpreter and answers with the reply cut after the code, and the code's output.
async function agentStep(reply) {
  const response = await fetch("/v1/agent/step", {
    method: "POST", headers: headers(), body: JSON.stringify({ session: agentSession, reply }),
  });
  if (!response.ok) throw new Error(await errorMessage(response));
  return response.json();
}

function addCode(bubble, code, output) {
  for (const [className, text] of [["code", code], ["output", output]]) {
    const block = document.createElement("pre");
    block.className = className;
    block.textContent = text;  // never innerHTML: code and its output are not trusted markup
    bubble.append(block);
  }
  bubble.scrollIntoView({ block: "end" });
}

function imageElement(url, alt) {
  const image = document.createElement("img");
  image.src = url;
  image.alt = alt;
  return image;
}

function readDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// The file as the data URL to send: as it is, or redrawn smaller (see MAX_IMAGE_CHARS). A file the browser
// cannot decode as an image is an error.
async function imageDataURL(file) {
  const url = await readDataURL(file);
  const image = new Image();
  image.src = url;
  await image.decode().catch(() => { throw new Error(`${file.name}: not an image this page can read`); });
  if (url.length <= MAX_IMAGE_CHARS && SENT_AS_IS.includes(file.type)) return url;
  const scale = Math.min(1, MAX_SIDE / Math.max(image.naturalWidth, image.naturalHeight));
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(image.naturalWidth * scale));
  canvas.height = Math.max(1, Math.round(image.naturalHeight * scale));
  canvas.getContext("2d").drawImage(image, 0, 0, canvas.width, canvas.height);
  return canvas.toDataURL("image/jpeg", 0.9);
}

// The images attached to the next message, each with a button that takes it off.
function showAttachments(error = "") {
  const items = attachments.map((url, i) => {
    const figure = document.createElement("figure");
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.title = "remove this image";
    remove.addEventListener("click", () => { attachments.splice(i, 1); showAttachments(); });
    figure.append(imageElement(url, `attached image ${i + 1}`), remove);
    return figure;
  });
  if (error) {
    const note = document.createElement("span");
    note.id = "attach-error";
    note.textContent = error;
    items.push(note);
  }
  $("attachments").replaceChildren(...items);
}

async function attachFiles(files) {
  let error = "";
  for (const file of files) {
    try {
      attachments.push(await imageDataURL(file));
    } catch (failure) {
      error = failure.message;
    }
  }
  showAttachments(error);
}

async function send(text, images = []) {
  if (!model) await loadModel();
  const turn = history.length;  // where this turn starts in the history, to take it back on an error
  // With images, OpenAI's content parts: the images first, then the text (as vision models are trained).
  const content = images.length
    ? [...images.map((url) => ({ type: "image_url", image_url: { url } })), ...(text ? [{ type: "text", text }] : [])]
    : text;
  history.push({ role: "user", content });
  addMessage("user", text, images);
  setBusy(true);
  try {
    for (let step = 0; ; step += 1) {
      const bubble = addMessage("assistant", "");
      const result = await streamReply(bubble);
      if (result === null) {  // the server did not take this turn; let the user send it again
        history.length = turn;
        return;
      }
      if (!bubble.isConnected) return;  // a new chat began
      const last = result.stopped || !agent || step === agent.max_steps;
      const action = last ? null : await agentStep(result.reply).catch((error) => {
        bubble.classList.add("error");
        bubble.append(` Error: ${error.message}`);
        return null;
      });
      if (!action || action.code === null) {
        history.push({ role: "assistant", content: result.reply });
        if (result.stopped) addNote(bubble, "stopped");
        showSpeed(result.started, result.firstTokenAt, performance.now(),
                  result.usage ? result.usage.completion_tokens : result.chunks, !result.usage,
                  result.usage?.prompt_tokens_details?.cached_tokens);
        return;
      }
      result.shown.data = action.content;  // the reply up to its code: what the model imagined after is dropped
      addCode(bubble, action.code, action.observation);
      history.push({ role: "assistant", content: action.content }, { role: "tool", content: action.observation });
    }
  } finally {
    setBusy(false);
  }
}

// Tokens per second of the last reply, counted from its first token (so the prompt's prefill is the
// separate "first token" figure). Without the final usage chunk (a stopped reply) the count is the number
// of streamed chunks, which is about one token each. `cached`: the prompt tokens (the conversation so far)
// the server's prefix cache held, so that only the new message was prefilled.
function showSpeed(started, firstTokenAt, ended, tokens, approximate, cached) {
  if (firstTokenAt === null) {
    $("speed").textContent = "no tokens";
    return;
  }
  const seconds = (ended - firstTokenAt) / 1000;
  const rate = tokens > 1 && seconds > 0 ? ((tokens - 1) / seconds).toFixed(1) : "–";
  $("speed").textContent = `${approximate ? "≈" : ""}${tokens} tokens · ${rate} tok/s · ` +
    `first token ${Math.round(firstTokenAt - started)} ms` + (cached ? ` · ${cached} prompt tokens cached` : "");
}

function newChat() {
  controller?.abort();
  if (agent) {
    fetch(`/v1/agent/session/${agentSession}`, { method: "DELETE", headers: headers() }).catch(() => {});
    agentSession = sessionId();
  }
  history.length = 0;
  attachments.length = 0;
  showAttachments();
  if (agent) history.push({ role: "system", content: agent.system_prompt });
  $("messages").replaceChildren(emptyHint);
  $("speed").textContent = "";
  $("prompt").focus();
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if ((!text && !attachments.length) || !$("stop").disabled) return;  // a turn (and its agent steps) still runs
  $("prompt").value = "";
  send(text, attachments.splice(0));
  showAttachments();
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller?.abort());
$("attach").addEventListener("click", () => $("image-file").click());
$("image-file").addEventListener("change", (event) => {
  attachFiles([...event.target.files]);
  event.target.value = "";  // the same file can be attached again
});
$("new-chat").addEventListener("click", newChat);
$("temperature").addEventListener("input", () => {
  $("temperature-value").textContent = Number($("temperature").value).toFixed(2);
});
$("api-key").addEventListener("change", () => loadModel().catch(() => {}));
loadModel().catch((error) => { $("model-name").textContent = `(${error.message})`; });
