"""Hostile and careless files through the readers (``mcp_medsam.io.medical``) and the real command line.

Each attack is first shown to work on SimpleITK or OpenCV alone (so the test can fail), then shown to
be refused by the readers: headers that name another file for their data, NIfTI files shorter than
their header or holding NaN, headers declaring more pixels than the limit (refused before any decoder
runs), FIFOs. Output places are compared by identity: a bind mount (where this machine allows
``mount --bind``) or a symbolic link of the input folder is the input folder. Files are tiny or made
from ``../shared/data/formats``; no model runs except where the command line needs one (the tiny export).
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED, run_cli

sitk = pytest.importorskip("SimpleITK")
cv2 = pytest.importorskip("cv2")

from mcp_medsam.errors import InputError, TooLarge  # noqa: E402
from mcp_medsam.io import medical  # noqa: E402
from mcp_medsam.segment import read_boxes_file  # noqa: E402

FORMATS = SHARED / "data" / "formats"
SECRET = (b"TOP-SECRET-0123456789-" * 3)[:64]  # a 16x4 uint8 image
THREADS = ("--threads", "1")


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error: ")]


def _nrrd(path: Path, data_file: str, *, extra: str = "", sizes: str = "16 4") -> Path:
    path.write_bytes(f"NRRD0004\ntype: uint8\ndimension: {len(sizes.split())}\nsizes: {sizes}\nencoding: raw\n"
                     f"{data_file}\n{extra}\n".encode())
    return path


def _mha(path: Path, data_file: str, *, before: str = "", dims: str = "16 4") -> Path:
    path.write_bytes(f"ObjectType = Image\nNDims = {len(dims.split())}\nDimSize = {dims}\n"
                     f"ElementType = MET_UCHAR\n{before}ElementDataFile = {data_file}\n".encode())
    return path


# ---------------------------------------------------------------- detached data


@pytest.fixture
def secret(tmp_path) -> Path:
    p = tmp_path / "elsewhere" / "secret.raw"
    p.parent.mkdir()
    p.write_bytes(SECRET)
    return p


def test_simpleitk_alone_follows_a_header_to_another_file(tmp_path, secret):
    """The attack is real: SimpleITK reads the named file's bytes as the image."""
    for path in (_nrrd(tmp_path / "a.nrrd", f"data file: {secret}"), _mha(tmp_path / "b.mha", str(secret))):
        assert sitk.GetArrayFromImage(sitk.ReadImage(str(path))).tobytes() == SECRET


def _detached_headers(tmp_path: Path, secret: Path) -> dict[str, Path]:
    return {
        "nrrd data file": _nrrd(tmp_path / "a.nrrd", f"data file: {secret}"),
        "nrrd datafile": _nrrd(tmp_path / "b.nrrd", f"datafile: {secret}"),
        "nrrd other case and spaces": _nrrd(tmp_path / "c.nrrd", f"Data  File : {secret}"),
        "nrrd relative": _nrrd(tmp_path / "d.nrrd", "data file: elsewhere/secret.raw"),
        "nrrd LIST": _nrrd(tmp_path / "e.nrrd", "data file: LIST", extra=f"{secret}\n"),
        "nrrd SKIPLIST": _nrrd(tmp_path / "f.nrrd", "data file: SKIPLIST 0", extra=f"0 {secret}\n"),
        "nrrd pattern": _nrrd(tmp_path / "g.nrrd", f"data file: {secret.parent}/secre%d.raw 1 1 1"),
        "nrrd environ": _nrrd(tmp_path / "h.nrrd", "data file: /proc/self/environ", sizes="8 1"),
        "nhdr": _nrrd(tmp_path / "i.nhdr", f"data file: {secret}"),
        "mha absolute": _mha(tmp_path / "j.mha", str(secret)),
        "mhd relative": _mha(tmp_path / "k.mhd", "elsewhere/secret.raw"),
        "mha LIST": _mha(tmp_path / "l.mha", "LIST"),
        "mha environ": _mha(tmp_path / "m.mha", "/proc/self/environ", dims="8 1"),
        # A spelling MetaIO skips must not end the header for the check either.
        "mha lower-case decoy": _mha(tmp_path / "n.mha", str(secret), before="elementdatafile = LOCAL\n"),
    }


def test_headers_naming_another_file_are_refused_before_simpleitk_reads(tmp_path, secret, monkeypatch):
    def no_read(*a, **k):
        raise AssertionError("SimpleITK was asked to read a file with detached data")

    monkeypatch.setattr(sitk.ImageFileReader, "ReadImageInformation", no_read)
    monkeypatch.setattr(sitk.ImageFileReader, "Execute", no_read)
    for name, path in _detached_headers(tmp_path, secret).items():
        for read in (medical.read_image, medical.read_labels, medical.read_prompt_labels):
            with pytest.raises(InputError) as exc:
                read(path)
            text = str(exc.value)
            assert "detached data is refused" in text and "\n" not in text, (name, text)
            assert "SECRET" not in text


def test_a_nifti_pair_header_is_refused(tmp_path, secret):
    raw = bytearray(gzip.decompress((FORMATS / "nifti" / "hippocampus_001_image.nii.gz").read_bytes()))
    raw[344:348] = b"ni1\0"  # the voxels lie in a .img beside the header
    (tmp_path / "pair.nii").write_bytes(bytes(raw[:348]))
    (tmp_path / "pair.img").write_bytes(bytes(raw[352:]))
    with pytest.raises(InputError, match="NIfTI pair header: its voxels lie in a .img file"):
        medical.read_image(tmp_path / "pair.nii")


def test_one_file_headers_with_local_data_still_read(tmp_path):
    a = np.arange(64, dtype=np.uint8).reshape(4, 16)
    mha = _mha(tmp_path / "ok.mha", "LOCAL")
    mha.write_bytes(mha.read_bytes() + a.tobytes())
    nrrd = _nrrd(tmp_path / "ok.nrrd", "# no data file: the data follows")
    nrrd.write_bytes(nrrd.read_bytes() + a.tobytes())
    for path in (mha, nrrd):
        np.testing.assert_array_equal(medical.read_image(path).array, a)


def test_segment_refuses_a_header_pointing_at_the_environment(tmp_path, tiny_export):
    evil = _nrrd(tmp_path / "evil.nrrd", "data file: /proc/self/environ", sizes="32 2")
    out = tmp_path / "out" / "evil.nrrd"
    proc = run_cli("segment", str(evil), "-o", str(out), "-m", "MR", "--box", "0,0,20,1",
                   "--weights", str(tiny_export), *THREADS, env={"MCP_MEDSAM_TEST_SECRET": "hunter2-xyzzy"})
    assert proc.returncode == 1, proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and "evil.nrrd: its header names another file for its data" in lines[0], proc.stderr
    assert "hunter2" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    assert not out.parent.exists()


# ---------------------------------------------------------------- NIfTI length and values


@pytest.fixture
def truncated(tmp_path) -> dict[str, Path]:
    gz = (FORMATS / "nifti" / "hippocampus_001_image.nii.gz").read_bytes()
    raw = gzip.decompress(gz)
    (tmp_path / "short.nii").write_bytes(raw[: len(raw) * 6 // 10])
    (tmp_path / "short.nii.gz").write_bytes(gz[: len(gz) // 2])
    return {"short.nii": tmp_path / "short.nii", "short.nii.gz": tmp_path / "short.nii.gz"}


def test_itk_alone_fills_a_truncated_nifti_with_zeros(truncated):
    for path in truncated.values():
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        assert a.shape == (35, 51, 35) and (a == 0).mean() > 0.3


def test_a_truncated_nifti_is_an_error_naming_the_file(truncated):
    for name, path in truncated.items():
        with pytest.raises(InputError) as exc:
            medical.read_image(path)
        assert f"{name} is truncated" in str(exc.value), str(exc.value)


def test_segment_refuses_a_truncated_nifti_with_one_line(truncated, tmp_path, tiny_export):
    out = tmp_path / "out"
    proc = run_cli("segment", str(truncated["short.nii.gz"]), "-o", f"{out}/", "-m", "MR", "--box", "5,5,5,20,20,20",
                   "--weights", str(tiny_export), *THREADS)
    assert proc.returncode == 1
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and "short.nii.gz is truncated" in lines[0], proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_nifti_voxels_are_refused(bad, tmp_path):
    img = sitk.ReadImage(str(FORMATS / "nifti" / "STS-001-PET_image.nii.gz"))
    a = sitk.GetArrayFromImage(img)
    a[30, 20, 20] = bad
    out = sitk.GetImageFromArray(a)
    out.CopyInformation(img)
    for name in ("nan.nii.gz", "nan.nii"):
        sitk.WriteImage(out, str(tmp_path / name))
        if np.isnan(bad):  # ITK alone reads the NaN as 0
            assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name)))).all()
        with pytest.raises(InputError, match="1 NaN or infinite voxel value"):
            medical.read_image(tmp_path / name)


# ---------------------------------------------------------------- sizes from the header, before decoding


def _tiff_header(path: Path, width: int, height: int, bits: int) -> Path:
    """A TIFF whose one directory declares a width x height grey image; its pixel strip is absent."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, bits), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 200), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, width * height * bits // 8)]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", tag, typ, n) + (struct.pack("<HH", v, 0) if typ == 3 else struct.pack("<I", v))
        for tag, typ, n, v in entries) + struct.pack("<I", 0)
    path.write_bytes(b"II*\0" + struct.pack("<I", 8) + ifd + b"\0" * 64)
    return path


def _huge_headers(tmp_path: Path) -> dict[str, Path]:
    png = tmp_path / "huge.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">IIBBBBB", 100000, 100000,
                                                                                          8, 2, 0, 0, 0) + b"\0" * 4)
    jpg = tmp_path / "huge.jpg"
    jpg.write_bytes(b"\xff\xd8\xff\xe0" + struct.pack(">H", 16) + b"JFIF\0" + b"\0" * 9
                    + b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, 60000, 60000, 3) + b"\0" * 9 + b"\xff\xd9")
    bmp = tmp_path / "huge.bmp"
    bmp.write_bytes(b"BM" + struct.pack("<IHHI", 0, 0, 0, 54) + struct.pack("<IiiHHI", 40, 60000, 60000, 1, 24, 0)
                    + b"\0" * 20)
    hdr = bytearray(352)
    struct.pack_into("<i", hdr, 0, 348)
    struct.pack_into("<8h", hdr, 40, 3, 2000, 2000, 2000, 1, 1, 1, 1)
    struct.pack_into("<hh", hdr, 70, 4, 16)  # int16
    struct.pack_into("<f", hdr, 108, 352.0)
    hdr[344:348] = b"n+1\0"
    (tmp_path / "huge.nii").write_bytes(bytes(hdr))
    (tmp_path / "huge.nii.gz").write_bytes(gzip.compress(bytes(hdr)))
    return {"tiff": _tiff_header(tmp_path / "huge.tif", 40000, 40000, 16), "png": png, "jpeg": jpg, "bmp": bmp,
            "nii": tmp_path / "huge.nii", "nii.gz": tmp_path / "huge.nii.gz",
            "nrrd": _nrrd(tmp_path / "huge.nrrd", "# data follows", sizes="5000 5000 200"),
            "mha": _mha(tmp_path / "huge.mha", "LOCAL", dims="5000 5000 200")}


def test_declared_sizes_are_refused_before_any_decoder_runs(tmp_path, monkeypatch):
    """Every format's header declares more than the default limit (2 GiB) and holds no pixels: the
    refusal is TooLarge (not an unreadable file), and no decoder (OpenCV, SimpleITK's pixel read) runs."""
    def no_decode(*a, **k):
        raise AssertionError("a decoder ran before the size check")

    monkeypatch.setattr(cv2, "imdecode", no_decode)
    monkeypatch.setattr(cv2, "imcount", no_decode)
    monkeypatch.setattr(sitk.ImageFileReader, "Execute", no_decode)
    for name, path in _huge_headers(tmp_path).items():
        with pytest.raises(TooLarge) as exc:
            medical.read_image(path)
        assert "decoded; the limit is 2048.0 MiB (--max-image-mb)" in str(exc.value), (name, str(exc.value))


def test_a_16_bit_tiff_of_16000_squared_is_refused_from_its_header(tmp_path, monkeypatch):
    tif = _tiff_header(tmp_path / "big.tif", 16000, 16000, 16)
    monkeypatch.setattr(cv2, "imdecode", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(TooLarge, match=r"a 16000x16000 picture of 1 x 16-bit values would take 488.3 MiB decoded; "
                                       r"the limit is 100.0 MiB"):
        medical.read_image(tif, max_bytes=100 << 20)


def test_a_dicom_series_declaring_65535_squared_is_refused_from_its_headers(tmp_path, monkeypatch):
    series = tmp_path / "series"
    shutil.copytree(FORMATS / "dicom" / "STS-001-CT" / "image", series)
    first = series / "000030.dcm"
    data = bytearray(first.read_bytes())
    for tag in (b"\x28\x00\x10\x00", b"\x28\x00\x11\x00"):  # Rows, Columns (implicit VR little endian)
        at = data.find(tag)
        data[at + 8:at + 10] = struct.pack("<H", 65535)
    first.write_bytes(bytes(data))
    monkeypatch.setattr(sitk.ImageSeriesReader, "Execute", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(TooLarge, match=r"a series of 59 files \(.*65535x65535x1.*\) would take"):
        medical.read_image(series)


def test_a_real_picture_under_the_limit_still_reads_and_over_it_is_refused():
    png = FORMATS / "png" / "CHNCXR-0001-0_image.png"
    assert medical.read_image(png, max_bytes=512 * 512).shape == (512, 512)
    with pytest.raises(TooLarge, match="a 512x512 picture of 1 x 8-bit values would take 0.2 MiB"):
        medical.read_image(png, max_bytes=512 * 512 - 1)
    tif = FORMATS / "tiff" / "GOWT1-t01_image.tif"
    assert medical.read_image(tif, max_bytes=1024 * 1024 * 2).shape == (1024, 1024)


def test_segment_max_image_mb_refuses_from_the_header(tmp_path, tiny_export):
    tif = _tiff_header(tmp_path / "big.tif", 16000, 16000, 16)
    proc = run_cli("segment", str(tif), "-o", str(tmp_path / "out.tif"), "-m", "Microscopy", "--box", "1,1,9,9",
                   "--max-image-mb", "100", "--weights", str(tiny_export), *THREADS)
    assert proc.returncode == 1
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and "would take 488.3 MiB decoded; the limit is 100.0 MiB" in lines[0], proc.stderr


# ---------------------------------------------------------------- FIFOs and other special files


def _unblock(fifo: Path) -> threading.Timer:
    """A safety net: should a reader open the FIFO, a writer opens it after 20 s, so the test fails, not hangs."""
    def feed():
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        except OSError:
            pass
    t = threading.Timer(20, feed)
    t.daemon = True
    t.start()
    return t


def test_a_fifo_is_refused_not_read(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    timer = _unblock(fifo)
    try:
        with pytest.raises(InputError, match="a FIFO, not a regular file; refused"):
            medical.read_image(fifo)
        series = tmp_path / "series"
        shutil.copytree(FORMATS / "dicom" / "STS-001-CT" / "image", series)
        os.mkfifo(series / "000100.dcm")
        with pytest.raises(InputError, match="the folder holds 000100.dcm, a FIFO; refused"):
            medical.read_image(series)
        os.mkfifo(tmp_path / "boxes.json")
        with pytest.raises(InputError, match="boxes.json is not a regular file"):
            read_boxes_file(tmp_path / "boxes.json")
    finally:
        timer.cancel()


def test_segment_refuses_a_fifo_input(tmp_path, tiny_export):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    proc = run_cli("segment", str(fifo), "-o", str(tmp_path / "out.png"), "-m", "XRay", "--box", "1,1,9,9",
                   "--weights", str(tiny_export), *THREADS, timeout=300)
    assert proc.returncode == 1
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and "pipe.png: a FIFO, not a regular file; refused" in lines[0], proc.stderr
    assert not (tmp_path / "out.png").exists()


# ---------------------------------------------------------------- output places by identity


def _npz_inputs(tmp_path: Path) -> Path:
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "2DBox_XRay_a.npz").write_bytes(b"a case")  # never read: the folders are refused first
    return inputs


def _refused(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode == 1, proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and message in lines[0], proc.stderr


@pytest.fixture
def bind_mount(tmp_path):
    """``mount --bind SRC DST``; skips where this machine does not allow it (not root, no CAP_SYS_ADMIN)."""
    made: list[Path] = []

    def mount(src: Path, dst: Path) -> Path:
        dst.mkdir(parents=True, exist_ok=True)
        if shutil.which("mount") is None:
            pytest.skip("no mount command here")
        proc = subprocess.run(["mount", "--bind", str(src), str(dst)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"mount --bind is not allowed here: {proc.stderr.strip() or proc.returncode}")
        made.append(dst)
        return dst

    yield mount
    for dst in reversed(made):
        subprocess.run(["umount", str(dst)], check=False)


def test_predict_refuses_a_bind_mount_of_the_input_folder(tmp_path, bind_mount):
    inputs = _npz_inputs(tmp_path)
    mirror = bind_mount(inputs, tmp_path / "mirror")
    assert mirror.resolve() != inputs.resolve()  # a path comparison cannot see it
    cases = {
        "output": (("-o", str(mirror)), "is the input folder"),
        "output inside": (("-o", str(mirror / "segs")), "is inside the input folder"),
        "overlays": (("-o", str(tmp_path / "o1"), "--overlays", str(mirror / "png")), "overlays folder"),
        "timing": (("-o", str(tmp_path / "o2"), "--timing", str(mirror / "t.csv")), "timing file"),
    }
    for name, (args, message) in cases.items():
        proc = run_cli("predict", "-i", str(inputs), *args, "--weights", str(tmp_path / "none"))
        _refused(proc, message)
    # The input inside the output, seen through a bind mount of the output's parent.
    outer = tmp_path / "outer"
    (outer / "in").mkdir(parents=True)
    (outer / "in" / "2DBox_XRay_a.npz").write_bytes(b"a case")
    view = bind_mount(outer, tmp_path / "view")
    proc = run_cli("predict", "-i", str(outer / "in"), "-o", str(view), "--weights", str(tmp_path / "none"))
    _refused(proc, "is inside the output folder")
    assert sorted(p.name for p in inputs.iterdir()) == ["2DBox_XRay_a.npz"]


def test_segment_refuses_a_bind_mount_of_the_input_folder(tmp_path, bind_mount):
    inputs = tmp_path / "in"
    inputs.mkdir()
    png = inputs / "x.png"
    shutil.copy(FORMATS / "png" / "CHNCXR-0001-0_image.png", png)
    mirror = bind_mount(inputs, tmp_path / "mirror")
    for given, out, message in ((png, mirror / "x.png", "is an input file"),
                                (png, f"{mirror}/", "is an input file"),
                                (inputs, f"{mirror}/", "is the input folder"),
                                (inputs, f"{mirror}/sub/", "is inside the input folder")):
        proc = run_cli("segment", str(given), "-o", str(out), "-m", "XRay", "--box", "1,1,9,9",
                       "--weights", str(tmp_path / "none"))
        _refused(proc, message)
    assert sorted(p.name for p in inputs.iterdir()) == ["x.png"]


def test_symbolic_links_of_the_input_folder_are_refused(tmp_path):
    inputs = _npz_inputs(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(inputs, target_is_directory=True)
    for args, message in ((("-o", str(link)), "is the input folder"),
                          (("-o", str(link / "sub")), "is inside the input folder"),
                          (("-o", str(tmp_path / "o"), "--timing", str(link / "t.csv")), "timing file")):
        _refused(run_cli("predict", "-i", str(link), *args, "--weights", str(tmp_path / "none")), message)
        _refused(run_cli("predict", "-i", str(inputs), *args, "--weights", str(tmp_path / "none")), message)


def test_a_failed_model_load_leaves_no_output_folder(tmp_path):
    inputs = _npz_inputs(tmp_path)
    proc = run_cli("predict", "-i", str(inputs), "-o", str(tmp_path / "segs"), "--overlays", str(tmp_path / "png"),
                   "--weights", str(tmp_path / "none"))
    assert proc.returncode == 1 and len(_error_lines(proc.stderr)) == 1, proc.stderr
    png = FORMATS / "png" / "CHNCXR-0001-0_image.png"
    proc = run_cli("segment", str(png), "-o", str(tmp_path / "seg" / "x.png"), "-m", "XRay", "--box", "1,1,9,9",
                   "--weights", str(tmp_path / "none"))
    assert proc.returncode == 1 and len(_error_lines(proc.stderr)) == 1, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
