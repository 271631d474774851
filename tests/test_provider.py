"""The demo's provider, over real HTTP on loopback with real threads and real processes.

Standard library clients, so that these tests need nothing beyond pytest,
except the one that pins keep-alive with httpx, the demo's client.
"""

import http.client
import io
import json
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from demo_project.provider import Provider
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
# Long enough that calls released together overlap, short enough that the
# module runs in a few seconds.
HOLD = 0.1
# Proxies from the environment must not see loopback calls.
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def request(url: str, method: str = "GET", body: bytes | None = None) -> tuple[int, Any]:
    """Send one request on its own connection; return the status and the decoded JSON."""
    prepared = urllib.request.Request(url, data=body, method=method)
    try:
        with opener.open(prepared, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.load(error)


def call(provider: Provider, account: str, op: str) -> tuple[int, Any]:
    return request(f"{provider.url}/call/{account}/{op}", "POST")


def stats(provider: Provider) -> Any:
    status, payload = request(f"{provider.url}/stats")
    assert status == 200
    return payload


def reset(provider: Provider, body: object) -> tuple[int, Any]:
    return request(f"{provider.url}/reset", "POST", json.dumps(body).encode())


def call_together(provider: Provider, calls: list[tuple[str, str]]) -> list[int]:
    """Release ``calls`` at the same moment from one thread each; return their statuses."""
    barrier = threading.Barrier(len(calls), timeout=10)

    def call_after_barrier(account: str, op: str) -> int:
        barrier.wait()
        return call(provider, account, op)[0]

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(call_after_barrier, account, op) for account, op in calls]
        return [future.result(timeout=10) for future in futures]


def address(provider: Provider) -> tuple[str, int]:
    url = urllib.parse.urlsplit(provider.url)
    assert url.hostname is not None and url.port is not None
    return url.hostname, url.port


@pytest.fixture
def provider() -> Iterator[Provider]:
    with Provider(hold=HOLD, stream=io.StringIO()) as running:
        yield running


# -- calls and collisions ---------------------------------------------------


def test_concurrent_calls_for_one_account_collide_and_are_counted_exactly(provider: Provider) -> None:
    statuses = call_together(provider, [("acme", "fetch_profile")] * 5)

    assert sorted(statuses) == [200, 429, 429, 429, 429]
    counted = stats(provider)
    assert (counted["calls"], counted["collisions"], counted["max_in_flight"]) == (5, 4, 5)
    assert counted["accounts"] == {"acme": {"calls": 5, "collisions": 4, "max_in_flight": 5}}
    assert sum(entry["collision"] for entry in counted["log"]) == 4


def test_an_account_allowing_slots_collides_only_past_them(provider: Provider) -> None:
    barrier = threading.Barrier(4, timeout=10)

    def call_with_three_slots(op: str) -> int:
        barrier.wait()
        return request(f"{provider.url}/call/acme/{op}?slots=3", "POST")[0]

    with ThreadPoolExecutor(max_workers=4) as pool:
        statuses = sorted(pool.map(call_with_three_slots, ["a", "b", "c", "d"]))

    assert statuses == [200, 200, 200, 429]
    assert stats(provider)["accounts"] == {"acme": {"calls": 4, "collisions": 1, "max_in_flight": 4}}


@pytest.mark.parametrize("slots", ["0", "x", "1&slots=2"])
def test_a_call_with_slots_that_are_not_a_count_gets_400(provider: Provider, slots: str) -> None:
    status, payload = request(f"{provider.url}/call/acme/a?slots={slots}", "POST")
    assert status == 400 and "slots must be a whole number" in payload["error"]


def test_concurrent_calls_across_accounts_never_collide(provider: Provider) -> None:
    accounts = ["acme", "globex", "initech", "umbrella", "hooli"]

    statuses = call_together(provider, [(account, "fetch_profile") for account in accounts])

    assert statuses == [200] * 5
    counted = stats(provider)
    assert counted["collisions"] == 0
    # All five were in flight at once: parallel, yet no collision.
    assert counted["max_in_flight"] == 5


def test_sequential_calls_for_one_account_never_collide(provider: Provider) -> None:
    statuses = [call(provider, "acme", op)[0] for op in ("fetch_profile", "list_invoices", "fetch_profile")]

    assert statuses == [200, 200, 200]
    assert stats(provider)["accounts"] == {"acme": {"calls": 3, "collisions": 0, "max_in_flight": 1}}


def test_call_answers_with_the_call_after_the_hold(provider: Provider) -> None:
    status, answer = call(provider, "acme", "fetch_profile")

    assert status == 200
    assert answer.keys() == {"account", "op", "collision", "started", "ended"}
    assert (answer["account"], answer["op"], answer["collision"]) == ("acme", "fetch_profile", False)
    assert answer["ended"] - answer["started"] >= HOLD


def test_collision_answers_429_with_collision_true(provider: Provider) -> None:
    with ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(call, provider, "acme", "fetch_profile")
        wait_for(lambda: stats(provider)["in_flight"] == 1)

        status, answer = call(provider, "acme", "list_invoices")

        assert first.result(timeout=10)[0] == 200
    assert status == 429
    assert (answer["account"], answer["op"], answer["collision"]) == ("acme", "list_invoices", True)


def test_call_path_segments_are_url_decoded(provider: Provider) -> None:
    status, answer = call(provider, "acme%20corp", "fetch%2Fprofile")

    assert status == 200
    assert (answer["account"], answer["op"]) == ("acme corp", "fetch/profile")


# -- the log on the stream --------------------------------------------------


def test_each_call_is_logged_as_one_aligned_line(provider: Provider) -> None:
    call_together(provider, [("acme", "fetch_profile")] * 2)

    assert isinstance(provider.stream, io.StringIO)
    lines = provider.stream.getvalue().splitlines()
    assert sorted(lines) == ["[COLLISION] acme     fetch_profile", "[ok       ] acme     fetch_profile"]


def test_call_is_logged_when_it_arrives_not_when_it_ends(provider: Provider) -> None:
    stream = provider.stream
    assert isinstance(stream, io.StringIO)
    with ThreadPoolExecutor(max_workers=1) as pool:
        answered = pool.submit(call, provider, "globex", "list_invoices")

        wait_for(lambda: stream.getvalue() != "")

        assert not answered.done()
        assert stream.getvalue() == "[ok       ] globex   list_invoices\n"
        answered.result(timeout=10)


def test_quiet_provider_logs_nothing() -> None:
    stream = io.StringIO()
    with Provider(hold=0.05, quiet=True, stream=stream) as running:
        call(running, "acme", "fetch_profile")

    assert stream.getvalue() == ""


# -- stats and reset --------------------------------------------------------


def test_stats_have_the_documented_shape(provider: Provider) -> None:
    call(provider, "acme", "fetch_profile")

    counted = stats(provider)

    entry = counted["log"][0]
    assert isinstance(entry.pop("started"), float)
    assert isinstance(entry.pop("ended"), float)
    assert counted == {
        "hold": HOLD,
        "calls": 1,
        "collisions": 0,
        "in_flight": 0,
        "max_in_flight": 1,
        "accounts": {"acme": {"calls": 1, "collisions": 0, "max_in_flight": 1}},
        "log": [{"account": "acme", "op": "fetch_profile", "collision": False}],
    }


def test_stats_show_a_call_in_flight_with_ended_null(provider: Provider) -> None:
    with ThreadPoolExecutor(max_workers=1) as pool:
        answered = pool.submit(call, provider, "acme", "fetch_profile")
        wait_for(lambda: stats(provider)["in_flight"] == 1)

        counted = stats(provider)

        answered.result(timeout=10)
    assert counted["calls"] == 1
    assert counted["log"][0]["ended"] is None


def test_log_keeps_arrival_order(provider: Provider) -> None:
    for account in ("acme", "globex", "initech"):
        call(provider, account, "fetch_profile")

    log = stats(provider)["log"]

    assert [entry["account"] for entry in log] == ["acme", "globex", "initech"]
    assert [entry["started"] for entry in log] == sorted(entry["started"] for entry in log)


def test_reset_zeroes_the_counters_and_changes_the_hold(provider: Provider) -> None:
    call_together(provider, [("acme", "fetch_profile")] * 2)

    status, counted = reset(provider, {"hold": 0.02})

    assert status == 200
    assert counted == {
        "hold": 0.02,
        "calls": 0,
        "collisions": 0,
        "in_flight": 0,
        "max_in_flight": 0,
        "accounts": {},
        "log": [],
    }
    answer = call(provider, "acme", "fetch_profile")[1]
    assert 0.02 <= answer["ended"] - answer["started"] < HOLD


def test_reset_without_a_body_keeps_the_hold(provider: Provider) -> None:
    call(provider, "acme", "fetch_profile")

    status, counted = request(f"{provider.url}/reset", "POST", b"")

    assert status == 200
    assert (counted["hold"], counted["calls"]) == (HOLD, 0)


@pytest.mark.parametrize("hold", [-1, -0.1, "0.1", True, None, [0.1]])
def test_reset_rejects_a_hold_that_is_not_a_non_negative_number(provider: Provider, hold: object) -> None:
    call(provider, "acme", "fetch_profile")

    status, answer = reset(provider, {"hold": hold})

    assert status == 400
    assert "hold" in answer["error"]
    # Rejected as a whole: nothing was zeroed either.
    assert (stats(provider)["hold"], stats(provider)["calls"]) == (HOLD, 1)


@pytest.mark.parametrize("body", [b"not json", b"[0.1]", b'{"hld": 0.1}'])
def test_reset_rejects_a_body_that_is_not_the_documented_object(provider: Provider, body: bytes) -> None:
    status, answer = request(f"{provider.url}/reset", "POST", body)

    assert status == 400
    assert "error" in answer


def test_a_call_in_flight_across_a_reset_still_collides(provider: Provider) -> None:
    with ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(call, provider, "acme", "fetch_profile")
        wait_for(lambda: stats(provider)["in_flight"] == 1)
        reset(provider, {})

        status = call(provider, "acme", "list_invoices")[0]

        first.result(timeout=10)
    assert status == 429
    assert stats(provider)["collisions"] == 1


# -- HTTP -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("GET", "/nowhere"),
        ("GET", "/call/acme/fetch_profile"),
        ("POST", "/call/acme"),
        ("POST", "/call/acme/fetch_profile/extra"),
        ("POST", "/stats"),
        ("DELETE", "/stats"),
    ],
)
def test_unknown_endpoint_gets_404_json(provider: Provider, method: str, path: str) -> None:
    status, answer = request(provider.url + path, method)

    assert status == 404
    assert "error" in answer


def test_malformed_request_gets_400_json(provider: Provider) -> None:
    with socket.create_connection(address(provider), timeout=10) as connection:
        connection.sendall(b"POST /reset HTTP/1.1\r\nHost: provider\r\nContent-Length: ten\r\n\r\n")
        response = http.client.HTTPResponse(connection)
        response.begin()
        with response:
            assert response.status == 400
            assert response.getheader("Connection") == "close"
            assert "Content-Length" in json.load(response)["error"]


def test_two_calls_over_one_httpx_client_reuse_the_connection(provider: Provider) -> None:
    with httpx.Client(base_url=provider.url, trust_env=False, timeout=10) as client:
        statuses, local_addresses = [], []
        for op in ("fetch_profile", "list_invoices"):
            response = client.post(f"/call/acme/{op}")
            statuses.append(response.status_code)
            # Read while the connection is open: closing the client closes it.
            local_addresses.append(response.extensions["network_stream"].get_extra_info("client_addr"))

    assert statuses == [200, 200]
    assert local_addresses[0] == local_addresses[1]


def test_stop_returns_while_a_client_holds_an_idle_keep_alive_connection(provider: Provider) -> None:
    connection = http.client.HTTPConnection(*address(provider), timeout=10)
    try:
        connection.request("GET", "/stats")
        with connection.getresponse() as response:
            response.read()

        started = time.monotonic()
        provider.stop()

        assert time.monotonic() - started < 1
    finally:
        connection.close()


def test_provider_refuses_a_negative_hold() -> None:
    with pytest.raises(ValueError, match="hold"):
        Provider(hold=-1)


# -- command line -----------------------------------------------------------

LISTENING = re.compile(r"provider listening on (http://127\.0\.0\.1:\d+) \(hold 0\.05s\)\n")


def run_provider(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "error", "-m", "demo_project.provider", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture
def started_provider() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start ``python -m demo_project.provider`` with the given arguments; kill it at teardown if still running."""
    processes: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-W", "error", "-m", "demo_project.provider", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.communicate()


def read_line(process: subprocess.Popen[str], timeout: float = 10) -> str:
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        assert selector.select(timeout), "no output in time"
    return process.stdout.readline()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cli_prints_the_listening_line_and_exits_0_on_signal(
    started_provider: Callable[..., subprocess.Popen[str]], signum: int
) -> None:
    process = started_provider("--host", "127.0.0.1", "--port", "0", "--hold", "0.05")

    listening = LISTENING.fullmatch(read_line(process))
    assert listening is not None
    status, _ = request(f"{listening[1]}/call/acme/fetch_profile", "POST")
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=10)

    assert status == 200
    assert process.returncode == 0
    assert (stdout, stderr) == ("[ok       ] acme     fetch_profile\n", "")


def test_cli_quiet_prints_only_the_listening_line(started_provider: Callable[..., subprocess.Popen[str]]) -> None:
    process = started_provider("--port", "0", "--hold", "0.05", "--quiet")

    listening = LISTENING.fullmatch(read_line(process))
    assert listening is not None
    request(f"{listening[1]}/call/acme/fetch_profile", "POST")
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=10)

    assert (process.returncode, stdout, stderr) == (0, "", "")


def test_cli_with_its_port_in_use_exits_non_zero_with_one_line(provider: Provider) -> None:
    port = address(provider)[1]

    finished = run_provider("--port", str(port))

    assert finished.returncode != 0
    assert finished.stderr == f"provider: port {port} on 127.0.0.1 is already in use\n"
    assert finished.stdout == ""


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--hold", "-1"], "argument --hold"),
        (["--hold", "soon"], "argument --hold"),
        (["--hold", "nan"], "argument --hold"),
        (["--port", "65536"], "argument --port"),
        (["--port", "http"], "argument --port"),
    ],
)
def test_cli_rejects_bad_arguments_with_one_line(args: list[str], complaint: str) -> None:
    finished = run_provider(*args)

    assert finished.returncode != 0
    assert finished.stderr.startswith(f"provider: {complaint}: ")
    assert finished.stderr.count("\n") == 1
    assert finished.stdout == ""
