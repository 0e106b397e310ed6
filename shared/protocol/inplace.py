"""A message decoded where it was read: its bytes in one memory map, its large tensors views on it.

``MessageBuffer`` holds a body as it arrives from the network, in an anonymous memory map sized from
the declared length (or the size limit when none is declared): pages cost memory only once written,
and unmapping gives them back to the system at once (freed heap blocks may stay with the process).

``bulk_bins`` walks the msgpack framing without building anything and finds the large bins at
``tensors.<name>.<field>``; ``skeleton`` is the message with each of them replaced by a 6-byte ext
placeholder (fixext 4, ``BULK_EXT``, the bin's index), which msgpack then decodes as usual; and
``MessageBuffer.adopt`` aligns those bins in place (each to ``ALIGN`` bytes, so tensors over them
are aligned like torch's own) and hands them out as writable memoryviews. The ordinary decode
refuses ext types, so a placeholder cannot come from the network: ``bulk_bins`` gives up (None) on
any ext, as on anything else unusual, and the caller then decodes the bytes the ordinary way.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from dataclasses import dataclass

ALIGN = 64  # bytes; torch's CPU allocator aligns to 64 too
BULK_MIN = 64 * 1024  # bins at least this large are used in place; smaller ones are copied by msgpack
BULK_EXT = 0x55  # the placeholder's ext type (never accepted from the network)
MAX_SCAN = 100_000  # values walked before giving up on the in-place path (the ordinary decode then runs)

# head byte -> (bytes of the length field, extra bytes after it, kind); fixed-size values have no length field
_SIZED = {0xc4: (1, 0, "bin"), 0xc5: (2, 0, "bin"), 0xc6: (4, 0, "bin"),
          0xd9: (1, 0, "str"), 0xda: (2, 0, "str"), 0xdb: (4, 0, "str"),
          0xc7: (1, 1, "ext"), 0xc8: (2, 1, "ext"), 0xc9: (4, 1, "ext"),
          0xdc: (2, 0, "array"), 0xdd: (4, 0, "array"), 0xde: (2, 0, "map"), 0xdf: (4, 0, "map")}
_FIXED = {0xc0: 0, 0xc2: 0, 0xc3: 0, 0xca: 4, 0xcb: 8, 0xcc: 1, 0xcd: 2, 0xce: 4, 0xcf: 8,
          0xd0: 1, 0xd1: 2, 0xd2: 4, 0xd3: 8}
_FIXEXT = {0xd4: 1, 0xd5: 2, 0xd6: 4, 0xd7: 8, 0xd8: 16}
_LENGTH = {1: struct.Struct(">B"), 2: struct.Struct(">H"), 4: struct.Struct(">I")}

# where a value sits: the root, the top map, the tensors map, a tensor entry, or anywhere else
_ROOT, _TOP, _TENSORS, _ENTRY, _FIELD, _OTHER = range(6)
_INSIDE = {_TOP: _TENSORS, _TENSORS: _ENTRY, _ENTRY: _FIELD}


@dataclass(frozen=True)
class Span:
    """A bin in the body: its header starts at ``head``, its bytes are ``[start, end)``."""

    head: int
    start: int
    end: int


def _value(buf: memoryview, pos: int) -> tuple[str, int, int, int]:
    """(kind, start of payload, end of payload, items inside) of the value at ``pos``; IndexError/KeyError
    when the framing is bad or cut short."""
    c = buf[pos]
    if c <= 0x7f or c >= 0xe0:
        return "scalar", pos + 1, pos + 1, 0
    if c <= 0x8f:
        return "map", pos + 1, pos + 1, 2 * (c & 0x0f)
    if c <= 0x9f:
        return "array", pos + 1, pos + 1, c & 0x0f
    if c <= 0xbf:
        return "str", pos + 1, pos + 1 + (c & 0x1f), 0
    if c in _FIXED:
        return "scalar", pos + 1, pos + 1 + _FIXED[c], 0
    if c in _FIXEXT:
        return "ext", pos + 1, pos + 2 + _FIXEXT[c], 0
    width, extra, kind = _SIZED[c]  # KeyError for 0xc1, the one byte msgpack never uses
    (n,) = _LENGTH[width].unpack_from(buf, pos + 1)
    start = pos + 1 + width + extra
    if kind in ("array", "map"):
        return kind, start, start, n * (2 if kind == "map" else 1)
    return kind, start, start + n, 0


def bulk_bins(buf: memoryview) -> list[Span] | None:
    """The bins of at least ``BULK_MIN`` bytes at ``tensors.<name>.<field>`` in ``buf``, in order.

    None unless ``buf`` is exactly one well-framed msgpack value without ext types, of at most
    ``MAX_SCAN`` values: the caller then decodes it the ordinary way (which reports what is wrong).
    """
    min_size, max_values = BULK_MIN, MAX_SCAN
    spans: list[Span] = []
    # frames: [items left, where the container sits, index of the next item, was the last key "tensors"]
    stack: list[list] = [[1, _ROOT, 1, False]]
    pos, seen, n = 0, 0, len(buf)
    try:
        while stack:
            frame = stack[-1]
            if frame[0] == 0:
                stack.pop()
                continue
            frame[0] -= 1
            where, is_key = frame[1], frame[2] % 2 == 0
            frame[2] += 1
            kind, start, end, items = _value(buf, pos)
            seen += 1
            if kind == "ext" or end > n or seen > max_values:
                return None
            if where == _TOP and is_key:
                frame[3] = kind == "str" and buf[start:end] == b"tensors"
            if is_key or where in (_FIELD, _OTHER):
                inner = _OTHER
            elif where == _ROOT:
                inner = _TOP
            elif where == _TOP:
                inner = _TENSORS if frame[3] else _OTHER
            else:
                inner = _INSIDE[where]
            if kind == "bin" and inner == _FIELD and end - start >= min_size:
                spans.append(Span(pos, start, end))
            if items:
                stack.append([items, inner if kind == "map" else _OTHER, 0, False])
            pos = end
    except (IndexError, KeyError, struct.error):
        return None
    return spans if pos == n else None


def skeleton(buf: memoryview, spans: list[Span]) -> bytes:
    """``buf`` with each span's bin replaced by the placeholder ``fixext 4 BULK_EXT <index>``."""
    pieces: list[bytes | memoryview] = []
    pos = 0
    for i, span in enumerate(spans):
        pieces += [buf[pos:span.head], struct.pack(">BBI", 0xd6, BULK_EXT, i)]
        pos = span.end
    pieces.append(buf[pos:])
    return b"".join(pieces)


class MessageBuffer:
    """A body as it is read: ``write`` the chunks, then ``wire.decode`` adopts it (tensors may be views on it).

    ``capacity`` is the most it can hold (the declared length, or the size limit); the map also keeps
    room to align bins. Untouched pages are never resident; the map is unmapped when the buffer and
    every view on it are gone.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # private: plain anonymous memory, like the heap's, but unmapped (given back) as a whole when done
        self._map = mmap.mmap(-1, capacity + ALIGN * (capacity // BULK_MIN + 1), flags=mmap.MAP_PRIVATE)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        """Append ``chunk``; ValueError beyond ``capacity``."""
        end = self._size + len(chunk)
        if end > self.capacity:
            raise ValueError(f"{end} bytes is over this buffer's capacity of {self.capacity}")
        self._map[self._size:end] = chunk
        self._size = end

    def view(self) -> memoryview:
        """The bytes written so far."""
        return memoryview(self._map)[: self._size]

    def adopt(self, spans: list[Span]) -> list[memoryview]:
        """Move each span's bytes forward to an ``ALIGN``-byte boundary (overwriting the bytes between the
        spans, which ``skeleton`` has copied), and return writable views on them. Call once."""
        shifts, total = [], 0
        for span in spans:
            total += -(span.start + total) % ALIGN
            shifts.append(total)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        for span, shift in zip(reversed(spans), reversed(shifts)):  # last first: a move never overtakes one
            if shift:  # ctypes' memmove lets other threads run (mmap.move holds the GIL)
                ctypes.memmove(base + span.start + shift, base + span.start, span.end - span.start)
        whole = memoryview(self._map)
        return [whole[s.start + shift:s.end + shift] for s, shift in zip(spans, shifts)]
