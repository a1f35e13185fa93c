"""One UTF-8 reader (auditbench.textio) behind the protocol loader and the data set adapters: each
keeps its own error and advice, both name the same place, a byte-order mark included."""
from __future__ import annotations

import pytest

from auditbench.data.datasets import DataError, read_utf8
from auditbench.protocol.loader import ProtocolError, _read_text
from auditbench.textio import BOM, NotUtf8, read_utf8_text

TEXT = "name: x\n# caf\xe9\n"  # é at offset 13, line 2, column 6 when written as Latin-1


def test_the_place_of_the_first_byte_that_is_not_utf8(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(TEXT.encode("latin-1"))
    with pytest.raises(NotUtf8) as caught:
        read_utf8_text(path)
    assert (caught.value.line, caught.value.column, caught.value.offset, caught.value.byte) == (2, 6, 13, 0xE9)
    assert caught.value.where == f"{path}, line 2: byte 0xe9 at offset 13"
    path.write_text("ok\n", encoding="utf-8")
    assert read_utf8_text(path) == "ok\n"


def test_each_caller_keeps_its_message(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_bytes(TEXT.encode("latin-1"))
    with pytest.raises(ProtocolError) as protocol:
        _read_text(path)
    assert str(protocol.value) == f"{path}, line 2: byte 0xe9 at offset 13 is not UTF-8; save the protocol as UTF-8"
    with pytest.raises(DataError) as data:
        read_utf8(path)
    assert str(data.value) == (f"{path}, line 2: byte 0xe9 at offset 13 (column 6) is not UTF-8; "
                               "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")


def test_a_byte_order_mark_is_dropped_by_the_csv_reader_only_and_counted_in_the_place(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes(BOM + b"path,label\n")
    assert read_utf8(path) == "path,label\n"  # a spreadsheet's UTF-8 export reads as before
    assert _read_text(path) == "\ufeffpath,label\n"  # the protocol's text as before (YAML skips the mark)
    # Offsets count the file's bytes: the bad byte itself is named, not the one three bytes before it.
    path.write_bytes(BOM + TEXT.encode("latin-1"))
    with pytest.raises(DataError, match=r"line 2: byte 0xe9 at offset 16 \(column 6\) is not UTF-8"):
        read_utf8(path)
