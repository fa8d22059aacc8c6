"""The judge's wire format: length-prefixed marshal frames, and the plain-data check on what the program
sends back."""

import marshal
import os

MAX_REPLY_BYTES = 64 << 20
# The parent's stdout pipe is moved here at start-up, so that whatever the tests print cannot garble reports.
REPORT_FD = 3
PLAIN_TYPES = frozenset({int, float, complex, str, bytes, bool, type(None)})
CONTAINER_TYPES = frozenset({tuple, list, set, frozenset})


def encode_frame(obj: object) -> bytes:
    data = marshal.dumps(obj)
    return len(data).to_bytes(4, "little") + data


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read_exact(fd: int, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int, max_bytes: int = MAX_REPLY_BYTES) -> object:
    """The next frame's object, or None at end of stream. Raises ValueError on an oversized frame."""
    head = read_exact(fd, 4)
    if head is None:
        return None
    size = int.from_bytes(head, "little")
    if size > max_bytes:
        raise ValueError(f"frame of {size} bytes is over the {max_bytes}-byte limit")
    data = read_exact(fd, size)
    return None if data is None else marshal.loads(data)


def report(obj: object) -> None:
    write_all(REPORT_FD, encode_frame(obj))


def check_plain(value: object) -> object:
    """`value` itself if it is made only of plain data, else TypeError (code objects and the like)."""
    kind = type(value)
    if kind in PLAIN_TYPES:
        return value
    if kind in CONTAINER_TYPES:
        for item in value:
            check_plain(item)
        return value
    if kind is dict:
        for key, item in value.items():
            check_plain(key)
            check_plain(item)
        return value
    raise TypeError(f"the program sent a {kind.__name__}, which is not plain data")
