"""The HTML report in a real headless browser: nothing overflows at 1400 px and every plot renders.

Runs when Debian's `chromium` is installed (`apt-get install chromium`); skipped otherwise.
"""

import re
import shutil
import subprocess

import pytest

from transferlab.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TINY = ["source_per_class=60", "pretrain_epochs=2", "shots=3", "val_per_class=10", "test_per_class=20",
        "target_steps=3", "lrs=0.001,0.01", "width=8"]

PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const broken = imgs.filter(i => !i.complete || i.naturalWidth === 0).length;
  const wide = [...document.querySelectorAll('body *')].filter(e => {
    const r = e.getBoundingClientRect();
    return r.right > document.documentElement.clientWidth + 1 && getComputedStyle(e).overflowX !== 'auto'
      && !e.closest('table');
  }).length;
  const page = document.documentElement.scrollWidth > document.documentElement.clientWidth;
  document.title = `probe images=${imgs.length} broken=${broken} wide=${wide} page_overflow=${page}`;
});
</script></body>"""


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium")
def test_report_fits_1400px_and_renders_every_plot(tmp_path):
    out = tmp_path / "results"
    assert main(["run", "fmnist-transfer", "--seeds", "2", "--out", str(out), *[f"--set={s}" for s in TINY]]) == 0
    # the widest table an experiment may declare: 12 metrics and their paired differences
    from transferlab.core.report import _md_to_html, table_markdown

    metrics = [f"metric_with_a_long_name_{i}" for i in range(12)]
    row = {"arm": "an_arm_with_a_long_name", "n": 8, **{m: (123.456, 7.89, 8) for m in metrics},
           **{"Δ" + m: (-12.345, 6.78, 8) for m in metrics}}
    wide = _md_to_html(table_markdown([row], metrics, "reference"))
    page = tmp_path / "probe.html"
    page.write_text((out / "report.html").read_text().replace("</body>", wide + PROBE))
    res = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,900",
                          "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    m = re.search(r"<title>probe images=(\d+) broken=(\d+) wide=(\d+) page_overflow=(\w+)</title>", res.stdout)
    assert m, res.stderr[-2000:]
    images, broken, wide, overflow = int(m[1]), int(m[2]), int(m[3]), m[4]
    assert images >= 1 and broken == 0
    assert wide == 0 and overflow == "false"
