"""Ray for the driver: a private Ray on loopback, or a cluster that answers; env and signals."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator

import ray

from autolr.errors import ConfigError

LOOPBACK = "127.0.0.1"  # where a private Ray listens


# ray.init retries an address that does not answer for minutes, silently; a cluster
# that runs answers a TCP connect in milliseconds, a remote one well within seconds.
CONNECT_TIMEOUT_S = 5.0


def _start_ray(address: str | None) -> bool:
    """Connect to Ray; return whether we did (and so must shut it down).

    A private Ray listens on 127.0.0.1 only (see `_loopback_node`), with the
    token authentication that ray 2.60 turns on for a new local Ray (unless
    ``RAY_AUTH_MODE`` says otherwise); a cluster at ``address`` must answer
    within `CONNECT_TIMEOUT_S`.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    if not address:
        with _loopback_node(), _quiet_token_notice():
            ray.init(
                address="local",
                num_cpus=os.cpu_count(),
                include_dashboard=False,
                _node_ip_address=LOOPBACK,
                **quiet,
            )
        return True
    _check_reachable(address)
    try:  # an existing cluster sizes itself; num_cpus would raise
        ray.init(address=address, **quiet)
    except ConnectionError as exc:
        raise ConfigError(
            f"cannot connect to the Ray cluster at {address!r} (ray_address or $RAY_ADDRESS); "
            f"expected a running cluster: {exc}"
        ) from exc
    return True


@contextlib.contextmanager
def _quiet_token_notice() -> Iterator[None]:
    """Mute ray's "Token authentication is enabled for this Ray cluster" warning.

    ray 2.60 logs it on every new local Ray; for a private one, whose token
    autolr never hands out, it only says what the README does.
    """
    notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = notice.level
    notice.setLevel(logging.ERROR)
    try:
        yield
    finally:
        notice.setLevel(level)


def _check_reachable(address: str) -> None:
    """Raise ConfigError unless something listens at ``address``'s ``host:port``.

    Addresses without a port (``"auto"``, a cluster found through Ray's files)
    are left to ray.init.
    """
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ConfigError(
            f"cannot connect to the Ray cluster at {address!r} (ray_address or $RAY_ADDRESS): "
            f"nothing answered at {host}:{port} within {CONNECT_TIMEOUT_S:g} s ({exc}); "
            "expected a running cluster's GCS address, or no address for a private Ray."
        ) from None


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """Let ray.init keep a node IP of 127.0.0.1, so that every Ray process binds loopback.

    ray.init rewrites a loopback node IP to the machine's outward address, and the
    GCS, raylet, workers and agents then listen on all interfaces; it keeps it when
    Ray clusters are off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read once at
    import), and with a loopback node IP every process binds 127.0.0.1 (ray 2.60,
    checked with ``ss -ltnp``). Only this call sees the switch: a driver attaching to
    a cluster needs its real address.
    """
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


@contextlib.contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """Keep the caller's SIGINT and SIGTERM handlers over the block.

    ``ray.init`` replaces the driver's SIGTERM handler (in ray 2.60 SIGTERM then
    aborts it, exit 134), so the pipeline could not end its runs as KILLED.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:  # None: set outside Python, nothing to restore
                signal.signal(sig, handler)
