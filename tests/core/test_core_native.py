"""The optional C-kernel loader: builds once into its cache, atomically, and never fails a caller."""

import pytest

from transferlab.core import native

SOURCE = "int tl_answer(void) { return 42; }\n"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERLAB_NATIVE_CACHE", str(tmp_path))
    monkeypatch.delenv("TRANSFERLAB_NATIVE", raising=False)  # these tests set it themselves
    native.load.cache_clear()
    yield tmp_path
    native.load.cache_clear()


def test_builds_once_and_reuses_the_cached_library(cache):
    if native._compiler() is None:
        pytest.skip("no C compiler")
    lib = native.load("answer", SOURCE)
    assert lib is not None and lib.tl_answer() == 42
    built = sorted(p.name for p in cache.iterdir())
    assert len(built) == 1 and built[0].startswith("answer-") and built[0].endswith(".so")
    native.load.cache_clear()
    assert native.load("answer", SOURCE).tl_answer() == 42
    assert sorted(p.name for p in cache.iterdir()) == built  # reused, nothing rebuilt beside it


def test_disabled_by_environment(cache, monkeypatch):
    monkeypatch.setenv("TRANSFERLAB_NATIVE", "0")
    assert native.load("answer", SOURCE) is None
    assert not any(cache.iterdir())


def test_failed_build_warns_and_leaves_nothing_behind(cache, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.warns(UserWarning, match="could not build the C kernel 'answer'"):
        assert native.load("answer", SOURCE) is None
    assert not any(cache.iterdir())  # no half-written library, no temporary directory


def test_missing_compiler_is_not_an_error(cache, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    assert native.load("answer", SOURCE) is None
