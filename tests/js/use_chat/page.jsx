// A product page's chat, written as docs/ai-sdk.md tells its readers to write it: React's useChat
// from @ai-sdk/react with the AI SDK's DefaultChatTransport, talking to chatsvc's POST /api/chat
// from another origin (credentials: "include"), resuming after a reload (resume: true), and
// stopping with the documented handler (DELETE first, stop() only if that failed).
//
//   index.html?chat=<the chat's id>&chatsvc=<chatsvc's origin>
//
// The chat's id is in the URL, so a reload is the same chat. The page keeps its conversation in
// sessionStorage, as a product page keeps it in its own store, so that a reload shows it again;
// an answer still streaming at the reload comes back through the resume.
import { useChat } from "@ai-sdk/react";
import { DefaultChatTransport } from "ai";
import { useEffect, useState } from "react";
import { createRoot } from "react-dom/client";

const query = new URLSearchParams(location.search);
const chatId = query.get("chat");
const api = `${query.get("chatsvc")}/api/chat`;
const saved = `chat:${chatId}`;

// The documented transport, with a note of what each reconnect found, for the test to await.
class NotedTransport extends DefaultChatTransport {
  async reconnectToStream(options) {
    const noted = document.querySelector("[data-role=reconnects]");
    try {
      const stream = await super.reconnectToStream(options);
      noted.textContent += stream === null ? "none " : "stream ";
      return stream;
    } catch (error) {
      noted.textContent += "error ";
      throw error;
    }
  }
}

const transport = new NotedTransport({ api, credentials: "include", body: { max_tokens: 500 } });
const textOf = (message) => message.parts.filter((part) => part.type === "text").map((part) => part.text).join("");

function Chat() {
  const { messages, sendMessage, stop, status, error } = useChat({
    id: chatId,
    messages: JSON.parse(sessionStorage.getItem(saved) ?? "[]"),
    transport,
    resume: true,
  });
  const [input, setInput] = useState("");
  const [stopped, setStopped] = useState(""); // what the stop handler's DELETE answered
  useEffect(() => sessionStorage.setItem(saved, JSON.stringify(messages)), [messages]);

  // docs/ai-sdk.md's handler; on another origin, the DELETE carries the owner cookie only with
  // credentials: "include", as the transport's requests do.
  async function stopAnswer() {
    setStopped("deleting");
    const response = await fetch(`${api}/${encodeURIComponent(chatId)}/stream`, {
      method: "DELETE",
      credentials: "include",
    }).catch(() => null);
    setStopped(String(response?.status ?? "failed"));
    if (!response?.ok) await stop(); // chatsvc did not take it: at least stop reading
  }

  function send(event) {
    event.preventDefault();
    sendMessage({ text: input });
    setInput("");
  }

  const busy = status === "submitted" || status === "streaming";
  return (
    <>
      <ol>
        {messages.map((message) => (
          <li
            key={message.id}
            data-role={message.role}
            data-id={message.id}
            data-metadata={JSON.stringify(message.metadata ?? null)}
          >
            {textOf(message)}
          </li>
        ))}
      </ol>
      <form onSubmit={send}>
        <input data-role="input" value={input} onChange={(event) => setInput(event.target.value)} />
        <button data-role="send" type="submit" disabled={busy}>
          Send
        </button>
        <button data-role="stop" type="button" disabled={!busy} onClick={stopAnswer}>
          Stop
        </button>
      </form>
      <p data-role="status">{status}</p>
      <p data-role="stopped">{stopped}</p>
      <p data-role="error">{error?.message ?? ""}</p>
    </>
  );
}

createRoot(document.getElementById("root")).render(<Chat />);
