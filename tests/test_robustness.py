"""Issue 11: never lose, corrupt or silently change a result; no traceback for a problem of the user's making.

Each numbered defect of the issue is reproduced here and shown fixed, through the real CLI (a
fresh interpreter per run) on the tiny exported model, or at module level where the defect lives
in one function (the NPZ reader, box checks). Every CLI run asserts that no traceback is printed.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_cli, segs_of, tiny_checkpoint
from conftest import write_case as write
from mcp_medsam import InputError
from mcp_medsam.errors import TooLarge
from mcp_medsam.io.atomic import atomic_file, remove_stale_temps
from mcp_medsam.io.npz import load_case
from mcp_medsam.manifest import file_records
from mcp_medsam.preprocess import resized_shape

RNG = np.random.default_rng(0)
IMG = RNG.integers(0, 256, (90, 120, 3), dtype=np.uint8)
VOL = RNG.integers(0, 256, (12, 40, 50), dtype=np.uint8)




@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("in")
    write(d, "2DBox_CT_a.npz", imgs=IMG, boxes=np.array([[10, 10, 60, 50], [40, 30, 100, 80]]))
    write(d, "3DBox_MR_b.npz", imgs=VOL, boxes=np.array([[5, 5, 2, 30, 30, 9]]))
    return d


def predict(*args: str, weights: Path, cache: Path | None = None) -> subprocess.CompletedProcess:
    extra = ["--cache-dir", str(cache)] if cache is not None else []
    return run_cli("predict", *args, "--weights", str(weights), "--threads", "1", *extra)


def one_error(proc: subprocess.CompletedProcess, *fragments: str, status: int = 1) -> str:
    """The run failed with exactly one 'error:' line holding every fragment, and no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == status, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for f in fragments:
        assert f in errors[0], (f, errors[0])
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}




def timing_rows(path: Path) -> dict[str, dict]:
    with open(path) as f:
        return {r["case"]: r for r in csv.DictReader(f)}


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot create files in (root ignores modes: then a sysfs folder)."""
    if os.geteuid() != 0:
        d = tmp_path / "read-only"
        d.mkdir()
        d.chmod(0o555)
        return d
    d = Path("/sys/kernel")
    try:
        fd, probe = tempfile.mkstemp(dir=d)
    except OSError:
        return d
    os.close(fd)
    os.unlink(probe)
    pytest.skip("no folder here that root cannot write")


# ---------------------------------------------------------------- 1: inputs destroyed


@pytest.mark.parametrize("where", ["same", "inside", "around", "symlink"])
def test_1_output_folder_at_the_inputs_is_refused_before_the_model_loads(tmp_path, where):
    inp = tmp_path / "cases"
    write(inp, "2DBox_CT_a.npz", imgs=IMG, boxes=np.array([[10, 10, 60, 50]]))
    before = snapshot(inp)
    out = {"same": inp, "inside": inp / "out", "around": tmp_path, "symlink": tmp_path / "link"}[where]
    if where == "symlink":
        out.symlink_to(inp)
    # A weights folder that does not exist: the output check must come first (before the model loads).
    proc = predict("-i", str(inp), "-o", str(out), weights=tmp_path / "no-such-model")
    one_error(proc, "choose a folder outside it" if where in ("inside", "around") else "is the input folder")
    assert "manifest" not in proc.stderr
    assert snapshot(inp) == before  # the inputs are untouched


# ---------------------------------------------------------------- 6: output and input path problems


def test_6_output_and_input_path_problems_are_one_line(tmp_path, inputs, tiny_export):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [
        (["-o", str(a_file)], "is a file, not a folder"),
        (["-o", str(a_file / "sub")], f"cannot be created: {a_file} is a file"),
        (["-o", str(unwritable_folder(tmp_path))], "is not writable"),
        (["-o", str(tmp_path / "o"), "--timing", str(tmp_path)], "timing file"),
        (["-o", str(tmp_path / "o"), "--timing", str(inputs / "t.csv")], "is inside the input folder"),
        (["-o", str(tmp_path / "o"), "--overlays", str(a_file / "png")], "overlays folder"),
        (["-o", str(tmp_path / "o"), "--max-image-mb", "0"], "--max-image-mb 0"),
    ]
    for args, fragment in cases:
        one_error(predict("-i", str(inputs), *args, weights=tiny_export), fragment)
    one_error(predict("-i", str(a_file), "-o", str(tmp_path / "o"), weights=tiny_export), "is a file, not a folder")
    one_error(predict("-i", str(tmp_path / "nothing"), "-o", str(tmp_path / "o"), weights=tiny_export),
              "does not exist")


# ---------------------------------------------------------------- 6: broken weights folders


def _flip(path: Path, offset: int, n: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def _edit_manifest(folder: Path, change) -> None:
    path = folder / "manifest.json"
    m = json.loads(path.read_text())
    m = change(m)
    path.write_text(json.dumps(m))


def _drop_hashes(m):
    m.pop("files", None)
    return m


def _outside(m):
    m["graphs"]["decoder"]["files"]["openvino"] = "../elsewhere/decoder.xml"
    return m


BROKEN = {
    "bin missing": (lambda w: (w / "decoder.bin").unlink(), "decoder.bin: the weights of decoder.xml are missing"),
    "bin truncated": (lambda w: os.truncate(w / "decoder.bin", 1000), "decoder.bin: 1000 bytes, manifest.json records"),
    "xml truncated": (lambda w: os.truncate(w / "image_encoder.xml", 5000), "image_encoder.xml: 5000 bytes"),
    "xml truncated, no hashes": (lambda w: (os.truncate(w / "image_encoder.xml", 5000),
                                            _edit_manifest(w, _drop_hashes)),
                                 "image_encoder.xml: OpenVINO cannot load this graph (Start-end tags mismatch"),
    "bin truncated, no hashes": (lambda w: (os.truncate(w / "decoder.bin", 1000), _edit_manifest(w, _drop_hashes)),
                                 "decoder.xml: OpenVINO cannot load this graph (Incorrect weights in bin file"),
    "graph outside": (lambda w: _edit_manifest(w, _outside), "'../elsewhere/decoder.xml' is not a plain file name"),
    "manifest []": (lambda w: (w / "manifest.json").write_text("[]"), "malformed manifest (a JSON list"),
    "manifest garbage": (lambda w: (w / "manifest.json").write_bytes(b"\xff\xfe{"), "malformed manifest"),
    # 3: 64 KiB flipped in decoder.bin gave every mask empty with exit 0.
    "64 KiB flipped": (lambda w: _flip(w / "decoder.bin", 100_000, 65536),
                       "decoder.bin: sha256 differs from manifest.json"),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_3_6_broken_weights_folders_are_one_line_naming_the_file(tmp_path, inputs, tiny_export, kind):
    weights = tmp_path / "weights"
    shutil.copytree(tiny_export, weights)
    damage, fragment = BROKEN[kind]
    damage(weights)
    proc = predict("-i", str(inputs), "-o", str(tmp_path / "out"), weights=weights, cache=tmp_path / "cache")
    one_error(proc, fragment)
    assert not list((tmp_path / "out").glob("*.npz"))


def test_3_nan_weights_fail_every_case_loudly(tmp_path, inputs, tiny_export):
    """NaN written into image_encoder.bin (hashes recorded afresh, as a bad export would): every case
    fails naming the graph, nothing is written, exit 1 (before: empty masks, exit 0)."""
    weights = tmp_path / "weights"
    shutil.copytree(tiny_export, weights)
    xml = (weights / "image_encoder.xml").read_text()
    consts = [(int(s), int(o)) for o, s in re.findall(r'element_type="f32" shape="[^"]*" offset="(\d+)" size="(\d+)"',
                                                       xml)]
    size, offset = max(consts)
    with open(weights / "image_encoder.bin", "r+b") as f:
        f.seek(offset)
        f.write(np.full(size // 4, np.nan, np.float32).tobytes())
    _edit_manifest(weights, lambda m: {**m, "files": file_records(weights)})
    proc = predict("-i", str(inputs), "-o", str(tmp_path / "out"), weights=weights, cache=tmp_path / "cache")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    failed = [ln for ln in proc.stderr.splitlines() if ": failed: " in ln]
    assert len(failed) == 2 and all("image_encoder graph" in ln and "NaN or infinite" in ln for ln in failed)
    assert not list((tmp_path / "out").glob("*.npz"))


# ---------------------------------------------------------------- 2 and 3: stale or damaged compiled models


@pytest.fixture(scope="module")
def second_export(tmp_path_factory) -> Path:
    """Another tiny model (other random weights, same architecture: same IR layout)."""
    from mcp_medsam_torch.exporter import ExportConfig, export_model

    tmp = tmp_path_factory.mktemp("tiny-b")
    return export_model(ExportConfig(out=tmp / "weights", checkpoint=tiny_checkpoint(tmp / "b.pth", seed=1)))


@pytest.fixture(scope="module")
def references(inputs, tiny_export, second_export, tmp_path_factory):
    """Each model's segs of the inputs, each from a fresh cache of its own."""
    refs = {}
    for key, weights in (("a", tiny_export), ("b", second_export)):
        out = tmp_path_factory.mktemp(f"ref-{key}")
        proc = predict("-i", str(inputs), "-o", str(out), weights=weights, cache=out / "cache")
        assert proc.returncode == 0, proc.stderr
        refs[key] = segs_of(out)
    assert any((refs["a"][n] != refs["b"][n]).any() for n in refs["a"])  # the two models differ
    return refs


def _same(segs: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> bool:
    return segs.keys() == ref.keys() and all(np.array_equal(segs[n], ref[n]) for n in ref)


def test_2_a_reexport_into_a_warm_folder_is_picked_up(tmp_path, inputs, tiny_export, second_export, references):
    weights, cache = tmp_path / "weights", tmp_path / "cache"
    shutil.copytree(tiny_export, weights)

    def run(tag: str) -> dict[str, np.ndarray]:
        proc = predict("-i", str(inputs), "-o", str(tmp_path / tag), weights=weights, cache=cache)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        return segs_of(tmp_path / tag)

    assert _same(run("warm-1"), references["a"]) and _same(run("warm-2"), references["a"])  # the cache is warm
    # Only the weights change (the .bin files and their records); the .xml files and their mtimes stay:
    # OpenVINO's own cache key (graph path + .xml timestamp) does not see it.
    xml_times = {x: os.stat(weights / x).st_mtime_ns for x in ("image_encoder.xml", "decoder.xml")}

    def swap_bins(src: Path) -> None:
        records = json.loads((src / "manifest.json").read_text())["files"]
        for name in ("image_encoder.bin", "decoder.bin"):
            shutil.copyfile(src / name, weights / name)
        _edit_manifest(weights, lambda m: {**m, "files": {**m["files"], **{n: records[n] for n in
                                                                         ("image_encoder.bin", "decoder.bin")}}})
        for x, t in xml_times.items():
            os.utime(weights / x, ns=(t, t))

    swap_bins(second_export)
    assert _same(run("swapped"), references["b"])  # before the fix: the old model's masks
    swap_bins(tiny_export)
    assert _same(run("restored"), references["a"])  # before the fix: the damaged model stayed cached
    # A whole re-export into the same, warm folder.
    from mcp_medsam_torch.exporter import ExportConfig, export_model

    export_model(ExportConfig(out=weights, checkpoint=tiny_checkpoint(tmp_path / "b.pth", seed=1)))
    assert _same(run("reexported"), references["b"])
    # One compiled-model folder per set of graph files: the first model, its .xml with the second's .bin, the second.
    assert len(list(cache.glob("model-*"))) == 3


def test_3_a_damaged_cache_blob_is_recompiled(tmp_path, inputs, tiny_export, references):
    weights, cache = tmp_path / "weights", tmp_path / "cache"
    shutil.copytree(tiny_export, weights)
    proc = predict("-i", str(inputs), "-o", str(tmp_path / "o1"), weights=weights, cache=cache)
    assert proc.returncode == 0, proc.stderr
    blobs = sorted(cache.glob("model-*/*.blob"))
    assert blobs
    damaged = {}
    for b in blobs:  # 512 bytes flipped, size unchanged
        b.chmod(0o644)
        _flip(b, b.stat().st_size // 2, 512)
        damaged[b] = b.read_bytes()
    proc = predict("-i", str(inputs), "-o", str(tmp_path / "o2"), weights=weights, cache=cache)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert _same(segs_of(tmp_path / "o2"), references["a"])
    assert all(not b.exists() or b.read_bytes() != data for b, data in damaged.items())


def test_verify_weights_command(tmp_path, tiny_export):
    proc = run_cli("verify-weights", str(tiny_export))
    assert proc.returncode == 0, proc.stderr
    assert "decoder.bin: ok" in proc.stdout and "all 6 recorded files match" in proc.stdout
    weights = tmp_path / "weights"
    shutil.copytree(tiny_export, weights)
    _flip(weights / "image_encoder.bin", 1000, 16)
    proc = run_cli("verify-weights", str(weights))
    one_error(proc, "1 problem(s) in 6 recorded file(s)")
    assert "image_encoder.bin: SHA256 MISMATCH" in proc.stdout
    _edit_manifest(weights, _drop_hashes)
    one_error(run_cli("verify-weights", str(weights)), "problem(s)")
    one_error(run_cli("verify-weights", str(tmp_path / "none")), "no manifest.json")


def test_the_bundled_weights_record_their_hashes():
    proc = run_cli("verify-weights")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "image_encoder.bin: ok" in proc.stdout and "decoder.bin: ok" in proc.stdout


# ---------------------------------------------------------------- 4: unbounded decompression


def _bomb(path: Path, *, boxes=((10, 10, 60, 50),), lie: bool = False) -> Path:
    """A 64 MiB member of zeros in a few hundred KB. lie: its npy header declares a 10x10 image."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("boxes.npy", "w") as f:
            np.lib.format.write_array(f, np.array(boxes))
        with zf.open("imgs.npy", "w", force_zip64=True) as f:
            shape = (10, 10) if lie else (8192, 8192)
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            zeros = bytes(1 << 20)
            for _ in range(64):
                f.write(zeros)
    return path


@pytest.mark.parametrize("variant", ["over the limit", "bad boxes first", "header lies"])
def test_4_a_decompression_bomb_is_refused_from_its_header(tmp_path, variant):
    boxes = {"over the limit": (10, 10, 60, 50), "bad boxes first": (60, 10, 10, 50), "header lies": (1, 1, 5, 5)}
    path = _bomb(tmp_path / "2DBox_CT_bomb.npz", boxes=(boxes[variant],), lie=variant == "header lies")
    assert path.stat().st_size < 1 << 20
    message = {"over the limit": "imgs is 64.0 MiB when decompressed (shape (8192, 8192), uint8); "
                                 "the limit is 16.0 MiB",
               "bad boxes first": "is inverted", "header lies": "imgs holds more data than its npy header declares"}
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as err:
            load_case(path, max_image_bytes=16 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert message[variant] in str(err.value)
    assert isinstance(err.value, TooLarge) == (variant == "over the limit")  # the service answers 413 for it
    assert peak < 4 << 20, f"peak {peak / 2 ** 20:.1f} MiB while refusing a 64 MiB member"


def test_4_the_image_limit_through_the_cli(tmp_path, tiny_export):
    inp = tmp_path / "in"
    inp.mkdir()
    _bomb(inp / "2DBox_CT_bomb.npz")
    write(inp, "2DBox_CT_a.npz", imgs=IMG, boxes=np.array([[10, 10, 60, 50]]))
    proc = predict("-i", str(inp), "-o", str(tmp_path / "out"), "--max-image-mb", "16", weights=tiny_export)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    rows = timing_rows(tmp_path / "out" / "timing.csv")
    assert rows["2DBox_CT_a.npz"]["status"] == "ok"
    assert rows["2DBox_CT_bomb.npz"]["status"] == "failed"
    assert "64.0 MiB when decompressed" in rows["2DBox_CT_bomb.npz"]["message"]
    assert "--max-image-mb" in rows["2DBox_CT_bomb.npz"]["message"]


# ---------------------------------------------------------------- 5: SIGTERM / SIGINT, stale temp files


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_5_a_signal_ends_the_run_cleanly(tmp_path, tiny_export, sig):
    inp, out = tmp_path / "in", tmp_path / "out"
    vol = RNG.integers(0, 256, (80, 256, 256), dtype=np.uint8)
    for i in range(8):
        write(inp, f"3DBox_CT_{i}.npz", imgs=vol, boxes=np.array([[5, 5, 0, 200, 200, 79], [20, 20, 5, 120, 150, 70]]))
    proc = subprocess.Popen([sys.executable, "-m", "mcp_medsam", "predict", "-i", str(inp), "-o", str(out),
                             "--weights", str(tiny_export), "--threads", "1", "--cache-dir", str(tmp_path / "c")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")
    deadline = time.monotonic() + 300
    while not list(out.glob("*.npz")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)  # polling for the first output, not a timing assertion
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    assert "Traceback" not in stderr, stderr
    assert proc.returncode == 128 + sig, stderr
    error = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(error) == 1 and f"interrupted by {signal.Signals(sig).name}" in error[0]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp file left
    rows = timing_rows(out / "timing.csv")
    written = {p.name for p in out.glob("*.npz")}
    assert 1 <= len(written) < 8 and set(rows) == written and all(r["status"] == "ok" for r in rows.values())
    for name in written:
        with np.load(out / name) as d:
            assert d["segs"].shape == vol.shape


def test_5_stale_temp_files_are_removed_at_start_live_ones_kept(tmp_path, inputs, tiny_export):
    out = tmp_path / "out"
    out.mkdir()
    stale = [out / ".2DBox_CT_a.npz.k2j4h6g8.mcp-medsam.tmp", out / ".3DBox_MR_b.npz.abcd1234.tmp",  # old form
             out / ".timing.csv.zz99yy88.mcp-medsam.tmp"]
    for p in stale:
        p.write_bytes(b"half a result")
    live = out / ".2DBox_CT_x.npz.livelive.mcp-medsam.tmp"
    other = out / ".someone-elses.tmp"
    other.write_text("not ours")
    with open(live, "wb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # a concurrent run writing it
        proc = predict("-i", str(inputs), "-o", str(out), weights=tiny_export)
        assert proc.returncode == 0, proc.stderr
        assert live.exists()
    assert not any(p.exists() for p in stale) and other.exists()


def test_atomic_file_is_never_taken_for_stale(tmp_path):
    target = tmp_path / "x.npz"
    with atomic_file(target) as f:
        f.write(b"data")
        assert remove_stale_temps(tmp_path) == []  # in flight: locked
        assert len([p for p in tmp_path.iterdir() if p.name.startswith(".x.npz.")]) == 1
    assert target.read_bytes() == b"data" and [p.name for p in tmp_path.iterdir()] == ["x.npz"]


# ---------------------------------------------------------------- 7: specific messages


def test_7_a_member_that_is_not_an_npy_array(tmp_path):
    path = tmp_path / "2DBox_CT_x.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("imgs.npy", b"just some bytes")
        with zf.open("boxes.npy", "w") as f:
            np.lib.format.write_array(f, np.array([[1, 1, 5, 5]]))
    with pytest.raises(InputError, match=r"imgs is not an npy array \(the archive member imgs.npy holds 15 bytes"):
        load_case(path)


def test_7_a_truncated_member(tmp_path):
    path = tmp_path / "2DBox_CT_x.npz"
    with zipfile.ZipFile(path, "w") as zf:
        with zf.open("boxes.npy", "w") as f:
            np.lib.format.write_array(f, np.array([[1, 1, 5, 5]]))
        with zf.open("imgs.npy", "w") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (40, 50, 3)})
            f.write(bytes(100))
    with pytest.raises(InputError, match="imgs: truncated"):
        load_case(path)


def test_7_extreme_aspect_ratios_are_refused_with_a_message(tmp_path, tiny_export):
    with pytest.raises(InputError, match="its short side needs at least 8 pixels"):
        resized_shape(2, 4000, 256)
    assert resized_shape(8, 4000, 256) == (1, 256)
    inp = tmp_path / "in"
    write(inp, "2DBox_CT_thin.npz", imgs=np.zeros((2, 4000, 3), np.uint8), boxes=np.array([[0, 0, 100, 1]]))
    write(inp, "3DBox_CT_flat.npz", imgs=np.zeros((3, 2, 1200), np.uint8), boxes=np.array([[0, 0, 0, 100, 1, 2]]))
    write(inp, "2DBox_CT_a.npz", imgs=IMG, boxes=np.array([[10, 10, 60, 50]]))
    proc = predict("-i", str(inp), "-o", str(tmp_path / "out"), weights=tiny_export)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    rows = timing_rows(tmp_path / "out" / "timing.csv")
    assert rows["2DBox_CT_a.npz"]["status"] == "ok"
    for name in ("2DBox_CT_thin.npz", "3DBox_CT_flat.npz"):
        assert rows[name]["status"] == "failed" and "short side needs at least" in rows[name]["message"], rows[name]


# ---------------------------------------------------------------- 8: coordinates at or beyond 2**63


@pytest.mark.parametrize("x_max", [np.iinfo(np.int64).max, np.iinfo(np.uint64).max, 1e19, 1e300])
def test_8_huge_box_coordinates_are_clipped_not_wrapped(tmp_path, x_max):
    dtype = np.uint64 if x_max == np.iinfo(np.uint64).max else np.float64 if isinstance(x_max, float) else np.int64
    path = write(tmp_path, "2DBox_CT_x.npz", imgs=IMG, boxes=np.array([[10, 10, x_max, 50]], dtype=dtype))
    np.testing.assert_array_equal(load_case(path).boxes, [[10, 10, 119, 50]])  # partly outside: clipped


@pytest.mark.parametrize("box,message", [
    ([1e19, 10, 5e19, 50], "lies wholly outside the image"),
    ([5e19, 10, 1e19, 50], "is inverted (x_max < x_min)"),
    ([10, 1e300, 60, 1e300], "is empty (zero height)"),
])
def test_8_huge_coordinates_keep_their_real_meaning(tmp_path, box, message):
    path = write(tmp_path, "2DBox_CT_x.npz", imgs=IMG, boxes=np.array([box], dtype=np.float64))
    with pytest.raises(InputError) as err:
        load_case(path)
    assert message in str(err.value)


# ---------------------------------------------------------------- minor defects


def test_minor_a_failed_case_removes_its_stale_output_and_non_files_are_reported(tmp_path, tiny_export):
    inp, out = tmp_path / "in", tmp_path / "out"
    write(inp, "2DBox_CT_a.npz", imgs=IMG, boxes=np.array([[10, 10, 60, 50]]))
    assert predict("-i", str(inp), "-o", str(out), weights=tiny_export).returncode == 0
    assert (out / "2DBox_CT_a.npz").exists()
    write(inp, "2DBox_CT_a.npz", imgs=IMG, boxes=np.array([[60, 10, 10, 50]]))  # now inverted
    (inp / "2DBox_CT_dir.npz").mkdir()
    (inp / "2DBox_CT_link.npz").symlink_to(tmp_path / "nowhere")
    os.mkfifo(inp / "2DBox_CT_fifo.npz")
    proc = predict("-i", str(inp), "-o", str(out), weights=tiny_export)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert not (out / "2DBox_CT_a.npz").exists()  # no earlier output beside a "failed" row
    assert timing_rows(out / "timing.csv")["2DBox_CT_a.npz"]["status"] == "failed"
    notes = [ln for ln in proc.stderr.splitlines() if ln.startswith("note: skipped")]
    assert notes == ["note: skipped 2DBox_CT_dir.npz: a folder", "note: skipped 2DBox_CT_fifo.npz: a FIFO",
                     "note: skipped 2DBox_CT_link.npz: a broken symbolic link"]


def test_minor_concurrent_runs_keep_every_timing_row(tmp_path, tiny_export):
    out = tmp_path / "out"
    folders = []
    for k in range(2):
        inp = tmp_path / f"in{k}"
        for i in range(4):
            write(inp, f"2DBox_CT_{k}_{i}.npz", imgs=IMG, boxes=np.array([[10, 10, 60, 50]]))
        folders.append(inp)
    procs = [subprocess.Popen([sys.executable, "-m", "mcp_medsam", "predict", "-i", str(f), "-o", str(out),
                               "--weights", str(tiny_export), "--threads", "1"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")
             for f in folders]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0 and "Traceback" not in err, err
    rows = timing_rows(out / "timing.csv")
    assert set(rows) == {f"2DBox_CT_{k}_{i}.npz" for k in range(2) for i in range(4)}
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_6_warmup_fills_the_content_keyed_cache_or_says_why_not(tmp_path, tiny_export):
    proc = run_cli("warmup", "--weights", str(tiny_export), "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr
    folders = list((tmp_path / "cache").glob("model-*"))
    assert len(folders) == 1 and list(folders[0].glob("*.blob")) and str(folders[0]) in proc.stdout
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    one_error(run_cli("warmup", "--weights", str(tiny_export), "--cache-dir", str(a_file)),
              "cannot use", "as the compiled-model cache")
