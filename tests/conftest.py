"""
Shared fixtures.

pytest-twisted runs the reactor for us but gives no `reactor` fixture and does
not fail a test when an error is logged; both are added here.  `vault` starts
the code under test in-process on 127.0.0.1 (real sockets), `upstream` a fake
origin server (tests/upstream.py); `http` is a client with a non-persistent
pool, so no connection outlives its test.  `rig` (start fake OCI registries)
and `home` (a HOME for skopeo) come from tests/ocienv.py.
"""

import os
import sys
from dataclasses import dataclass

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet import reactor as _reactor
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.web.client import Agent, HTTPConnectionPool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from artifact_vault.accesslog import LOG  # noqa: E402
from artifact_vault.config import parse  # noqa: E402
from artifact_vault.service import assemble  # noqa: E402
from tests.ocienv import home, rig  # noqa: E402,F401 - fixtures (a skopeo HOME, FakeRegistry starter)
from tests.upstream import FakeUpstream  # noqa: E402


@pytest.fixture
def reactor():
    return _reactor


class LogCapture:
    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    def messages(self):
        return [formatEvent(e) for e in self.events]

    def text(self):
        return "\n".join(self.messages())

    def errors(self):
        return [e for e in self.events
                if e.get("log_failure") is not None or e.get("log_level") is LogLevel.critical]


@pytest.fixture(autouse=True)
def logged():
    """Every log event of the test; a logged failure or critical event fails it."""
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    yield capture
    globalLogPublisher.removeObserver(capture)
    errors = capture.errors()
    if errors:
        details = "\n".join(formatEvent(e) + "\n" + (e["log_failure"].getTraceback() if e.get("log_failure") else "")
                            for e in errors)
        pytest.fail(f"errors were logged during the test:\n{details}")


@dataclass
class RunningVault:
    url: str
    config: object
    root: object
    vault: object
    port: object

    @property
    def store(self):
        return self.vault.store


@pytest.fixture
def vault_factory(tmp_path):
    ports, vaults = [], []

    def start(backends, **top) -> RunningVault:
        document = {"cache_dir": str(tmp_path / "cache"), "log_level": "DEBUG", "backends": backends, **top}
        config = parse(document, environ={})
        # Access log lines go into the log (where `logged` sees them), as with twistd --logfile,
        # unless the test names an access_log of its own.
        machinery = assemble(config, _reactor, "config" if "access_log" in top else LOG)
        machinery.store.sweep()
        port = _reactor.listenTCP(0, machinery.site, interface="127.0.0.1")
        ports.append(port)
        vaults.append(machinery)
        return RunningVault(f"http://127.0.0.1:{port.getHost().port}", config, machinery.root, machinery, port)

    yield start
    for port in ports:
        port.stopListening()
    for machinery in vaults:
        if machinery.access_log is not None:
            machinery.access_log.close()


@pytest.fixture
def upstream():
    up = FakeUpstream()
    up.listen(_reactor)
    yield up
    pytest_twisted.blockon(up.close())


@pytest.fixture
def other_origin():
    up = FakeUpstream(name="other")
    up.listen(_reactor)
    yield up
    pytest_twisted.blockon(up.close())


@pytest.fixture
def http():
    """treq client without connection reuse between tests."""
    pool = HTTPConnectionPool(_reactor, persistent=False)
    return HTTPClient(Agent(_reactor, pool=pool))
