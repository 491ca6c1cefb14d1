"""Fixtures shared by the integration tests; see harness.py."""

import pytest

import harness
from harness import DemoServices, Envoy


def pytest_sessionstart(session):
    missing = harness.missing_artifacts()
    if missing:
        # Never skip: a missing module is a failure that says how to fix it.
        raise pytest.UsageError(
            "built artifacts are missing: " + ", ".join(missing)
            + "\nbuild them with `make build` (or run the whole suite with `make test`)"
        )


@pytest.fixture(scope="session")
def services():
    """The three demo services (users, orders, products) on free loopback ports."""
    svc = DemoServices.start()
    yield svc
    svc.stop()


@pytest.fixture
def envoy_factory():
    """Start Envoys in a test: `envoy = envoy_factory(filters=[...], services=services)`.
    Every Envoy started is stopped at the end of the test."""
    mine = []

    def start(**kw):
        e = Envoy.start(**kw)
        mine.append(e)
        return e

    yield start
    for e in mine:
        e.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for e in harness.started_envoys():
            report.sections.append((f"Envoy log tail ({e.log_path})", e.log_tail(80)))
    if report.when == "teardown":
        harness.forget_envoys()
