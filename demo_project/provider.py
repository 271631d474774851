"""A stand-in for the external provider of the demo, which rejects overlapping calls per account.

The demo's story: a SaaS calls a provider on behalf of client accounts. The
provider serves calls for different accounts in parallel, but a second call
for an account while one is still in flight is a collision, the stand-in for
the 429 a real provider answers with. With keyjobs keeping the calls for one
account serial, the collision count stays at zero.

    POST /call/<account>/<op>   one call, held for the hold time; 200, or 429 on a collision
         ?slots=N               the account allows N calls in flight at once (default 1): the N+1th collides
    POST /reset                 zero the counters and the log; body {"hold": 0.1} optional
    GET  /stats                 counters, overall and per account, and the log of calls

``python -m demo_project.provider --help`` runs it in the foreground; tests
run :class:`Provider` in-process. Standard library only, so that it starts
in any environment the demo runs in.
"""

import argparse
import contextlib
import errno
import json
import math
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any, NoReturn, TextIO
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_HOLD = 0.4
# Every call ties up a thread for its hold; the demo needs well under a
# second, and a hold too large for time.sleep() would crash the handler.
MAX_HOLD = 60.0
# /reset takes a tiny JSON object; anything bigger is a client bug.
MAX_BODY = 64 * 1024


def check_hold(value: object) -> float:
    """Return ``value`` as a hold in seconds; raise ValueError if it is not one."""
    problem = f"hold must be a number of seconds from 0 to {MAX_HOLD:g}, got {value!r}"
    # bool is an int to Python but never a duration to a caller.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(problem)
    try:
        seconds = float(value)
    except OverflowError:
        raise ValueError(problem) from None
    if not (math.isfinite(seconds) and 0 <= seconds <= MAX_HOLD):
        raise ValueError(problem)
    return seconds


class Ledger:
    """Count calls, collisions and calls in flight, overall and per account; keep the log of calls."""

    def __init__(self, hold: float, stream: TextIO | None = None) -> None:
        # One lock for every counter, so that the numbers in a stats
        # snapshot always add up, and arrival order is log order.
        self._lock = threading.Lock()
        self._hold = check_hold(hold)
        self._stream = stream
        # Calls in flight are the provider's real state, not a counter: reset
        # leaves them, so a call still running across a reset still collides
        # with the next call for its account.
        self._in_flight: dict[str, int] = {}
        self._in_flight_total = 0
        self._zero()

    def _zero(self) -> None:
        self._calls = 0
        self._collisions = 0
        self._max_in_flight = self._in_flight_total
        self._accounts: dict[str, dict[str, int]] = {}
        self._log: list[dict[str, Any]] = []

    def arrive(self, account: str, op: str, slots: int = 1) -> tuple[dict[str, Any], float]:
        """Record a call arriving and return it with the hold it must stay in flight for.

        It collides if the account already has ``slots`` calls in flight.
        """
        with self._lock:
            collision = self._in_flight.get(account, 0) >= slots
            in_flight = self._in_flight[account] = self._in_flight.get(account, 0) + 1
            self._in_flight_total += 1
            self._calls += 1
            self._collisions += collision
            self._max_in_flight = max(self._max_in_flight, self._in_flight_total)
            counts = self._accounts.setdefault(account, {"calls": 0, "collisions": 0, "max_in_flight": 0})
            counts["calls"] += 1
            counts["collisions"] += collision
            counts["max_in_flight"] = max(counts["max_in_flight"], in_flight)
            call = {"account": account, "op": op, "collision": collision, "started": time.time(), "ended": None}
            self._log.append(call)
            # Echoed under the lock so that the lines come out in log order.
            self._echo(f"[{'COLLISION' if collision else 'ok':<9}] {account:<8} {op}")
            return call, self._hold

    def leave(self, call: dict[str, Any]) -> dict[str, Any]:
        """Record ``call`` leaving and return a copy of it, now ended."""
        with self._lock:
            call["ended"] = time.time()
            account = call["account"]
            self._in_flight[account] -= 1
            if not self._in_flight[account]:
                del self._in_flight[account]
            self._in_flight_total -= 1
            return dict(call)

    def reset(self, hold: float | None = None) -> dict[str, Any]:
        """Zero the counters and the log, change the hold if given, and return the new stats."""
        with self._lock:
            if hold is not None:
                self._hold = check_hold(hold)
            self._zero()
            return self._stats()

    def stats(self) -> dict[str, Any]:
        """Return a snapshot of the hold, the counters and the log."""
        with self._lock:
            return self._stats()

    def _stats(self) -> dict[str, Any]:
        return {
            "hold": self._hold,
            "calls": self._calls,
            "collisions": self._collisions,
            "in_flight": self._in_flight_total,
            "max_in_flight": self._max_in_flight,
            "accounts": {account: dict(counts) for account, counts in self._accounts.items()},
            "log": [dict(call) for call in self._log],
        }

    def _echo(self, line: str) -> None:
        if self._stream is None:
            return
        try:
            self._stream.write(line + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            # The audience went away (closed pipe or file); that must not
            # change what the provider answers or counts.
            self._stream = None


class _RequestError(Exception):
    def __init__(self, status: HTTPStatus, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        # Set when the rest of the request could not be read, so the next
        # bytes on the connection are not the start of a request.
        self.close = close


def _slots_from_query(query: str) -> int:
    """Return the calls in flight a call's account allows (``?slots=N``, default 1); 400 if it is not a count."""
    values = parse_qs(query).get("slots", ["1"])
    if len(values) != 1 or not (values[0].isascii() and values[0].isdigit()) or not 1 <= int(values[0]) <= 1000:
        raise _RequestError(HTTPStatus.BAD_REQUEST, f"slots must be a whole number from 1 to 1000, got {values!r}")
    return int(values[0])


class _Handler(BaseHTTPRequestHandler):
    # Keep-alive, so that a client reusing one connection per thread
    # (httpx.Client, as in the demo's runners) works; every response then
    # needs a Content-Length.
    protocol_version = "HTTP/1.1"
    server_version = "keyjobs-demo-provider"
    # Headers and body go out in two writes; with Nagle's algorithm the body
    # would wait for the client's delayed ACK, adding ~40 ms per call.
    disable_nagle_algorithm = True
    server: "_Server"

    def _handle(self) -> None:
        try:
            status, payload = self._dispatch()
        except _RequestError as error:
            if error.close:
                self.close_connection = True
            status, payload = error.status, {"error": error.message}
        self._send_json(status, payload)

    # Every other method gets the 404 of an unknown route, as the demo's
    # clients expect; unsupported ones (HEAD, OPTIONS) get the 501 of send_error.
    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    def _dispatch(self) -> tuple[HTTPStatus, dict[str, Any]]:
        path, query = urlsplit(self.path).path, urlsplit(self.path).query
        # Read the body even for a 404, so that the next request on this
        # keep-alive connection starts where the client put it.
        body = self._read_body()
        ledger = self.server.ledger
        if self.command == "POST":
            parts = path.split("/")
            if len(parts) == 4 and parts[1] == "call" and parts[2] and parts[3]:
                return self._call(unquote(parts[2]), unquote(parts[3]), _slots_from_query(query))
            if path == "/reset":
                return HTTPStatus.OK, ledger.reset(_hold_from_body(body))
        elif self.command == "GET" and path == "/stats":
            return HTTPStatus.OK, ledger.stats()
        raise _RequestError(HTTPStatus.NOT_FOUND, f"no such endpoint: {self.command} {path}")

    def _call(self, account: str, op: str, slots: int) -> tuple[HTTPStatus, dict[str, Any]]:
        ledger = self.server.ledger
        call, hold = ledger.arrive(account, op, slots)
        try:
            time.sleep(hold)
        finally:
            call = ledger.leave(call)
        return (HTTPStatus.TOO_MANY_REQUESTS if call["collision"] else HTTPStatus.OK), call

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise _RequestError(HTTPStatus.BAD_REQUEST, "chunked request bodies are not supported", close=True)
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        length = length.strip()
        # int() would also take "+5" and "1_0".
        if not (length.isascii() and length.isdigit()):
            raise _RequestError(HTTPStatus.BAD_REQUEST, f"bad Content-Length: {length!r}", close=True)
        if int(length) > MAX_BODY:
            raise _RequestError(HTTPStatus.BAD_REQUEST, f"request body over {MAX_BODY} bytes", close=True)
        body = self.rfile.read(int(length))
        if len(body) < int(length):
            raise _RequestError(HTTPStatus.BAD_REQUEST, "request body shorter than its Content-Length", close=True)
        return body

    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Answer a malformed or unsupported request in JSON, like every other response, and close."""
        # BaseHTTPRequestHandler calls this itself for a malformed request
        # line or headers, where the connection is no longer in step.
        self.close_connection = True
        self._send_json(code, {"error": message or HTTPStatus(code).phrase})

    def version_string(self) -> str:
        """Return the Server header without the Python version."""
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        # The call lines are the provider's output; an access line per
        # request on stderr would drown them.
        pass


def _hold_from_body(body: bytes) -> float | None:
    if not body.strip():
        return None
    try:
        data = json.loads(body)
    except ValueError:
        raise _RequestError(HTTPStatus.BAD_REQUEST, "body must be a JSON object") from None
    if not isinstance(data, dict):
        raise _RequestError(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
    unknown = sorted(set(data) - {"hold"})
    if unknown:
        raise _RequestError(HTTPStatus.BAD_REQUEST, f"unknown fields: {', '.join(unknown)}")
    if "hold" not in data:
        return None
    try:
        return check_hold(data["hold"])
    except ValueError as error:
        raise _RequestError(HTTPStatus.BAD_REQUEST, str(error)) from None


class _Server(ThreadingHTTPServer):
    # Collisions only show up if many calls are in flight at once: a thread
    # per connection, and a backlog for the demo's 64+ concurrent connects
    # (the default of 5 makes the kernel drop or delay them).
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], ledger: Ledger) -> None:
        self.ledger = ledger
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind() looks the host up in DNS (getfqdn) only to
        # fill server_name, which nothing here uses; that can stall startup.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = port

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def server_close(self) -> None:
        # server_close() joins every handler thread, and one waiting on an
        # idle keep-alive connection would wait forever. Shutting the read
        # side ends that wait, while a call in flight still sends its response.
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # Its handler closed it meanwhile.
                connection.shutdown(socket.SHUT_RD)
        super().server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-call (a runner timing out) is routine
        # in the demo, not worth a traceback.
        if isinstance(sys.exception(), ConnectionError):
            return
        super().handle_error(request, client_address)


class Provider:
    """Run the provider on a background thread: ``start()``, then ``stop()``, or use it as a context manager."""

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = 0,
        hold: float = DEFAULT_HOLD,
        quiet: bool = False,
        stream: TextIO | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.hold = check_hold(hold)
        self.quiet = quiet
        # Resolved now rather than at import, so a replaced sys.stdout
        # (pytest's capture, a redirect) is the one written to.
        self.stream = sys.stdout if stream is None else stream
        self.url: str | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        """Bind, serve on a background thread and return the base URL (port 0 picks a free port)."""
        if self._server is not None:
            raise RuntimeError(f"provider is already running at {self.url}")
        server = _Server((self.host, self.port), Ledger(self.hold, None if self.quiet else self.stream))
        host, port = server.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._server = server
        # stop() waits up to one poll interval for the accept loop to notice;
        # the default half second would make every stop feel stuck.
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=f"provider {self.url}", daemon=True
        )
        self._thread.start()
        return self.url

    def stop(self) -> None:
        """Stop accepting calls, let the calls in flight finish, and close every connection."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._server = self._thread = None
        server.shutdown()
        server.server_close()
        thread.join()

    def __enter__(self) -> "Provider":
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


# -- command line ---------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # A parent process reads the error as one line; argparse's default
        # puts the usage above it.
        self.exit(2, f"provider: {message}\n")


def _hold_argument(text: str) -> float:
    try:
        return check_hold(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds from 0 to {MAX_HOLD:g}, got {text!r}"
        ) from None


def _port_argument(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 0 to 65535, got {port}")
    return port


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the provider's command line."""
    parser = _Parser(
        prog="python -m demo_project.provider",
        description="Run the demo's external provider until SIGINT or SIGTERM.",
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default %(default)s)")
    parser.add_argument(
        "--port", type=_port_argument, default=DEFAULT_PORT, help="port to listen on, 0 for any free one (default %(default)s)"
    )
    parser.add_argument(
        "--hold", type=_hold_argument, default=DEFAULT_HOLD, help="seconds each call stays in flight (default %(default)s)"
    )
    parser.add_argument("--quiet", action="store_true", help="do not print a line per call")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the provider in the foreground until SIGINT or SIGTERM; return the exit status."""
    args = build_parser().parse_args(argv)
    provider = Provider(args.host, args.port, args.hold, args.quiet, sys.stdout)
    try:
        url = provider.start()
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            problem = f"port {args.port} on {args.host} is already in use"
        else:
            problem = f"cannot listen on {args.host}:{args.port}: {error.strerror or error}"
        print(f"provider: {problem}", file=sys.stderr)
        return 1

    stopping = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    # Installed before the listening line, so that a parent that signals as
    # soon as it reads the line gets a clean exit.
    previous = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"provider listening on {url} (hold {args.hold:.2f}s)", flush=True)
        stopping.wait()
    finally:
        provider.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
