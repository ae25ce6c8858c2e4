"""A door for ostiary-client's tests: an action starts it, it listens, serves, exits.

Run as ``python client_door.py MODE HOST PORT OUT``. It serves one connection
(``accept``: close at once; ``echo``: read to end of file, write ``OUT.in``,
send it all back, close; ``greet``: send ``hello``, shut down writing, read to
end of file into ``OUT.in``, close), and gives up after 30 seconds.
"""

import socket
import sys

mode, host, port, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
family = socket.AF_INET6 if ":" in host else socket.AF_INET
with socket.socket(family, socket.SOCK_STREAM) as lst:
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind((host, port))
    lst.listen(1)
    lst.settimeout(30)
    conn, _ = lst.accept()
    with conn:
        conn.settimeout(30)
        if mode in ("echo", "greet"):
            if mode == "greet":
                conn.sendall(b"hello\n")
                conn.shutdown(socket.SHUT_WR)
            got = bytearray()
            while chunk := conn.recv(65536):
                got += chunk
            with open(out + ".in", "wb") as f:
                f.write(got)
            if mode == "echo":
                conn.sendall(got)
