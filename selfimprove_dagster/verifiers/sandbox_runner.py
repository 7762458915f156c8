"""The sandboxed side of the code judge, and the wire format both sides speak.

The judge (`verifiers/sandbox.py`) starts `python -I -S -c <this file's source>` inside
a sandbox and talks to it in frames on its stdin/stdout: a 4-byte big-endian length,
then that many bytes of JSON. Values cross only as plain data (`encode` / `decode`):
None, bools, ints, floats, strings, bytes, complex numbers, ranges, and lists, tuples,
dicts, sets and frozensets of those; an iterator crosses as its items and comes out
as an iterator again. Anything else does not cross (`Unserializable`).

Two kinds of process run this file, each in a fresh sandbox of its own:

    candidate   job {"mode": "candidate", "program", "setup", "limits", "drop_to"}
                -> {"ready": true} | {"failed": "candidate_error" | "setup_error", "error"}
                then per request {"expr", "args", "discard"}: evaluates `expr` (a call of the
                candidate's code, `args` bound as `__a`) in the program's namespace
                -> {"ok": value} | {"raised": "Type: message"} | {"unserializable": type}
    tests       job {"mode": "tests", "helpers", "tests", "limits", "drop_to"}: a test the
                judge could not split runs here, where the candidate's names are
                proxies that send plain data to the judge and receive plain data
                back; it never sees the candidate's code
                -> per {"run": i}: {"call", "args", "kwargs"}... then {"done": i, "error",
                "line"}

The module is imported by the judge for the wire format (it uses the standard library
only) and is never imported inside a sandbox: there it is the `-c` program.
"""

import os
import sys

MAX_DEPTH = 100  # nesting of a value
MAX_ITEMS = 100_000  # items of an iterator a candidate returns
MAX_FRAME = 8 * 2**20  # bytes of one frame


class Unserializable(TypeError):
    """A value that is not plain data; the message names its type."""


class WireError(ValueError):
    """A frame or a value that does not follow the wire format."""


class ReturnedIterator:
    """An iterator the other side returned, as its items: `list(it)` works, and like
    any iterator it equals only itself (`f() == [1, 2]` stays False for a generator)."""

    def __init__(self, items):
        self._items = iter(items)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._items)

    def __repr__(self):
        return "<iterator>"


# --- values ------------------------------------------------------------------------


def encode(value, _depth=0):
    """`value` as JSON-ready data; Unserializable when it is not plain data."""
    if _depth > MAX_DEPTH:
        raise Unserializable(f"a value nested deeper than {MAX_DEPTH}")
    kind = type(value)
    if value is None or kind is bool or kind is str or kind is float:
        return value
    if kind is int:
        if abs(value).bit_length() > 14_000:  # json's own limit is 4,300 digits
            raise Unserializable("an int of more than 4,000 digits")
        return value
    down = _depth + 1
    if kind is list:
        return [encode(v, down) for v in value]
    if kind is tuple:
        return {"t": [encode(v, down) for v in value]}
    if kind is dict:
        return {"d": [[encode(k, down), encode(v, down)] for k, v in value.items()]}
    if kind is set:
        return {"s": [encode(v, down) for v in value]}
    if kind is frozenset:
        return {"f": [encode(v, down) for v in value]}
    if kind is complex:
        return {"c": [value.real, value.imag]}
    if kind is bytes:
        return {"b": value.hex()}
    if kind is range:
        return {"r": [value.start, value.stop, value.step]}
    return _encode_subclass(value, _depth)


def _encode_subclass(value, depth):
    # Subclasses of plain types (namedtuple, Counter, OrderedDict, IntEnum, a str
    # subclass) cross as their base type: what they compare equal to.
    kind = type(value)  # its real type: `isinstance` would believe a spoofed __class__
    for base in (bool, int, float, str, bytes, complex, tuple, list, dict, set, frozenset):
        if issubclass(kind, base):
            return encode(base(value), depth)
    if hasattr(kind, "__next__") and hasattr(kind, "__iter__"):
        items = []
        for item in value:
            if len(items) == MAX_ITEMS:
                raise Unserializable(f"an iterator of more than {MAX_ITEMS} items")
            items.append(encode(item, depth + 1))
        return {"i": items}
    raise Unserializable(type(value).__name__)


def decode(data, _depth=0):
    """The value `encode` made, rebuilt from builtin types only; WireError otherwise."""
    if _depth > MAX_DEPTH:
        raise WireError("nested too deep")
    kind = type(data)
    if data is None or kind in (bool, int, float, str):
        return data
    down = _depth + 1
    if kind is list:
        return [decode(v, down) for v in data]
    if kind is not dict or len(data) != 1:
        raise WireError(f"not a value: {kind.__name__}")
    ((tag, body),) = data.items()
    try:
        if tag == "t" and type(body) is list:
            return tuple(decode(v, down) for v in body)
        if tag == "d" and type(body) is list:
            return {_key(decode(k, down)): decode(v, down) for k, v in (_pair(p) for p in body)}
        if tag == "s" and type(body) is list:
            return {_key(decode(v, down)) for v in body}
        if tag == "f" and type(body) is list:
            return frozenset(_key(decode(v, down)) for v in body)
        if tag == "c" and _numbers(body, 2, (int, float)):
            return complex(body[0], body[1])
        if tag == "b" and type(body) is str:
            return bytes.fromhex(body)
        if tag == "r" and _numbers(body, 3, (int,)):
            return range(body[0], body[1], body[2])
        if tag == "i" and type(body) is list:
            return ReturnedIterator([decode(v, down) for v in body])
    except (TypeError, ValueError) as err:  # unhashable key, bad hex, zero step
        raise WireError(f"bad {tag!r} value: {err}") from None
    raise WireError(f"unknown tag {tag!r}")


def _pair(item):
    if type(item) is not list or len(item) != 2:
        raise WireError("a dict item is not a [key, value] pair")
    return item


def _key(value):
    hash(value)  # TypeError for an unhashable key (builtin types only: no user code)
    return value


def _numbers(body, n, kinds):
    return type(body) is list and len(body) == n and all(type(v) in kinds for v in body)


# --- frames ------------------------------------------------------------------------


def _not_json(value):
    raise TypeError(f"{type(value).__name__} is not JSON")


class _Strict:
    """What json.loads's scanner reads its options from: plain JSON only."""

    strict = True  # no control characters inside strings
    object_hook = object_pairs_hook = None
    parse_float, parse_int = float, int
    parse_constant = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}.get


def _json_functions():
    """json.dumps(..., separators=(",", ":")) and json.loads's scanner, straight from
    json's C half: the `json` package imports `re`, a few ms of every sandbox's start.
    Where that half is missing or differs, the `json` package's own."""
    try:
        import _json

        encoder = _json.make_encoder(
            None, _not_json, _json.encode_basestring_ascii, None, ":", ",", False, False, True
        )
        return (lambda message: "".join(encoder(message, 0))), _json.make_scanner(_Strict())
    except (ImportError, AttributeError, TypeError):
        import json

        decoder = json.JSONDecoder(parse_constant=_Strict.parse_constant)
        return (lambda message: json.dumps(message, separators=(",", ":"))), decoder.scan_once


_DUMPS, _SCAN = _json_functions()


def frame(message):
    """The bytes of one frame holding `message` (a dict of JSON-ready data)."""
    body = _DUMPS(message).encode("ascii")
    return len(body).to_bytes(4, "big") + body


def parse_frame(body):
    """The message in a frame's body; WireError unless it is one JSON object."""
    try:
        text = body.decode("ascii")
        message, end = _SCAN(text, 0)
    except StopIteration:
        raise WireError("not JSON") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise WireError(f"not JSON: {str(err)[:80]}") from None
    if end != len(text):
        raise WireError("data after the JSON value")
    if type(message) is not dict:
        raise WireError("a frame is not a JSON object")
    return message


def read_frame(fd):
    """The next frame on a blocking descriptor (inside the sandbox); None at EOF."""
    header = _read_exactly(fd, 4)
    if header is None:
        return None
    size = int.from_bytes(header, "big")
    if size > MAX_FRAME:
        raise WireError(f"a frame of {size} bytes")
    body = _read_exactly(fd, size)
    if body is None:
        raise WireError("the stream ended inside a frame")
    return parse_frame(body)


def write_frame(fd, message):
    data = frame(message)
    while data:
        data = data[os.write(fd, data) :]


def _read_exactly(fd, n):
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 2**20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def error_text(err):
    """An exception in the verdict's words: "ValueError: message" (message cut)."""
    message = str(err)[:300]
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


# --- the sandboxed process ------------------------------------------------------------


def _limit(limits):
    import resource

    cpu = int(limits["cpu_seconds"])
    for name, value in (
        ("RLIMIT_CPU", (cpu, cpu + 1)),  # SIGXCPU at `cpu` seconds, SIGKILL one later
        ("RLIMIT_AS", (limits["memory_bytes"],) * 2),
        ("RLIMIT_FSIZE", (limits["file_bytes"],) * 2),
        ("RLIMIT_NPROC", (limits["processes"],) * 2),
        ("RLIMIT_NOFILE", (64, 64)),
        ("RLIMIT_CORE", (0, 0)),
    ):
        try:  # noqa: SIM105 (contextlib would be one more import in every sandbox)
            resource.setrlimit(getattr(resource, name), value)
        except (ValueError, OSError):  # e.g. NPROC above a hard limit: keep the lower one
            pass


def _drop_root(uid):
    # A judge running as root maps the sandbox's uid 0 to its own for bwrap's set-up
    # and hands the runner CAP_SETUID/CAP_SETGID for this one step: the candidate's code
    # runs as `uid` (65534), without capabilities (RLIMIT_NPROC holds, /proc/sys is
    # read-only to it).
    if uid is not None and os.getuid() == 0:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)


def _private_channel():
    """Move the frame channel off fds 0/1 (the candidate's input is empty and its
    prints go nowhere) and return (read_fd, write_fd)."""
    read_fd, write_fd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    return read_fd, write_fd


def _serve_candidate(job, read_fd, write_fd):
    namespace = {"__name__": "__candidate__", "__builtins__": __builtins__}
    stage = "candidate_error"
    try:
        exec(compile(job["program"], "<candidate>", "exec"), namespace)
        stage = "setup_error"
        if job.get("setup"):
            exec(compile(job["setup"], "<test_setup>", "exec"), namespace)
    except BaseException as err:  # SystemExit and KeyboardInterrupt included
        write_frame(write_fd, {"failed": stage, "error": error_text(err)})
        return
    write_frame(write_fd, {"ready": True})
    while (request := read_frame(read_fd)) is not None:
        try:
            value = eval(request["expr"], namespace, {"__a": decode(request["args"])})
            reply = {"ok": None if request.get("discard") else encode(value)}
        except Unserializable as err:
            reply = {"unserializable": str(err)}
        except BaseException as err:
            reply = {"raised": error_text(err)}
        write_frame(write_fd, reply)


class CandidateError(Exception):
    """The candidate's function raised; the message is its exception in words."""


class UnserializableResult(Exception):
    """The candidate returned something that is not plain data."""


def _raised(text):
    # A builtin exception comes back as itself (a test may expect a ValueError); any
    # other as CandidateError with the same words.
    import builtins

    name, _, message = text.partition(": ")
    kind = getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            return kind(message)
        except Exception:  # an exception class that wants other arguments
            pass
    return CandidateError(text)


def _proxy(name, read_fd, write_fd):
    def call(*args, **kwargs):
        try:
            message = {"call": name, "args": encode(list(args)), "kwargs": encode(kwargs)}
        except Unserializable as err:
            raise TypeError(f"the test passed {err} to {name}(), not plain data") from None
        write_frame(write_fd, message)
        reply = read_frame(read_fd)
        if reply is None:
            raise SystemExit(0)  # the judge is gone
        if "ok" in reply:
            return decode(reply["ok"])
        if "unserializable" in reply:
            raise UnserializableResult(reply["unserializable"])
        raise _raised(str(reply.get("raised", "no result")))

    call.__name__ = call.__qualname__ = name
    return call


def _serve_tests(job, read_fd, write_fd):
    namespace = {"__name__": "__tests__", "__builtins__": __builtins__}
    if job.get("helpers"):
        try:  # noqa: SIM105 (the row's helper code, HumanEval's prompt: never the candidate's)
            exec(compile(job["helpers"], "<helpers>", "exec"), namespace)
        except BaseException:
            pass
    while (request := read_frame(read_fd)) is not None:
        index = request["run"]
        test = job["tests"][index]
        for name in test["modules"]:  # used without an import, as the candidate's were
            try:  # noqa: SIM105
                namespace[name] = __import__(name)
            except ImportError:
                pass
        for name in test["proxies"]:
            namespace[name] = _proxy(name, read_fd, write_fd)
        filename = f"<test {index + 1}>"
        try:
            exec(compile(test["source"], filename, "exec"), namespace)
            error, line = None, None
        except BaseException as err:
            error, line = error_text(err), _line_in(err.__traceback__, filename)
        write_frame(write_fd, {"done": index, "error": error, "line": line})


def _line_in(traceback, filename):
    line = None
    while traceback is not None:
        if traceback.tb_frame.f_code.co_filename == filename:
            line = traceback.tb_lineno
        traceback = traceback.tb_next
    return line


def main():
    read_fd, write_fd = _private_channel()
    job = read_frame(read_fd)
    _limit(job["limits"])
    _drop_root(job.get("drop_to"))
    if job["mode"] == "candidate":
        _serve_candidate(job, read_fd, write_fd)
    else:
        _serve_tests(job, read_fd, write_fd)
    os._exit(0)  # skip interpreter shutdown (a candidate's atexit hooks, __del__)


if __name__ == "__main__":
    sys.setrecursionlimit(2000)
    main()
