"""Vma.dup() copies every field (it names them one by one)."""

from dataclasses import fields

from kvmdbgfs.guest.pagecache import File
from kvmdbgfs.guest.vma import PROT_READ, PROT_WRITE, Vma


def test_dup_copies_every_field() -> None:
    vma = Vma(0x1000, 0x5000, PROT_READ | PROT_WRITE, True, File("f", 4), 3, "[heap]", True, True, True)
    dup = vma.dup()
    assert dup is not vma
    assert [getattr(dup, f.name) for f in fields(Vma)] == [getattr(vma, f.name) for f in fields(Vma)]
    assert len(fields(Vma)) == 10  # a new field must be added to dup() too
