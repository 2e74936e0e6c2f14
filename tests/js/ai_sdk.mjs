// Drives the AI SDK (the `ai` package) as useChat does: its DefaultChatTransport sends the chat to
// POST /api/chat and readUIMessageStream builds the assistant message from the chunks. With
// "reconnect", a send that breaks is followed by the transport's reconnectToStream (what useChat's
// resumeStream calls), and once the message is whole, by another that must find nothing (204).
// With "abortAfter": N, the send is aborted after N text deltas, as useChat's stop() does.
// The transport's fetch keeps the cookies the service sets and sends them back, as a browser does
// for a same-origin page (node's fetch has no cookie jar): the owner cookie of an AI SDK chat.
// Prints one JSON line: the message, the chunk types of each read, the errors seen, the cookies.
//
//   node ai_sdk.mjs <url of /api/chat> <{"chatId", "messages", "headers"?, "body"?, "reconnect"?,
//                                         "abortAfter"?} as JSON>
import { DefaultChatTransport, readUIMessageStream } from "ai";

const [api, requestJson] = process.argv.slice(2);
const { chatId, messages, headers, body, reconnect, abortAfter } = JSON.parse(requestJson);
const abort = new AbortController();
const cookies = new Map(); // name -> value; one origin only, so no domain or path to match
async function fetchWithCookies(url, init) {
  const withCookies = new Headers(init.headers);
  if (cookies.size) withCookies.set("cookie", [...cookies].map(([name, value]) => `${name}=${value}`).join("; "));
  const response = await fetch(url, { ...init, headers: withCookies });
  for (const setCookie of response.headers.getSetCookie()) {
    const [pair] = setCookie.split(";");
    const at = pair.indexOf("=");
    cookies.set(pair.slice(0, at).trim(), pair.slice(at + 1).trim());
  }
  return response;
}
const transport = new DefaultChatTransport({ api, headers, body, fetch: fetchWithCookies });
const result = { message: null, reads: [], errors: [], reconnects: [], cookies: {} };

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
result.cookies = Object.fromEntries(cookies);
console.log(JSON.stringify(result));
