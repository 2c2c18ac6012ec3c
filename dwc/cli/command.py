"""How every `dwc` command runs: --json and --debug, library chatter silenced, SIGTERM
unwinding like Ctrl-C, and every failure turned into one line and its exit code (README.md,
"Commands")."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import traceback
import warnings

import click

from dwc.errors import EXIT_PASS_FAILED, DwcError


def _quiet_libraries() -> None:
    """Library chatter (deprecation warnings, transformers' logs) is not for our users."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.disable_progress_bar()


def command(fn):
    """Adds --json and --debug, and turns every failure into one line and an exit code."""
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
    @click.option("--debug", is_flag=True, help="Show Python tracebacks on errors.")
    @functools.wraps(fn)
    def wrapper(*args, as_json: bool, debug: bool, **kwargs):
        if not debug:
            _quiet_libraries()
        # SIGTERM unwinds like Ctrl-C, so staging folders and scratch space are removed.
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            fn(*args, as_json=as_json, **kwargs)
        except DwcError as e:
            _fail(e.message, e.exit_code, e.pass_name, as_json, debug)
        except KeyboardInterrupt:
            # The unwinding above already removed staging and scratch folders. Leave at
            # once: an interrupt during interpreter shutdown would turn 130 into -SIGINT.
            _fail("interrupted", 130, None, as_json, debug, hard=True)
        except Exception as e:  # a bug in dwc or its environment, not the user's input
            _fail(f"internal error: {type(e).__name__}: {e}", EXIT_PASS_FAILED, None,
                  as_json, debug)
    return wrapper


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _fail(message: str, code: int, pass_name, as_json: bool, debug: bool, hard: bool = False):
    if debug:
        traceback.print_exc()
    message = " ".join(message.split())  # one line, always
    if as_json:
        click.echo(json.dumps({"error": {"code": code, "message": message, "pass": pass_name}}))
    else:
        where = f"[{pass_name}] " if pass_name else ""
        click.echo(f"error: {where}{message}", err=True)
    if hard:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
