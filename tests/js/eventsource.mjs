// Drives the `eventsource` package (the WHATWG EventSource, as browsers implement it) on
// GET /chat/streams/{id}: it reconnects by itself with Last-Event-ID, and stops for good when the
// service answers 204 after the terminal event. Prints one JSON line with the events and the opens.
//
//   node eventsource.mjs <url of /chat/streams/{id}> [<headers as JSON>]
import { EventSource } from "eventsource";

const [url, headersJson] = process.argv.slice(2);
const extra = JSON.parse(headersJson || "{}");
const events = [];
let opens = 0;
// The package's documented way to add request headers (a browser's EventSource cannot): its fetch.
const source = new EventSource(url, {
  fetch: (input, init) => fetch(input, { ...init, headers: { ...init.headers, ...extra } }),
});
const closed = new Promise((resolve) => {
  source.addEventListener("open", () => { opens += 1; });
  for (const name of ["meta", "delta", "done", "error"]) {
    source.addEventListener(name, (ev) => {
      // Our `error` event and EventSource's own connection errors share a name: only ours has data.
      if (ev.data === undefined) {
        if (source.readyState === EventSource.CLOSED) resolve(); // failed for good, e.g. on 204
        return;
      }
      events.push({ event: name, id: ev.lastEventId, data: JSON.parse(ev.data) });
    });
  }
});
const limit = setTimeout(() => source.close(), 60_000);
await closed;
clearTimeout(limit);
console.log(JSON.stringify({ events, opens }));
