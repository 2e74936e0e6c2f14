// Drives the AI SDK (the `ai` package) as useChat does: its DefaultChatTransport sends the chat to
// POST /api/chat and readUIMessageStream builds the assistant message from the chunks. With
// "reconnect", a send that breaks is followed by the transport's reconnectToStream (what useChat's
// resumeStream calls), and once the message is whole, by another that must find nothing (204).
// With "abortAfter": N, the send is aborted after N text deltas, as useChat's stop() does.
// Prints one JSON line: the message, the chunk types of each read, and the errors seen.
//
//   node ai_sdk.mjs <url of /api/chat> <{"chatId", "messages", "headers"?, "body"?, "reconnect"?,
//                                         "abortAfter"?} as JSON>
import { DefaultChatTransport, readUIMessageStream } from "ai";

const [api, requestJson] = process.argv.slice(2);
const { chatId, messages, headers, body, reconnect, abortAfter } = JSON.parse(requestJson);
const abort = new AbortController();
const transport = new DefaultChatTransport({ api, headers, body });
const result = { message: null, reads: [], errors: [], reconnects: [] };

// The assistant message as useChat would show it; the chunk types as they came.
async function read(stream) {
  const types = [];
  result.reads.push(types);
  const recorded = stream.pipeThrough(
    new TransformStream({
      transform(chunk, controller) {
        types.push(chunk.type);
        controller.enqueue(chunk);
        if (types.filter((type) => type === "text-delta").length === abortAfter) abort.abort();
      },
    }),
  );
  const onError = (err) => result.errors.push({ phase: "stream", name: err.name, message: err.message });
  for await (const message of readUIMessageStream({ stream: recorded, onError })) result.message = message;
}

try {
  await read(
    await transport.sendMessages({
      chatId,
      messages,
      trigger: "submit-message",
      messageId: undefined,
      abortSignal: abort.signal,
    }),
  );
} catch (err) {
  result.errors.push({ phase: "send", name: err.name, message: err.message, statusCode: err.statusCode });
}
if (reconnect) {
  for (let i = 0; i < 2; i++) {
    const stream = await transport.reconnectToStream({ chatId });
    result.reconnects.push(stream === null ? "none" : "stream");
    if (stream === null) break;
    await read(stream);
  }
}
console.log(JSON.stringify(result));
