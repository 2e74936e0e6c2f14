// Drives @microsoft/fetch-event-source as a chat page would: POST /chat, and on a dropped connection
// its own retry, which repeats the POST with the Last-Event-ID it has read. Prints one JSON line:
// the events dispatched (pings and other empty messages left out) and how often it opened.
//
//   node fetch_event_source.mjs <url of /chat> <message> [<headers as JSON>]
import { fetchEventSource } from "@microsoft/fetch-event-source";

// fetch-event-source is written for browsers: it listens for page visibility and uses window's timers.
globalThis.window = globalThis;
globalThis.document = { hidden: false, addEventListener() {}, removeEventListener() {} };

const [url, message, headersJson] = process.argv.slice(2);
const events = [];
const statuses = [];
let errors = 0;
const controller = new AbortController();
class Finished extends Error {}

await fetchEventSource(url, {
  method: "POST",
  headers: { "Content-Type": "application/json", ...JSON.parse(headersJson || "{}") },
  body: JSON.stringify({ message }),
  signal: controller.signal,
  openWhenHidden: true,
  async onopen(response) {
    statuses.push(response.status);
    if (response.status === 204) throw new Finished(); // the terminal event was delivered already
    if (!response.ok) throw new Finished();
  },
  onmessage(ev) {
    if (!ev.event) return; // a ping comment ends in a blank line, which dispatches an empty message
    events.push({ event: ev.event, id: ev.id, data: JSON.parse(ev.data) });
    if (ev.event === "done" || ev.event === "error") controller.abort();
  },
  onerror(err) {
    if (err instanceof Finished) throw err; // fatal: stop retrying
    errors += 1;
    if (errors > 20) throw err;
    return 50; // retry after 50 ms
  },
}).catch((err) => {
  if (!(err instanceof Finished)) throw err;
});
console.log(JSON.stringify({ events, statuses, errors }));
