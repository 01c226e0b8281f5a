"""Shared test setup: no network, and tiny models built once per session."""

from __future__ import annotations

import os

# Before anything imports transformers/huggingface_hub, which read these once at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # keeps failure output readable
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings from DataLoader workers
# Tiny models: syncing threads costs far more than the math, 10-30x more on a busy 2-core CI box.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# tests/ mirrors src/loralab/ (tests/engine/test_train.py, ...); the helpers (tiny, chromium) and the
# tests other tests build on (test_runner's files, test_findings' fabricated runs) import by name
# from any folder.
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)] + sorted(str(d) for d in HERE.iterdir() if d.is_dir() and not d.name.startswith((".", "_")))

from tiny import make_tiny_model  # noqa: E402  (tests/ is on sys.path: it holds this conftest)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Folder with a tiny Llama (q/k/v/o_proj, gate/up/down_proj) and its ChatML tokenizer."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"), arch="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_neox(tmp_path_factory) -> Path:
    """Folder with a tiny GPT-NeoX (query_key_value, dense, dense_h_to_4h/4h_to_h): other module names."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_neox"), arch="gpt_neox", seed=0)


@pytest.fixture
def pg_url():
    """A PostgreSQL workspace URL of its own: LORALAB_TEST_PG_URL with a fresh schema on its search_path,
    dropped afterwards, so tests never see each other's runs or studies. Skipped without a server,
    unless LORALAB_REQUIRE_PG=1 (CI), where a missing server fails the test."""
    import uuid

    base = os.environ.get("LORALAB_TEST_PG_URL")
    if not base:
        if os.environ.get("LORALAB_REQUIRE_PG") == "1":
            pytest.fail("PostgreSQL is required here (LORALAB_REQUIRE_PG=1): set LORALAB_TEST_PG_URL (.ci/run does)")
        pytest.skip("no PostgreSQL server: set LORALAB_TEST_PG_URL=postgresql://USER@127.0.0.1:PORT/DB")
    from sqlalchemy import create_engine, text

    from loralab.workspace.store import engine_url

    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(engine_url(base), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in base else "?"
    try:
        yield f"{base}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
