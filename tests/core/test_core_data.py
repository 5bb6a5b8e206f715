import gzip

import pytest

from transferlab.core.errors import DataNotFoundError
from transferlab.data import SUPERSENSES_39, load_fashion_mnist, load_wordnet
from transferlab.data.wordnet import parse_data_line


def test_fashion_mnist_vendored_subset(data_dir):
    x, y = load_fashion_mnist("train", data_dir / "fashion-mnist")
    assert x.shape == (2000, 28, 28) and x.dtype.is_floating_point is False
    assert sorted(y.unique().tolist()) == list(range(10))
    assert (y == 3).sum() == 200
    xt, yt = load_fashion_mnist("test")  # via TRANSFERLAB_DATA set in conftest
    assert xt.shape == (1000, 28, 28) and len(yt) == 1000


def test_fashion_mnist_missing_names_the_fix(tmp_path, monkeypatch):
    with pytest.raises(DataNotFoundError, match="does not contain"):
        load_fashion_mnist("train", tmp_path)
    monkeypatch.setenv("TRANSFERLAB_DATA", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    from transferlab.data import paths

    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        paths.find_source("fashion-mnist", None, [str(tmp_path / "nowhere")], ["train-images-idx3-ubyte.gz"],
                          "install it with `apt-get install dataset-fashion-mnist`")


def test_fashion_mnist_corrupt_file_is_an_error(tmp_path):
    for name in ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]:
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(b"\0" * (16 + 784 * 3 if "images" in name else 8 + 2))
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        load_fashion_mnist("train", tmp_path)


def test_wordnet_parser_on_a_real_line():
    line = ('00003431 29 v 04 burp 0 bubble 0 belch 0 eruct 0 005 @ 00105333 v 0000 + 00117578 n 0405 '
            '01 + 02 00 | expel gas from the stomach; "In China it is polite to burp at the table"  \n')
    s = parse_data_line(line)
    assert s.lexname == "verb.body" and s.pos == "v"
    assert s.lemmas == ("burp", "bubble", "belch", "eruct")
    assert s.definition == "expel gas from the stomach"
    assert s.examples == ("In China it is polite to burp at the table",)


def test_wordnet_vendored_subset_covers_39_supersenses():
    syn = load_wordnet()
    names = {s.lexname for s in syn}
    assert set(SUPERSENSES_39) <= names and len(SUPERSENSES_39) == 39
    assert "noun.Tops" not in SUPERSENSES_39
    assert sum(bool(s.examples) for s in syn) > 500


def test_minilm_path_prefers_a_user_path_then_transferlab_data(tmp_path, monkeypatch):
    from transferlab.data import minilm_path

    staged = tmp_path / "all-MiniLM-L6-v2"
    staged.mkdir()
    (staged / "config.json").write_text("{}")
    monkeypatch.setenv("TRANSFERLAB_DATA", str(tmp_path))
    assert minilm_path() == staged
    with pytest.raises(DataNotFoundError, match="no config.json"):
        minilm_path(tmp_path / "elsewhere")


def test_rotate_by_90_degrees_is_rot90_and_zero_is_a_copy():
    import torch

    from transferlab.data.image_ops import rotate

    x = torch.arange(32.0).reshape(2, 1, 4, 4)
    assert torch.equal(rotate(x, 90, "nearest"), torch.rot90(x, 1, (2, 3)))  # counter-clockwise
    same = rotate(x, 0)
    assert torch.equal(same, x) and same.data_ptr() != x.data_ptr()


def test_per_class_indices_are_disjoint_balanced_and_refuse_too_many():
    import torch

    from transferlab.core.errors import UserError
    from transferlab.data.image_ops import per_class_indices

    y = torch.arange(40) % 4
    a = per_class_indices(y, [1, 3], 3, torch.Generator().manual_seed(0))
    b = per_class_indices(y, [1, 3], 3, torch.Generator().manual_seed(0), skip=3)
    assert y[a].tolist() == [1, 1, 1, 3, 3, 3] and not set(a.tolist()) & set(b.tolist())
    assert len(per_class_indices(y, [0], None, torch.Generator().manual_seed(0))) == 10
    with pytest.raises(UserError, match="fewer than the 11"):
        per_class_indices(y, [0], 11, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["clean", "noise", "blur", "contrast", "inversion", "tint", "speckle", "pixelate",
                                  "brightness", "rot60"])
def test_corrupt_gives_three_channel_images_in_range_drawn_from_the_generator_only(kind):
    import torch

    from transferlab.data.image_ops import corrupt, domain_transform, rotate

    x = torch.rand(6, 1, 28, 28)
    a = corrupt(x, kind, torch.Generator().manual_seed(1))
    assert a.shape == (6, 3, 28, 28) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, corrupt(x, kind, torch.Generator().manual_seed(1)))
    if kind not in ("clean", "rot60"):  # the severities come from the generator
        assert not torch.equal(a, corrupt(x, kind, torch.Generator().manual_seed(2)))
    if kind == "rot60":
        assert torch.equal(a, rotate(x, 60.0).expand(-1, 3, -1, -1))
    assert torch.equal(domain_transform("corrupted", kind, x, torch.Generator().manual_seed(1)), a)


def test_domain_transform_rotates_the_rotated_family_and_refuses_unknown_corruptions():
    import torch

    from transferlab.core.errors import UserError
    from transferlab.data.image_ops import corrupt, domain_transform, rotate

    x = torch.rand(2, 1, 28, 28)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(domain_transform("rotated", 30, x, g, "nearest"), rotate(x, 30, "nearest"))
    with pytest.raises(UserError, match="unknown corruption 'fog'; choose from clean, noise") as e:
        corrupt(x, "fog", g)
    assert "\n" not in str(e.value)
