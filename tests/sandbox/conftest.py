import os

import pytest

from sandbox import isolation, launch


def sandbox_processes() -> list[int]:
    """Pids of live processes running under one of this test process's sandbox uids."""
    base = isolation.uid_slots._base
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as file:
                uid = next(int(line.split()[1]) for line in file if line.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        if base <= uid < base + isolation.SLOTS:
            pids.append(int(entry))
    return pids


@pytest.fixture
def leftovers():
    """A function listing live processes of this test process's sandbox runs."""
    return sandbox_processes


@pytest.fixture
def no_leftovers():
    """Fails the test if any process of a sandbox run is still alive after it."""
    assert sandbox_processes() == []
    yield
    assert sandbox_processes() == [], "a sandboxed process outlived its run"


@pytest.fixture(scope="session", autouse=True)
def full_isolation():
    report = launch.isolation_report()
    assert report.ok, f"CI must provide every isolation layer:\n{report}"
