#!/usr/bin/env python3
"""Which cipher does an SSH client negotiate? Answer without trusting its docs.

A throwaway listener on 127.0.0.1 plays the first move of an SSH server: it sends a
banner, reads the client's banner and its SSH_MSG_KEXINIT (sent in clear text, RFC 4253
section 7.1), and closes the connection. The client's preference lists are then matched
against the real server's lists the way RFC 4253 says the server does it: the first
algorithm in the client's list that the server also supports.

    ssh-kexinit.py --port-file F --server 127.0.0.1:2222

first reads the real server's KEXINIT (the server sends its lists to anyone who says
hello), then writes the port it listens on to F (so the caller can point a client at
it), accepts one connection, and prints `key=value` lines to stdout:

    cipher=chacha20-poly1305@openssh.com       # what the client gets from that server
    compression=none
    client_ciphers=chacha20-poly1305@openssh.com,aes256-gcm@openssh.com,...
    client_compression=none,...
    client_banner=SSH-2.0-libssh2_1.11.2_DEV
    server_ciphers=chacha20-poly1305@openssh.com,aes128-ctr,...
    server_banner=SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u10

Exit 1 when no client came within --timeout seconds or it sent something else.
Used by bench/delivery.sh to force `sftp -c` to the cipher that upload-pure (ssh2 /
libssh2) negotiates with the test sshd, so the SFTP comparison is like for like.
"""

import argparse
import socket
import struct
import sys

SSH_MSG_KEXINIT = 20
BANNER = b"SSH-2.0-OpenSSH_9.2 labrelay-bench-probe\r\n"


class ProbeError(Exception):
    pass


def read_exact(conn, buf, n):
    while len(buf) < n:
        chunk = conn.recv(65536)
        if not chunk:
            raise ProbeError("connection closed")
        buf += chunk
    return buf


def hello(conn):
    """Send our banner, read the peer's banner and its first packet (KEXINIT), return
    (banner, the ten name-lists)."""
    conn.sendall(BANNER)
    buf = b""
    banner = None
    # Lines before the "SSH-" banner are allowed from servers (RFC 4253 4.2).
    while banner is None:
        while b"\n" not in buf:
            if len(buf) > 64 * 1024:
                raise ProbeError("no SSH banner")
            buf = read_exact(conn, buf, len(buf) + 1)
        line, buf = buf.split(b"\n", 1)
        line = line.rstrip(b"\r")
        if line.startswith(b"SSH-"):
            banner = line.decode("ascii", "replace")
    buf = read_exact(conn, buf, 5)
    (plen,) = struct.unpack(">I", buf[:4])
    if plen > 256 * 1024:
        raise ProbeError("packet length %d" % plen)
    buf = read_exact(conn, buf, 4 + plen)
    pad = buf[4]
    payload = buf[5 : 4 + plen - pad]
    if not payload or payload[0] != SSH_MSG_KEXINIT:
        raise ProbeError("first packet is not KEXINIT")
    # type byte, 16-byte cookie, then ten name-lists: kex, host key, cipher c2s, cipher
    # s2c, mac c2s, mac s2c, compression c2s, compression s2c, language c2s, s2c.
    off = 1 + 16
    lists = []
    try:
        for _ in range(10):
            (n,) = struct.unpack(">I", payload[off : off + 4])
            off += 4
            lists.append(payload[off : off + n].decode("ascii").split(","))
            off += n
    except (struct.error, UnicodeDecodeError) as e:
        raise ProbeError("bad KEXINIT: %s" % e)
    return banner, lists


def negotiate(client, server):
    """RFC 4253 7.1: the first algorithm on the client's list that the server has."""
    for name in client:
        if name in server:
            return name
    return ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--server", required=True, help="HOST:PORT of the real sshd")
    ap.add_argument("--timeout", type=float, default=60)
    args = ap.parse_args()

    host, _, port = args.server.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=args.timeout) as conn:
            server_banner, server_lists = hello(conn)
    except (OSError, ProbeError) as e:
        print("ssh-kexinit: server %s: %s" % (args.server, e), file=sys.stderr)
        return 1

    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(args.timeout)
    with open(args.port_file, "w") as f:
        f.write("%d\n" % srv.getsockname()[1])
    try:
        conn, _ = srv.accept()
    except socket.timeout:
        print("ssh-kexinit: no client connected", file=sys.stderr)
        return 1
    finally:
        srv.close()
    conn.settimeout(args.timeout)
    try:
        client_banner, client_lists = hello(conn)
    except (OSError, ProbeError) as e:
        print("ssh-kexinit: client: %s" % e, file=sys.stderr)
        return 1
    finally:
        conn.close()

    print("cipher=%s" % negotiate(client_lists[2], server_lists[2]))
    print("compression=%s" % negotiate(client_lists[6], server_lists[6]))
    print("client_ciphers=%s" % ",".join(client_lists[2]))
    print("client_compression=%s" % ",".join(client_lists[6]))
    print("client_banner=%s" % client_banner)
    print("server_ciphers=%s" % ",".join(server_lists[2]))
    print("server_banner=%s" % server_banner)
    return 0


if __name__ == "__main__":
    sys.exit(main())
