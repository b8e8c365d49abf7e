"""Serving the dashboard: the address checked and bound before the table is opened, then uvicorn on that
socket until Ctrl-C. Loopback unless --host says otherwise: the pages show everyone's jobs and paths."""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable

from qrun.db.errors import BadInput

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8470


def check_port(port) -> int:
    """--port: a whole number from 1 to 65535."""
    text = str(port).strip()
    try:
        number = int(text)
    except ValueError:
        raise BadInput(f"--port {text!r} is not a number: give a port from 1 to 65535") from None
    if not 1 <= number <= 65535:
        raise BadInput(f"--port {number} is out of range: give a port from 1 to 65535")
    return number


def _looks_numeric(host: str) -> bool:
    """An address rather than a name: digits and dots, or an IPv6 form (it has a colon)."""
    return ":" in host or all(part.isdigit() for part in host.split("."))


def _address_info(host: str, port: int) -> tuple:
    """(family, address) to bind for `host`; an address that is no address, or a name that does not
    resolve, is BadInput (an address-like text is never looked up by name)."""
    if not host.strip() or any(c.isspace() for c in host):
        raise BadInput(f"--host {host!r} is not a host name or address: give one like 127.0.0.1 or 0.0.0.0")
    if _looks_numeric(host):
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            raise BadInput(f"--host {host!r} is not an IP address: give one like 127.0.0.1, ::1 or 0.0.0.0") from None
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        return family, (str(address), port) if address.version == 4 else (str(address), port, 0, 0)
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise BadInput(f"--host {host!r} does not resolve ({exc}): give an address of this machine, "
                       "like 127.0.0.1") from None
    family, _, _, _, address = found[0]
    return family, address


def bind(host: str, port) -> socket.socket:
    """A listening socket on host:port; BadInput naming what is wrong (in use, not this machine's address,
    a port only root may open)."""
    port = check_port(port)
    family, address = _address_info(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise BadInput(f"--port {port}: something already listens there on {host}: give another port") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise BadInput(f"--host {host}: not an address of this machine: give one of its own, like "
                           "127.0.0.1 or 0.0.0.0 (every address)") from None
        if exc.errno == errno.EACCES:
            raise BadInput(f"--port {port}: only root may serve on a port below 1024: give one above") from None
        raise BadInput(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None
    sock.setblocking(False)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def serve(host: str = DEFAULT_HOST, port=DEFAULT_PORT, db=None, say: Callable[[str], None] | None = None) -> None:
    """`qrun dashboard`: bind host:port (checked first), open the job table read-only in spirit (it must
    exist: nothing is created), and serve until Ctrl-C. say(line): the line that names the address."""
    import uvicorn

    from qrun.api import database
    from qrun.comparison import stderr_line
    from qrun.db.session import masked_url
    from qrun.web.app import create_app

    say = say or stderr_line
    sock = bind(host, port)
    try:
        with database(db, create=False) as opened:
            table = opened.url.removeprefix("sqlite:///") if opened.is_sqlite else masked_url(opened.url)
            app = create_app(opened, table)
            config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                    timeout_graceful_shutdown=2)
            say(f"qrun dashboard: {url_of(sock)} (read-only, table {table}); Ctrl-C stops it")
            uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
