"""Logprobs in OpenAI's two shapes, from the runtime's entries (dwc/runtime/logprobs.py:
(logprob, [(token id, logprob)] top k) per token).

/v1/completions: {"tokens", "token_logprobs", "top_logprobs", "text_offset"}, one item
per token; with echo the prompt's tokens come first and the first of them has null
logprob and top logprobs (nothing precedes it). Each top_logprobs dict also holds the
chosen token, as OpenAI's does (so it has up to k + 1 keys).
/v1/chat/completions: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}.
"""

from __future__ import annotations


class Pieces:
    """Token ids -> the text each adds and where it starts. A token's text depends on its
    neighbours (leading spaces, characters split across tokens), so it is the difference
    between decoding a window of recent tokens with and without it (vLLM's incremental
    detokenization; the window restarts after each token that ends on a whole character).
    A token that ends inside a character adds "" and the one completing it adds the
    character, so the pieces always join to the decoded text. Decoding whole prefixes
    instead made a long echoed prompt's logprobs quadratic (lm-eval's loglikelihood
    requests: 2,000 tokens took about 2 million token decodes)."""

    def __init__(self, tokenizer, base: int = 0):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.stable = ""  # the decoded text so far, without an unfinished character
        self.base = base  # text_offset of the first piece (the echoed prompt's length)
        self.prefix = self.read = 0  # the window starts at prefix; tokens before read are out
        self.extra = 0  # characters given out of the tokens after read (a partial window)

    def add(self, ids: list[int]) -> list[tuple[str, int]]:
        out = []
        for token in ids:
            self.ids.append(token)
            before = self.tokenizer.decode(self.ids[self.prefix:self.read])
            raw = self.tokenizer.decode(self.ids[self.prefix:])
            text = raw.rstrip("\ufffd")
            new = text[len(before) + self.extra:]
            out.append((new, self.base + len(self.stable)))  # "" inside a character
            self.stable += new
            self.extra += len(new)
            if raw == text:  # ends on a whole character: the next window starts here
                self.prefix, self.read, self.extra = self.read, len(self.ids), 0
        return out


def token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def _top(tokenizer, chosen: int, logprob: float, top: list) -> dict:
    """{text: logprob}, most likely first; a text two ids share keeps the higher value."""
    out: dict[str, float] = {}
    for token, value in top:
        out.setdefault(token_text(tokenizer, token), value)
    out.setdefault(token_text(tokenizer, chosen), logprob)
    return out


def completion_logprobs(tokenizer, pieces: list[tuple[str, int]], ids: list[int],
                        entries: list, first_null: bool = False) -> dict:
    """The completions shape for `ids` (their `pieces` from Pieces.add, their `entries`);
    `first_null`: the first token is the prompt's first, which nothing scores."""
    out = {"tokens": [p for p, _ in pieces], "text_offset": [o for _, o in pieces],
           "token_logprobs": [], "top_logprobs": []}
    if first_null:
        out["token_logprobs"].append(None)
        out["top_logprobs"].append(None)
        ids = ids[1:]
    for token, (logprob, top) in zip(ids, entries):
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append(_top(tokenizer, token, logprob, top))
    return out


def merge(a: dict | None, b: dict) -> dict:
    """Two completions-shape logprobs one after the other (echoed prompt, completion)."""
    if a is None:
        return b
    return {key: a[key] + b[key] for key in a}


def chat_logprobs(tokenizer, pieces: list[tuple[str, int]], ids: list[int],
                  entries: list) -> dict:
    def item(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for (text, _), token, (logprob, top) in zip(pieces, ids, entries):
        content.append(item(text or token_text(tokenizer, token), logprob) | {
            "top_logprobs": [item(token_text(tokenizer, t), v) for t, v in top]})
    return {"content": content}
