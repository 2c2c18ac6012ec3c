"""examples/ci/dwc-bundle.yml: every dwc command it runs exists with the options it uses,
and the target it names is one dwc builds."""

from __future__ import annotations

import re
import shlex

import yaml

from tests.conftest import ROOT, dwc


def test_the_workflow_uses_real_commands_options_and_target():
    workflow = yaml.safe_load((ROOT / "examples" / "ci" / "dwc-bundle.yml").read_text())
    runs = [step["run"] for step in workflow["jobs"]["bundle"]["steps"] if "run" in step]
    commands = [line.strip() for run in runs for line in run.splitlines()
                if line.strip().startswith("dwc ")]
    assert {c.split()[1] for c in commands} == {"build", "inspect", "diff"}
    for command in commands:
        words = shlex.split(command.split(">")[0])
        help_text = dwc(words[1], "--help").stdout
        for option in (w for w in words if w.startswith("-")):
            assert re.search(rf"(^|[\s,]){re.escape(option)}([\s,=]|$)", help_text, re.M), \
                (command, option)
    targets = {t["name"] for t in __import__("json").loads(dwc("targets", "--json").stdout)}
    assert workflow["env"]["TARGET"] in targets
    from dwc.cli.diff import parse_rules

    assert len(parse_rules(workflow["env"]["FAIL_ON"])) == 3
