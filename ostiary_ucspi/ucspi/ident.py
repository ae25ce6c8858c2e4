"""Ident (RFC 1413) for ostiary-tcpserver's TCPREMOTEINFO, as tcpserver asks it."""

import socket
import time


def remote_info(family: int, local: tuple, remote: tuple, timeout: int) -> bytes | None:
    """Ask the client's identd (RFC 1413) as tcpserver does; None if it fails.

    ``local`` and ``remote`` are (ip, port[, flowinfo, scope]). The answer is
    what follows the third colon, blanks, tabs and CRs removed, cut after 257 bytes.
    """
    deadline = time.monotonic() + timeout
    out = bytearray()
    colons = 0
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((local[0], 0) + tuple(local[2:]))
            s.settimeout(max(timeout, 0.001))
            s.connect((remote[0], 113) + tuple(remote[2:]))
            s.sendall(b"%d , %d\r\n" % (remote[1], local[1]))
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                s.settimeout(left)
                chunk = s.recv(128)
                if not chunk:
                    return None
                for b in chunk:
                    if b in (32, 9, 13):
                        continue
                    if b == 10:
                        return bytes(out)
                    if colons < 3:
                        colons += b == 58
                        continue
                    out.append(b)
                    if len(out) > 256:
                        return bytes(out)
    except OSError:
        return None
