"""The build file (`model.yaml`, README.md, "The build file"), loaded into dataclasses and
checked before work.

`--set key=value` overrides any value: `calibration.samples=64` sets a build-file field;
`<pass>.<option>=value` (e.g. `evaluate.batch_size=4`) is short for
`passes.<pass>.<option>`. Values are parsed as YAML scalars (`64` is an integer, `true` a
boolean). Relative paths, in the file or in `--set`, resolve against the build file's
folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from dwc.config import from_dict, option, positive
from dwc.constants import NAME_PATTERN, SEARCH_MAX_MINUTES
from dwc.quality.data import has_chat_template, read_records
from dwc.quality.task import read_task
from dwc.errors import BadInput, BuildFileError


@dataclass
class Calibration:
    data: Path = option(help="calibration text (.txt or .jsonl)")
    samples: int = option(128, help="number of token windows run through the model")
    seq_len: int = option(512, help="tokens per window")

    def validate(self, path: str) -> None:
        positive(self, path, "samples", "seq_len")


@dataclass
class Task:
    path: Path = option(help="evaluation task (.jsonl: prompts with an answer or choices)")
    margin: float = option(0.05, help="equivalent when the accuracy difference's interval "
                                      "lies inside +-margin")
    required: bool = option(False, help="exit 3 when the task is not shown equivalent")
    max_new_tokens: int = option(32, help="longest greedy continuation (exact-match items)")

    def validate(self, path: str) -> None:
        positive(self, path, "max_new_tokens")
        if not 0 <= self.margin <= 1:
            raise BuildFileError(f"{path}.margin: must be between 0 and 1 (an accuracy "
                                 f"difference), got {self.margin}")


@dataclass
class Evaluation:
    data: Path = option(help="held-out text for the quality gate (.txt or .jsonl)")
    max_ppl_increase_pct: float = option(2.0, help="the build fails beyond this perplexity increase")
    max_kl_divergence: Optional[float] = option(
        None, help="optional second budget: mean KL(original || optimized) per token, nats")
    samples: int = option(64, help="number of token windows evaluated")
    seq_len: int = option(512, help="tokens per window")
    task: Optional[Task] = option(None, help="optional task scored before and after, with a "
                                             "paired test (docs/QUALITY.md)")

    def validate(self, path: str) -> None:
        positive(self, path, "samples", "seq_len", "max_kl_divergence")
        if self.max_ppl_increase_pct < 0:
            raise BuildFileError(f"{path}.max_ppl_increase_pct: must be >= 0")


@dataclass
class Slo:
    target_latency_ms: Optional[float] = option(None, help="p99 time per output token, ms")
    target_ttft_ms: Optional[float] = option(None, help="p99 time to first token, ms")
    target_rps: Optional[float] = option(None, help="requests per second to sustain")
    max_context: Optional[int] = option(None, help="longest prompt + output, tokens")
    prompt_tokens: int = option(512, help="typical prompt length, for the cost model")
    output_tokens: int = option(128, help="typical output length, for the cost model")
    enforce: bool = option(False, help="exit 4 when the SLO cannot be met")

    def validate(self, path: str) -> None:
        positive(self, path, "target_latency_ms", "target_ttft_ms", "target_rps", "max_context",
                 "prompt_tokens", "output_tokens")


@dataclass
class Search:
    targets: Optional[list[str]] = option(
        None, help="the targets searched (default: every target of the hardware)")
    max_minutes: float = option(SEARCH_MAX_MINUTES, help="no new candidate starts after this")

    def validate(self, path: str) -> None:
        if self.max_minutes <= 0:
            raise BuildFileError(f"{path}.max_minutes: must be > 0, got {self.max_minutes}")
        if self.targets is not None and not self.targets:
            raise BuildFileError(f"{path}.targets: must name at least one target")


@dataclass
class BuildFile:
    name: str = option(help="bundle name")
    model: Path = option(help="Hugging Face checkpoint folder")
    calibration: Calibration = option(help="calibration data")
    evaluation: Evaluation = option(help="evaluation data and quality budget")
    adapter: Optional[Path] = option(None, help="PEFT LoRA adapter merged at build time")
    slo: Optional[Slo] = option(None, help="service-level objective")
    draft: Union[Literal["auto", "none"], Path] = option("auto", help="auto | none | draft path")
    optimization: Union[Literal["auto"], list[str]] = option(
        "auto", help="auto (the target's pass list) or an explicit list of pass names")
    passes: dict[str, dict[str, Any]] = option({}, help="options per pass: {pass: {option: value}}")
    search: Optional[Search] = option(None, help="--target auto or a hardware name: what is "
                                                "searched and for how long (docs/SEARCH.md)")

    def validate(self, path: str) -> None:
        if not re.match(NAME_PATTERN, self.name):
            raise BuildFileError(f"name: {self.name!r} must be letters, digits, '.', '_' or '-'")


def load_buildfile(path: Path, overrides: list[str] = (), pass_names=()) -> BuildFile:
    """Read, override and validate a build file; every error names the file and field."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: build file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise BuildFileError(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    except UnicodeDecodeError:
        raise BuildFileError(f"{path}: not UTF-8 text") from None
    if data is None:
        raise BuildFileError(f"{path}: the build file is empty")
    if not isinstance(data, dict):
        raise BuildFileError(f"{path}: expected a mapping of keys, got {type(data).__name__}")
    for item in overrides:
        apply_override(data, item, pass_names)
    try:
        build = from_dict(BuildFile, data, "", base_dir=path.parent.resolve())
        _check_inputs(build)
    except BuildFileError as e:
        raise BuildFileError(f"{path}: {e.message}") from None
    return build


def apply_override(data: dict, item: str, pass_names=()) -> None:
    """Apply one `--set a.b.c=value` to the raw build-file mapping."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise BadInput(f"--set {item!r}: expected key=value, e.g. calibration.samples=64")
    parts = key.split(".")
    if parts[0] in pass_names and parts[0] not in BuildFile.__dataclass_fields__:
        parts = ["passes", *parts]
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise BadInput(f"--set {item!r}: {part} is not a mapping")
        node = child
    node[parts[-1]] = value


def _check_inputs(build: BuildFile) -> None:
    """Files the build will read must exist and hold data, before any pass runs."""
    if not build.model.is_dir():
        raise BuildFileError(f"model: {build.model}: model folder not found")
    if build.adapter is not None and not build.adapter.is_dir():
        raise BuildFileError(f"adapter: {build.adapter}: adapter folder not found")
    if isinstance(build.draft, Path) and not (build.draft / "config.json").is_file():
        raise BuildFileError(f"draft: {build.draft}: not a Hugging Face checkpoint folder")
    for field, data in (("calibration.data", build.calibration.data),
                        ("evaluation.data", build.evaluation.data)):
        try:
            records = read_records(data)
        except BadInput as e:
            raise BuildFileError(f"{field}: {e.message}") from None
        if any(not isinstance(r, str) for r in records) and not has_chat_template(build.model):
            raise BuildFileError(f"{field}: {data} holds chat records (\"messages\") but the "
                                 "model's tokenizer has no chat template to render them")
    if build.evaluation.task is not None:
        try:
            read_task(build.evaluation.task.path)
        except BadInput as e:
            raise BuildFileError(f"evaluation.task.path: {e.message}") from None
