"""The suite writes only into pytest's temporary folders: never into the checkout (runs/, data/, out*/)."""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session", autouse=True)
def checkout_stays_clean():
    before = set(os.listdir(ROOT))
    yield
    made = sorted(set(os.listdir(ROOT)) - before - {".pytest_cache", "__pycache__"})
    assert not made, f"the tests wrote into the checkout: {made}"
