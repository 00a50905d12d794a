"""Socket addresses between Python tuples and raw ``struct sockaddr`` bytes.

The engine takes and hands out raw sockaddrs (connect, sendmsg, recvmsg,
accept). CPython has no public codec for them, so this module builds and
parses the Linux layouts of AF_INET, AF_INET6 and AF_UNIX the way the
socket module does (``getsockaddrarg``/``makesockaddr``): numeric hosts are
used as they are, anything else goes through getaddrinfo() as CPython's own
``sock.connect()`` would. Other families raise NotImplementedError and the
caller falls back to readiness plus the socket's own method.
"""

import socket
import struct
import sys

__all__ = ("encode", "decode")

AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6
AF_UNIX = socket.AF_UNIX

_IN = struct.Struct("=H2s4s8x")            # family, port (BE), addr
_IN6 = struct.Struct("=H2s4s16sI")         # family, port, flowinfo (BE), addr, scope
_FAMILY = struct.Struct("=H")
_SUN_PATH_MAX = 108

_inet_pton = socket.inet_pton
_inet_ntop = socket.inet_ntop

# Small cache of encoded addresses: datagram servers answer the same few
# peers over and over.
_cache = {}
_CACHE_MAX = 256


def _port(port):
    if not isinstance(port, int):
        raise TypeError(f"'{type(port).__name__}' object cannot be interpreted as an integer")
    if not 0 <= port <= 0xFFFF:
        raise OverflowError("port must be 0-65535.")
    return port.to_bytes(2, "big")


def _resolve(host, family):
    # CPython's setipaddr(): '' is INADDR_ANY, '<broadcast>' the broadcast
    # address; other names are resolved (blocking, as sock.connect does).
    if family == AF_INET:
        if host == "":
            return b"\0\0\0\0"
        if host == "<broadcast>" or host == "255.255.255.255":
            return b"\xff\xff\xff\xff"
    elif host == "":
        return bytes(16)
    try:
        return _inet_pton(family, host)
    except (OSError, ValueError):
        pass
    infos = socket.getaddrinfo(host, None, family)
    if not infos:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return _inet_pton(family, infos[0][4][0].split("%", 1)[0])


def encode(family, address):
    """Return the raw sockaddr bytes of ``address`` for ``family``."""
    key = (family, address)
    try:
        return _cache[key]
    except (KeyError, TypeError):
        pass
    if family == AF_INET:
        if not isinstance(address, tuple) or len(address) != 2:
            raise TypeError(
                f"AF_INET address must be a pair (host, port), not {type(address).__name__}")
        host, port = address
        if isinstance(host, (bytes, bytearray)):
            host = bytes(host).decode("idna")
        if not isinstance(host, str):
            raise TypeError(f"str, bytes or bytearray expected, not {type(host).__name__}")
        raw = _IN.pack(AF_INET, _port(port), _resolve(host, AF_INET))
    elif family == AF_INET6:
        if not isinstance(address, tuple) or not 2 <= len(address) <= 4:
            raise TypeError("AF_INET6 address must be a tuple (host, port[, flowinfo[, scopeid]])")
        host, port = address[0], address[1]
        flowinfo = address[2] if len(address) > 2 else 0
        scope_id = address[3] if len(address) > 3 else 0
        if not 0 <= flowinfo <= 0xFFFFF:
            raise OverflowError("flowinfo must be 0-1048575.")
        if isinstance(host, (bytes, bytearray)):
            host = bytes(host).decode("idna")
        if not isinstance(host, str):
            raise TypeError(f"str, bytes or bytearray expected, not {type(host).__name__}")
        if "%" in host:
            host, _, scope = host.partition("%")
            if not scope_id:
                try:
                    scope_id = int(scope)
                except ValueError:
                    scope_id = socket.if_nametoindex(scope)
        raw = _IN6.pack(AF_INET6, _port(port), flowinfo.to_bytes(4, "big"),
                        _resolve(host, AF_INET6), scope_id)
    elif family == AF_UNIX:
        if isinstance(address, str):
            path = address.encode(sys.getfilesystemencoding(), "surrogateescape")
        elif isinstance(address, (bytes, bytearray, memoryview)):
            path = bytes(address)
        else:
            import os
            path = os.fsencode(address)
        if len(path) > _SUN_PATH_MAX or (path[:1] != b"\0" and len(path) == _SUN_PATH_MAX):
            raise OSError("AF_UNIX path too long")
        if path[:1] == b"\0":
            raw = _FAMILY.pack(AF_UNIX) + path          # abstract: exact length
        else:
            raw = _FAMILY.pack(AF_UNIX) + path + b"\0"
    else:
        raise NotImplementedError(family)
    if len(_cache) >= _CACHE_MAX:
        _cache.clear()
    try:
        _cache[key] = raw
    except TypeError:
        pass
    return raw


def decode(raw):
    """Return the Python address for raw sockaddr bytes (as makesockaddr)."""
    if len(raw) < 2:
        return None
    family = _FAMILY.unpack_from(raw)[0]
    if family == AF_INET:
        _, port, addr = _IN.unpack_from(raw.ljust(16, b"\0"))
        return (_inet_ntop(AF_INET, addr), int.from_bytes(port, "big"))
    if family == AF_INET6:
        _, port, flow, addr, scope = _IN6.unpack_from(raw.ljust(28, b"\0"))
        return (_inet_ntop(AF_INET6, addr), int.from_bytes(port, "big"),
                int.from_bytes(flow, "big"), scope)
    if family == AF_UNIX:
        path = raw[2:]
        if path[:1] == b"\0":
            return path
        end = path.find(b"\0")
        if end >= 0:
            path = path[:end]
        return path.decode(sys.getfilesystemencoding(), "surrogateescape")
    raise NotImplementedError(family)
