"""Fixtures of the whole-model tests."""
from __future__ import annotations

import warnings

import pytest

from tests.tiny_models import ARCHS

warnings.filterwarnings("ignore", message=".*compiled ops unavailable.*")


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param
