"""Native medical formats (``mcp_medsam.io.medical``) on the real files of ``../shared/data/formats``: reading
(shape, spacing, orientation), the challenge's intensity conversion and box rule against the NPZ cases made
from the same files (bit for bit), label images written back in the input's geometry, and bad inputs.
No model runs here."""

from __future__ import annotations

import locale
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE, SHARED, need

sitk = pytest.importorskip("SimpleITK")

from mcp_medsam.errors import InputError, SegmentationError  # noqa: E402
from mcp_medsam.io import medical  # noqa: E402
from mcp_medsam.locale_guard import keep_locale  # noqa: E402

FORMATS = SHARED / "data" / "formats"
CT_UID = "1.3.6.1.4.1.14519.5.2.1.5168.1900.449841255123215696894565592289"
EYE3 = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

# image, label image, the NPZ case made from them, modality, mask threshold (the converter's, per
# ../shared/data/sample/SOURCES.md), array shape, spacing (x, y, z), direction.
CASES = {
    "ct-nifti": ("nifti/STS-001-CT_image.nii.gz", "nifti/STS-001-CT_mask.nii.gz", "3DBox_CT_STS_STS-001", "CT", None,
                 (59, 202, 198), (0.976562, 0.976562, 3.27), EYE3),
    "ct-dicom": ("dicom/STS-001-CT/image", "nifti/STS-001-CT_mask.nii.gz", "3DBox_CT_STS_STS-001", "CT", None,
                 (59, 202, 198), (0.976562, 0.976562, 3.27), EYE3),
    "pet-nifti": ("nifti/STS-001-PET_image.nii.gz", "nifti/STS-001-PET_mask.nii.gz", "3DBox_PET_STS_STS-001", "PET",
                  None, (59, 43, 41), (4.6875, 4.6875, 3.27), EYE3),
    "mr-nifti": ("nifti/hippocampus_001_image.nii.gz", "nifti/hippocampus_001_label.nii.gz",
                 "3DBox_MR_MSDHippocampus_001", "MR", None, (35, 51, 35), (1.0, 1.0, 1.0),
                 (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)),  # NIfTI RAS seen in ITK's LPS
    "mr-nrrd": ("nrrd/brain1_image.nrrd", "nrrd/brain1_label.nrrd", "3DBox_MR_pyradiomics_brain1", "MR", None,
                (25, 256, 256), (0.78125, 0.78125, 6.5), (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)),
    "xray-png": ("png/CHNCXR-0001-0_image.png", "png/CHNCXR-0001-0_mask.png", "2DBox_XRay_Shenzhen_CHNCXR-0001-0",
                 "XRay", 127, (512, 512), None, None),
    "endo-jpeg": ("jpg/cju0qkwl35piu0993l0dewei2_image.jpg", "jpg/cju0qkwl35piu0993l0dewei2_mask.jpg",
                  "2DBox_Endoscopy_KvasirSEG_cju0qkwl35piu0993l0dewei2", "Endoscopy", None, (529, 622, 3), None, None),
    "derm-bmp": ("bmp/IMD003_image.bmp", "bmp/IMD003_mask.bmp", "2DBox_Dermoscopy_PH2_IMD003", "Dermoscopy", None,
                 (574, 765, 3), None, None),
    "micro-tiff": ("tiff/GOWT1-t01_image.tif", "tiff/GOWT1-t01_mask.tif", "2DBox_Microscopy_CTCGOWT1_t01",
                   "Microscopy", None, (1024, 1024), None, None),
}


def _npz(name: str) -> dict[str, np.ndarray]:
    with np.load(need(SAMPLE / "imgs" / f"{name}.npz")) as d:
        return {k: d[k] for k in d.files}


@pytest.mark.parametrize("case", list(CASES))
def test_every_format_reads_with_its_shape_spacing_and_orientation(case):
    image, _, _, _, _, shape, spacing, direction = CASES[case]
    img = medical.read_image(need(FORMATS / image))
    assert img.array.shape == shape
    assert img.is_3d == (spacing is not None)
    if spacing is None:  # pictures: no geometry; grey stays (H, W), colour is RGB
        assert img.spacing is None and img.array.dtype == np.uint8
    else:
        np.testing.assert_allclose(img.spacing, spacing, rtol=1e-6)
        assert img.direction == direction
        assert img.spacing_zyx == tuple(reversed(img.spacing))


def test_colour_pictures_are_rgb_not_opencvs_bgr():
    import cv2

    path = FORMATS / "bmp" / "IMD003_image.bmp"
    img = medical.read_image(path)
    np.testing.assert_array_equal(img.array, cv2.imread(str(path))[:, :, ::-1])


def test_dicom_series_and_the_nifti_made_from_it_share_geometry_and_values():
    series = medical.read_image(FORMATS / "dicom" / "STS-001-CT" / "image")
    nifti = medical.read_image(FORMATS / "nifti" / "STS-001-CT_image.nii.gz")
    assert series.format == "dicom" and series.series_uid == CT_UID
    np.testing.assert_array_equal(series.array, nifti.array)  # HU after rescale slope/intercept
    np.testing.assert_allclose(series.spacing, nifti.spacing, rtol=1e-7)  # the NIfTI holds float32
    np.testing.assert_allclose(series.origin, nifti.origin, atol=1e-5)
    assert series.direction == nifti.direction
    # The case folder holds the series and an RTSTRUCT (mask/RS.dcm): the scan finds the one series.
    assert medical.read_image(FORMATS / "dicom" / "STS-001-CT").series_uid == CT_UID


@pytest.mark.parametrize("case", list(CASES))
def test_conversion_is_the_npz_image_bit_for_bit(case):
    image, _, npz, modality, *_ = CASES[case]
    pixels = medical.to_uint8(medical.read_image(FORMATS / image), modality)
    ref = _npz(npz)["imgs"]
    assert pixels.dtype == np.uint8 and pixels.shape == ref.shape
    np.testing.assert_array_equal(pixels, ref)


@pytest.mark.parametrize("case", list(CASES))
def test_boxes_from_the_mask_are_the_npz_boxes(case):
    image, labels, npz, _, threshold, *_ = CASES[case]
    img = medical.read_image(FORMATS / image)
    lab = medical.read_labels(FORMATS / labels, threshold=threshold)
    medical.check_same_grid(lab, img)
    boxes, values = medical.boxes_from_labels(lab.array)
    np.testing.assert_array_equal(boxes, _npz(npz)["boxes"])
    with np.load(SAMPLE / "gts" / f"{npz}.npz") as g:
        gts = g["gts"]
    # The NPZ renumbered its labels 1..N in order; the native values map onto them one to one.
    for i, v in enumerate(values, start=1):
        np.testing.assert_array_equal(lab.array == v, gts == i)


def test_label_values_are_the_files_own():
    # GOWT1's instance labels skip 2 (the NPZ renumbered them); the BMP mask is 0/255; a JPEG is thresholded.
    _, values = medical.boxes_from_labels(medical.read_labels(FORMATS / "tiff" / "GOWT1-t01_mask.tif").array)
    assert values.tolist() == [1] + list(range(3, 25))
    _, values = medical.boxes_from_labels(medical.read_labels(FORMATS / "bmp" / "IMD003_mask.bmp").array)
    assert values.tolist() == [255]
    jpeg = medical.read_labels(FORMATS / "jpg" / "cju0qkwl35piu0993l0dewei2_mask.jpg")
    assert np.unique(jpeg.array).tolist() == [0, 1]
    # The PNG lung mask is a soft (resized) mask: without a threshold its grey edge values are labels too.
    soft = medical.read_labels(FORMATS / "png" / "CHNCXR-0001-0_mask.png")
    assert len(np.unique(soft.array)) > 100


def test_boxes_from_labels_rule():
    lab = np.zeros((4, 20, 30), np.uint16)
    lab[1:3, 2:5, 3:9] = 7  # two parts of one label: one box around both
    lab[3, 15:18, 20:29] = 7
    lab[0, 0, 0] = 300  # under 10 voxels: dropped
    lab[2, 10:14, 10:14] = 2
    every = medical.label_boxes(lab)
    assert every.values.tolist() == [2, 7, 300] and every.sizes.tolist() == [16, 63, 1]
    boxes, values = medical.boxes_from_labels(lab)
    assert values.tolist() == [2, 7]
    assert boxes.tolist() == [[10, 10, 2, 13, 13, 2], [3, 2, 1, 28, 17, 3]]  # x0, y0, z0, x1, y1, z1
    boxes, values = medical.boxes_from_labels(lab, min_size=1)
    assert values.tolist() == [2, 7, 300] and boxes[2].tolist() == [0, 0, 0, 0, 0, 0]
    boxes, _ = medical.boxes_from_labels(lab[2])
    assert boxes.tolist() == [[10, 10, 13, 13], [3, 2, 8, 4]]  # x0, y0, x1, y1
    with pytest.raises(InputError, match="empty"):
        medical.boxes_from_labels(np.zeros((5, 5), np.uint8))
    with pytest.raises(InputError, match="no label has 10 or more pixels"):
        medical.boxes_from_labels(lab[0])


def _image(array: np.ndarray, fmt: str = "nifti", is_3d: bool = True) -> medical.MedicalImage:
    return medical.MedicalImage(array=array, is_3d=is_3d, source=Path(f"x.{fmt}"), format=fmt)


def test_intensity_rules():
    hu = np.array([[[-1000, -160, -159, 40, 240, 3000]]], np.float32)
    np.testing.assert_array_equal(medical.to_uint8(_image(hu), "CT"), [[[0, 0, 1, 128, 255, 255]]])
    wide = medical.to_uint8(_image(hu), "ct", window=(0, 2000))  # -1000..1000
    np.testing.assert_array_equal(wide, [[[0, 107, 107, 133, 158, 255]]])
    mr = np.concatenate([np.zeros(100), np.linspace(1, 1000, 1000)]).reshape(1, 10, 110)
    out = medical.to_uint8(_image(mr), "MR")
    lo, hi = np.percentile(mr[mr > 0], [0.5, 99.5])
    assert (out.ravel()[:100] == 0).all()  # zero stays zero
    np.testing.assert_array_equal(out, np.rint((np.clip(mr, lo, hi) - lo) / (hi - lo) * 255))
    grey16 = (np.arange(200 * 300, dtype=np.uint16).reshape(200, 300) * 7) % 60000
    out = medical.to_uint8(_image(grey16, "png", is_3d=False), "US")
    assert out.shape == (200, 300, 3) and out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    grey8 = np.full((8, 9), 77, np.uint8)
    np.testing.assert_array_equal(medical.to_uint8(_image(grey8, "png", is_3d=False), "XRay")[..., 1], grey8)
    with pytest.raises(InputError, match="NaN"):
        medical.to_uint8(_image(np.full((2, 3, 3), np.nan)), "MR")
    with pytest.raises(InputError, match="no voxel above zero"):
        medical.to_uint8(_image(np.zeros((2, 3, 3))), "PET")
    with pytest.raises(InputError, match="unknown modality"):
        medical.to_uint8(_image(hu), "Sonar")
    npz = medical.read_image(SAMPLE / "imgs" / "3DBox_MR_pyradiomics_brain1.npz")
    assert npz.boxes.shape == (1, 6)
    np.testing.assert_array_equal(medical.to_uint8(npz, "MR"), _npz("3DBox_MR_pyradiomics_brain1")["imgs"])


@pytest.mark.parametrize("source", ["dicom/STS-001-CT/image", "nrrd/brain1_image.nrrd",
                                    "nifti/hippocampus_001_image.nii.gz"])
@pytest.mark.parametrize("out_suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_geometry_round_trips(source, out_suffix, tmp_path):
    img = medical.read_image(FORMATS / source)
    labels = (np.arange(img.array.size).reshape(img.shape) % 3).astype(np.uint8)
    out = medical.write_labels(tmp_path / f"labels{out_suffix}", labels, like=img)
    back = medical.read_image(out)
    np.testing.assert_array_equal(back.array, labels)
    assert back.array.dtype == np.uint8
    # NIfTI stores the geometry as float32; NRRD and MetaImage keep it as written.
    tol = 1e-4 if out_suffix.startswith(".nii") else 0
    np.testing.assert_allclose(back.spacing, img.spacing, rtol=tol / 10, atol=0)
    np.testing.assert_allclose(back.origin, img.origin, atol=tol)
    np.testing.assert_allclose(back.direction, img.direction, atol=tol)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temp file left behind


@pytest.mark.parametrize("out_suffix", [".png", ".tif", ".bmp", ".npz", ".nii.gz"])
def test_2d_labels_round_trip(out_suffix, tmp_path):
    img = medical.read_image(FORMATS / "bmp" / "IMD003_image.bmp")
    labels = np.zeros(img.shape, np.uint8)
    labels[100:200, 50:400] = 255
    labels[300:310, 20:30] = 3
    out = medical.write_labels(tmp_path / f"l{out_suffix}", labels, like=img)
    back = medical.read_labels(out)
    np.testing.assert_array_equal(back.array, labels)
    medical.check_same_grid(back, img)


def test_labels_above_255_are_uint16_where_the_format_holds_them(tmp_path):
    img = medical.read_image(FORMATS / "png" / "CHNCXR-0001-0_image.png")
    labels = np.arange(512 * 512, dtype=np.int64).reshape(512, 512) % 700
    for s in (".png", ".tif", ".nii.gz"):
        back = medical.read_labels(medical.write_labels(tmp_path / f"l{s}", labels, like=img))
        assert back.array.dtype == np.uint16
        np.testing.assert_array_equal(back.array, labels)
    with pytest.raises(InputError, match="BMP holds 8-bit labels"):
        medical.write_labels(tmp_path / "l.bmp", labels, like=img)
    for name, why in (("l.jpg", "lossy"), ("l.mhd", "header"), ("l.xyz", "use one of")):
        with pytest.raises(InputError, match=why):
            medical.write_labels(tmp_path / name, labels, like=img)
    with pytest.raises(InputError, match="shape"):
        medical.write_labels(tmp_path / "l.png", labels[:10], like=img)
    vol = medical.read_image(FORMATS / "nifti" / "STS-001-PET_image.nii.gz")
    with pytest.raises(InputError, match="cannot write a volume as .png"):
        medical.write_labels(tmp_path / "v.png", np.zeros(vol.shape, np.uint8), like=vol)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.nii.gz", "l.png", "l.tif"]


# ---------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def two_series(tmp_path_factory) -> Path:
    """The CT series and a 3-slice copy of it with its own SeriesInstanceUID, in one folder."""
    folder = tmp_path_factory.mktemp("two-series")
    files = sorted((FORMATS / "dicom" / "STS-001-CT" / "image").glob("*.dcm"))
    for f in files:
        shutil.copy(f, folder)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    with keep_locale():  # GDCM's DICOM writer leaves the process in the "C" locale
        _write_copies(files[:3], folder, writer)
    return folder


def _write_copies(files: list[Path], folder: Path, writer) -> None:
    for i, f in enumerate(files):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(f))
        img = reader.Execute()
        for k in reader.GetMetaDataKeys():
            img.SetMetaData(k, reader.GetMetaData(k))
        img.SetMetaData("0020|000e", "1.2.826.0.1.3680043.8.498.7")  # SeriesInstanceUID
        img.SetMetaData("0008|0018", f"1.2.826.0.1.3680043.8.498.7.{i}")  # SOPInstanceUID
        img.SetMetaData("0008|103e", "a copy")  # SeriesDescription
        writer.SetFileName(str(folder / f"copy{i}.dcm"))
        writer.Execute(img)


def test_two_series_in_one_folder_are_listed_and_one_can_be_picked(two_series):
    before = locale.setlocale(locale.LC_ALL)
    with pytest.raises(InputError) as exc:
        medical.read_image(two_series)
    assert locale.setlocale(locale.LC_ALL) == before  # GDCM does not change the caller's locale
    msg = str(exc.value)
    assert "2 DICOM series" in msg and "--series" in msg and "\n" not in msg
    assert CT_UID in msg and "1.2.826.0.1.3680043.8.498.7 (3 files, CT a copy)" in msg
    assert medical.read_image(two_series, series="1.2.826.0.1.3680043.8.498.7").shape == (3, 202, 198)
    assert medical.read_image(two_series, series=CT_UID).shape == (59, 202, 198)
    with pytest.raises(InputError, match="no DICOM series 9.9; the folder holds"):
        medical.read_image(two_series, series="9.9")


def test_a_series_with_a_missing_slice_is_refused(tmp_path):
    for f in sorted((FORMATS / "dicom" / "STS-001-CT" / "image").glob("*.dcm")):
        if f.name != "000030.dcm":
            shutil.copy(f, tmp_path)
    with pytest.raises(InputError, match=r"slices are not evenly spaced \(gaps of 3.27 to 6.54 mm"):
        medical.read_image(tmp_path)


def _write_volume(path: Path, array: np.ndarray, spacing=None) -> Path:
    img = sitk.GetImageFromArray(array, isVector=False)
    if spacing is not None:
        img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))
    return path


def test_bad_files_give_one_clear_line(tmp_path):
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti file at all" * 20)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "image.xyz").write_bytes(b"?")
    (tmp_path / "empty").mkdir()
    _write_volume(tmp_path / "4d.nii.gz", np.zeros((2, 3, 4, 5), np.float32))
    expected = {
        "broken.nii.gz": "not a readable nifti file",
        "broken.png": "not a readable PNG file",
        "image.xyz": "unknown file type; accepted: .bmp, .dcm",
        "missing.nrrd": "no such file",
        "empty": "no DICOM image series in the folder",
        "4d.nii.gz": "a 4D image (size 5x4x3x2, x first)",
    }
    for name, message in expected.items():
        with pytest.raises(InputError) as exc:
            medical.read_image(tmp_path / name)
        assert message in str(exc.value) and "\n" not in str(exc.value), (name, str(exc.value))
    # RTSTRUCT only: not an image series.
    with pytest.raises(InputError, match="RTSTRUCT"):
        medical.read_image(FORMATS / "dicom" / "STS-001-CT" / "mask")
    with pytest.raises(InputError, match="--series applies to a DICOM series folder"):
        medical.read_image(FORMATS / "png" / "CHNCXR-0001-0_image.png", series="1.2")


def test_a_4d_file_holding_one_volume_reads_as_that_volume(tmp_path):
    a = np.arange(4 * 5 * 6, dtype=np.float32).reshape(1, 4, 5, 6)
    img = medical.read_image(_write_volume(tmp_path / "one.nii.gz", a, spacing=(2.0, 3.0, 4.0, 1.0)))
    assert img.is_3d and img.shape == (4, 5, 6) and img.spacing == (2.0, 3.0, 4.0)
    np.testing.assert_array_equal(img.array, a[0])


def test_bad_label_images(tmp_path):
    ct = medical.read_image(FORMATS / "nifti" / "STS-001-CT_image.nii.gz")
    pet_mask = medical.read_labels(FORMATS / "nifti" / "STS-001-PET_mask.nii.gz")
    with pytest.raises(InputError, match=r"label image STS-001-PET_mask.nii.gz is 59x43x41 \(z, y, x\), the image "
                                         r"59x202x198 \(z, y, x\): not the same grid"):
        medical.check_same_grid(pet_mask, ct)
    # Same shape, other spacing: not the same grid either.
    shifted = _write_volume(tmp_path / "spacing.nii.gz", np.ones(ct.shape, np.uint8), spacing=(1.0, 1.0, 3.27))
    with pytest.raises(InputError, match="has spacing"):
        medical.check_same_grid(medical.read_labels(shifted), ct)
    with pytest.raises(InputError, match="fractional values"):
        medical.read_labels(_write_volume(tmp_path / "prob.nii.gz", np.full((3, 4, 5), 0.4, np.float32)))
    with pytest.raises(InputError, match="negative label values"):
        medical.read_labels(_write_volume(tmp_path / "neg.nii.gz", np.full((3, 4, 5), -1, np.int16)))
    import cv2

    colour = np.zeros((10, 10, 3), np.uint8)
    colour[2:5, 2:5, 0] = 255
    cv2.imwrite(str(tmp_path / "colour.png"), colour)
    with pytest.raises(InputError, match="label image colour.png: a colour label image with different channels"):
        medical.read_labels(tmp_path / "colour.png")
    np.savez(tmp_path / "nolabels.npz", imgs=np.zeros((4, 4), np.uint8))
    with pytest.raises(InputError, match="no 'gts' or 'segs'"):
        medical.read_labels(tmp_path / "nolabels.npz")


def test_without_simpleitk_volumes_fail_with_the_install_line_and_pictures_still_read(monkeypatch):
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # import SimpleITK now raises ImportError
    with pytest.raises(SegmentationError, match=r"needs SimpleITK: pip install 'mcp-medsam\[io\]'"):
        medical.read_image(FORMATS / "nrrd" / "brain1_image.nrrd")
    assert medical.read_image(FORMATS / "png" / "CHNCXR-0001-0_image.png").shape == (512, 512)


def test_suffixes_and_names():
    assert set(medical.SUFFIXES) == {".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".png", ".jpg",
                                     ".jpeg", ".bmp", ".tif", ".tiff", ".npz"}
    assert medical.suffix("A.NII.GZ") == ".nii.gz" and medical.stem("case_01.nii.gz") == "case_01"
    assert medical.output_suffix("x.jpg") == ".png" and medical.output_suffix("x.mhd") == ".mha"
    assert medical.output_suffix(FORMATS / "dicom" / "STS-001-CT" / "image") == ".nii.gz"


def test_prompt_labels_judge_what_the_file_looks_like(tmp_path):
    """``read_prompt_labels`` (``segment --boxes-from``): a soft mask is thresholded at half its range with a
    note; a picture is refused; --mask-threshold leaves a label map with no value above it as it is."""
    import cv2

    mask = medical.read_image(FORMATS / "bmp" / "IMD003_mask.bmp").array
    cv2.imwrite(str(tmp_path / "soft.png"), cv2.GaussianBlur(mask, (0, 0), 2.0))
    notes: list[str] = []
    soft = medical.read_prompt_labels(tmp_path / "soft.png", notes=notes)
    assert len(np.unique(medical.read_labels(tmp_path / "soft.png").array)) > 100  # read as it is: grey levels
    assert set(np.unique(soft.array).tolist()) == {0, 1} and len(notes) == 1
    assert "looks like a soft mask" in notes[0] and "values above 127.5 are label 1" in notes[0]
    with pytest.raises(InputError, match="a picture, not a label image"):
        medical.read_prompt_labels(FORMATS / "png" / "CHNCXR-0001-0_image.png")
    with pytest.raises(InputError, match="a colour picture"):
        medical.read_prompt_labels(FORMATS / "bmp" / "IMD003_image.bmp")
    notes.clear()
    nrrd = medical.read_prompt_labels(FORMATS / "nrrd" / "brain1_label.nrrd", threshold=127, notes=notes)
    assert nrrd.array.max() == 1 and "--mask-threshold 127 not applied to brain1_label.nrrd" in notes[0]
    # Label maps stay label maps: the hippocampus' 1/2, the 23 nuclei, a 0/255 mask.
    for name, values in (("nifti/hippocampus_001_label.nii.gz", 3), ("tiff/GOWT1-t01_mask.tif", 24),
                         ("bmp/IMD003_mask.bmp", 2)):
        notes.clear()
        assert len(np.unique(medical.read_prompt_labels(FORMATS / name, notes=notes).array)) == values
        assert notes == []
