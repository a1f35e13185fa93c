"""UTF-8 text files read strictly, with the place of the first byte that is not UTF-8.

Imported by the protocol loader and the data set adapters alike (it imports nothing of the
package), so both say where a file breaks the same way; each turns :class:`NotUtf8` into its own
error and advice.
"""
from __future__ import annotations

from pathlib import Path

BOM = b"\xef\xbb\xbf"


class NotUtf8(ValueError):
    """A file that is not UTF-8, and where: 1-based ``line`` and ``column``, the 0-based byte
    ``offset`` in the file and the ``byte`` itself."""

    def __init__(self, path: Path, line: int, column: int, offset: int, byte: int):
        self.path, self.line, self.column, self.offset, self.byte = path, line, column, offset, byte
        super().__init__(f"{path}, line {line}: byte 0x{byte:02x} at offset {offset} is not UTF-8")

    @property
    def where(self) -> str:
        """``<path>, line L: byte 0xHH at offset N``."""
        return f"{self.path}, line {self.line}: byte 0x{self.byte:02x} at offset {self.offset}"


def read_utf8_text(path: Path, strip_bom: bool = False) -> str:
    """The text of ``path`` decoded as UTF-8 (a leading byte-order mark dropped when ``strip_bom``),
    or :class:`NotUtf8`; the place counts the file's own bytes, a byte-order mark included."""
    data = Path(path).read_bytes()
    start = len(BOM) if strip_bom and data.startswith(BOM) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        line = data.count(b"\n", 0, offset) + 1
        column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
        raise NotUtf8(path, line, column, offset, data[offset]) from None
