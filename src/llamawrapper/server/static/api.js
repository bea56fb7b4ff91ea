// The server's public OpenAI routes, as the page uses them: model list, streamed chat
// completions (Server-Sent Events read from fetch, cancellable with an AbortSignal: the server
// cancels the generation when the connection closes), and JSON POSTs for the task routes.

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers(apiKey) {
  const h = { "Content-Type": "application/json" };
  if (apiKey) h.Authorization = `Bearer ${apiKey}`;
  return h;
}

async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    message = body?.error?.message ?? message;
  } catch {
    /* not JSON: keep the status line */
  }
  return new ApiError(response.status, message);
}

export async function listModels(apiKey) {
  const response = await fetch("/v1/models", { headers: headers(apiKey) });
  if (!response.ok) throw await failure(response);
  const body = await response.json();
  return Array.isArray(body.data) ? body.data : [];
}

export async function postJSON(path, payload, apiKey, signal) {
  const response = await fetch(path, { method: "POST", headers: headers(apiKey), body: JSON.stringify(payload), signal });
  if (!response.ok) throw await failure(response);
  return response.json();
}

// Yields the parsed JSON of every SSE "data:" frame until [DONE].
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = frame.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

// Streams one chat completion. onDelta(text) for each piece of answer; resolves to
// {finishReason, usage} (usage is null when the server sent none, e.g. after Stop).
export async function streamChat(request, apiKey, signal, onDelta) {
  const payload = { ...request, stream: true, stream_options: { include_usage: true } };
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(apiKey), body: JSON.stringify(payload), signal,
  });
  if (!response.ok) throw await failure(response);
  let finishReason = null;
  let usage = null;
  for await (const event of sseEvents(response)) {
    if (event.error) throw new ApiError(500, event.error.message ?? "generation failed");
    if (event.usage) usage = event.usage;
    for (const choice of event.choices ?? []) {
      if (choice.delta?.content) onDelta(choice.delta.content);
      if (choice.finish_reason) finishReason = choice.finish_reason;
    }
  }
  return { finishReason, usage };
}
