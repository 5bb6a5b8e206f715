"""Stage the offline data a GPU machine needs into `.device-data/` (git-ignored), in small bundles.

A GPU machine without network has torch and transformers but none of the data. The data travel in two
bundles, each at most 64 MiB, so that a size-limited copy can carry either one with the working tree:

    python tools/stage_device_data.py text     # all-MiniLM-L6-v2 (fp16 weights, ~45 MB) + WordNet (xz)
    python tools/stage_device_data.py images   # Fashion-MNIST (the Debian package's gz files, ~30 MB)

On the machine, `tools/device_checks.sh` unpacks WordNet and points TRANSFERLAB_DATA at the folder.
The fp16 MiniLM copy declares `torch_dtype: float32`, so transformers loads it back as float32; its
weights are MiniLM's rounded to fp16 (relative error <= 2^-11), which changes results slightly
against the fp32 package: compare GPU and CPU numbers with that in mind.
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import shutil
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout; transferlab need not be installed

from transferlab.data import minilm_path  # noqa: E402
from transferlab.data.fashion_mnist import _FILES as FMNIST_FILES  # noqa: E402
from transferlab.data.paths import find_source  # noqa: E402
from transferlab.data.wordnet import _POS_FILES as WORDNET_FILES  # noqa: E402

OUT = ROOT / ".device-data"
BUDGET = 64 * 2**20


def stage_minilm(dest: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    src = minilm_path()
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("model.safetensors", "*.bin", "*.onnx", "onnx",
                                                              "openvino", "README.md", ".gitattributes"))
    weights = load_file(src / "model.safetensors")
    save_file({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in weights.items()},
              dest / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((dest / "config.json").read_text())
    cfg["torch_dtype"] = cfg["dtype"] = "float32"  # load back as float32 (both key spellings of transformers)
    (dest / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def stage_wordnet(dest_xz: Path) -> None:
    files = [WORDNET_FILES["n"], WORDNET_FILES["v"]]  # the noun and verb synsets every experiment reads
    root = find_source("wordnet", None, ["/usr/share/wordnet"], files, "apt-get install wordnet-base")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for f in files:
            tar.add(root / f, arcname=f"wordnet/{f}")
    dest_xz.write_bytes(lzma.compress(buf.getvalue(), preset=6))


def stage_fashion_mnist(dest: Path) -> None:
    files = [f for pair in FMNIST_FILES.values() for f in pair]
    root = find_source("fashion-mnist", None, ["/usr/share/datasets/fashion-mnist"], files,
                       "apt-get install dataset-fashion-mnist")
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(root / f, dest / f)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", choices=["text", "images"])
    args = ap.parse_args()
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir()
    if args.bundle == "text":
        stage_minilm(OUT / "all-MiniLM-L6-v2")
        stage_wordnet(OUT / "wordnet.tar.xz")
    else:
        stage_fashion_mnist(OUT / "fashion-mnist")
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"staged the {args.bundle} bundle in {OUT}: {size / 2**20:.1f} MiB "
          f"(the working tree adds a few MiB; a call carries at most {BUDGET // 2**20} MiB)")
    if size > BUDGET - 8 * 2**20:
        print("warning: too large to travel with the working tree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
