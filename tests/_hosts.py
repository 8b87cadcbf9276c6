"""Two "hosts" on one machine: network namespaces joined by a veth pair, each process in them with a private
``/dev/shm`` (``unshare --mount`` and a tmpfs), for the cross-host weight-sync tests. Needs root and ``ip``;
without them :func:`two_hosts` raises, naming why (CI must fail, not skip)."""

import contextlib
import os
import shutil
import subprocess

SUBNET = "10.213.{}.{}"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def two_hosts():
    """Yields {"trainer": (netns, address), "engine": (netns, address), "link": the trainer side's veth}."""
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("unshare") is None:
        raise RuntimeError("two network namespaces need root, `ip` and `unshare`: this machine cannot make hosts")
    tag = os.getpid() % 250 + 1
    a, b, va, vb = f"pbA{tag}", f"pbB{tag}", f"pbva{tag}", f"pbvb{tag}"
    ipa, ipb = SUBNET.format(tag, 1), SUBNET.format(tag, 2)
    try:
        _ip("netns", "add", a)
        _ip("netns", "add", b)
        _ip("link", "add", va, "type", "veth", "peer", "name", vb)
        _ip("link", "set", va, "netns", a)
        _ip("link", "set", vb, "netns", b)
        for ns, dev, addr in ((a, va, ipa), (b, vb, ipb)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield {"trainer": (a, ipa), "engine": (b, ipb), "link": va}
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"could not make two hosts: `{' '.join(e.cmd)}` failed: {e.stderr.strip()}") from e
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def in_host(netns: str, argv: list[str]) -> list[str]:
    """``argv`` run inside ``netns`` with a private, empty /dev/shm."""
    script = 'mount -t tmpfs -o size=4g tmpfs /dev/shm && exec "$@"'
    return ["ip", "netns", "exec", netns, "unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
            *argv]


def link(netns: str, dev: str, up: bool) -> None:
    _ip("-n", netns, "link", "set", dev, "up" if up else "down")
