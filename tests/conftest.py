"""Shared fixtures: a throwaway PostgreSQL database for integration tests, and small random
ResNet20 inputs for tests that run a real job.

Tests that need PostgreSQL take `postgres_url`; it skips them with the reason when no server is
reachable, so the default run stays green on a laptop without one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import psycopg
import pytest
import torch

from allocator.job import JobSpec
from allocator.zoo import load_model
from bench.deploy import throwaway_database

pytest_plugins = ("tests.api_app", "tests.databases", "tests.s3_server")
"""The HTTP API fixtures (settings, client, acme, globex, calib_ref), a migrated database on each
backend (engine) and an S3-compatible server (s3_server, s3_bucket) for every test module."""

POSTGRES_ADMIN_URL_ENV = "BITPLAN_TEST_POSTGRES_URL"
DEFAULT_POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh `bitplan_test_<random>` database for this test session, dropped afterwards, so
    runs never see each other's rows or leave any behind."""
    admin_url = os.environ.get(POSTGRES_ADMIN_URL_ENV, DEFAULT_POSTGRES_ADMIN_URL)
    with ExitStack() as stack:
        try:
            url = stack.enter_context(throwaway_database(admin_url, "bitplan_test"))
        except psycopg.OperationalError as error:
            pytest.skip(
                f"PostgreSQL unreachable at {admin_url} (set {POSTGRES_ADMIN_URL_ENV}): {error}"
            )
        yield url


@pytest.fixture(scope="session")
def resnet20_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Random but fixed ResNet20 weights and 48 random labelled images: a real job that runs in
    seconds, for tests about the machinery around the science rather than its numbers."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    images = folder / "images.npz"
    np.savez(
        images,
        images=rng.integers(0, 256, size=(48, 32, 32, 3), dtype=np.uint8),
        labels=rng.integers(0, 10, size=48),
    )
    torch.manual_seed(0)
    weights = folder / "resnet20.pth"
    torch.save(load_model("zoo:cifar_resnet20").module.state_dict(), weights)
    return weights, images


@pytest.fixture(scope="session")
def resnet20_job(resnet20_inputs: tuple[Path, Path]) -> JobSpec:
    """A whole ResNet20 job on `resnet20_inputs` that runs in seconds: 16 calibration images,
    evaluated on all 48, fisher costs, no report widths, no rounds."""
    weights, images = resnet20_inputs
    return JobSpec(
        model="zoo:cifar_resnet20",
        weights=str(weights),
        calib=str(images),
        eval=str(images),
        calib_samples=16,
        batch_size=16,
        budget="avg-bits=4",
        method="fisher",
        report_widths=False,
        context_rounds=0,
    )
