import os

# Nothing in the suite may wait on a network timeout.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

try:  # two torch processes on 2 cores ran ~9x slower: one process, threads set deliberately
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
except ImportError:  # pragma: no cover
    pass

try:
    from tests.conftest_ml import *  # noqa: F401,F403  (fixtures of the ML tests)
except ImportError:
    pass


@pytest.fixture(scope="session", autouse=True)
def fillup_cache(tmp_path_factory):
    """A private FILLUP_CACHE for the whole session, set before any fixture of any scope runs: the
    built-in tiny model is built once per session here, never in (or reused from) ~/.cache."""
    cache = tmp_path_factory.getbasetemp() / "fillup-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FILLUP_CACHE", str(cache))
        yield cache


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path_factory, monkeypatch):
    """A private datasets cache per test session, so tests never see each other's cached builds."""
    home = tmp_path_factory.getbasetemp() / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
