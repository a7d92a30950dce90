"""The README's Python code blocks run as written, and the wheel ships every checkpoint and config."""

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_python_blocks_run_as_written(tmp_path):
    """Each block that starts with `# <name>.py` is saved as that file (the one-file strategy); the others run,
    in order, as one script in that folder, outside the repo."""
    from experiments.toy.model import CHECKPOINT

    if not (CHECKPOINT / "config.json").exists():
        pytest.skip(f"the shipped toy checkpoint ({CHECKPOINT}) is not in this checkout")
    script = []
    for block in python_blocks():
        first = block.splitlines()[0]
        m = re.fullmatch(r"# (\w+\.py)", first.strip())
        if m:
            (tmp_path / m.group(1)).write_text(block)
        else:
            script.append(block)
    assert script, "README.md has no Python block to run"
    (tmp_path / "readme.py").write_text("\n".join(script))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "readme.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(printed) == 4 and printed[0].startswith("none [144.0, 144.0]"), proc.stdout


def checkpoint_folders() -> list[Path]:
    """Folders inside the packages that hold a saved model (config.json + weights)."""
    out = []
    for pkg in ("framework", "strategies", "models", "experiments"):
        for cfg in (ROOT / pkg).rglob("config.json"):
            if any(cfg.parent.glob("*.safetensors")):
                out.append(cfg.parent)
    return out


@pytest.mark.slow
def test_wheel_ships_every_checkpoint_and_config(tmp_path):
    import shutil

    src = tmp_path / "src"  # a copy: setuptools writes build/ next to the sources
    shutil.copytree(
        ROOT, src, ignore=shutil.ignore_patterns(".*", "build", "outputs", "runs", "wandb", "*.egg-info", "__pycache__")
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("sparsevlm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = [p for p in (ROOT / "experiments" / "conf").rglob("*.yaml")]
    for folder in checkpoint_folders():
        wanted += [p for p in folder.iterdir() if p.is_file()]
    missing = sorted(str(p.relative_to(ROOT)) for p in wanted if str(p.relative_to(ROOT)) not in names)
    assert not missing, f"not in the wheel: {missing}"
