/**
 * Reading a text/event-stream body as the WHATWG HTML standard says (section 9.2.6):
 * lines end in CR, LF or CRLF; `data` lines join with LF; comments start with ':'.
 */

export interface ServerSentEvent {
  /** The `event` field, "message" when absent. */
  event: string;
  data: string;
  /** The `id` field of this event, if it had one. */
  id?: string;
  /** The `retry` field in milliseconds, if this event carried one. */
  retry?: number;
}

/** Yield each event of BODY as it arrives; a block with only `retry` is yielded too. */
export async function* readEvents(body: ReadableStream<Uint8Array>): AsyncGenerator<ServerSentEvent> {
  const decoder = new TextDecoder();
  const reader = body.getReader();
  let buffer = "";
  let block: Partial<ServerSentEvent> & { dataLines: string[] } = { dataLines: [] };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      let match: RegExpExecArray | null;
      // A CR at the very end may be the first half of a CRLF: wait for the next read.
      while ((match = /\r\n|\r(?!$)|\n/.exec(buffer)) !== null) {
        const line = buffer.slice(0, match.index);
        buffer = buffer.slice(match.index + match[0].length);
        if (line === "") {
          const event = finish(block);
          if (event) yield event;
          block = { dataLines: [] };
        } else {
          addField(block, line);
        }
      }
      if (done) return;
    }
  } finally {
    reader.releaseLock();
  }
}

function addField(block: Partial<ServerSentEvent> & { dataLines: string[] }, line: string): void {
  if (line.startsWith(":")) return;
  const colon = line.indexOf(":");
  const name = colon < 0 ? line : line.slice(0, colon);
  let value = colon < 0 ? "" : line.slice(colon + 1);
  if (value.startsWith(" ")) value = value.slice(1);
  if (name === "data") block.dataLines.push(value);
  else if (name === "event") block.event = value;
  else if (name === "id" && !value.includes("\0")) block.id = value;
  else if (name === "retry" && /^[0-9]+$/.test(value)) block.retry = Number(value);
}

function finish(block: Partial<ServerSentEvent> & { dataLines: string[] }): ServerSentEvent | undefined {
  if (block.dataLines.length === 0 && block.retry === undefined) return undefined;
  const event: ServerSentEvent = { event: block.event || "message", data: block.dataLines.join("\n") };
  if (block.id !== undefined) event.id = block.id;
  if (block.retry !== undefined) event.retry = block.retry;
  return event;
}
