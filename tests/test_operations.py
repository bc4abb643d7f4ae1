"""
Metrics, the access log, the status JSON and LRU eviction, in-process over
real sockets.
"""


import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families

from tests.test_core import BODY, SMALL, backend, sleep, stream, until


def samples(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest_twisted.ensureDeferred
async def test_metrics_count_outcomes_bytes_and_errors(vault_factory, upstream, http):
    upstream.add("/a.bin", BODY, hold=True)
    upstream.add("/gone", b"", status=404)
    v = vault_factory(backend(upstream))
    _, first = await stream(http, v.url + "/files/a.bin")
    _, second = await stream(http, v.url + "/files/a.bin")
    m = samples((await (await http.get(v.url + "/_vault/metrics")).content()).decode())
    assert m[("artifact_vault_downloads_in_flight", ())] == 1
    assert m[("artifact_vault_download_waiters", ())] == 2
    upstream.release("/a.bin")
    await first.done
    await second.done
    await (await http.get(v.url + "/files/a.bin")).content()
    await (await http.get(v.url + "/files/gone")).content()
    await sleep(0.05)
    m = samples((await (await http.get(v.url + "/_vault/metrics")).content()).decode())
    key = lambda name, **labels: (name, tuple(sorted(labels.items())))  # noqa: E731
    assert m[key("artifact_vault_requests_total", backend="files", outcome="miss")] == 1
    assert m[key("artifact_vault_requests_total", backend="files", outcome="joined")] == 1
    assert m[key("artifact_vault_requests_total", backend="files", outcome="hit")] == 1
    assert m[key("artifact_vault_requests_total", backend="files", outcome="error")] == 1
    assert m[key("artifact_vault_served_bytes_total", backend="files", outcome="hit")] == len(BODY)
    assert m[key("artifact_vault_upstream_fetched_bytes_total", backend="files")] == len(BODY)
    assert m[key("artifact_vault_upstream_errors_total", backend="files", status="404")] == 1
    assert m[key("artifact_vault_waiters_per_download_count")] == 2  # a.bin and the failed /gone
    assert m[key("artifact_vault_waiters_per_download_sum")] == 3  # a.bin had two clients
    assert m[("artifact_vault_downloads_in_flight", ())] == 0


@pytest_twisted.ensureDeferred
async def test_access_log_line_has_outcome_bytes_and_duration(vault_factory, upstream, http, tmp_path):
    upstream.add("/a.txt", SMALL)
    path = tmp_path / "access.log"
    v = vault_factory(backend(upstream), access_log=str(path))
    for _ in range(2):
        await (await http.get(v.url + "/files/a.txt")).content()
    v.vault.access_log.flush()
    lines = [m for m in path.read_text().splitlines() if '"GET /files/a.txt HTTP/1.1" 200' in m]
    assert len(lines) == 2
    assert f" 200 {len(SMALL)} miss " in lines[0] and f" 200 {len(SMALL)} hit " in lines[1]
    assert lines[1].split(" hit ")[1].split("s ")[0].replace(".", "").isdigit()


@pytest_twisted.ensureDeferred
async def test_status_json_shows_downloads_in_flight_with_progress(vault_factory, upstream, http):
    import json

    upstream.add("/a.bin", BODY, hold=True)
    v = vault_factory(backend(upstream), admin_token="admin-token-0123456789")
    _, s = await stream(http, v.url + "/files/a.bin")
    upstream.release("/a.bin", upto=len(BODY) // 2)
    await until(lambda: len(s.data) >= len(BODY) // 2)
    status = json.loads(await (await http.get(v.url + "/_vault/status.json",
                                              headers={"X-Admin-Token": "admin-token-0123456789"})).content())
    [download] = status["downloads"]
    assert download["name"] == "files/a.bin" and download["total"] == len(BODY)
    assert 45 <= download["percent"] <= 55 and download["rate"] > 0 and download["clients"] == 1
    upstream.release("/a.bin")
    await s.done


def _entry_paths(v):
    return sorted(k for k in ("files/f1.bin", "files/f2.bin", "files/f3.bin") if v.store.lookup(k) is not None)


@pytest_twisted.ensureDeferred
async def test_least_recently_used_entries_are_evicted_to_respect_the_cap(vault_factory, upstream, http):
    for n in (1, 2, 3):
        upstream.add(f"/f{n}.bin", BODY)
    v = vault_factory(backend(upstream), max_cache_size=int(len(BODY) * 2.5))
    for n in (1, 2):
        await (await http.get(v.url + f"/files/f{n}.bin")).content()
        await sleep(0.02)
    await (await http.get(v.url + "/files/f1.bin")).content()  # f1 is now more recent than f2
    await sleep(0.02)
    await (await http.get(v.url + "/files/f3.bin")).content()
    await v.vault.janitor.scan()
    assert _entry_paths(v) == ["files/f1.bin", "files/f3.bin"]
    assert v.vault.janitor.usage["bytes"] == 2 * len(BODY) and v.vault.janitor.usage["files"] == 2
    m = samples((await (await http.get(v.url + "/_vault/metrics")).content()).decode())
    assert m[("artifact_vault_evictions_total", (("backend", "files"),))] == 1
    assert m[("artifact_vault_cache_bytes", (("backend", "files"),))] == 2 * len(BODY)
    assert m[("artifact_vault_cache_files", (("backend", "files"),))] == 2
    # f2 comes back on demand
    assert await (await http.get(v.url + "/files/f2.bin")).content() == BODY


@pytest_twisted.ensureDeferred
async def test_an_entry_being_read_is_not_evicted(vault_factory, upstream, http):
    import socket

    big = BODY * 16  # 20 MB: more than loopback buffers hold, so the reader stays busy
    upstream.add("/f1.bin", big)
    upstream.add("/f2.bin", BODY)
    v = vault_factory(backend(upstream), max_cache_size=len(big) + 10)
    await (await http.get(v.url + "/files/f1.bin")).content()
    host, port = v.url.split("//")[1].split(":")
    slow = socket.create_connection((host, int(port)))  # asks for f1 and never reads
    slow.sendall(b"GET /files/f1.bin HTTP/1.1\r\nHost: localhost\r\n\r\n")
    try:
        await sleep(0.2)
        await (await http.get(v.url + "/files/f2.bin")).content()
        await v.vault.janitor.scan()
        assert v.store.lookup("files/f1.bin") is not None  # still being read
        assert v.store.lookup("files/f2.bin") is None  # so the other one went
    finally:
        slow.close()
