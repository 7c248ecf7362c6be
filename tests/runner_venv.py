"""A bare virtual environment holding only some distributions, for the on-device runner tests.

``bare_venv(folder, ["numpy", "pillow", "openvino"])`` makes ``python -m venv --without-pip``
and links in the files of exactly those distributions and what they require (what ``pip install``
of them would bring), taken from the test's own environment. Nothing else of that environment,
nor the repository, is importable there: a runner that needs torch, onnx or maskedge's build
code fails in it. No network is used.
"""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path


def _requirements(name: str) -> list[str]:
    names = []
    for req in metadata.distribution(name).requires or []:
        if ";" in req and "extra ==" in req.split(";", 1)[1]:
            continue  # an optional extra, not installed by a plain `pip install name`
        if ";" in req:
            marker = req.split(";", 1)[1]
            from packaging.markers import Marker

            if not Marker(marker).evaluate():
                continue
        names.append(re.split(r"[\s<>=!~\[;(]", req.strip(), maxsplit=1)[0])
    return names


def closure(names: list[str]) -> list[str]:
    """``names`` and every distribution they require, transitively (as installed here)."""
    seen: list[str] = []
    todo = list(names)
    while todo:
        name = todo.pop()
        key = metadata.distribution(name).metadata["Name"].lower().replace("_", "-")
        if key in seen:
            continue
        seen.append(key)
        todo += _requirements(name)
    return sorted(seen)


def bare_venv(folder: Path, distributions: list[str]) -> Path:
    """A venv under ``folder`` with only ``distributions`` (and their requirements); its python."""
    site = folder / "site"
    site.mkdir(parents=True)
    for name in closure(distributions):
        dist = metadata.distribution(name)
        tops = {Path(str(f)).parts[0] for f in dist.files or []}
        for top in sorted(tops - {".."}):
            src = Path(dist.locate_file(top))
            if src.exists() and not (site / top).exists():
                (site / top).symlink_to(src)
    env = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    Path(purelib, "runner_only.pth").write_text(str(site) + "\n")
    assert Path(purelib) != Path(sysconfig.get_paths()["purelib"])
    return python
