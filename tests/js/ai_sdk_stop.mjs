// Drives the AI SDK's AbstractChat, the class that useChat wraps (here with a plain state in place of
// React's), and stops its answer once more than `stopAfter` words are shown, with the stop handler
// of docs/ai-sdk.md: DELETE /api/chat/{id}/stream, awaited, and stop() only if the DELETE failed, so
// that the stream ends with the service's `abort` chunk after the last delta that the service keeps.
// Prints one JSON line: the text shown when the stop was asked for and at the end, the chat's
// status, and the message's metadata (its stream id, its usage).
//
//   node ai_sdk_stop.mjs <url of /api/chat> <{"chatId", "message", "headers", "stopAfter"} as JSON>
import { AbstractChat, DefaultChatTransport } from "ai";

const [api, requestJson] = process.argv.slice(2);
const { chatId, message, headers, stopAfter } = JSON.parse(requestJson);
const textOf = (m) => m.parts.filter((part) => part.type === "text").map((part) => part.text).join("");
const result = { shownAtStop: null, shownAtEnd: null, status: null, metadata: null };
let stopping = null; // the stop handler, once Stop is "pressed"

// What a page renders: a copy of each message as the chat hands it over (React's state copies too).
class PlainState {
  status = "ready";
  error = undefined;
  messages = [];
  pushMessage = (m) => this.show([...this.messages, structuredClone(m)]);
  popMessage = () => this.show(this.messages.slice(0, -1));
  replaceMessage = (i, m) => this.show(this.messages.map((old, j) => (j === i ? structuredClone(m) : old)));
  snapshot = (thing) => structuredClone(thing);
  show(messages) {
    this.messages = messages;
    const last = messages.at(-1);
    if (stopping === null && last?.role === "assistant" && textOf(last).split(" ").length > stopAfter) {
      result.shownAtStop = textOf(last);
      stopping = stop();
    }
  }
}

const transport = new DefaultChatTransport({ api, headers });
const chat = new AbstractChat({ id: chatId, transport, state: new PlainState() });

async function stop() {
  const response = await fetch(`${api}/${encodeURIComponent(chatId)}/stream`, { method: "DELETE", headers }).catch(
    () => null,
  );
  if (!response?.ok) await chat.stop(); // the service did not take it: at least stop reading
}

await chat.sendMessage({ text: message });
await stopping;
const last = chat.messages.at(-1);
Object.assign(result, { shownAtEnd: textOf(last), status: chat.status, metadata: last.metadata ?? null });
console.log(JSON.stringify(result));
