"""The body of an OpenAI-style completion request, checked: which fields the server takes
(an unknown one is refused, as OpenAI does), the sampling parameters with their ranges,
and text a tokenizer can take. Every problem is a BadInput naming the field.
"""

from __future__ import annotations

from dwc.errors import BadInput
from dwc.runtime.sequence import SamplingParams

# The request fields the server honours; OpenAI's others are accepted only at their
# defaults (they would change the answer), and any other field is refused, as OpenAI does.
FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
          "ignore_eos", "speculative", "user"}
AT_DEFAULT = {"n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (None, False),
              "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": (None, {}),
              "suffix": (None, ""), "stream_options": (None,)}


def check_fields(body: dict, chat: bool) -> None:
    unknown = sorted(set(body) - FIELDS - set(AT_DEFAULT) - {"messages" if chat else "prompt"})
    if unknown:
        raise BadInput(f"unknown field(s): {', '.join(unknown)}")
    for key, defaults in AT_DEFAULT.items():
        value = body.get(key)
        if key in body and not any(value is d if isinstance(value, bool) or d is None
                                   or d is False else value == d for d in defaults):
            raise BadInput(f"{key}: only {defaults[0]!r} is supported, not {value!r}")


def encodable(text: str, field: str) -> str:
    """`text` if it is valid Unicode (JSON can carry lone surrogates; no tokenizer takes them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput(f"{field}: not valid Unicode (a lone surrogate)") from None
    return text


def sampling_from(body: dict) -> SamplingParams:
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    checks = {"max_tokens": (int, 1, None), "temperature": ((int, float), 0, 2),
              "top_p": ((int, float), 1e-6, 1), "top_k": (int, 0, None),
              "seed": (int, 0, 2 ** 63 - 1)}
    for key, (types, low, high) in checks.items():
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, types) or \
                (low is not None and value < low) or (high is not None and value > high):
            raise BadInput(f"{key}: invalid value {value!r}")
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadInput("stop: expected a string or a list of strings")
    for flag in ("ignore_eos", "speculative", "stream"):  # null = the default
        if body.get(flag) is not None and not isinstance(body[flag], bool):
            raise BadInput(f"{flag}: expected true or false")
    temperature, top_p = body.get("temperature"), body.get("top_p")  # null = the default
    return SamplingParams(max_tokens=body.get("max_tokens") or 16,
                          temperature=1.0 if temperature is None else float(temperature),
                          top_k=body.get("top_k") or 0, top_p=1.0 if top_p is None else float(top_p),
                          seed=body.get("seed"), stop=stop,
                          ignore_eos=body.get("ignore_eos") is True,  # a vLLM extension
                          speculative=body.get("speculative") is not False)  # dwc's: draft on/off
