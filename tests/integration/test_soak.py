"""A short soak in the suite: concurrent load through real `serve` with every fault kind injected.

The full soak (`.venv/bin/python -m tests.integration.soak --seconds 60`) makes the same checks
over tens of thousands of requests; this one is kept light for a shared two-core CI machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.soak import SoakReport, SoakSettings, run_soak

SHORT_SOAK = SoakSettings(seconds=12, warmup_s=3, clients=8, sample_every_s=1.0)
# Below this the run says too little to pass; even a busy CI machine manages far more.
MIN_REQUESTS = 500


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> SoakReport:
    report = run_soak(SHORT_SOAK, tmp_path_factory.mktemp("soak"))
    print(report.summary())
    return report


def test_the_soak_is_long_enough_to_mean_something(soak: SoakReport) -> None:
    assert soak.requests >= MIN_REQUESTS, soak.summary()
    assert soak.faults_injected >= MIN_REQUESTS * SHORT_SOAK.fault_share / 2, soak.summary()
    assert soak.faults_missing == []


def test_every_answer_under_injected_faults_is_the_status_the_contract_gives_its_fault(
    soak: SoakReport,
) -> None:
    assert soak.wrong_answers == [], soak.summary()


def test_no_worker_is_killed_and_no_error_goes_unhandled_under_faults(soak: SoakReport) -> None:
    assert soak.log_findings == [], soak.summary()


def test_worker_memory_grows_less_than_ten_percent_over_the_soak(soak: SoakReport) -> None:
    assert soak.rss_growth, soak.summary()
    assert soak.memory_growth == [], soak.summary()


def test_the_soak_leaves_no_process_behind(soak: SoakReport) -> None:
    pids = [*soak.service_pids, *soak.rss_kb]
    assert len(soak.service_pids) == 2
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []
