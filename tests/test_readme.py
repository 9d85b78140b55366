"""The README guides: it is short, its example config plans the paper's settings as written, every
command it gives works (snakemake commands as dry runs, maskdistill commands parse, check-config
runs), and the config reference in docs/ is the one the schema generates."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import PY, REPO, run_env
from PIL import Image

from maskdistill.cli import build_parser
from maskdistill.config import config_reference

README = (REPO / "README.md").read_text()


def bash_commands(text: str) -> list[str]:
    """Every command of the README's bash blocks, comments dropped, continuation lines joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].split(" # ")[0].split(" > ")[0].strip()
            commands += [part.strip() for part in line.split("&&") if part.strip()]
    return commands


def example_config() -> dict:
    """The README's own-images example (the yaml block that starts with '# my.yaml')."""
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", README, re.S) if b.startswith("# my.yaml"))
    return yaml.safe_load(block)


def _photos(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (40, 30), (10 * i, 100, 200)).save(folder / f"p{i}.jpg")
    return [f"p{i}.jpg" for i in range(n)]


@pytest.fixture
def user_folder(tmp_path) -> Path:
    """A working folder holding the README's my.yaml and the data it names (paths as written)."""
    cfg = example_config()
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(cfg))
    _photos(tmp_path / cfg["dataset"]["train"]["images"], 3)
    names = _photos(tmp_path / cfg["dataset"]["val"]["images"], 2)
    coco = {"images": [{"id": i + 1, "file_name": n, "height": 30, "width": 40} for i, n in enumerate(names)],
            "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / cfg["dataset"]["val"]["annotations"]).write_text(json.dumps(coco))
    _photos(tmp_path / cfg["segment"]["images"], 2)
    for link in ("profiles", "configs"):
        (tmp_path / link).symlink_to(REPO / link)
    return tmp_path


def dry_run(cwd: Path, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [PY, "-m", "snakemake", "-s", str(REPO / "Snakefile"), *args]
    if "-n" not in args:
        cmd.append("-n")
    cmd += ["-p", "--nolock"]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=run_env(), timeout=600)


def planned_config(proc: subprocess.CompletedProcess, command: str) -> dict:
    """The settings JSON of the first planned ``maskdistill <command>`` job."""
    line = next(x for x in proc.stdout.splitlines() if f" {command} --config " in x)
    return json.loads(shlex.split(line.split(f" {command} --config ", 1)[1])[0])


def test_the_readme_is_short_and_starts_with_the_quick_start():
    lines = README.splitlines()
    assert len(lines) <= 300
    headings = [line for line in lines if line.startswith("## ")]
    assert lines.index("## Quick start") < 40
    for section in ("## Your own images", "## Segmenting new photos",
                    "## What each cluster is, and choosing k", "## On a SLURM cluster",
                    "## Paper settings, PASCAL VOC and COCO20k", "## What it writes", "## A map of the code"):
        assert section in headings, section
    for link in re.findall(r"\]\((docs/[^)#]+)", README):
        assert (REPO / link).is_file(), link


def test_the_config_reference_is_the_one_the_schema_generates():
    assert (REPO / "docs" / "configuration.md").read_text() == config_reference(), (
        "docs/configuration.md is out of date: uv run maskdistill config-reference > docs/configuration.md")


def test_the_example_config_plans_the_papers_settings_as_written(user_folder):
    proc = dry_run(user_folder, ["--cores", "all", "--configfile", "my.yaml"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    mining = planned_config(proc, "mine")["mining"]
    assert mining["backbone"] == {"name": "vit_small_patch16_224.dino", "pretrained": True,
                                  "checkpoint": None}
    assert (mining["short_side"], mining["cls_heads"], mining["center_keys"]) == (640, None, False)
    detector = planned_config(proc, "train-detector")["detector"]
    assert (detector["backbone"], detector["fpn_channels"], detector["epochs"]) == ("resnet50", 256, 12)
    assert "make_demo" not in proc.stdout and "linear_probe" not in proc.stdout
    assert "rule segment:" in proc.stdout or "localrule segment:" in proc.stdout


def test_another_working_directory_plans_the_same_jobs(user_folder, tmp_path_factory):
    here = dry_run(user_folder, ["--cores", "1", "--configfile", "my.yaml"])
    elsewhere = dry_run(tmp_path_factory.mktemp("elsewhere"),
                        ["--directory", str(user_folder), "--cores", "1", "--configfile",
                         str(user_folder / "my.yaml")])
    assert here.returncode == elsewhere.returncode == 0, elsewhere.stderr[-3000:]
    assert planned_config(here, "mine") == planned_config(elsewhere, "mine")
    demo = dry_run(tmp_path_factory.mktemp("demo"), ["--cores", "1"])  # no config: the demo's settings
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert planned_config(demo, "mine")["mining"]["short_side"] == 128 and "make_demo" in demo.stdout


@pytest.mark.parametrize("command", [c for c in bash_commands(README) if c.startswith("uv run ")],
                         ids=lambda c: c[:60])
def test_every_readme_command_works(command, user_folder):
    args = shlex.split(command)[2:]  # after "uv run"
    if args[0] == "snakemake":
        rest = args[1:]
        if "--report" in rest:
            pytest.skip("needs a finished run: tests/test_workflow_report.py builds one")
        if any(a.startswith("configs/") for a in rest):
            pytest.skip("needs the benchmark's data (tests/test_datasets.py plans it on tiny trees)")
        proc = dry_run(user_folder, rest)
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
    elif args[0] == "maskdistill":
        build_parser().parse_args(args[1:])  # every flag exists
        if args[1] in ("check-config", "config-reference"):
            proc = subprocess.run([PY, "-m", "maskdistill.cli", *args[1:]], cwd=user_folder, env=run_env(),
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
    elif args[:2] == ["python", "-c"]:  # a check the README gives, e.g. that detectron2's ops load
        compile(args[2], command, "exec")
        module = re.match(r"import (\w+)", args[2])
        if module and importlib.util.find_spec(module.group(1)) is None:
            pytest.skip(f"{module.group(1)} is not installed here")
        proc = subprocess.run([PY, "-c", args[2]], cwd=user_folder, env=run_env(), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
    elif args[0] in ("pytest", "ruff", "python"):
        assert args[0] != "python" or (REPO / args[1]).is_file(), command
    else:
        raise AssertionError(f"a README command nobody checks: {command}")


def test_the_readme_commands_include_the_ones_a_newcomer_needs():
    commands = " ".join(bash_commands(README))
    for needed in ("uv sync", "snakemake --cores all", "--configfile my.yaml", "maskdistill segment",
                   "--report", "--profile profiles/slurm", "pytest -q", "check-config"):
        assert needed in commands, needed
    assert sys.executable  # the suite runs in the project's environment
