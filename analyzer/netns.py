"""`redirect-audit run --transparent`: the command in a network namespace of its own, every
TCP connection it opens sent to the recorder's transparent listener by the kernel.

No client has to cooperate: a Go program talking to its own server on 127.0.0.1 (Go's
net/http never proxies loopback), curl with `--noproxy '*'`, a JVM without proxy
properties. The steps, all in this process before the recorder and the command start,
so that both are born in the namespace:

1. `unshare(CLONE_NEWNET)`: a namespace whose only interface is a loopback, brought up
   here (SIOCSIFFLAGS). Nothing outside it is reachable, the host's loopback included:
   the servers the command talks to must be ones it starts itself.
2. The recorder runs under a group of its own (RECORDER_GID), so that its own upstream
   connections are told apart from the command's.
3. An nftables table (`nft -f -`): in the nat output hook, every TCP connection not
   opened by that group and not to the recorder's own ports is redirected to the
   transparent listener, which finds the original destination in the connection's
   conntrack entry (SO_ORIGINAL_DST), for IPv4 and IPv6.

It needs root (CAP_NET_ADMIN for the namespace and the table, CAP_SETGID for the group)
and the `nft` program (Debian: nftables). Without them it says so, in one line.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import struct
import subprocess

# The recorder's group inside the namespace: any gid nobody else's process uses there.
RECORDER_GID = 47_213
TABLE = "redirect_audit"
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


class NamespaceError(Exception):
    """Why the command cannot be given a network namespace of its own here."""


def enter_own_network() -> None:
    """Move this process (and so every child it starts from now on) into a new network
    namespace with its loopback up."""
    if shutil.which("nft") is None:
        raise NamespaceError(
            "--transparent needs the nft program to redirect the command's connections "
            "(Debian and Ubuntu: apt-get install nftables)"
        )
    needs_root = (
        "--transparent needs root: it gives the command a network namespace of its own "
        "(CAP_NET_ADMIN) and runs the recorder under a group of its own (CAP_SETGID); without "
        "root, run without --transparent (clients are sent to the recorder through the proxy variables)"
    )
    if os.geteuid() != 0:
        raise NamespaceError(needs_root)
    try:
        os.unshare(os.CLONE_NEWNET)  # CAP_SYS_ADMIN
        _loopback_up()  # CAP_NET_ADMIN
    except PermissionError:
        raise NamespaceError(needs_root) from None
    except OSError as exc:
        raise NamespaceError(
            f"--transparent: a network namespace cannot be created here ({os.strerror(exc.errno or errno.EPERM)}; "
            "a container may forbid it: run without --transparent)"
        ) from None


def _loopback_up() -> None:
    import fcntl

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | _IFF_UP))


def redirect_to(port: int, spared_ports: list[int]) -> None:
    """Send every TCP connection in this namespace to `port`, but the recorder's own (its
    group) and those to `spared_ports` (its control port, the listener itself)."""
    spared = ", ".join(str(p) for p in sorted({port, *spared_ports}))
    rules = f"""
table inet {TABLE} {{
    chain output {{
        type nat hook output priority -100; policy accept;
        meta skgid {RECORDER_GID} return
        tcp dport {{ {spared} }} return
        meta l4proto tcp redirect to :{port}
    }}
}}
"""
    done = subprocess.run(["nft", "-f", "-"], input=rules, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise NamespaceError(f"--transparent: nft could not install the redirect: {reason[:300]}")
