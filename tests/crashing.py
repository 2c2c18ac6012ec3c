"""Functions the tests send to dwc's llama.cpp child process (dwc/backends/gguf/child.py)
in place of dwc's own: a module of their own, without heavy imports, because the child
imports the module of every function it is sent."""

from __future__ import annotations

import os
import signal


def segfault(*args):
    """Dies as llama.cpp does when it crashes: by SIGSEGV, with no Python left to catch it."""
    os.kill(os.getpid(), signal.SIGSEGV)


def add(a, b):
    return a + b


def pid() -> int:
    return os.getpid()


def refuse(message: str):
    from dwc.errors import BadInput

    raise BadInput(message)


def sleep(seconds: float) -> None:
    import time

    time.sleep(seconds)
