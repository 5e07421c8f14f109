"""Issue 15: deterministic parts of a case list, resume of finished outputs, merged timing files.

Module level (the part arithmetic, the resume check, the merge) and end to end through the real
CLI on the tiny exported model: parts run side by side, a resumed run after damage, ``--part-id
auto`` from a scheduler's variables, ``timing merge``, ``segment`` over many inputs; and the README's
cluster recipes, parsed, with every ``mcp-medsam`` option they use checked against the CLI.
"""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, SHARED, need, run_cli, segs_of
from conftest import csv_rows as rows_of
from conftest import write_case as write
from mcp_medsam.batch import CaseResult, merge_timing, write_timing
from mcp_medsam.errors import InputError, UsageError
from mcp_medsam.io.npz import segs_layout
from mcp_medsam.shards import Part, npz_output_problem, part_timing_files, part_timing_path, resolve_part

RNG = np.random.default_rng(15)
IMG = RNG.integers(0, 256, (90, 120, 3), dtype=np.uint8)
VOL = RNG.integers(0, 256, (12, 40, 50), dtype=np.uint8)






def by_case(path: Path) -> dict[str, dict]:
    rows = rows_of(path)
    cases = [r["case"] for r in rows]
    assert len(cases) == len(set(cases)), f"a case twice in {path.name}: {cases}"
    return {r["case"]: r for r in rows}




def no_traceback(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


# ---------------------------------------------------------------- the part arithmetic


@pytest.mark.parametrize("num_parts", [1, 2, 3, 4])
def test_every_case_is_in_exactly_one_part(num_parts):
    for n in range(0, 13):
        names = [f"case_{i:02d}.npz" for i in range(n)]
        shuffled = list(RNG.permutation(names))  # a listing in another order gives the same parts
        parts = [Part(num_parts, i).select(shuffled) for i in range(num_parts)]
        flat = [c for p in parts for c in p]
        assert sorted(flat) == names and len(flat) == len(set(flat)), (n, parts)
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1, sizes  # balanced
        for p in parts:
            assert p == [c for c in shuffled if c in p]  # the given order is kept
        # Round robin over the sorted list (nnU-Net's list[part_id::num_parts]).
        assert [sorted(p) for p in parts] == [names[i::num_parts] for i in range(num_parts)]


def test_part_ids_from_the_scheduler():
    assert resolve_part() == Part(1, 0)
    assert resolve_part(4, "2") == Part(4, 2) and resolve_part(4, 3) == Part(4, 3)
    assert resolve_part(4, "auto", env={"SLURM_ARRAY_TASK_ID": "3"}) == Part(4, 3)
    assert resolve_part(4, "auto", env={"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1"}) == Part(4, 3)
    assert resolve_part(4, "AUTO", env={"JOB_COMPLETION_INDEX": "0"}) == Part(4, 0)
    # SLURM's variable wins over Kubernetes' (a pod that runs inside a SLURM task is not a thing; be definite).
    assert resolve_part(4, "auto", env={"SLURM_ARRAY_TASK_ID": "1", "JOB_COMPLETION_INDEX": "2"}) == Part(4, 1)
    bad = [
        ((4, None, {}), "--num-parts 4 needs --part-id (0..3, or auto)"),
        ((4, "4", {}), "--part-id: part 4 is outside 0..3 of --num-parts 4"),
        ((4, "-1", {}), "part -1 is outside 0..3"),
        ((4, "x", {}), "--part-id 'x' is not a whole number"),
        ((0, None, {}), "--num-parts 0 must be 1 or more"),
        ((4, "auto", {}), "neither $SLURM_ARRAY_TASK_ID"),
        ((4, "auto", {"SLURM_ARRAY_TASK_ID": "7"}), "$SLURM_ARRAY_TASK_ID=7: part 7 is outside 0..3"),
        ((4, "auto", {"JOB_COMPLETION_INDEX": "a"}), "$JOB_COMPLETION_INDEX 'a' is not a whole number"),
    ]
    for (n, i, env), message in bad:
        with pytest.raises(UsageError) as err:
            resolve_part(n, i, env=env)
        assert message in str(err.value), (n, i, env, str(err.value))


def test_part_timing_files_are_named_and_found(tmp_path):
    timing = tmp_path / "timing.csv"
    assert part_timing_path(timing, Part()) == timing
    assert part_timing_path(timing, Part(4, 2)) == tmp_path / "timing.part-2-of-4.csv"
    assert part_timing_path(tmp_path / "t.x.csv", Part(2, 1)) == tmp_path / "t.x.part-1-of-2.csv"
    for name in ("timing.part-0-of-2.csv", "timing.part-1-of-2.csv", "timing.part-3-of-4.csv",
                 "timing.part-5-of-4.csv", "other.part-0-of-2.csv", "timing.part-0-of-2.csv.bak"):
        (tmp_path / name).write_text("")
    found = part_timing_files(timing)
    assert {n: sorted(p) for n, p in found.items()} == {2: [0, 1], 4: [3]}


# ---------------------------------------------------------------- the resume check


def test_the_resume_check_reads_the_whole_output(tmp_path):
    case2 = write(tmp_path / "in", "2DBox_CT_a.npz", imgs=IMG, boxes=np.array([[10, 10, 60, 50]]))
    case3 = write(tmp_path / "in", "3DBox_MR_b.npz", imgs=VOL, boxes=np.array([[5, 5, 2, 30, 30, 9]]))
    many = write(tmp_path / "in", "2DBox_CT_many.npz", imgs=IMG[:, :, 0],
                 boxes=np.array([[1, 1, 5, 5]] * 300))
    assert segs_layout(case2) == ((90, 120), np.dtype(np.uint8))
    assert segs_layout(case3) == ((12, 40, 50), np.dtype(np.uint8))
    assert segs_layout(many) == ((90, 120), np.dtype(np.uint16))
    good = write(tmp_path, "good.npz", segs=np.ones((90, 120), np.uint8))
    assert npz_output_problem(good, (90, 120), np.dtype(np.uint8)) is None
    assert "shape (90, 120) is not the case's (12, 40, 50)" in npz_output_problem(good, (12, 40, 50), None)
    assert "dtype uint8 is not uint16" in npz_output_problem(good, (90, 120), np.dtype(np.uint16))
    assert "no 'segs'" in npz_output_problem(write(tmp_path, "k.npz", gts=np.ones((90, 120), np.uint8)),
                                             (90, 120), None)
    # Truncated anywhere: the central directory gone, or a member cut short (CRC or length).
    big = write(tmp_path, "big.npz", segs=RNG.integers(0, 3, (12, 40, 50), dtype=np.uint8))
    data = big.read_bytes()
    for cut in (len(data) - 10, len(data) // 2, 30):
        t = tmp_path / f"cut{cut}.npz"
        t.write_bytes(data[:cut])
        assert "unreadable" in npz_output_problem(t, (12, 40, 50), None), cut
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF  # compressed bytes changed, size unchanged
    (tmp_path / "flip.npz").write_bytes(bytes(flipped))
    assert "unreadable" in npz_output_problem(tmp_path / "flip.npz", (12, 40, 50), None)
    with pytest.raises(InputError):
        segs_layout(tmp_path / "cut30.npz")


# ---------------------------------------------------------------- merging timing files


def test_merge_timing_needs_every_part_and_keeps_one_row_per_case(tmp_path):
    timing = tmp_path / "timing.csv"
    write_timing(timing, [CaseResult("old_case.npz", seconds=9.0)])  # a row of another run is kept
    write_timing(part_timing_path(timing, Part(3, 0)), [CaseResult("c.npz", 1.0, 1, 1), CaseResult("a.npz", 2.0)])
    write_timing(part_timing_path(timing, Part(3, 2)), [CaseResult("b.npz", 3.0, status="failed", message="bad")])
    with pytest.raises(InputError, match=r"part\(s\) 1 of 3 have written no timing file"):
        merge_timing(timing)
    assert [r["case"] for r in rows_of(timing)] == ["old_case.npz"]  # nothing merged
    write_timing(part_timing_path(timing, Part(3, 1)), [CaseResult("d.npz", 4.0, status="skipped")])
    report = merge_timing(timing, cases=["a.npz", "b.npz", "c.npz", "d.npz", "e.npz"])
    assert report.rows == 4 and report.num_parts == 3 and report.missing == ["e.npz"]
    rows = by_case(timing)
    assert list(rows) == ["a.npz", "b.npz", "c.npz", "d.npz", "old_case.npz"]  # sorted by case
    assert rows["b.npz"]["status"] == "failed" and rows["b.npz"]["message"] == "bad"
    assert rows["c.npz"]["seconds"] == "1.000" and rows["d.npz"]["status"] == "skipped"
    # A case in two part files (the folder changed between parts): a row of a run beats "skipped".
    write_timing(part_timing_path(timing, Part(3, 1)), [CaseResult("a.npz", 0.0, status="skipped")])
    merge_timing(timing)
    assert by_case(timing)["a.npz"]["status"] == "ok"
    # Part files of two splits: which one is for the caller to say.
    write_timing(part_timing_path(timing, Part(2, 0)), [CaseResult("a.npz", 5.0)])
    with pytest.raises(UsageError, match=r"2 splits .*--num-parts 2, 3"):
        merge_timing(timing)
    assert merge_timing(timing, num_parts=3).rows == 4
    with pytest.raises(InputError, match="no part timing files"):
        merge_timing(tmp_path / "elsewhere.csv")


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("in")
    for i in range(4):
        write(d, f"2DBox_CT_{i}.npz", imgs=np.roll(IMG, 7 * i, axis=1), boxes=np.array([[10, 10, 60, 50]]))
    write(d, "2DBox_XRay_grey.npz", imgs=IMG[:, :, 0], boxes=np.array([[5, 5, 80, 70], [20, 20, 40, 60]]))
    write(d, "3DBox_MR_b.npz", imgs=VOL, boxes=np.array([[5, 5, 2, 30, 30, 9]]))
    write(d, "3DBox_PET_c.npz", imgs=VOL[::-1], boxes=np.array([[10, 5, 0, 40, 35, 11]]))
    (d / "2DBox_CT_broken.npz").write_bytes(b"not a zip file")
    return d


def predict(*args: str, weights: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return no_traceback(run_cli("predict", *args, "--weights", str(weights), "--threads", "1", env=env))


@pytest.fixture(scope="module")
def reference(inputs, tiny_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    proc = predict("-i", str(inputs), "-o", str(out), weights=tiny_export)
    assert proc.returncode == 1, proc.stderr  # the broken case
    return out


def test_parts_side_by_side_cover_every_case_once_and_merge_by_themselves(inputs, tiny_export, reference, tmp_path):
    out, n = tmp_path / "out", 3
    procs = [subprocess.Popen([sys.executable, "-m", "mcp_medsam", "predict", "-i", str(inputs), "-o", str(out),
                               "--weights", str(tiny_export), "--threads", "1", "--num-parts", str(n),
                               "--part-id", str(i)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, encoding="utf-8") for i in range(n)]
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert "Traceback" not in err, err
        errs.append((p.returncode, err))
    names = sorted(p.name for p in inputs.glob("*.npz"))
    parts = [by_case(out / f"timing.part-{i}-of-{n}.csv") for i in range(n)]
    assert [sorted(p) for p in parts] == [names[i::n] for i in range(n)]  # each its share, disjoint
    # The part holding the broken case exits 1, the others 0; the last to finish wrote timing.csv.
    assert sorted(rc for rc, _ in errs) == [0, 0, 1]
    assert sum("every part's rows are in" in e for _, e in errs) >= 1
    merged = by_case(out / "timing.csv")
    assert list(merged) == names
    assert merged["2DBox_CT_broken.npz"]["status"] == "failed"
    assert all(r["status"] == "ok" for c, r in merged.items() if c != "2DBox_CT_broken.npz")
    ref = segs_of(reference)
    got = segs_of(out)
    assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) and got[k].dtype == ref[k].dtype
                                            for k in ref)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    # By hand, the same file again; with --input, a case without a row is named.
    before = (out / "timing.csv").read_text()
    proc = no_traceback(run_cli("timing", "merge", str(out), "--input", str(inputs)))
    assert proc.returncode == 0 and f"{len(names)} rows from 3 parts" in proc.stdout, proc.stderr
    assert (out / "timing.csv").read_text() == before


def test_more_parts_than_cases_and_merge_errors(inputs, tiny_export, tmp_path):
    one = tmp_path / "one"
    write(one, "2DBox_CT_only.npz", imgs=IMG, boxes=np.array([[10, 10, 60, 50]]))
    out = tmp_path / "out"
    proc = predict("-i", str(one), "-o", str(out), "--num-parts", "2", "--part-id", "1", weights=tiny_export)
    assert proc.returncode == 0 and "part 1 of 2 has no cases (1 in all)" in proc.stderr, proc.stderr
    assert rows_of(out / "timing.part-1-of-2.csv") == [] and not (out / "timing.csv").exists()
    proc = no_traceback(run_cli("timing", "merge", str(out)))
    assert proc.returncode == 1 and "error: part(s) 0 of 2 have written no timing file" in proc.stderr
    proc = predict("-i", str(one), "-o", str(out), "--num-parts", "2", "--part-id", "0", weights=tiny_export)
    assert proc.returncode == 0 and "every part's rows are in" in proc.stderr
    assert list(by_case(out / "timing.csv")) == ["2DBox_CT_only.npz"]
    proc = no_traceback(run_cli("timing", "merge", str(out), "--input", str(inputs)))
    assert proc.returncode == 1 and "case(s) of" in proc.stderr and "have no row yet" in proc.stderr
    assert no_traceback(run_cli("timing", "merge")).returncode == 2


@pytest.mark.parametrize("args,env,message", [
    (["--num-parts", "3"], {}, "--num-parts 3 needs --part-id"),
    (["--num-parts", "3", "--part-id", "3"], {}, "part 3 is outside 0..2"),
    (["--num-parts", "3", "--part-id", "auto"], {"SLURM_ARRAY_TASK_ID": "", "JOB_COMPLETION_INDEX": ""},
     "neither $SLURM_ARRAY_TASK_ID"),
    (["--dask", "local:zero"], {}, "local:N needs a number of workers"),
])
def test_bad_part_options_are_usage_errors(inputs, tiny_export, tmp_path, args, env, message):
    proc = predict("-i", str(inputs), "-o", str(tmp_path / "o"), *args, weights=tiny_export, env=env)
    assert proc.returncode == 2, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert not (tmp_path / "o").exists()  # refused before anything was written


@pytest.mark.parametrize("var,value,base", [("SLURM_ARRAY_TASK_ID", "2", {"SLURM_ARRAY_TASK_MIN": "1"}),
                                            ("JOB_COMPLETION_INDEX", "1", {})])
def test_part_id_auto_from_slurm_or_kubernetes(inputs, tiny_export, tmp_path, var, value, base):
    env = {"SLURM_ARRAY_TASK_ID": "", "JOB_COMPLETION_INDEX": "", "SLURM_ARRAY_TASK_MIN": "", **base, var: value}
    out = tmp_path / "out"
    proc = predict("-i", str(inputs), "-o", str(out), "--num-parts", "4", "--part-id", "auto", weights=tiny_export,
                   env=env)
    names = sorted(p.name for p in inputs.glob("*.npz"))
    assert sorted(by_case(out / "timing.part-1-of-4.csv")) == names[1::4], proc.stderr
    assert sorted(p.name for p in out.glob("*.npz")) == [n for n in names[1::4] if "broken" not in n]


def test_resume_keeps_finished_cases_and_redoes_damaged_ones(inputs, tiny_export, reference, tmp_path):
    out = tmp_path / "out"
    predict("-i", str(inputs), "-o", str(out), weights=tiny_export)
    first = by_case(out / "timing.csv")
    done = sorted(c for c, r in first.items() if r["status"] == "ok")
    assert len(done) == 7
    truncated, wrong, removed, intact = done[0], done[3], done[4], done[6]  # 2D, 2D, 2D grey, 3D
    (out / truncated).write_bytes((out / truncated).read_bytes()[:-40])
    np.savez_compressed(out / wrong, segs=np.zeros((3, 3), np.uint8))  # whole, but not this case's shape
    (out / removed).unlink()
    before = {c: (out / c).stat().st_mtime_ns for c in done if c not in (truncated, wrong, removed)}
    proc = predict("-i", str(inputs), "-o", str(out), "--skip-existing", weights=tiny_export)
    assert proc.returncode == 1, proc.stderr  # the broken case still fails
    assert "8 cases: 3 segmented, 4 kept from an earlier run, 1 failed" in proc.stderr, proc.stderr
    rows = by_case(out / "timing.csv")
    for c in before:
        assert rows[c]["status"] == "skipped" and "earlier run kept" in rows[c]["message"], rows[c]
        assert (rows[c]["seconds"], rows[c]["boxes"], rows[c]["slices"]) == \
            (first[c]["seconds"], first[c]["boxes"], first[c]["slices"])  # the earlier run's figures
        assert (out / c).stat().st_mtime_ns == before[c]  # not written again
    assert rows[intact]["slices"] == "12"
    for name, why in ((truncated, "unreadable"), (wrong, "its shape (3, 3) is not the case's (90, 120)")):
        assert rows[name]["status"] == "ok" and why in rows[name]["message"], rows[name]
        assert f"{name}: note: {name} exists but" in proc.stderr
    assert rows[removed]["status"] == "ok" and rows[removed]["message"] == ""
    assert rows["2DBox_CT_broken.npz"]["status"] == "failed"
    ref, got = segs_of(reference), segs_of(out)
    assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in ref)
    # Everything done: a second resume runs no case and exits 0 once the broken case is gone.
    (tmp_path / "in2").mkdir()
    for p in inputs.glob("2DBox_CT_[0-9].npz"):
        (tmp_path / "in2" / p.name).write_bytes(p.read_bytes())
    proc = predict("-i", str(tmp_path / "in2"), "-o", str(out), "--skip-existing", weights=tiny_export)
    assert proc.returncode == 0 and "4 cases: 0 segmented, 4 kept from an earlier run, 0 failed" in proc.stderr, \
        proc.stderr


def test_segment_over_many_inputs_takes_parts_and_resumes(tiny_export, tmp_path):
    formats = need(SHARED / "data" / "formats")
    pictures = sorted([*formats.glob("png/*_image.png"), *formats.glob("bmp/*_image.bmp"),
                       *formats.glob("jpg/*_image.jpg")], key=str)
    if len(pictures) < 2:
        pytest.skip("fewer than two 2D pictures in the formats data")
    out = tmp_path / "seg"
    common = ["-o", str(out), "-m", "XRay", "--box", "20,20,120,120", "--weights", str(tiny_export), "--threads", "1"]
    paths = [str(p) for p in pictures]
    for i in range(2):
        proc = no_traceback(run_cli("segment", *paths, *common, "--num-parts", "2", "--part-id", str(i)))
        assert proc.returncode == 0, proc.stderr
        ran = [ln.split(" -> ")[0] for ln in proc.stdout.splitlines() if " -> " in ln]
        assert ran == paths[i::2]
    written = sorted(out.iterdir())
    assert len(written) == len(pictures)
    damaged = written[0]
    damaged.write_bytes(damaged.read_bytes()[:100])
    kept = {p: p.stat().st_mtime_ns for p in written[1:]}
    proc = no_traceback(run_cli("segment", *paths, *common, "--skip-existing"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("(kept from an earlier run)") == len(pictures) - 1
    assert f"{damaged.name} exists but" in proc.stderr
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    assert damaged.stat().st_size > 100


# ---------------------------------------------------------------- the README's recipes


def _recipes() -> str:
    """The README's recipes: from the SLURM job array to the end of that section."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("### Archives beyond one machine")
    return text[text.index("**A SLURM job array**", start):text.index("\n### ", start + 10)]


def _cli_options() -> dict[str, set[str]]:
    """Every command path of the CLI ("predict", "timing merge", ...) and its option names."""
    import typer

    from mcp_medsam.cli import cli

    found: dict[str, set[str]] = {}

    def walk(cmd, path: str) -> None:
        if hasattr(cmd, "commands"):  # a group (typer's own click or click itself)
            for name, sub in cmd.commands.items():
                walk(sub, f"{path} {name}".strip())
        else:
            found[path] = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}

    walk(typer.main.get_command(cli), "")
    return found


def _check_invocation(argv: list[str], options: dict[str, set[str]]) -> None:
    assert argv[0] == "mcp-medsam", argv
    words = [w for w in argv[1:] if not w.startswith("-")]
    command = next((" ".join(words[:k]) for k in (2, 1) if " ".join(words[:k]) in options), None)
    assert command is not None, f"no such command: {argv}"
    for word in argv[1:]:
        if word.startswith("-"):
            assert word.split("=")[0] in options[command], f"mcp-medsam {command} has no option {word}"


def test_the_readme_recipes_parse_and_use_real_options():
    import yaml

    section = _recipes()
    options = _cli_options()
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)
    kinds = [k for k, _ in blocks]
    assert kinds.count("yaml") == 1 and kinds.count("python") == 1 and kinds.count("sh") == 2, kinds
    checked = 0
    for kind, body in blocks:
        if kind == "sh":
            assert subprocess.run(["bash", "-n"], input=body, text=True, encoding="utf-8").returncode == 0, body
            for line in body.replace("\\\n", " ").splitlines():
                argv = shlex.split(line, comments=True)
                if argv and argv[0] == "mcp-medsam":
                    _check_invocation(argv, options)
                    checked += 1
        elif kind == "yaml":
            job = yaml.safe_load(body)
            assert job["kind"] == "Job" and job["spec"]["completionMode"] == "Indexed"
            assert job["spec"]["parallelism"] == job["spec"]["completions"] == 16
            container = job["spec"]["template"]["spec"]["containers"][0]
            argv = container["command"]
            _check_invocation(argv, options)
            assert argv[argv.index("--num-parts") + 1] == "16" and argv[argv.index("--part-id") + 1] == "auto"
            assert job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["containerName"] == container["name"]
            checked += 1
        elif kind == "python":
            tree = ast.parse(body)
            lists = [n for n in ast.walk(tree) if isinstance(n, ast.List) and n.elts
                     and isinstance(n.elts[0], ast.Constant) and n.elts[0].value == "mcp-medsam"]
            assert lists, body
            for node in lists:
                argv = [e.value if isinstance(e, ast.Constant) else "VALUE" for e in node.elts]
                _check_invocation(argv, options)
                checked += 1
    assert checked == 4  # SLURM array, Indexed Job, dask-jobqueue, dask.sh
    # The options the recipes lean on exist on the dask command line too (distributed is the dask extra).
    help_text = subprocess.run([sys.executable, "-m", "dask", "worker", "--help"], capture_output=True,
                               text=True, encoding="utf-8").stdout
    assert "--scheduler-file" in help_text and "--nthreads" in help_text
