"""Published results: tables and doc blocks are generated from committed results.jsonl files."""

from pathlib import Path

import pytest

from transferlab.cli import main
from transferlab.core.bench import Comparison
from transferlab.core.publish import check_bench, check_published, publish, publish_bench

REPO = Path(__file__).resolve().parents[2]
TINY = ["source_per_class=60", "pretrain_epochs=2", "shots=3", "val_per_class=10", "test_per_class=20",
        "target_steps=3", "lrs=0.001", "width=8"]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    out = root / "results"
    assert main(["run", "fmnist-transfer", "--seeds", "2", "--out", str(out), "--no-report",
                 *[f"--set={s}" for s in TINY]]) == 0
    (root / "docs").mkdir()
    readme = root / "README.md"
    readme.write_text("# x\n\n<!-- table: fmnist-transfer -->\nstale\n<!-- /table -->\n\ntext after\n"
                      "<!-- summary -->\n<!-- /summary -->\n")
    publish(out, root / "docs" / "results")
    return root


def test_publish_writes_results_tables_and_blocks(published):
    d = published / "docs" / "results" / "fmnist-transfer"
    assert (d / "results.jsonl").exists() and (d / "table.md").exists() and (d / "metric.png").exists()
    readme = (published / "README.md").read_text()
    assert "stale" not in readme and (d / "table.md").read_text() in readme and "text after\n" in readme
    assert "[fmnist-transfer](docs/results/fmnist-transfer/table.md)" in readme and "linear_probe" in readme
    assert check_published(published / "docs" / "results", [published / "README.md"]) == []


@pytest.mark.parametrize("victim", ["table", "readme", "summary", "results"])
def test_a_hand_edit_is_caught(published, victim, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(published, root)
    dest, readme = root / "docs" / "results", root / "README.md"
    table = dest / "fmnist-transfer" / "table.md"
    if victim == "table":
        table.write_text(table.read_text().replace("±", "+-", 1))
    elif victim == "readme":
        readme.write_text(readme.read_text().replace("±", "+-", 1))
    elif victim == "summary":
        text = readme.read_text()
        head, tail = text.split("<!-- summary -->")
        readme.write_text(head + "<!-- summary -->" + tail.replace("| 2 |", "| 3 |", 1))
    else:  # a metric changed in the log: the committed tables no longer match it
        log = dest / "fmnist-transfer" / "results.jsonl"
        lines = log.read_text().splitlines()
        lines[0] = lines[0].replace('"test_acc": ', '"test_acc": 1', 1)
        log.write_text("\n".join(lines) + "\n")
    assert check_published(dest, [readme])


def test_bench_publish_merges_and_is_checked(tmp_path):
    (tmp_path / "docs").mkdir()
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench -->\n<!-- /bench -->\n<!-- bench: b -->\n<!-- /bench -->\n")
    path = tmp_path / "docs" / "results" / "bench.json"
    machine = {"device": "cpu", "hardware": "test cpu", "cores": 2, "threads": 1, "torch": "x", "date": "2026-01-01"}
    publish_bench(path, {"a": [Comparison("a", "new", "old", 1.0, 2.0, 1.2)]}, machine)
    publish_bench(path, {"b": [Comparison("b", "new", "old", 3.0, 2.0, 1.2)]}, machine)
    text = readme.read_text()
    assert "| a |" in text and "| b |" in text and "test cpu" in text
    only_b = text.split("<!-- bench: b -->")[1]
    assert "| b |" in only_b and "| a |" not in only_b
    assert check_bench(path, [readme]) == []
    readme.write_text(text.replace("0.500", "0.400"))
    assert check_bench(path, [readme])


def test_the_repository_tables_match_their_results():
    dest = REPO / "docs" / "results"
    assert check_published(dest) == []
    assert check_bench(dest / "bench.json") == []


def test_arms_of_another_profile_of_the_same_config_join_the_table(published, tmp_path):
    import json
    import shutil

    from transferlab.core.report import write_experiment_report

    src = published / "docs" / "results" / "fmnist-transfer"
    out = tmp_path / "fmnist-transfer"
    shutil.copytree(src, out)
    latest = json.loads((out / "latest.json").read_text())
    arms = latest["config"]["arms"]
    latest["config"]["arms"] = arms[:-1]  # the last invocation ran all arms but one ...
    (out / "latest.json").write_text(json.dumps(latest))
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    for r in rows:
        if r["arm"] == arms[-1]:
            r["profile"] = "long"  # ... which an earlier profile of the same config ran
    rows.append({**rows[0], "config_hash": "other", "arm": arms[-1], "seed": 99})  # another config: left out
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    section, _ = write_experiment_report(out)
    assert f"| {arms[-1]} | 2 |" in section
    assert f"Profiles `{latest['profile']}` + `long`" in section


def test_a_second_run_is_published_under_its_own_name_with_its_details(published, tmp_path):
    import json
    import shutil

    from transferlab.core.errors import UserError

    out = tmp_path / "results"
    shutil.copytree(published / "results", out)
    exp = out / "fmnist-transfer"
    h = json.loads((exp / "latest.json").read_text())["config_hash"]
    (exp / "details" / h).mkdir(parents=True)
    (exp / "details" / h / "arm-seed0.json").write_text("{}")
    (exp / "details" / "oldconfig").mkdir()  # a config that is not published: not copied
    dest = published / "docs" / "results"
    alias = tmp_path / "docs-results"
    shutil.copytree(dest, alias)
    assert publish(out, alias, names=["fmnist-transfer"], alias="fmnist-transfer-curves", docs=[]) == [
        "fmnist-transfer-curves"]
    d = alias / "fmnist-transfer-curves"
    assert json.loads((d / "latest.json").read_text())["experiment"] == "fmnist-transfer"
    assert (d / "details" / h / "arm-seed0.json").exists() and not (d / "details" / "oldconfig").exists()
    assert (d / "section.md").read_text().startswith("## fmnist-transfer-curves\n")
    assert check_published(alias, []) == []
    for bad in ({"names": None, "alias": "x"}, {"names": ["fmnist-transfer"], "alias": "cuber-pfmnist"},
                {"names": ["fmnist-transfer"], "alias": "Bad Name"}):
        with pytest.raises(UserError, match="--as"):
            publish(out, alias, docs=[], **bad)
