"""The body of an OpenAI-style completion request, checked: which fields the server takes
(an unknown one is refused, as OpenAI does), the sampling parameters with their ranges,
the choices (n, best_of, echo, logprobs), and text a tokenizer can take. Every problem is
a BadInput naming the field.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from dwc.errors import BadInput
from dwc.runtime.sequence import SamplingParams

# The request fields the server honours; OpenAI's others are accepted only at their
# defaults (they would change the answer), and any other field is refused, as OpenAI does.
FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
          "ignore_eos", "speculative", "user", "n", "best_of", "logprobs", "stream_options"}
ONLY = {False: {"echo"}, True: {"top_logprobs", "max_completion_tokens"}}  # completions / chat
AT_DEFAULT = {"presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": (None, {}),
              "suffix": (None, "")}
MAX_LOGPROBS = 20      # OpenAI's limit for top logprobs
MAX_CHOICES = 128      # OpenAI's limit for n
MIN_TEMPERATURE = 1e-2  # below it logits / T overflow float32 (vLLM raises it to this, too)


@dataclass
class Choices:
    """What a request asks of its answer, beyond sampling."""

    n: int = 1                 # choices returned per prompt
    best_of: int = 1           # sequences generated per prompt (the n most likely returned)
    echo: bool = False         # completions: the prompt comes back before the completion
    logprobs: int | None = None  # top logprobs per token (None: no logprobs)
    stream: bool = False
    include_usage: bool = False  # streaming: a last chunk with usage
    max_tokens: int = 16       # as asked; 0 (echo only) runs one token, which is dropped


def check_fields(body: dict, chat: bool) -> None:
    allowed = FIELDS | ONLY[chat] | set(AT_DEFAULT) | {"messages" if chat else "prompt"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadInput(f"unknown field(s): {', '.join(unknown)}")
    for key, defaults in AT_DEFAULT.items():
        value = body.get(key)
        if key in body and not any(value is d if d is None else value == d for d in defaults):
            raise BadInput(f"{key}: only {defaults[0]!r} is supported, not {value!r}")


def encodable(text: str, field: str) -> str:
    """`text` if it is valid Unicode (JSON can carry lone surrogates; no tokenizer takes them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput(f"{field}: not valid Unicode (a lone surrogate)") from None
    return text


def prompts_from(body: dict) -> list[str | list[int]]:
    """/v1/completions' `prompt`: a string, a list of strings, a list of token ids, or a
    list of lists of token ids (lm-eval sends those); token ids are checked by the server
    against the vocabulary."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [encodable(prompt, "prompt")]
    if isinstance(prompt, list) and prompt:
        if all(_is_ids(p) for p in prompt):
            return [list(prompt)]
        if all(isinstance(p, str) for p in prompt):
            return [encodable(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
        if all(isinstance(p, list) and p and _is_ids(p[0]) and all(_is_ids(t) for t in p)
               for p in prompt):
            return [list(p) for p in prompt]
    raise BadInput("prompt: expected a string, a list of strings, a list of token ids or "
                   "a list of lists of token ids")


def _is_ids(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict, key: str, types, low, high):
    value = body.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, types) or
                              (low is not None and value < low) or
                              (high is not None and value > high)):
        raise BadInput(f"{key}: invalid value {value!r}")
    return value


def choices_from(body: dict, chat: bool) -> Choices:
    n = _number(body, "n", int, 1, MAX_CHOICES) or 1
    best_of = _number(body, "best_of", int, 1, MAX_CHOICES) or n
    if best_of < n:
        raise BadInput(f"best_of ({best_of}) must be at least n ({n})")
    stream = body.get("stream") is True
    if stream and best_of > n:
        raise BadInput("best_of > n cannot be streamed (the best are known only at the end)")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or
                                set(options) - {"include_usage"}):
        raise BadInput("stream_options: only {\"include_usage\": bool} with \"stream\": true")
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = _number(body, key, int, 0, None)
    echo = body.get("echo") is True
    if max_tokens == 0 and not echo:
        raise BadInput(f"{key}: 0 is allowed only with \"echo\": true")
    return Choices(n=n, best_of=best_of, echo=echo, logprobs=_logprobs(body, chat),
                   stream=stream, include_usage=bool((options or {}).get("include_usage")),
                   max_tokens=16 if max_tokens is None else max_tokens)


def _logprobs(body: dict, chat: bool) -> int | None:
    """Completions: `logprobs` is the number of top logprobs (0..20). Chat: `logprobs`
    true turns them on and `top_logprobs` (0..20) says how many alternatives."""
    if not chat:
        return _number(body, "logprobs", int, 0, MAX_LOGPROBS)
    on, top = body.get("logprobs"), _number(body, "top_logprobs", int, 0, MAX_LOGPROBS)
    if on is not None and not isinstance(on, bool):
        raise BadInput("logprobs: expected true or false")
    if top is not None and on is not True:
        raise BadInput("top_logprobs: needs \"logprobs\": true")
    return (top or 0) if on else None


def sampling_from(body: dict, choices: Choices) -> SamplingParams:
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    checks = {"temperature": ((int, float), 0, 2), "top_p": ((int, float), 1e-6, 1),
              "top_k": (int, 0, None), "seed": (int, 0, 2 ** 63 - 1)}
    for key, (types, low, high) in checks.items():
        _number(body, key, types, low, high)
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadInput("stop: expected a string or a list of strings")
    for flag in ("ignore_eos", "speculative", "stream", "echo"):  # null = the default
        if body.get(flag) is not None and not isinstance(body[flag], bool):
            raise BadInput(f"{flag}: expected true or false")
    temperature, top_p = body.get("temperature"), body.get("top_p")  # null = the default
    temperature = 1.0 if temperature is None else float(temperature)
    # best_of ranks the sequences by their summed logprobs, so they are recorded.
    logprobs = 0 if choices.logprobs is None and choices.best_of > choices.n else choices.logprobs
    return SamplingParams(max_tokens=max(choices.max_tokens, 1),
                          temperature=max(temperature, MIN_TEMPERATURE) if temperature else 0.0,
                          top_k=body.get("top_k") or 0, top_p=1.0 if top_p is None else float(top_p),
                          seed=body.get("seed"), stop=stop,
                          ignore_eos=body.get("ignore_eos") is True,  # a vLLM extension
                          speculative=body.get("speculative") is not False,  # dwc's: draft on/off
                          logprobs=logprobs)


def per_choice(params: SamplingParams, choices: Choices) -> list[SamplingParams]:
    """One SamplingParams per sequence of a prompt. Choice 0 keeps the request's seed (so
    n=1 answers as before); the others get seeds drawn from it, so a seeded request with
    n > 1 is reproducible and its choices differ. Only choice 0 computes the prompt's
    logprobs (echo with logprobs); the others reuse them, and its KV blocks."""
    out = []
    for i in range(choices.best_of):
        seed = params.seed if i == 0 or params.seed is None else \
            random.Random(f"{params.seed}:{i}").getrandbits(63)
        prompt = choices.logprobs if choices.echo and i == 0 else None
        out.append(replace(params, seed=seed, prompt_logprobs=prompt))
    return out
