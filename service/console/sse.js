// Server-Sent Events over fetch(): EventSource cannot send an Authorization header, so the
// console reads event streams (a job's events, a streamed chat) as response bodies instead.

/** Split complete SSE blocks off `buffer`; returns [events, rest]. An event is {id, data}. */
export function parseSSE(buffer) {
  const events = [];
  // a chunk may end between the \r and \n of one line end: keep that \r for the next call
  const hold = buffer.endsWith("\r") ? "\r" : "";
  const text = buffer.slice(0, buffer.length - hold.length).replace(/\r\n?/g, "\n");
  let start = 0;
  for (let end = text.indexOf("\n\n"); end !== -1; end = text.indexOf("\n\n", start)) {
    const block = text.slice(start, end);
    start = end + 2;
    let id = null;
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) continue; // a comment (keepalive)
      const colon = line.indexOf(":");
      const field = colon === -1 ? line : line.slice(0, colon);
      let value = colon === -1 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "id") id = value;
      else if (field === "data") data.push(value);
    }
    if (data.length) events.push({ id, data: data.join("\n") });
  }
  return [events, text.slice(start) + hold];
}

/**
 * Read an SSE response body, calling onEvent({id, data}) per event as it arrives.
 * Resolves when the stream ends; true when it ended with `data: [DONE]`.
 */
export async function readSSE(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return false;
    buffer += decoder.decode(value, { stream: true });
    const [events, rest] = parseSSE(buffer);
    buffer = rest;
    for (const event of events) {
      if (event.data === "[DONE]") return true;
      onEvent(event);
    }
  }
}
