"""The relay's two hand-made parts against the libraries' behaviour they stand in for (note 9):
the upstream SSE parser, and the encoding of events; and how a follower cuts its writes (note 20)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sse_starlette import JSONServerSentEvent

from chatsvc import (
    AI_SDK,
    WRITE_BYTES,
    MalformedStream,
    ServiceError,
    Settings,
    UpstreamFrames,
    encode_deltas,
    encode_event,
    last_words_event,
    map_upstream_error,
    pieces,
)

texts = st.text(st.characters(codec="utf-8"), max_size=20)
STREAM_ID = "0123456789abcdef0123456789abcdef"


def id_last(event: JSONServerSentEvent, seq: int) -> bytes:
    """sse-starlette's encoding of an event without id, with our `id:` line added last (note 11)."""
    encoded = event.encode()
    assert encoded.endswith(b"\r\n\r\n")
    return encoded[:-2] + f"id: {STREAM_ID}:{seq}\r\n\r\n".encode()


@settings(max_examples=300, deadline=None)
@given(st.lists(texts, max_size=8), st.integers(0, 10**6))
def test_deltas_encode_as_sse_starlette_encodes_each_event_with_the_id_last(contents: list[str], first: int) -> None:
    expected = [id_last(JSONServerSentEvent({"content": c}, event="delta"), first + i) for i, c in enumerate(contents)]
    assert encode_deltas(STREAM_ID, first, contents) == expected


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | texts,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(texts, children, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["meta", "done", "error"]), st.dictionaries(texts, json_values, max_size=5), st.integers(0, 99))
def test_events_encode_as_sse_starlette_encodes_them_with_the_id_last(
    name: str, data: dict[str, object], seq: int
) -> None:
    assert encode_event(STREAM_ID, seq, name, data) == id_last(JSONServerSentEvent(data, event=name), seq)


def frames_of(body: bytes, cuts: list[int]) -> list[bytes]:
    parser, out, start = UpstreamFrames(), [], 0
    for cut in [*sorted(cuts), len(body)]:
        out += parser.feed(body[start:cut])
        start = cut
    return out + parser.end()


line = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=12)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.lists(line, min_size=1, max_size=3), min_size=1, max_size=6),
    st.sampled_from([b"\n", b"\r\n", b"\r"]),
    st.data(),
)
def test_frames_come_out_whole_and_in_order_wherever_the_reads_cut(
    events: list[list[str]], eol: bytes, data: st.DataObject
) -> None:
    """Each event is one or more `data:` lines; its frame is those lines joined by \n."""
    body = b"".join(b"".join(b"data: " + text.encode() + eol for text in lines) + eol for lines in events)
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=10))
    assert frames_of(body, cuts) == ["\n".join(lines).encode() for lines in events]


def test_only_data_lines_count_and_several_make_one_frame() -> None:
    body = b': a comment\nevent: message\nid: 7\nretry: 10\ndata: {"a":\ndata:1}\n\ndata: [DONE]\n\n'
    assert frames_of(body, [3, 40]) == [b'{"a":\n1}', b"[DONE]"]


def test_an_event_without_end_beyond_the_limit_is_refused() -> None:
    parser = UpstreamFrames()
    parser.feed(b"data: " + b"x" * (UpstreamFrames.MAX_EVENT_BYTES - 6))
    with pytest.raises(MalformedStream, match="MAX_EVENT_BYTES") as refused:
        parser.feed(b"x")
    error = map_upstream_error(refused.value, Settings(), streaming=True)
    assert error.code == "upstream_error"  # the model server's malformed stream (note 18)


@settings(max_examples=100, deadline=None)
@given(texts, st.integers(0, 10**9), st.integers(0, 10**6), st.integers(0, 10**6))
def test_the_last_resort_is_the_error_event_the_encoders_write(
    detail: str, seq: int, prompt: int, completion: int
) -> None:
    """Note 18: the template encoded at a stream's start, filled with ints alone, is exactly the
    error event (and the AI SDK's error chunks) that the ordinary encoders write."""
    body = ServiceError("internal_error", detail).body()
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    data = {**body, "usage": {**usage, "source": "estimated"}}
    fill = {b"seq": seq, b"prompt": prompt, b"completion": completion, b"total": prompt + completion}
    assert last_words_event(STREAM_ID, body) % fill == encode_event(STREAM_ID, seq, "error", data)
    assert AI_SDK.last_words(STREAM_ID, body) % fill == AI_SDK.event(STREAM_ID, seq, "error", data)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3 * WRITE_BYTES), max_size=12), st.data())
def test_a_replay_leaves_in_bounded_pieces_that_keep_each_id_line_whole(sizes: list[int], data: st.DataObject) -> None:
    """Bug: a replay left in one write of the whole log. Fix: writes of whole events up to
    WRITE_BYTES; a longer event alone, cut so that no cut falls inside or after its id line."""
    entries = [encode_event(STREAM_ID, seq, "delta", {"content": "x" * size}) for seq, size in enumerate(sizes)]
    start = data.draw(st.integers(0, len(entries)))
    end = data.draw(st.integers(start, len(entries)))

    written = list(pieces(entries, start, end))

    assert b"".join(written) == b"".join(entries[start:end])
    assert all(0 < len(piece) <= WRITE_BYTES + 64 for piece in written)
    for piece in written:
        tail = piece.rfind(b"\r\nid: ")
        assert tail == -1 or piece.endswith(b"\r\n\r\n"), "a cut inside an id line"
    small = [entry for entry in entries[start:end] if len(entry) <= WRITE_BYTES]
    assert all(any(entry in piece for piece in written) for entry in small), "a small event was cut"


def test_a_large_event_in_small_reads_is_split_once_and_whole() -> None:
    """Bug: feed() joined its whole buffer to each read and searched all of it again: quadratic, an
    8 MB event in 4 KB reads took 34 s. Fix: the pieces are kept, only the new bytes (and the one
    before them) are searched for the end of an event, and the event is joined once."""
    payload = b'{"x":"' + b"y" * (15 * 1024 * 1024) + b'"}'  # under MAX_EVENT_BYTES
    body = b"data: " + payload + b"\r\n\r\ndata: [DONE]\r\n\r\n"
    frames = UpstreamFrames()
    out: list[bytes] = []
    for start in range(0, len(body), 4096):
        out += frames.feed(body[start : start + 4096])
    out += frames.end()
    assert out == [payload, b"[DONE]"]


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_separators_split_across_reads_of_any_size(size: int) -> None:
    body = b"data: a\r\n\r\ndata: b\n\ndata: c\r\rdata: d\r\n\r\n: comment\n\ndata: e\ndata: f\r\n\r\n"
    frames = UpstreamFrames()
    out: list[bytes] = []
    for start in range(0, len(body), size):
        out += frames.feed(body[start : start + size])
    out += frames.end()
    assert out == [b"a", b"b", b"c", b"d", b"e\nf"]
