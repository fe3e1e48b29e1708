"""The only way values cross between a sandboxed program and the trusted judge: tagged JSON of plain data.

Never pickle: decoding builds nothing but ``None``, ``bool``, ``int``, ``float``, ``complex``, ``str``, ``bytes``,
``bytearray``, ``range``, ``list``, ``tuple``, ``dict``, ``set``, ``frozenset``, list iterators and ``Opaque``, so no
object made by the program (no ``__eq__`` override, no frame, no callable) ever reaches the judge. A result that is
not plain data (a ``re.Match``, an instance of a class the program defines) may be sent as ``Opaque``: its type
name, its truth value and a short repr, computed in the sandbox; it equals only itself, so ``assert f(x)`` works as
with the real object while ``assert f(x) == y`` fails. Ints travel in hexadecimal (no
4300-digit cap), floats as ``float.hex`` (exact, NaN and infinities included). An iterator the program returns
(``map``, generator, ...) is drained in the sandbox (at most ``MAX_ITEMS`` items) and arrives as a list iterator.

Messages are length-prefixed (4 bytes, big-endian) JSON objects of at most ``MAX_MESSAGE_BYTES``. This file is
stdlib-only and imports nothing from the package: ``execution`` prepends its source to the worker's and the
judge's, which run as ``python -I -S -c <source>``.
"""

import json
import os

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_ITEMS = 1_000_000
_ITERATOR_TYPES = (
    type(iter([])), type(iter(())), type(iter("")), type(iter(range(0))), type(iter({})), type(iter(set())),
    type(iter({}.values())), type(iter({}.items())), type(map(abs, ())), type(filter(None, ())), type(zip()),
    type(reversed([])), type(enumerate(())), type((lambda: (yield))()),
)  # fmt: skip


class WireError(ValueError):
    """A message that is not well-formed plain data, or too large."""


class Opaque:
    """Stand-in for a value that is not plain data: truth value and repr only; equal to nothing but itself."""

    __slots__ = ("type_name", "truth", "text")

    def __init__(self, type_name, truth, text):
        self.type_name, self.truth, self.text = type_name, truth, text

    def __bool__(self):
        return self.truth

    def __repr__(self):
        return f"<opaque {self.type_name}: {self.text}>"


def encode(value, depth=0, opaque=False):
    """``value`` as JSON-ready tagged data; anything that is not plain data raises ``WireError``, or with
    ``opaque`` becomes an ``Opaque`` description (type name, truth value, repr)."""
    if depth > 200:
        raise WireError("value nested deeper than 200 levels")
    if value is None or value is True or value is False:
        return value
    if isinstance(value, int):
        return ["int", format(int(value), "x")]
    if isinstance(value, float):
        return ["float", float(value).hex()]
    if isinstance(value, complex):
        return ["complex", value.real.hex(), value.imag.hex()]
    if isinstance(value, str):
        return ["str", str.__str__(value)]
    if isinstance(value, bytearray):
        return ["bytearray", bytes(value).hex()]
    if isinstance(value, bytes):
        return ["bytes", bytes(value).hex()]
    if isinstance(value, range):
        return ["range", encode(value.start), encode(value.stop), encode(value.step)]
    for kind in (list, tuple, set, frozenset):
        if isinstance(value, kind):
            return [kind.__name__, [encode(item, depth + 1, opaque) for item in value]]
    if isinstance(value, dict):
        return ["dict", [[encode(k, depth + 1, opaque), encode(v, depth + 1, opaque)] for k, v in value.items()]]
    if isinstance(value, _ITERATOR_TYPES):
        items = []
        for item in value:
            if len(items) >= MAX_ITEMS:
                raise WireError(f"iterator yields more than {MAX_ITEMS} items")
            items.append(encode(item, depth + 1, opaque))
        return ["iter", items]
    if opaque:
        return ["opaque", str(type(value).__name__), bool(value), str(repr(value))[:200]]
    raise WireError(f"a value of type {type(value).__name__} cannot cross the sandbox boundary (plain data only)")


def _float(text):
    if not isinstance(text, str):
        raise WireError("malformed float")
    return float.fromhex(text)


def _int(text):
    if not isinstance(text, str) or len(text) > 1_000_000:
        raise WireError("malformed int")
    return int(text, 16)


def decode(data):
    """Plain data from tagged JSON; raises ``WireError`` on anything malformed."""
    if data is None or data is True or data is False:
        return data
    if not isinstance(data, list) or not data or not isinstance(data[0], str):
        raise WireError(f"malformed value {str(data)[:80]!r}")
    tag, body = data[0], data[1:]
    try:
        if tag == "int" and len(body) == 1:
            return _int(body[0])
        if tag == "float" and len(body) == 1:
            return _float(body[0])
        if tag == "complex" and len(body) == 2:
            return complex(_float(body[0]), _float(body[1]))
        if tag == "str" and len(body) == 1 and isinstance(body[0], str):
            return body[0]
        if tag in ("bytes", "bytearray") and len(body) == 1 and isinstance(body[0], str):
            return (bytes if tag == "bytes" else bytearray).fromhex(body[0])
        if tag == "range" and len(body) == 3:
            return range(*(_exact_int(decode(part)) for part in body))
        if tag in ("list", "tuple", "set", "frozenset", "iter") and len(body) == 1 and isinstance(body[0], list):
            items = [decode(item) for item in body[0]]
            return iter(items) if tag == "iter" else {"list": list, "tuple": tuple, "set": set,
                                                      "frozenset": frozenset}[tag](items)  # fmt: skip
        if tag == "opaque" and len(body) == 3 and isinstance(body[0], str) and isinstance(body[2], str):
            return Opaque(body[0], body[1] is True, body[2][:200])
        if tag == "dict" and len(body) == 1 and isinstance(body[0], list):
            pairs = body[0]
            if not all(isinstance(pair, list) and len(pair) == 2 for pair in pairs):
                raise WireError("malformed dict")
            return {decode(k): decode(v) for k, v in pairs}
    except (TypeError, ValueError, OverflowError, RecursionError) as err:  # unhashable key, bad hex, too deep
        raise WireError(f"malformed {tag}: {err}") from None
    raise WireError(f"unknown or malformed tag {tag!r}")


def _exact_int(value):
    if type(value) is not int:
        raise WireError("range bounds must be ints")
    return value


def send(fd, message):
    """Write one message (a dict of JSON-ready data) to file descriptor ``fd``."""
    payload = json.dumps(message, separators=(",", ":")).encode("utf-8", "surrogatepass")
    if len(payload) > MAX_MESSAGE_BYTES:
        raise WireError(f"message of {len(payload)} bytes is larger than {MAX_MESSAGE_BYTES}")
    data = len(payload).to_bytes(4, "big") + payload
    while data:
        data = data[os.write(fd, data) :]


def _read_exactly(fd, count):
    chunks, left = [], count
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("the other side closed the channel")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def receive(fd):
    """Read one message from ``fd``; ``EOFError`` when the other side is gone, ``WireError`` when it is malformed."""
    size = int.from_bytes(_read_exactly(fd, 4), "big")
    if size > MAX_MESSAGE_BYTES:
        raise WireError(f"message of {size} bytes is larger than {MAX_MESSAGE_BYTES}")
    try:
        message = json.loads(_read_exactly(fd, size).decode("utf-8", "surrogatepass"))
    except (ValueError, RecursionError) as err:
        raise WireError(f"malformed message: {err}") from None
    if not isinstance(message, dict):
        raise WireError("malformed message: not an object")
    return message
