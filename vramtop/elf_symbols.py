"""Addresses of exported functions inside another process (ELF .dynsym + /proc/PID/maps).

Used by the injector (ptrace_call.py) to find `Py_AddPendingCall`,
`PyRun_SimpleString` (libpython, or the python executable itself when it is
statically linked and exports its symbols) and `mmap` (libc) in the target.
Only the dynamic symbol table is read: it is what the dynamic linker uses, so
it exists in stripped builds too.
"""

from __future__ import annotations

import os
import struct


class SymbolError(Exception):
    """The file is not a 64-bit little-endian ELF, or lacks the symbol."""


def dynamic_symbols(path: str, wanted: set[str]) -> tuple[dict[str, int], int]:
    """({name: st_value} for the wanted defined symbols, vaddr of the first PT_LOAD) of one ELF file."""
    with open(path, "rb") as fh:
        data = fh.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise SymbolError(f"{path} is not a 64-bit little-endian ELF file")
    e_phoff, e_shoff = struct.unpack_from("<QQ", data, 0x20)
    e_phentsize, e_phnum, e_shentsize, e_shnum = struct.unpack_from("<HHHH", data, 0x36)
    first_load = None
    for i in range(e_phnum):
        p_type, _flags, _off, p_vaddr = struct.unpack_from("<IIQQ", data, e_phoff + i * e_phentsize)
        if p_type == 1:  # PT_LOAD
            first_load = p_vaddr if first_load is None else min(first_load, p_vaddr)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, e_shoff + i * e_shentsize) for i in range(e_shnum)]
    found: dict[str, int] = {}
    for sh in sections:
        if sh[1] != 11:  # SHT_DYNSYM
            continue
        offset, size, link, entsize = sh[4], sh[5], sh[6], sh[9] or 24
        str_off = sections[link][4]
        for j in range(size // entsize):
            st_name, st_info, _other, st_shndx, st_value = struct.unpack_from("<IBBHQ", data, offset + j * entsize)
            if st_shndx == 0 or st_value == 0 or (st_info & 0xF) != 2:  # undefined, or not a function
                continue
            end = data.index(b"\0", str_off + st_name)
            name = data[str_off + st_name:end].decode("ascii", "replace")
            if name in wanted:
                found[name] = st_value
    return found, (first_load or 0) & ~0xFFF


def mapped_files(pid: int) -> dict[str, int]:
    """{path: lowest start address} of the files mapped in `pid` (from /proc/PID/maps)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/maps") as fh:
        for line in fh:
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or not parts[5].startswith("/"):
                continue
            path = parts[5].strip()
            if path.endswith(" (deleted)"):
                continue
            start = int(parts[0].split("-")[0], 16)
            if path not in out or start < out[path]:
                out[path] = start
    return out


def resolve(pid: int, path: str, names: set[str], maps: dict[str, int] | None = None) -> dict[str, int]:
    """Run-time addresses of `names` in the copy of `path` that `pid` has mapped."""
    maps = mapped_files(pid) if maps is None else maps
    if path not in maps:
        raise SymbolError(f"{path} is not mapped in process {pid}")
    readable = f"/proc/{pid}/root{path}"  # the file as the target sees it (another mount namespace)
    symbols, first_load = dynamic_symbols(readable if os.path.exists(readable) else path, names)
    missing = names - set(symbols)
    if missing:
        raise SymbolError(f"{os.path.basename(path)} does not export {', '.join(sorted(missing))}")
    bias = maps[path] - first_load
    return {name: bias + value for name, value in symbols.items()}
