"""A non-editable install works like a tool: the wheel ships conf/ (as maml_runner/conf), and the installed
`maml-run`, `maml-aggregate` and `maml-reproduce` work from a directory that is not the checkout.

The wheel is built from a copy of the sources (no stale build/ of the checkout, nothing written into it) and
installed without dependencies into a fresh venv that borrows .venv's site-packages through a .pth line. A .pth
line adds a plain path, so .venv's editable-install hook (itself a .pth) does not run there: the venv can import
maml_runner only from the wheel, which the tests assert.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # a wheel build, a venv and a few CLI start-ups: ~30-60 s on 2 busy cores


def _clean_env(venv: Path) -> dict:
    """No PYTHONPATH, no checkout on the path: only what an installed tool sees."""
    return {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8",
            "CUDA_VISIBLE_DEVICES": "", "TQDM_DISABLE": "1"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("maml_runner", "conf"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    dist = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "--disable-pip-version-check", "-w", str(dist), str(src)], check=True, capture_output=True,
                   timeout=300)
    wheel, = dist.glob("maml_runner-*.whl")

    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(subprocess.run([str(venv / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    borrowed = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])  # .venv's packages
    (site / "_borrowed_dependencies.pth").write_text("".join(f"{path}\n" for path in borrowed))
    work = tmp / "work"  # the directory the commands run from: no conf/, no checkout
    work.mkdir()
    env = _clean_env(venv)
    # --ignore-installed: pip sees .venv's editable maml-runner through the .pth and must not touch it.
    subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
                    "-q", "--disable-pip-version-check", str(wheel)], check=True, cwd=work, env=env,
                   capture_output=True, timeout=300)
    return {"wheel": wheel, "venv": venv, "site": site, "work": work, "env": env}


def _run(installed, *command: str, timeout: float = 300) -> subprocess.CompletedProcess:
    venv = installed["venv"]
    return subprocess.run([str(venv / "bin" / command[0]), *command[1:]], cwd=installed["work"],
                          env=installed["env"], capture_output=True, text=True, timeout=timeout)


def test_wheel_holds_every_module_and_config(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "maml_runner").rglob("*.py")
               if "__pycache__" not in p.parts}
    configs = {"maml_runner/" + p.relative_to(REPO).as_posix() for p in (REPO / "conf").rglob("*.yaml")}
    assert modules - names == set(), "modules missing from the wheel (add the package to pyproject's packages)"
    assert configs - names == set(), "configs missing from the wheel"
    assert "maml_runner/paper_results.yaml" in names and "maml_runner/conf/hydra/help/maml_help.yaml" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(installed["wheel"]).read(entry_points).decode()
    for command in ("maml-run", "maml-aggregate", "maml-reproduce"):
        assert f"{command} =" in text


def test_installed_package_is_the_wheel_not_the_checkout(installed):
    probe = _run(installed, "python", "-c",
                 "import maml_runner, maml_runner.paths as p; print(maml_runner.__file__); print(p.CONF_DIR)")
    assert probe.returncode == 0, probe.stderr
    module_file, conf_dir = probe.stdout.split()
    assert Path(module_file).is_relative_to(installed["site"]), module_file
    assert Path(conf_dir) == installed["site"] / "maml_runner" / "conf"


def test_installed_maml_run_help_cfg_and_a_short_run(installed):
    help_ = _run(installed, "maml-run", "--help")
    assert help_.returncode == 0, help_.stderr
    assert "== maml-run ==" in help_.stdout  # the help template of conf/hydra/help, from the wheel
    assert "algorithm: anil, fomaml, maml, mamlpp, metasgd, pretrain, reptile" in help_.stdout

    job = _run(installed, "maml-run", "--cfg", "job", "dataset=omniglot_5w1s")
    assert job.returncode == 0, job.stderr
    assert "name: omniglot" in job.stdout and "iterations: 60000" in job.stdout

    run_dir = installed["work"].parent / "run"
    trained = _run(installed, "maml-run", "train.iterations=20", "train.val_interval=10", "train.val_tasks=4",
                   "eval.num_tasks=8", "hardware=cpu", "hardware.threads=1", "report.enabled=false",
                   f"hydra.run.dir={run_dir}")
    assert trained.returncode == 0, trained.stderr[-2000:]
    import csv
    rows = list(csv.DictReader(open(run_dir / "results.csv")))
    assert len(rows) == 1 and rows[0]["iterations_done"] == "20" and rows[0]["n_tasks"] == "8"

    aggregated = _run(installed, "maml-aggregate", str(run_dir), "--out", str(installed["work"] / "agg"))
    assert aggregated.returncode == 0, aggregated.stderr
    assert (installed["work"] / "agg" / "aggregate.md").is_file()


def test_installed_maml_reproduce_composes_from_the_packaged_configs(installed):
    out = installed["work"].parent / "reproduce"
    # 70,000 paper iterations x 0.0003 = 21: the cell composes experiment=sinusoid_maml from the wheel's conf/.
    result = _run(installed, "maml-reproduce", "sinusoid", "--budget", "0.0003", "--cells", "sinusoid_maml",
                  "--out", str(out), "eval.num_tasks=8", "train.val_tasks=4", "hardware=cpu",
                  "hardware.threads=1", "report.enabled=false")
    assert result.returncode == 0, result.stderr[-2000:]
    table = (out / "table.csv").read_text()
    assert "sinusoid_maml" in table and ",done" in table

    bad = _run(installed, "maml-aggregate", str(out / "nothing-here"))
    assert bad.returncode == 2 and bad.stderr.strip().startswith("maml-aggregate: error:")
    assert len(bad.stderr.strip().splitlines()) == 1
