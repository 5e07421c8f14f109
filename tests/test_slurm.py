"""The README's cluster recipes on a real SLURM (a single node: tests/slurm/start.sh, which .ci/run
calls): the job array with ``--part-id auto`` and the dask-jobqueue ``SLURMCluster``. Each recipe runs
as the README writes it, with only the paths (venv, input, output), the weights (the tiny test model)
and the sizes (array length, parts, jobs, memory) put in; then every case has exactly one row, the
timing CSV is merged, and the outputs are bit-identical to one process's.

Skips, saying why, where SLURM is not installed or does not start (not root, no slurm-wlm/munge)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, SAMPLE, csv_rows, need, run_cli, segs_of

pytestmark = pytest.mark.slow

README = REPO / "README.md"
START = REPO / "tests" / "slurm" / "start.sh"
CASES = ("2DBox_XRay_Montgomery_MCUCXR-0001-0.npz", "2DBox_US_HC18_000.npz", "3DBox_PET_STS_STS-001.npz",
         "3DBox_PET_STS_STS-002.npz", "2DBox_Dermoscopy_PH2_IMD003.npz")
VENV_ACTIVATE = "source /shared/venvs/mcp-medsam/bin/activate"


def readme_block(after: str, language: str) -> str:
    """The first fenced block of ``language`` after the paragraph that starts with ``after``."""
    text = README.read_text(encoding="utf-8")
    start = text.index(after)
    m = re.compile(rf"```{language}\n(.*?)```", flags=re.S).search(text, start)
    assert m is not None, after
    return m.group(1)


@pytest.fixture(scope="module")
def slurm() -> str:
    """SLURM's version once the node takes jobs (started by tests/slurm/start.sh if need be)."""
    if shutil.which("sbatch") is None:
        pytest.skip("SLURM is not installed (apt-get install slurm-wlm munge; .ci/run does it)")
    proc = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.skip(proc.stdout.strip() or proc.stderr.strip())
    return subprocess.run(["sinfo", "-V"], capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def cases(tmp_path_factory, tiny_export) -> tuple[Path, dict[str, np.ndarray]]:
    """(input folder, the labels one process writes for it)."""
    root = tmp_path_factory.mktemp("slurm-cases")
    inputs = root / "imgs"
    inputs.mkdir()
    for name in CASES:
        shutil.copy(need(SAMPLE / "imgs" / name), inputs / name)
    proc = run_cli("predict", "-i", str(inputs), "-o", str(root / "one"), "--weights", str(tiny_export))
    assert proc.returncode == 0, proc.stderr
    return inputs, segs_of(root / "one")


def _activate() -> str:
    return f"source {Path(sys.prefix) / 'bin' / 'activate'}"


def _check(out: Path, reference: dict[str, np.ndarray]) -> None:
    rows = csv_rows(out / "timing.csv")
    assert sorted(r["case"] for r in rows) == sorted(CASES)  # every case exactly once
    assert all(r["status"] == "ok" for r in rows), rows
    got = segs_of(out)
    assert got.keys() == reference.keys() and all(np.array_equal(got[k], reference[k]) for k in reference)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp file left


def test_readme_job_array_runs_every_case_once(slurm, cases, tiny_export, tmp_path):
    inputs, reference = cases
    parts = 3
    script = readme_block("**A SLURM job array**", "sh")
    for old, new in ((VENV_ACTIVATE, _activate()), ("/shared/archive/imgs", str(inputs)),
                     ("/shared/archive/segs", str(tmp_path / "segs")), ("--array=0-15", f"--array=0-{parts - 1}"),
                     ("--num-parts 16", f"--num-parts {parts} --weights {tiny_export}"),
                     ("--cpus-per-task=2", "--cpus-per-task=1"), ("--mem=8G", "--mem=1G")):
        assert old in script, old
        script = script.replace(old, new)
    (tmp_path / "job.sh").write_text(script)
    proc = subprocess.run(["sbatch", "--wait", "--output", str(tmp_path / "part-%a.out"), str(tmp_path / "job.sh")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("part-*.out")))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    assert len(list(tmp_path.glob("part-*.out"))) == parts  # one task per part ran
    out = tmp_path / "segs"
    assert sorted(p.name for p in out.glob("timing.part-*-of-3.csv")) == [f"timing.part-{i}-of-3.csv"
                                                                           for i in range(parts)]
    assert "every part's rows are in" in logs  # the last part merged the timing files
    _check(out, reference)


def test_readme_dask_jobqueue_recipe_runs_every_case_once(slurm, cases, tiny_export, tmp_path):
    pytest.importorskip("dask_jobqueue", reason="dask-jobqueue is not installed (dev extra)")
    inputs, reference = cases
    script = readme_block("**A Dask cluster on SLURM**", "python")
    for old, new in ((VENV_ACTIVATE, _activate()), ("/shared/archive/imgs", str(inputs)),
                     ("/shared/archive/segs", str(tmp_path / "segs")), ("scale(jobs=32)", "scale(jobs=2)"),
                     ('"--skip-existing"]', f'"--skip-existing", "--weights", {str(tiny_export)!r}]'),
                     ('memory="4GB"', 'memory="2GB"')):
        assert old in script, old
        script = script.replace(old, new)
    (tmp_path / "recipe.py").write_text(script)
    proc = subprocess.run([sys.executable, str(tmp_path / "recipe.py")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "5 cases: 5 segmented, 0 kept from an earlier run, 0 failed in " in proc.stderr, proc.stderr[-3000:]
    _check(tmp_path / "segs", reference)
    # The workers were SLURM jobs: dask-jobqueue's job name, and none is left behind.
    queue = subprocess.run(["squeue", "-h", "-n", "dask-worker", "-t", "PD,R"], capture_output=True, text=True).stdout
    assert queue.strip() == "", queue
