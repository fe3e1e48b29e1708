"""The trusted judge of a code run: runs the dataset's tests against proxies of the sandboxed program's functions.

Runs as ``python -I -S -B -c <sandbox_wire source + this source> <request_fd> <reply_fd>``, outside the sandbox,
started by ``dskd_scale.eval.execution``; reads the task (JSON: ``program``, ``setup``, ``test``, ``proxied``) from
stdin and writes one verdict (JSON: ``status`` passed/failed/error, ``detail``) to its stdout, a pipe only the
evaluator holds. The program runs in the sandbox worker (``sandbox_child.serve``); here only trusted dataset code
runs: ``setup`` (HumanEval's prompt with its helpers, MBPP's test imports) and ``test`` (``check(candidate)`` or the
asserts). Every name the test reads that neither the setup, the test itself nor builtins bind is looked up in the
program's top level (``bind_program_names``): a function (and every name in ``proxied``) becomes a proxy; calling
it sends the arguments to the worker as plain data and returns the worker's reply decoded as plain data
(``sandbox_wire``), or raises the builtin exception type the program raised. No object of the
program ever exists here, so nothing it does can reach the verdict; it can only answer calls.
"""

import ast
import builtins
import importlib
import json
import os
import resource
import sys

if "receive" not in globals():  # at run time execution.py prepends sandbox_wire's source instead
    from dskd_scale.eval.sandbox_wire import WireError, decode, encode, receive, send


class CandidateError(Exception):
    """The program raised an exception that is not a builtin type, or replied with something that is not data."""


class ProgramDied(BaseException):
    """The worker exited or stopped answering; a BaseException so that no ``except Exception`` in a test hides it."""


def _raised(name, message):
    kind = getattr(builtins, name, None) if isinstance(name, str) else None
    # StopIteration would silently end a test's loop over the program's results instead of failing it
    if (
        isinstance(kind, type)
        and issubclass(kind, Exception)
        and not issubclass(kind, (StopIteration, StopAsyncIteration))
    ):
        try:
            return kind(message)
        except Exception:  # noqa: BLE001 - a builtin exception that takes other arguments
            pass
    return CandidateError(f"{name}: {message}")


class Channel:
    def __init__(self, request_fd, reply_fd):
        self.request_fd, self.reply_fd = request_fd, reply_fd
        self.died = None

    def ask(self, message):
        if self.died:
            raise ProgramDied(self.died)
        try:
            send(self.request_fd, message)
            return receive(self.reply_fd)
        except (EOFError, BrokenPipeError) as err:
            self.died = f"the program's process exited ({type(err).__name__})"
            raise ProgramDied(self.died) from None
        except WireError as err:
            raise CandidateError(f"malformed reply from the program: {err}") from None

    def proxy(self, name):
        def call(*args, **kwargs):
            reply = self.ask({"name": name, "args": encode(list(args)), "kwargs": encode(dict(kwargs))})
            if "raise" in reply and isinstance(reply["raise"], list) and len(reply["raise"]) == 2:
                raise _raised(*reply["raise"])
            if "value" not in reply:
                raise CandidateError("malformed reply from the program")
            try:
                return decode(reply["value"])
            except WireError as err:
                raise CandidateError(f"malformed reply from the program: {err}") from None

        call.__name__ = call.__qualname__ = name
        return call


def free_names(source):
    """Names ``source`` reads but never binds (an over-approximation is harmless: unknown names fail either way)."""
    bound, read = set(), set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return read - bound


def bind_program_names(namespace, described, wanted, proxied, channel):
    """Bind what the test reads from the program, as the program's top level defines it: functions become
    proxies, a module the judge imports itself (standard library only), plain data its decoded copy. A name the
    program lacks stays unbound, except ``proxied`` names: the proxy's call then fails with the program's
    NameError."""
    if not isinstance(described, dict):
        raise CandidateError("malformed reply from the program")
    for name in wanted:
        kind = described.get(name)
        if not isinstance(kind, list) or not kind:
            raise CandidateError(f"malformed reply from the program about {name!r}")
        if kind[0] == "callable" or name in proxied:
            namespace[name] = channel.proxy(name)
        elif kind[0] == "module" and len(kind) == 2 and kind[1] == name and name in sys.stdlib_module_names:
            namespace[name] = importlib.import_module(name)
        elif kind[0] == "value" and len(kind) == 2:
            try:
                namespace[name] = decode(kind[1])
            except WireError as err:
                raise CandidateError(f"malformed reply from the program: {err}") from None


def judge(task, channel):
    try:  # the worker speaks first, before any program code has run: silence here is a broken sandbox
        hello = receive(channel.reply_fd)
    except (EOFError, WireError):
        hello = None
    if hello != {"hello": True}:
        return {"status": "error", "detail": "the sandbox did not start"}
    namespace = {"__name__": "__judge__"}
    exec(compile(task["setup"], "setup.py", "exec"), namespace)
    # A builtin the test reads keeps meaning the builtin unless the dataset names it (MBPP 126 defines ``sum``): a
    # program that redefines ``abs`` or ``set`` must not change how the test checks it.
    unbound = {name for name in free_names(task["test"]) if name not in namespace and not hasattr(builtins, name)}
    wanted = sorted(set(task["proxied"]) | unbound)
    try:
        loaded = channel.ask({"program": task["program"], "describe": wanted})
    except (ProgramDied, CandidateError) as err:
        return {"status": "failed", "detail": str(err)}
    if "raise" in loaded:
        kind, message = (loaded["raise"] + ["", ""])[:2] if isinstance(loaded["raise"], list) else ("?", "")
        return {"status": "failed", "detail": f"{kind}: {message}"[:500]}
    try:
        bind_program_names(namespace, loaded.get("names"), wanted, set(task["proxied"]), channel)
    except CandidateError as err:
        return {"status": "failed", "detail": str(err)}
    try:
        exec(compile(task["test"], "test.py", "exec"), namespace)
    except ProgramDied as err:
        return {"status": "failed", "detail": str(err)}
    except Exception as err:  # noqa: BLE001 - a failing test, whatever it raised
        return {"status": "failed", "detail": f"{type(err).__name__}: {err}"[:500]}
    if channel.died:  # the test swallowed the exception of a dead program
        return {"status": "failed", "detail": channel.died}
    return {"status": "passed", "detail": ""}


def main():
    request_fd, reply_fd, memory_bytes = (int(value) for value in sys.argv[1:4])
    verdict = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything the tests print goes to stderr; stdout carries the verdict only
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    task = json.loads(sys.stdin.read())
    try:
        result = judge(task, Channel(request_fd, reply_fd))
    except MemoryError:
        result = {"status": "failed", "detail": "MemoryError in the judge (the program's reply is too large)"}
    verdict.write(json.dumps(result) + "\n")
    verdict.flush()


main()
