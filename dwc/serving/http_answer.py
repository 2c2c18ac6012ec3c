"""One answer of `dwc serve`: the sequences of one request (n or best_of per prompt, for
one or more prompts), collected into a JSON body or streamed as server-sent events.

All sequences of an answer share one asyncio queue: the engine thread puts (kind, value)
on each request's `events`, which tags it with the sequence's index. Logprobs are read
from the sequence itself: the engine records a token's entry in the step that makes the
token, before the token is published, so it is there when the event arrives.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

from dwc.serving.openai_logprobs import Pieces, chat_logprobs, completion_logprobs, merge
from dwc.serving.openai_request import Choices
from dwc.runtime.async_engine import Request
from dwc.runtime.sequence import cut_at_stop


class EngineFailed(Exception):
    """The engine's step failed while this request was in it."""


class ClientGone(Exception):
    """The client disconnected before its answer was complete."""


class Tagged:
    """A request's `events` as seen by the engine thread: puts go to the answer's shared
    queue, tagged with the sequence's index."""

    def __init__(self, queue: asyncio.Queue, index: int):
        self.queue, self.index = queue, index

    def put_nowait(self, item: tuple) -> None:
        self.queue.put_nowait((self.index, *item))


@dataclass
class Prompt:
    ids: list[int]
    text: str


@dataclass
class Seq:
    """One sequence's progress in the answer."""

    request: Request
    prompt: int                     # index into the answer's prompts
    ids: list[int] = field(default_factory=list)
    reason: str | None = None
    sent: str = ""                  # streaming: the text already sent
    pieces: Pieces | None = None    # streaming with logprobs: its tokens' text so far
    started: bool = False           # streaming: its first chunk (role, echo) went out
    decoded: Pieces | None = None   # streaming: its text (EOS skipped), token by token


def releasable(text: str, sent: int, hold: int) -> str:
    """The prefix of `text` that can be streamed now: not the last `hold` characters (they
    may start a stop string), and not a trailing character whose bytes have not all
    arrived (decoded as U+FFFD until they have). Never shorter than what was sent."""
    ready = text[:max(sent, len(text) - hold)]
    while ready.endswith("\ufffd") and len(ready) > sent:
        ready = ready[:-1]
    return ready


class Answer:
    def __init__(self, api, prompts: list[Prompt], groups: list[list[Request]],
                 choices: Choices, chat: bool, queue: asyncio.Queue):
        self.api, self.tok, self.prompts, self.choices = api, api.tokenizer, prompts, choices
        self.chat, self.queue = chat, queue
        self.seqs = [Seq(r, i) for i, group in enumerate(groups) for r in group]
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:16]}"
        self.created = int(time.time())

    async def events(self, http):
        """(index, kind, value) until every sequence is done; aborts them all if the
        client goes away (checked at least once a second) or the engine fails."""
        pending, checked = len(self.seqs), time.monotonic()
        try:
            while pending:
                try:
                    index, kind, value = await asyncio.wait_for(self.queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    kind = None
                if time.monotonic() - checked >= 1.0 or kind is None:
                    checked = time.monotonic()
                    if await http.is_disconnected():
                        raise ClientGone
                if kind is None:
                    continue
                if kind == "error":
                    raise EngineFailed(value)
                if kind == "done":
                    pending -= 1  # echo only: "length" even if the dropped token was EOS
                    self.seqs[index].reason = "length" if self.choices.max_tokens == 0 else value
                elif self.choices.max_tokens == 0:
                    continue  # echo only: the one token it ran for is not part of the answer
                else:
                    self.seqs[index].ids.append(value)
                yield index, kind
        except (asyncio.CancelledError, GeneratorExit, ClientGone, EngineFailed):
            for s in self.seqs:
                self.api.core.abort(s.request)
            raise

    # -- pieces of a choice ---------------------------------------------------------------

    def text(self, s: Seq) -> str:
        return self.api.text(s.ids, s.request.params)

    def prompt_logprobs(self, prompt: int) -> dict | None:
        """The echoed prompt's logprobs, from the sequence that computed them."""
        p = self.prompts[prompt]
        leader = next(s for s in self.seqs if s.prompt == prompt).request.seq
        pieces = Pieces(self.tok).add(p.ids)
        return completion_logprobs(self.tok, pieces, p.ids, leader.prompt_logprobs, True)

    def logprobs(self, s: Seq, ids: list[int], pieces: list, first: int) -> dict:
        """Logprobs of `ids`, the sequence's tokens from index `first` on."""
        entries = s.request.seq.logprobs[first:first + len(ids)]
        if self.chat:
            return chat_logprobs(self.tok, pieces, ids, entries)
        return completion_logprobs(self.tok, pieces, ids, entries)

    def chosen(self) -> list[Seq]:
        """n sequences per prompt in choice order: with best_of, the n whose tokens have
        the highest summed logprob."""
        out, per = [], self.choices.best_of
        for i in range(len(self.prompts)):
            group = self.seqs[i * per:(i + 1) * per]
            if per > self.choices.n:
                group = sorted(group, key=lambda s: -sum(
                    lp for lp, _ in s.request.seq.logprobs[:len(s.ids)]))[:self.choices.n]
            out.extend(group)
        return out

    def usage(self, seqs: list[Seq]) -> dict:
        prompt = sum(len(p.ids) for p in self.prompts)
        completion = sum(len(s.ids) for s in seqs)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def envelope(self, choices: list[dict], chunk: bool = False) -> dict:
        kind = ("chat.completion" + (".chunk" if chunk else "")) if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created,
                "model": self.api.name, "choices": choices}

    # -- the whole answer at once ---------------------------------------------------------

    async def complete(self, http) -> dict:
        async for _ in self.events(http):
            pass
        for s in self.seqs:
            self.api.observe_tpot(s.request, len(s.ids))
        seqs = self.chosen()
        return self.envelope([self.choice(i, s) for i, s in enumerate(seqs)]) | {
            "usage": self.usage(seqs)}

    def choice(self, index: int, s: Seq) -> dict:
        text, wanted = self.text(s), self.choices.logprobs is not None
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text},
                    "finish_reason": s.reason, "logprobs": self.logprobs(
                        s, s.ids, Pieces(self.tok).add(s.ids), 0) if wanted else None}
        prompt = self.prompts[s.prompt]
        echo = prompt.text if self.choices.echo else ""
        out = {"index": index, "text": echo + text, "finish_reason": s.reason,
               "logprobs": None}
        if wanted:
            head = self.prompt_logprobs(s.prompt) if self.choices.echo else None
            tail = self.logprobs(s, s.ids, Pieces(self.tok, len(echo)).add(s.ids), 0)
            out["logprobs"] = merge(head, tail)
        return out

    # -- streamed ---------------------------------------------------------------------------

    async def stream(self, http):
        try:
            async for index, kind in self.events(http):
                chunk = self.chunk(index, kind)
                if chunk:
                    yield f"data: {json.dumps(self.envelope([chunk], chunk=True))}\n\n"
        except EngineFailed as e:
            error = {"error": {"message": f"generation failed: {e}", "type": "server_error"}}
            yield f"data: {json.dumps(error)}\n\n"
            return
        except ClientGone:
            return
        for s in self.seqs:
            self.api.observe_tpot(s.request, len(s.ids))
        if self.choices.include_usage:
            yield f"data: {json.dumps(self.envelope([], chunk=True) | {'usage': self.usage(self.seqs)})}\n\n"
        yield "data: [DONE]\n\n"

    def chunk(self, index: int, kind: str) -> dict | None:
        """The chunk for a sequence's event: new text (held back where it may start a stop
        string or ends inside a character), with the new token's logprobs when asked; the
        first chunk of a choice carries the chat role or the echoed prompt."""
        s, wanted = self.seqs[index], self.choices.logprobs is not None
        hold = max((len(x) for x in s.request.params.stop), default=1) - 1
        if kind == "token":  # decoding the whole output every token was quadratic
            s.decoded = s.decoded or Pieces(self.tok)
            if s.ids[-1] not in self.api.engine.eos_ids:
                s.decoded.add(s.ids[-1:])
            ready = releasable(cut_at_stop(s.decoded.stable, s.request.params.stop),
                               len(s.sent), hold)
        else:  # done: the whole output decoded once (what a non-streamed answer says)
            full = self.text(s)
            ready = full if full.startswith(s.sent) else s.sent
        delta, s.sent = ready[len(s.sent):], ready
        reason = s.reason if kind == "done" else None
        logprobs = None
        if wanted and kind == "token":
            s.pieces = s.pieces or Pieces(self.tok, len(self.prompts[s.prompt].text)
                                          if self.choices.echo else 0)
            logprobs = self.logprobs(s, s.ids[-1:], s.pieces.add(s.ids[-1:]), len(s.ids) - 1)
        first, s.started = not s.started and (self.chat or self.choices.echo), True
        if first and not self.chat:
            delta = self.prompts[s.prompt].text + delta
            if wanted:
                logprobs = merge(self.prompt_logprobs(s.prompt),
                                 logprobs or completion_logprobs(self.tok, [], [], []))
        if not (delta or reason or logprobs or first):
            return None
        if self.chat:
            message = {"role": "assistant", "content": delta} if first else {"content": delta}
            out = {"index": index, "delta": message, "finish_reason": reason}
        else:
            out = {"index": index, "text": delta, "finish_reason": reason}
        return out | {"logprobs": logprobs}
