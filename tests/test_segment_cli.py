"""``mcp-medsam segment`` through its real command line on the files of ``../shared/data/formats``.

A ``--boxes-from`` run on each native file is compared with ``predict`` on the NPZ case made from it:
the 2D files and the smallest volume with the default weights, the other volumes and the 23-box
microscopy image with a tiny export (seconds). ``test_formats.py`` shows that the same uint8 image and
boxes reach the segmenter (bit for bit); here the labels must agree per label at Dice >= 0.99.
Then geometry of the written files, box options, and bad inputs (one line each, nothing written, the
other inputs still run).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE, run_cli

sitk = pytest.importorskip("SimpleITK")
pytest.importorskip("scipy")  # the Dice of mcp_medsam.evaluation

from mcp_medsam.evaluation.metrics import dice  # noqa: E402
from mcp_medsam.io import medical  # noqa: E402
from mcp_medsam.locale_guard import keep_locale  # noqa: E402
from test_formats import CASES, CT_UID, FORMATS  # noqa: E402

ON_DEFAULT_WEIGHTS = ("xray-png", "endo-jpeg", "derm-bmp", "mr-nrrd")
ON_TINY_WEIGHTS = ("micro-tiff", "ct-nifti", "ct-dicom", "pet-nifti", "mr-nifti")
THREADS = ("--threads", "1")


def _predict(cases: tuple[str, ...], tmp: Path, weights: tuple[str, ...]) -> Path:
    """``predict`` on the NPZ cases behind ``cases`` (one process): their ``segs`` folder."""
    imgs, out = tmp / "imgs", tmp / "segs"
    imgs.mkdir()
    for c in cases:
        shutil.copy(SAMPLE / "imgs" / f"{CASES[c][2]}.npz", imgs)
    proc = run_cli("predict", "-i", str(imgs), "-o", str(out), *THREADS, *weights)
    assert proc.returncode == 0, proc.stderr
    return out


def _segment_case(case: str, out_dir: Path, weights: tuple[str, ...]) -> Path:
    image, labels, _, modality, threshold, *_ = CASES[case]
    out = out_dir / f"{case}{medical.output_suffix(FORMATS / image)}"
    extra = ("--mask-threshold", str(threshold)) if threshold is not None else ()
    proc = run_cli("segment", str(FORMATS / image), "-o", str(out), "-m", modality, "--boxes-from",
                   str(FORMATS / labels), *extra, *THREADS, *weights)
    assert proc.returncode == 0, proc.stderr
    assert f"-> {out} (" in proc.stdout and "1 inputs: 1 segmented" in proc.stderr
    return out


@pytest.fixture(scope="module")
def default_runs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    tmp = tmp_path_factory.mktemp("default")
    segs = _predict(ON_DEFAULT_WEIGHTS, tmp, ())
    return {c: (_segment_case(c, tmp, ()), segs / f"{CASES[c][2]}.npz") for c in ON_DEFAULT_WEIGHTS}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, tiny_export) -> dict[str, tuple[Path, Path]]:
    tmp = tmp_path_factory.mktemp("tiny")
    weights = ("--weights", str(tiny_export))
    segs = _predict(tuple(dict.fromkeys(ON_TINY_WEIGHTS)), tmp, weights)
    return {c: (_segment_case(c, tmp, weights), segs / f"{CASES[c][2]}.npz") for c in ON_TINY_WEIGHTS}


def _agreement(case: str, native_out: Path, npz_out: Path) -> list[float]:
    """Per-label Dice of the native run against the NPZ run (native label values map onto 1..N in order)."""
    _, labels, _, _, threshold, *_ = CASES[case]
    values = medical.boxes_from_labels(medical.read_labels(FORMATS / labels, threshold=threshold).array)[1]
    native = medical.read_labels(native_out).array
    with np.load(npz_out) as d:
        segs = d["segs"]
    assert native.shape == segs.shape
    assert set(np.unique(native).tolist()) <= {0, *values.tolist()}  # the label image's own values
    return [dice(segs == i, native == v) for i, v in enumerate(values, start=1)]


@pytest.mark.parametrize("case", ON_DEFAULT_WEIGHTS)
def test_native_file_agrees_with_the_npz_run_default_weights(case, default_runs):
    scores = _agreement(case, *default_runs[case])
    assert min(scores) >= 0.99, scores


@pytest.mark.parametrize("case", ON_TINY_WEIGHTS)
def test_native_file_agrees_with_the_npz_run_tiny_export(case, tiny_runs):
    scores = _agreement(case, *tiny_runs[case])
    assert min(scores) >= 0.99, scores


def _geometry(path: Path) -> tuple:
    img = medical.read_image(path)
    return img.shape, img.spacing, img.origin, img.direction


def test_dicom_input_gives_a_nifti_in_the_series_geometry(tiny_runs):
    out, _ = tiny_runs["ct-dicom"]
    assert out.name.endswith(".nii.gz")
    shape, spacing, origin, direction = _geometry(out)
    s_shape, s_spacing, s_origin, s_direction = _geometry(FORMATS / "dicom" / "STS-001-CT" / "image")
    assert shape == s_shape and direction == s_direction
    np.testing.assert_allclose(spacing, s_spacing, rtol=1e-6)  # NIfTI stores float32
    np.testing.assert_allclose(origin, s_origin, atol=1e-4)


@pytest.mark.parametrize("case", ["mr-nrrd", "mr-nifti"])
def test_volume_output_keeps_the_inputs_geometry_exactly(case, default_runs, tiny_runs):
    out, _ = {**default_runs, **tiny_runs}[case]
    assert medical.suffix(out) == medical.suffix(FORMATS / CASES[case][0])  # the same format out
    assert _geometry(out) == _geometry(FORMATS / CASES[case][0])


# ---------------------------------------------------------------- box options and naming


def test_box_options_give_box_indices(tmp_path, tiny_export):
    png = FORMATS / "png" / "CHNCXR-0001-0_image.png"
    w = ("--weights", str(tiny_export), *THREADS)
    proc = run_cli("segment", str(png), "-o", str(tmp_path / "a.png"), "-m", "XRay", "--box", "70,62,260,406",
                   "--box", "250,62,460,406", *w)
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "b.json").write_text(json.dumps({"boxes": [[70, 62, 260, 406], [250, 62, 460, 406]]}))
    (tmp_path / "c.json").write_text(json.dumps({"boxes": {png.name: [[70, 62, 260, 406], [250, 62, 460, 406]]}}))
    for name in ("b", "c"):
        proc = run_cli("segment", str(png), "-o", str(tmp_path / f"{name}.tif"), "-m", "XRay",
                       "--boxes", str(tmp_path / f"{name}.json"), *w)
        assert proc.returncode == 0, proc.stderr
    a = medical.read_labels(tmp_path / "a.png").array
    assert set(np.unique(a).tolist()) <= {0, 1, 2} and (a == 2).any()
    for name in ("b.tif", "c.tif"):
        np.testing.assert_array_equal(medical.read_labels(tmp_path / name).array, a)


def test_3d_box_and_npz_input(tmp_path, tiny_export):
    w = ("--weights", str(tiny_export), *THREADS)
    nrrd = FORMATS / "nrrd" / "brain1_image.nrrd"
    npz = SAMPLE / "imgs" / "3DBox_MR_pyradiomics_brain1.npz"
    proc = run_cli("segment", str(nrrd), str(npz), "-o", str(tmp_path / "out"), "-m", "MR",
                   "--box", "162,84,11,208,153,17", *w)
    assert proc.returncode == 0, proc.stderr
    native = medical.read_labels(tmp_path / "out" / "brain1_image.nrrd").array
    with np.load(tmp_path / "out" / "3DBox_MR_pyradiomics_brain1.npz") as d:
        np.testing.assert_array_equal(d["segs"], native)  # the NPZ image is the converted NRRD
    assert native[:11].max() == 0 and native[18:].max() == 0  # z 11..17 only
    # An .npz case without box options uses its own boxes (the same box here).
    proc = run_cli("segment", str(npz), "-o", str(tmp_path / "own.npz"), "-m", "MR", *w)
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "own.npz") as d:
        np.testing.assert_array_equal(d["segs"], native)


def test_several_inputs_with_a_label_folder_and_a_format(tmp_path, tiny_export):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for case in ("pet-nifti", "mr-nifti"):
        shutil.copy(FORMATS / CASES[case][0], images / f"{case}.nii.gz")
        shutil.copy(FORMATS / CASES[case][1], labels / f"{case}.nii.gz")
    proc = run_cli("segment", str(images / "pet-nifti.nii.gz"), str(images / "mr-nifti.nii.gz"), "-o",
                   str(tmp_path / "out"), "-m", "PET", "--boxes-from", str(labels), "--format", "mha",
                   "--weights", str(tiny_export), *THREADS)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mr-nifti.mha", "pet-nifti.mha"]
    assert np.unique(medical.read_labels(tmp_path / "out" / "mr-nifti.mha").array).tolist() == [0, 1, 2]


# ---------------------------------------------------------------- bad inputs


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error: ")]


def test_bad_inputs_fail_alone_with_one_line_and_write_nothing(tmp_path, tiny_export):
    bad = tmp_path / "bad"
    bad.mkdir()
    good = FORMATS / "png" / "CHNCXR-0001-0_image.png"
    (bad / "broken.png").write_bytes(b"not a png")
    (bad / "image.xyz").write_bytes(b"?")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.float32), isVector=False),
                    str(bad / "4d.nii.gz"))
    two = bad / "two-series"
    shutil.copytree(FORMATS / "dicom" / "STS-001-CT" / "image", two)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(two / "000000.dcm"))
    img = reader.Execute()
    for k in reader.GetMetaDataKeys():
        img.SetMetaData(k, reader.GetMetaData(k))
    img.SetMetaData("0020|000e", "1.2.826.0.1.3680043.8.498.9")
    img.SetMetaData("0008|0018", "1.2.826.0.1.3680043.8.498.9.1")
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(two / "copy.dcm"))
    with keep_locale():  # GDCM's DICOM writer leaves the process in the "C" locale
        writer.Execute(img)
    inputs = [good, bad / "broken.png", bad / "image.xyz", bad / "4d.nii.gz", two, bad / "missing.nii.gz"]
    out = tmp_path / "out"
    proc = run_cli("segment", *map(str, inputs), "-o", str(out), "-m", "XRay", "--box", "70,62,460,406",
                   "--weights", str(tiny_export), *THREADS)
    assert proc.returncode == 1
    lines = _error_lines(proc.stderr)
    expected = ["broken.png: not a readable PNG file", "image.xyz: unknown file type",
                "4d.nii.gz: a 4D image (size 5x4x3x2, x first)",
                "two-series: 2 DICOM series in the folder; pick one with --series UID: 1.2.826.0.1.3680043.8.498.9 "
                "(1 files, CT", "missing.nii.gz: no such file"]
    assert len(lines) == len(expected), proc.stderr
    for line, message in zip(lines, expected):
        assert message in line, (line, message)
    assert CT_UID in lines[3]
    assert "6 inputs: 1 segmented, 0 kept from an earlier run, 5 failed" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["CHNCXR-0001-0_image.png"]  # nothing else, no temp file
    # --series picks one of the two; a 2D box for a volume is refused.
    proc = run_cli("segment", str(two), "-o", str(tmp_path / "one.nii.gz"), "-m", "CT", "--series", CT_UID,
                   "--box", "52,52,20,145,149,22", "--weights", str(tiny_export), *THREADS)
    assert proc.returncode == 0, proc.stderr
    assert medical.read_image(tmp_path / "one.nii.gz").shape == (59, 202, 198)
    proc = run_cli("segment", str(two), "-o", str(tmp_path / "two.nii.gz"), "-m", "CT", "--series", CT_UID,
                   "--box", "52,52,145,149", "--weights", str(tiny_export), *THREADS)
    assert proc.returncode == 1 and "boxes of 4 coordinates: a volume needs x0,y0,z0,x1,y1,z1" in proc.stderr
    assert not (tmp_path / "two.nii.gz").exists()


def test_bad_prompts_fail_with_one_line_and_write_nothing(tmp_path, tiny_export):
    ct = FORMATS / "nifti" / "STS-001-CT_image.nii.gz"
    empty = tmp_path / "empty.nii.gz"
    img = sitk.ReadImage(str(FORMATS / "nifti" / "STS-001-CT_mask.nii.gz")) * 0
    sitk.WriteImage(img, str(empty))
    w = ("--weights", str(tiny_export), *THREADS)
    cases = {
        "other-grid": (("--boxes-from", str(FORMATS / "nifti" / "STS-001-PET_mask.nii.gz")),
                       "label image STS-001-PET_mask.nii.gz is 59x43x41 (z, y, x), the image 59x202x198 (z, y, x)"),
        "empty-labels": (("--boxes-from", str(empty)), "label image is empty"),
        "outside": (("--box", "300,300,0,400,400,5"), "lies wholly outside the image (size 198x202x59)"),
        "inverted": (("--box", "50,50,9,60,60,3"), "is inverted (z_min > z_max)"),
    }
    for name, (args, message) in cases.items():
        out = tmp_path / f"{name}.nii.gz"
        proc = run_cli("segment", str(ct), "-o", str(out), "-m", "CT", *args, *w)
        assert proc.returncode == 1, (name, proc.stderr)
        lines = _error_lines(proc.stderr)
        assert len(lines) == 1 and message in lines[0], (name, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.nii.gz"]


@pytest.mark.parametrize("args, message", [
    (("-m", "XRay"), "give the boxes: --box, --boxes FILE.json or --boxes-from LABELS"),
    (("-m", "XRay", "--box", "1,2,3,4", "--boxes", "b.json"), "--box and --boxes cannot be combined"),
    (("-m", "XRay", "--box", "1,2,x,4"), "--box '1,2,x,4': expected numbers separated by commas"),
    (("-m", "XRay", "--box", "1,2,3"), "3 numbers; expected x0,y0,x1,y1 (2D) or x0,y0,z0,x1,y1,z1 (3D)"),
    (("-m", "XRay", "--box", "1,2,3,4", "--window", "40"), "--window '40': expected LEVEL,WIDTH"),
    (("-m", "XRay", "--box", "1,2,3,4", "--format", "jpg"), "--format 'jpg': expected one of nii.gz"),
    (("-m", "XRay", "--box", "1,2,3,4", "--overwrite", "--skip-existing"), "--overwrite and --skip-existing cannot"),
])
def test_usage_errors_exit_2_before_the_model_loads(args, message, tmp_path):
    png = FORMATS / "png" / "CHNCXR-0001-0_image.png"
    proc = run_cli("segment", str(png), "-o", f"{tmp_path / 'o'}/", *args, "--weights", str(tmp_path / "none"))
    assert proc.returncode == 2, proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("output, message", [
    ("x.vtk", "-o {tmp}/x.vtk: segment cannot write .vtk files; give a file name ending in one of .nii.gz"),
    ("x.nii.gz.bak", "segment cannot write .bak files"),
    ("results", "-o {tmp}/results: neither an existing folder nor a file name with an extension"),
])
def test_an_output_that_is_neither_a_label_file_nor_a_folder_is_refused_before_the_model_loads(output, message,
                                                                                                tmp_path):
    png = FORMATS / "png" / "CHNCXR-0001-0_image.png"
    proc = run_cli("segment", str(png), "-o", str(tmp_path / output), "-m", "XRay", "--box", "1,2,30,40",
                   "--weights", str(tmp_path / "none"))
    assert proc.returncode == 2, proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and message.format(tmp=tmp_path) in lines[0], proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_folder_output_is_an_existing_folder_or_ends_in_a_slash(tmp_path, tiny_export):
    png = FORMATS / "png" / "CHNCXR-0001-0_image.png"
    w = ("-m", "XRay", "--box", "70,62,260,406", "--weights", str(tiny_export), *THREADS)
    (tmp_path / "existing.d").mkdir()
    for out, written in ((tmp_path / "existing.d", tmp_path / "existing.d" / png.name),
                         (f"{tmp_path / 'new.d'}/", tmp_path / "new.d" / png.name)):
        proc = run_cli("segment", str(png), "-o", str(out), *w)
        assert proc.returncode == 0, proc.stderr
        assert f"-> {written} (" in proc.stdout and written.is_file()


def test_an_existing_output_is_kept_unless_overwrite(tmp_path, tiny_export):
    png = FORMATS / "png" / "CHNCXR-0001-0_image.png"
    out = tmp_path / "lungs.png"
    out.write_bytes(b"an earlier result")
    w = ("-m", "XRay", "--box", "70,62,260,406", "--weights", str(tiny_export), *THREADS)
    proc = run_cli("segment", str(png), "-o", str(out), *w)
    assert proc.returncode == 1
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and "lungs.png exists already; refusing to replace it (--overwrite replaces" in lines[0]
    assert out.read_bytes() == b"an earlier result"
    proc = run_cli("segment", str(png), "-o", str(out), "--overwrite", *w)
    assert proc.returncode == 0, proc.stderr
    assert medical.read_labels(out).array.max() == 1


def test_output_checks(tmp_path, tiny_export):
    png = tmp_path / "x.png"
    shutil.copy(FORMATS / "png" / "CHNCXR-0001-0_image.png", png)
    w = ("--weights", str(tiny_export), *THREADS)
    # The result would replace its input.
    proc = run_cli("segment", str(png), "-o", str(tmp_path), "-m", "XRay", "--box", "1,2,30,40", *w)
    assert proc.returncode == 1 and "is an input file" in proc.stderr
    # Several inputs need a folder; a lossy output type is refused.
    proc = run_cli("segment", str(png), str(png), "-o", str(tmp_path / "o.png"), "-m", "XRay", "--box", "1,2,3,4", *w)
    assert proc.returncode == 2 and "2 inputs: OUTPUT is a folder" in proc.stderr
    proc = run_cli("segment", str(png), "-o", str(tmp_path / "o.jpg"), "-m", "XRay", "--box", "1,2,3,4", *w)
    assert proc.returncode == 2 and "JPEG is lossy" in proc.stderr
    proc = run_cli("segment", str(png), "-o", str(tmp_path / "o.png"), "-m", "Sonar", "--box", "1,2,3,4", *w)
    assert proc.returncode == 1 and "unknown modality 'Sonar'; accepted: CT, MR" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


# ---------------------------------------------------------------- label images that are not label maps


def _soft_mask(path: Path) -> Path:
    """A real 0/255 lesion mask with anti-aliased edges, saved as a PNG (as many datasets store masks)."""
    import cv2

    mask = medical.read_image(FORMATS / "bmp" / "IMD003_mask.bmp").array
    cv2.imwrite(str(path), cv2.GaussianBlur(mask, (0, 0), 2.0))
    return path


def test_a_soft_mask_is_thresholded_at_half_its_range_with_a_note(tmp_path, tiny_export):
    image = FORMATS / "bmp" / "IMD003_image.bmp"
    soft = _soft_mask(tmp_path / "IMD003_soft.png")
    assert len(np.unique(medical.read_image(soft).array)) > 100  # grey edges, not labels
    w = ("-m", "Dermoscopy", "--weights", str(tiny_export), *THREADS)
    proc = run_cli("segment", str(image), "-o", str(tmp_path / "auto.png"), "--boxes-from", str(soft), *w)
    assert proc.returncode == 0, proc.stderr
    notes = [ln for ln in proc.stderr.splitlines() if "looks like a soft mask" in ln]
    assert len(notes) == 1 and "thresholded at half its range, values above 127.5 are label 1" in notes[0]
    proc = run_cli("segment", str(image), "-o", str(tmp_path / "told.png"), "--boxes-from", str(soft),
                   "--mask-threshold", "127", *w)
    assert proc.returncode == 0, proc.stderr
    auto = medical.read_labels(tmp_path / "auto.png").array
    assert set(np.unique(auto).tolist()) == {0, 1}  # one object, never grey levels
    np.testing.assert_array_equal(auto, medical.read_labels(tmp_path / "told.png").array)


def test_an_image_given_as_its_own_labels_or_a_picture_as_labels_is_refused(tmp_path, tiny_export):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    sources = {"a.png": "png/CHNCXR-0001-0_image.png", "b.bmp": "bmp/IMD003_image.bmp",
               "c.tif": "tiff/GOWT1-t01_image.tif", "d.nii.gz": "nifti/STS-001-PET_image.nii.gz"}
    for name, src in sources.items():
        shutil.copy(FORMATS / src, images / name)
        shutil.copy(FORMATS / src, labels / name)  # a copy of the image where its labels belong
    w = ("-m", "XRay", "--weights", str(tiny_export), *THREADS)
    proc = run_cli("segment", *(str(images / n) for n in sources), "-o", str(tmp_path / "out"),
                   "--boxes-from", str(labels), *w)
    assert proc.returncode == 1
    lines = _error_lines(proc.stderr)
    expected = ["a.png: label image a.png: a picture, not a label image: 254 distinct values, and 89% of "
                "neighbouring pixels differ (in a label map only region borders do)",
                "b.bmp: label image b.bmp: a colour picture (its channels differ), not a label image",
                "c.tif: label image c.tif: a picture, not a label image: 47 distinct values, and 85% of",
                "d.nii.gz: label image d.nii.gz: fractional values"]
    assert len(lines) == 4, proc.stderr
    for line, message in zip(lines, expected):
        assert message in line, (line, message)
    # The input itself: as the file, and as the folder that holds the inputs.
    png = images / "a.png"
    proc = run_cli("segment", str(png), "-o", str(tmp_path / "self.png"), "--boxes-from", str(png), *w)
    assert proc.returncode == 1 and "--boxes-from" in _error_lines(proc.stderr)[0]
    assert "is the input itself" in proc.stderr
    proc = run_cli("segment", str(png), "-o", str(tmp_path / "self.png"), "--boxes-from", str(images), *w)
    assert proc.returncode == 1
    assert "the only label image for a.png in" in proc.stderr and "is the input itself" in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "self.png").exists()


def test_a_folder_of_image_files_is_a_batch_with_labels_by_suffix(tmp_path, tiny_export):
    """A folder of native files (a 0/1 NRRD label map beside a soft PNG mask, labels named *_label and
    *_mask in the same folder) segments as a batch; --mask-threshold binarises only the mask that needs it."""
    batch = tmp_path / "batch"
    batch.mkdir()
    for src in ("nrrd/brain1_image.nrrd", "nrrd/brain1_label.nrrd", "png/CHNCXR-0001-0_image.png",
                "png/CHNCXR-0001-0_mask.png"):
        shutil.copy(FORMATS / src, batch)
    out = tmp_path / "out"
    proc = run_cli("segment", str(batch), "-o", f"{out}/", "-m", "MR", "--boxes-from", str(batch),
                   "--mask-threshold", "127", "--weights", str(tiny_export), *THREADS)
    assert proc.returncode == 0, proc.stderr
    assert (f"note: {batch}: a folder of 2 image file(s), segmented as a batch: CHNCXR-0001-0_image.png, "
            f"brain1_image.nrrd; left out as label images: CHNCXR-0001-0_mask.png, brain1_label.nrrd") in proc.stderr
    assert "--mask-threshold 127 not applied to brain1_label.nrrd: no value lies above it" in proc.stderr
    assert "2 inputs: 2 segmented" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["CHNCXR-0001-0_image.png", "brain1_image.nrrd"]
    for name in ("CHNCXR-0001-0_image.png", "brain1_image.nrrd"):
        assert set(np.unique(medical.read_labels(out / name).array).tolist()) == {0, 1}
