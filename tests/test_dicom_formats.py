"""DICOM encodings beyond single-frame native pixel data: multi-frame (Enhanced and Legacy
Converted Enhanced CT) and compressed transfer syntaxes.

Every case is built from a plain single-frame series written with pydicom and converted
by pydicom (and, for the JPEG encodings pydicom cannot write, imagecodecs), independently
of dinox; prep must give exactly the volume of the original series."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder, pixel_array
from pydicom.pixels.decoders.base import Decoder
from pydicom.sequence import Sequence
from pydicom.uid import (EnhancedCTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLosslessSV1,
                         JPEGLSLossless, LegacyConvertedEnhancedCTImageStorage, RLELossless, generate_uid)

from dinox.data import dicom_io

from test_ingest import index_rows, prep, volume, write_series

ROW_DIR = np.array([1.0, 0.0, 0.0])
COL_DIR = np.array([0.0, np.cos(np.deg2rad(20.0)), -np.sin(np.deg2rad(20.0))])   # oblique
NORMAL = np.cross(ROW_DIR, COL_DIR)
ORIENTATION = tuple(ROW_DIR) + tuple(COL_DIR)


def single_frame_series(folder: Path, n: int, shape, uid: str, seed: int, *, signed: bool = False,
                        rescales=None) -> tuple[np.ndarray, list[Path]]:
    """HU truth and its single-frame files: oblique, with in-plane offsets (so only the
    slice normal orders them) and, optionally, a different rescale per slice."""
    rng = np.random.default_rng(seed)
    hu = (rng.integers(-500, 1000, (n,) + tuple(shape)) * 2).astype(np.int16)   # even: exact for slope 2
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(n):
        slope, intercept = rescales[k] if rescales else ((1, 0) if signed else (1, -1024))
        stored = np.rint((hu[k].astype(np.float64) - intercept) / slope).astype(np.int16 if signed else np.uint16)
        position = (np.array([-40.0, 12.0, 30.0]) + 1.5 * k * NORMAL
                    + rng.uniform(-20, 20) * ROW_DIR + rng.uniform(-20, 20) * COL_DIR)
        files.append(_write_single(folder / f"IM{k:03d}", stored, uid, position, slope, intercept, k + 1))
    return hu, files


def _write_single(path: Path, stored, uid, position, slope, intercept, instance) -> Path:
    ds = _image_dataset(stored.shape, stored.dtype.kind == "i", uid, "1.2.3.77")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in ORIENTATION]
    ds.PixelSpacing = [0.7, 0.8]
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _image_dataset(shape, signed: bool, series_uid: str, study_uid: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.PatientID = "P1"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Rows, ds.Columns = shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = int(signed)
    return ds


def _item(**elements) -> Dataset:
    item = Dataset()
    for name, value in elements.items():
        setattr(item, name, value)
    return item


def to_enhanced(files: list[Path], path: Path, series_uid: str, *, order=None,
                sop_class=EnhancedCTImageStorage, shared_rescale: bool = False,
                frame_orientation: dict[int, tuple] | None = None) -> Path:
    """One multi-frame file holding the pixels of single-frame `files`, frames in `order`
    (indices into files), each frame's position (and rescale unless `shared_rescale`) in
    its per-frame functional groups, orientation and pixel spacing in the shared ones
    (a frame listed in `frame_orientation` gets its own orientation instead)."""
    sources = [pydicom.dcmread(f) for f in files]
    order = list(range(len(files))) if order is None else list(order)
    first = sources[0]
    ds = _image_dataset((first.Rows, first.Columns), bool(first.PixelRepresentation), series_uid,
                        first.StudyInstanceUID)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(order)

    def rescale(src):
        return _item(RescaleSlope=src.RescaleSlope, RescaleIntercept=src.RescaleIntercept, RescaleType="HU")

    shared = _item(PlaneOrientationSequence=Sequence([_item(ImageOrientationPatient=first.ImageOrientationPatient)]),
                   PixelMeasuresSequence=Sequence([_item(PixelSpacing=first.PixelSpacing, SliceThickness="1.5")]))
    if shared_rescale:
        assert len({(s.RescaleSlope, s.RescaleIntercept) for s in sources}) == 1
        shared.PixelValueTransformationSequence = Sequence([rescale(first)])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for number, k in enumerate(order):
        item = _item(PlanePositionSequence=Sequence([_item(ImagePositionPatient=sources[k].ImagePositionPatient)]),
                     FrameContentSequence=Sequence([_item(InStackPositionNumber=int(k) + 1)]))
        if not shared_rescale:
            item.PixelValueTransformationSequence = Sequence([rescale(sources[k])])
        if frame_orientation and number in frame_orientation:
            item.PlaneOrientationSequence = Sequence([_item(ImageOrientationPatient=list(frame_orientation[number]))])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = b"".join(sources[k].PixelData for k in order)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("sop_class", [EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage])
@pytest.mark.parametrize("shared_rescale", [False, True])
def test_enhanced_ct_equals_its_single_frame_series(tmp_path, sop_class, shared_rescale):
    rescales = None if shared_rescale else [(1, -1024), (2, -2048), (0.5, -1000), (1, 0), (1, -3000), (2, -1024)]
    hu, files = single_frame_series(tmp_path / "in" / "single", 6, (10, 12), "1.2.50.1", seed=0,
                                    signed=True, rescales=rescales)
    order = np.random.default_rng(1).permutation(6)
    assert list(order) != sorted(order)
    (tmp_path / "in" / "multi").mkdir()
    to_enhanced(files, tmp_path / "in" / "multi" / "enhanced.dcm", "1.2.50.2", order=order,
                sop_class=sop_class, shared_rescale=shared_rescale)
    out = tmp_path / "out"
    report = prep([tmp_path / "in"], out)
    assert sorted(report["series_written"]) == ["1.2.50.1", "1.2.50.2"]
    assert report["files_skipped"] == []
    np.testing.assert_array_equal(volume(out, "1.2.50.1"), hu)
    np.testing.assert_array_equal(volume(out, "1.2.50.2"), volume(out, "1.2.50.1"))
    rows = index_rows(out)
    keys = ("num_slices", "rows", "cols", "spacing_z", "spacing_y", "spacing_x")
    assert [rows["1.2.50.2"][k] for k in keys] == [rows["1.2.50.1"][k] for k in keys]
    assert float(rows["1.2.50.2"]["spacing_z"]) == pytest.approx(1.5)
    assert rows["1.2.50.2"]["n_source_files"] == "1"
    # the rescale lies in the functional groups, not at the top level: found there, no note
    assert not any("Rescale" in note for notes in report["series_notes"].values() for note in notes)
    # each frame's z is its own ImagePositionPatient z, as a slice's: LIDC's imageZposition finds both alike
    single = dicom_io.plan_series([h for f in files for h in dicom_io.read_headers(str(f))])
    multi = dicom_io.plan_series(dicom_io.read_headers(str(tmp_path / "in" / "multi" / "enhanced.dcm")))
    assert multi.image_z == pytest.approx(single.image_z) and None not in multi.image_z


def test_enhanced_ct_frames_are_checked_like_slices(tmp_path):
    hu, files = single_frame_series(tmp_path / "single", 8, (6, 7), "1.2.51.1", seed=2)
    kept = [0, 1, 2, 3, 5, 6, 7]                      # slice 4 missing: a gap
    tilted = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)          # frame 2 (slice 3) in another orientation
    (tmp_path / "in").mkdir()
    to_enhanced([files[k] for k in kept] + [files[3]], tmp_path / "in" / "mf.dcm", "1.2.51.2",
                order=[6, 2, 0, 5, 1, 4, 3, 7], frame_orientation={7: tilted})
    report = prep([tmp_path / "in"], tmp_path / "out")
    np.testing.assert_array_equal(volume(tmp_path / "out", "1.2.51.2"), hu[kept])
    (skipped,) = report["files_skipped"]
    assert skipped["path"].endswith("mf.dcm [frame 8]") and "inconsistent geometry" in skipped["reason"]
    assert any("gap" in note for note in report["series_notes"]["1.2.51.2"])


def test_multi_frame_without_frame_positions_is_skipped_with_reason(tmp_path):
    _, files = single_frame_series(tmp_path / "single", 3, (4, 4), "1.2.52.1", seed=3)
    ds = pydicom.dcmread(files[0])
    ds.SeriesInstanceUID = "1.2.52.2"
    ds.NumberOfFrames = 3
    ds.PixelData = b"".join(pydicom.dcmread(f).PixelData for f in files)
    (tmp_path / "in").mkdir()
    ds.save_as(tmp_path / "in" / "mf.dcm", enforce_file_format=True)
    write_series(tmp_path / "in", np.zeros((2, 4, 4), np.int16), "1.2.52.3")
    report = prep([tmp_path / "in"], tmp_path / "out")
    (skip,) = report["series_skipped"]
    assert skip["series_id"] == "1.2.52.2" and "without functional groups" in skip["reason"]


# -- compressed transfer syntaxes -------------------------------------------------------

def _encapsulate_with(encode):
    """Compress a dataset's frames with an encoder pydicom does not have (imagecodecs)."""
    def compress(ds: Dataset, ts) -> None:
        frames = pixel_array(ds).reshape(-1, ds.Rows, ds.Columns)
        # the codestream holds the stored bits; signed pixels are encoded as their uint16 pattern
        ds.PixelData = encapsulate([encode(f.view(np.uint16)) for f in frames])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = ts
    return compress


def _jpeg_lossless_sv1(ds, ts):
    codecs = pytest.importorskip("imagecodecs", reason="no JPEG Lossless encoder: imagecodecs (dev extra)")
    _encapsulate_with(lambda f: codecs.jpeg8_encode(f, lossless=True, predictor=1, bitspersample=16))(ds, ts)


def _jpeg_ls(ds, ts):
    codecs = pytest.importorskip("imagecodecs", reason="no JPEG-LS encoder: imagecodecs (dev extra)")
    _encapsulate_with(lambda f: codecs.jpegls_encode(f, level=0))(ds, ts)


def _pydicom_compress(ds, ts):
    ds.compress(ts, encoding_plugin="pylibjpeg")   # pylibjpeg-openjpeg / pylibjpeg-rle encode


# transfer syntax: (the codecs-extra module that decodes it, how the test encodes it)
CODECS = {
    "jpeg-lossless-sv1": (JPEGLosslessSV1, "libjpeg", _jpeg_lossless_sv1),
    "jpeg-ls-lossless": (JPEGLSLossless, "libjpeg", _jpeg_ls),
    "jpeg2000-lossless": (JPEG2000Lossless, "openjpeg", _pydicom_compress),
    "rle-lossless": (RLELossless, "rle", _pydicom_compress),
}


def compress_copy(src: Path, dst: Path, ts, encode, series_uid: str) -> Path:
    ds = pydicom.dcmread(src)
    ds.SeriesInstanceUID = series_uid
    encode(ds, ts)
    ds.save_as(dst, enforce_file_format=True)
    assert pydicom.dcmread(dst, stop_before_pixels=True).file_meta.TransferSyntaxUID == ts
    return dst


@pytest.mark.parametrize("multi_frame", [False, True], ids=["single-frame", "enhanced"])
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("codec", sorted(CODECS))
def test_compressed_series_decode_hu_exact(tmp_path, codec, signed, multi_frame):
    ts, module, encode = CODECS[codec]
    pytest.importorskip("pylibjpeg", reason='codecs extra not installed (pip install "dinox[codecs]")')
    pytest.importorskip(module, reason='codecs extra not installed (pip install "dinox[codecs]")')
    # with the extra, pydicom tries pylibjpeg before its own RLE decoder and before Pillow
    assert "pylibjpeg" in get_decoder(ts).available_plugins
    # 32 x 40: openjpeg refuses images under 32 px a side at its default resolution levels
    hu, files = single_frame_series(tmp_path / "in" / "raw", 4, (32, 40), "1.2.60.1", seed=4, signed=signed)
    comp = tmp_path / "in" / "compressed"
    comp.mkdir()
    if multi_frame:
        sources = [to_enhanced(files, tmp_path / "enhanced.dcm", "1.2.60.2", order=[2, 0, 3, 1])]
    else:
        sources = files
    for src in sources:
        compress_copy(src, comp / src.name, ts, encode, "1.2.60.2")
    out = tmp_path / "out"
    report = prep([tmp_path / "in"], out)
    assert sorted(report["series_written"]) == ["1.2.60.1", "1.2.60.2"], report["series_skipped"]
    assert report["files_skipped"] == []
    np.testing.assert_array_equal(volume(out, "1.2.60.1"), hu)
    np.testing.assert_array_equal(volume(out, "1.2.60.2"), hu)


def _unavailable_decoder(ts) -> Decoder:
    """A decoder for `ts` as pydicom builds it where neither pylibjpeg nor gdcm is installed."""
    decoder = Decoder(ts)
    decoder.add_plugins([("gdcm", ("pydicom.pixels.decoders.gdcm", "_decode_frame")),
                         ("pylibjpeg", ("pydicom.pixels.decoders.pylibjpeg", "_decode_frame"))])
    return decoder


def test_compressed_series_without_decoder_is_skipped_with_codecs_hint(tmp_path, monkeypatch):
    from pydicom.pixels.decoders import gdcm as gdcm_plugin
    from pydicom.pixels.decoders import pylibjpeg as pylibjpeg_plugin

    monkeypatch.setattr(gdcm_plugin, "is_available", lambda uid: False)
    monkeypatch.setattr(pylibjpeg_plugin, "is_available", lambda uid: False)
    absent = _unavailable_decoder(JPEGLosslessSV1)
    assert not absent.is_available
    real = dicom_io.get_decoder
    monkeypatch.setattr(dicom_io, "get_decoder", lambda uid: absent if uid == JPEGLosslessSV1 else real(uid))

    _, files = single_frame_series(tmp_path / "in" / "raw", 3, (8, 8), "1.2.61.1", seed=5)
    (tmp_path / "in" / "jpeg").mkdir()
    for f in files:   # never decoded: the series is skipped when it is planned
        compress_copy(f, tmp_path / "in" / "jpeg" / f.name, JPEGLosslessSV1,
                      _encapsulate_with(lambda frame: b"\xff\xd8\xff\xc3 not decoded \xff\xd9"), "1.2.61.2")
    report = prep([tmp_path / "in"], tmp_path / "out")
    assert report["series_written"] == ["1.2.61.1"]
    (skip,) = report["series_skipped"]
    assert skip["series_id"] == "1.2.61.2"
    assert "JPEG Lossless" in skip["reason"] and "no decoder installed" in skip["reason"]
    assert 'pip install "dinox[codecs]"' in skip["reason"]
    assert "pip install pylibjpeg pylibjpeg-libjpeg" in skip["reason"] and "gdcm" in skip["reason"]
    assert "\n" not in skip["reason"]


def test_uncompressed_and_rle_need_no_extra():
    assert dicom_io.decoder_problem(ExplicitVRLittleEndian) is None
    assert dicom_io.decoder_problem(RLELossless) is None        # pydicom decodes RLE itself
    assert dicom_io.decoder_problem("1.2.840.10008.1.2.4.100").startswith("unsupported transfer syntax")


def test_the_header_cache_gives_back_each_header_exactly(tmp_path):
    """prep keeps the header scan's answers in a JSON cache (`_index/dicom_headers.json`), with
    what a series' slices share stored once; read back, every SliceHeader (frames, tuples,
    missing values) and every reason must be what the scan read."""
    import json
    _, files = single_frame_series(tmp_path / "single", 4, (6, 7), "1.2.53.1", seed=4)
    enhanced = to_enhanced(files, tmp_path / "mf.dcm", "1.2.53.2", order=[2, 0, 3, 1],
                           frame_orientation={1: (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)})
    (tmp_path / "notes.txt").write_text("no image")
    paths = [*map(str, files), str(enhanced), str(tmp_path / "notes.txt")]
    answers = [dicom_io.read_headers(p) for p in paths]
    assert sum(len(a) for a in answers[:-1]) == 8 and isinstance(answers[-1], str)
    packed = dicom_io.pack_header_records([dicom_io.header_record(a) for a in answers])
    assert len(packed["shared"]) == 3   # the single-frame series, and the enhanced file's two orientations
    records = dicom_io.unpack_header_records(json.loads(json.dumps(packed)))
    assert [dicom_io.headers_of_record(p, r) for p, r in zip(paths, records)] == answers
    packed["fields"][1] = packed["fields"][1][:-1]   # a cache written by another SliceHeader
    with pytest.raises(ValueError):
        dicom_io.unpack_header_records(packed)
