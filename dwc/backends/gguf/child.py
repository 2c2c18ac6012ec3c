"""llama.cpp in a child process, so that a native crash cannot take dwc down.

llama.cpp is C++: a segmentation fault in `llama_decode` kills the process that called it,
and Python cannot catch it (../shared/FACTS.md, 2026-12-03). Every call dwc makes into
llama.cpp (the quantizer, the pre-tokenizer probe, evaluation, `dwc bench`) goes through
`LlamaProcess`: a child Python process (`_serve`) that is sent a module-level
function and its arguments (pickled), runs it and sends back its result or its
exception. A child killed by a signal becomes one `LlamaCrashed` line naming llama.cpp,
the signal and the file, exit 1.

A plain subprocess rather than multiprocessing's spawn: spawn re-imports the parent's
`__main__`, which re-runs a user's script that has no `if __name__ == "__main__"` guard
(the Python API builds bundles too). The child keeps its state between calls (the
evaluation opens the model once and sends one window after another).
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

from dwc.errors import PassFailed


class LlamaCrashed(PassFailed):
    """llama.cpp's process died (a signal, or an exit without an answer): exit 1."""


class LlamaProcess:
    """One child process for a sequence of calls about one file; `doing` and `path` name
    them in the error ("llama.cpp died (SIGSEGV) evaluating <path>")."""

    def __init__(self, doing: str, path: Path):
        self.doing, self.path = doing, Path(path)
        self._proc: subprocess.Popen | None = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, fn, *args):
        """fn(*args) in the child; fn and args must pickle (fn by its module and name)."""
        if self._proc is None:
            self._proc = _start()
        # Pickled twice: the child reads the request whole before it imports anything for
        # it, so a request that fails to unpickle there is answered, not a broken stream.
        request = pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            pickle.dump(request, self._proc.stdin)
            self._proc.stdin.flush()
            status, value = pickle.load(self._proc.stdout)
        except (EOFError, BrokenPipeError, pickle.UnpicklingError):
            raise self._died() from None
        if status == "error":
            raise value
        return value

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.stdin.close()  # the child's loop ends at end of input
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()

    def _died(self) -> LlamaCrashed:
        proc, self._proc = self._proc, None
        code = proc.wait()
        proc.stdout.close()
        if code < 0:
            try:
                how = signal.Signals(-code).name
            except ValueError:
                how = f"signal {-code}"
            return LlamaCrashed(f"llama.cpp died ({how}) {self.doing} {self.path}")
        return LlamaCrashed(f"llama.cpp's process exited with code {code} without an answer "
                            f"while {self.doing} {self.path}")


def run(doing: str, path: Path, fn, *args):
    """fn(*args) in a fresh child process, which then exits."""
    with LlamaProcess(doing, path) as child:
        return child.call(fn, *args)


def _start() -> subprocess.Popen:
    # The parent's import path, so the child finds every module the parent could (a
    # function sent from a test module, an uninstalled checkout).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    # -c, not -m: the package imports this module, and -m would run a second copy of it
    return subprocess.Popen([sys.executable, "-c", _CHILD], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)


_CHILD = "from dwc.backends.gguf.child import _serve; _serve()"


def _picklable(e: BaseException) -> BaseException:
    """The exception itself when it survives pickling; otherwise its text as a RuntimeError
    (an exception class with a constructor of its own may not rebuild from its args)."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


def _die_with_parent() -> None:
    """A build killed with SIGKILL takes its llama.cpp child with it (Linux), rather than
    leaving it to finish a long evaluation into a scratch folder the next build removes."""
    if not sys.platform.startswith("linux"):
        return  # elsewhere the child ends at its next read, when the pipe is closed
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before the call
        os._exit(1)


def _serve() -> None:
    """The child's loop: (fn, args) in on stdin, ("ok", result) or ("error", exception)
    out, until stdin closes."""
    _die_with_parent()
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever llama.cpp prints goes to stderr, never into the replies
    sys.stdout = sys.stderr
    requests = sys.stdin.buffer
    while True:
        try:
            request = pickle.load(requests)
        except EOFError:
            return
        try:
            fn, args = pickle.loads(request)
            reply = ("ok", fn(*args))
        except BaseException as e:  # sent back and raised in the parent
            reply = ("error", _picklable(e))
        pickle.dump(reply, replies, protocol=pickle.HIGHEST_PROTOCOL)
        replies.flush()


_quiet = []


def quiet() -> None:
    """Silence llama.cpp's own logging (it writes to stderr; dwc's output stays dwc's)."""
    import llama_cpp

    if not _quiet:
        callback = llama_cpp.llama_log_callback(lambda level, text, user: None)
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
        _quiet.append(callback)  # keep the callback alive
