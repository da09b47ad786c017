"""DICOM SEG output: read back with highdicom, frame-by-frame against the mask, references to the source."""

from __future__ import annotations

import random

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from helpers import ball, write_dicom_series

from femurseg import __version__
from femurseg.core import io
from femurseg.core.dicom_seg import write_dicom_seg
from femurseg.core.errors import FemursegError
from femurseg.inference import predict as P

SHAPE, SPACING = (6, 14, 16), (1.5, 0.5, 0.6)


def _series(tmp_path, oblique: bool = False, shuffle: bool = False):
    rng = np.random.default_rng(0)
    if oblique:
        img = sitk.GetImageFromArray(rng.normal(100, 20, (SHAPE[0], SHAPE[1], SHAPE[2])).astype(np.float32))
        theta = np.deg2rad(17.0)
        rot = np.array([[np.cos(theta), 0, np.sin(theta)], [0, 1, 0], [-np.sin(theta), 0, np.cos(theta)]])
        coronal = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float)
        img.SetDirection(tuple((rot @ coronal).ravel()))
        img.SetSpacing((0.6, 0.5, 1.5))
        img.SetOrigin((10.0, -20.0, 5.0))
        sitk.WriteImage(img, str(tmp_path / "obl.nii.gz"))
        vol = io.read_image(tmp_path / "obl.nii.gz")
    else:
        vol = io.make_volume((rng.normal(100, 20, SHAPE)).astype(np.float32), SPACING)
    files = write_dicom_series(vol, tmp_path / "dcm")
    if shuffle:  # file names no longer in slice order
        names = [f"X{i:03d}.dcm" for i in range(len(files))]
        random.Random(1).shuffle(names)
        tmp = [f.rename(f.with_name("tmp_" + f.name)) for f in files]
        for f, n in zip(tmp, names):
            f.rename(f.with_name(n))
    return io.read_image(tmp_path / "dcm")


def _mask(vol):
    m = ball(vol.data.shape, radius=3.0, spacing=vol.spacing).astype(np.uint8)
    m[: vol.data.shape[0] // 2, :, : vol.data.shape[2] // 2] = 0  # asymmetric, so flips are caught
    return m


def _native_index(ds, vol) -> int:
    """The native slice index of a source file, from its position (independent of file order)."""
    g = vol.geometry
    d = np.asarray(g.direction).reshape(3, 3)
    offset = np.asarray(ds.ImagePositionPatient, float) - np.asarray(g.origin)
    return int(round(float(offset @ d[:, 2]) / g.spacing[2]))


@pytest.mark.parametrize("oblique,shuffle", [(False, False), (False, True), (True, False)])
def test_seg_frames_match_mask_and_reference_sources(tmp_path, oblique, shuffle):
    vol = _series(tmp_path, oblique, shuffle)
    mask = _mask(vol)
    path = write_dicom_seg(tmp_path / "seg.dcm", mask, vol)
    seg = hd.seg.segread(path)
    sources = [pydicom.dcmread(f) for f in vol.dicom_files]
    uids = [s.SOPInstanceUID for s in sources]

    # frame by frame: the frame that references a source slice holds the mask of that slice
    px = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])[..., 0]
    native = vol.native_array(mask)
    assert seg.number_of_frames == len(sources) == native.shape[0]
    for s, frame in zip(sources, px):
        assert np.array_equal(frame, native[_native_index(s, vol)])
    assert px.sum() == mask.sum() > 0

    # references, geometry, study
    ref_series = seg.ReferencedSeriesSequence[0]
    assert ref_series.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in ref_series.ReferencedInstanceSequence} == set(uids)
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.SeriesInstanceUID != sources[0].SeriesInstanceUID
    positions = {tuple(np.round(np.asarray(s.ImagePositionPatient, float), 3)) for s in sources}
    seg_positions = {tuple(np.round(np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, float), 3))
                     for f in seg.PerFrameFunctionalGroupsSequence}
    assert seg_positions == positions
    orient = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    assert np.allclose(np.asarray(orient, float), np.asarray(sources[0].ImageOrientationPatient, float), atol=1e-5)

    # the segment: binary, "Femur" with SNOMED codes, femurseg as the algorithm
    assert seg.SegmentationType == "BINARY"
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "Femur"
    prop = segment.SegmentedPropertyTypeCodeSequence[0]
    assert (prop.CodeValue, prop.CodingSchemeDesignator, prop.CodeMeaning) == ("71341001", "SCT", "Femur")
    cat = segment.SegmentedPropertyCategoryCodeSequence[0]
    assert (cat.CodeValue, cat.CodingSchemeDesignator) == ("91723000", "SCT")
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentAlgorithmName == "femurseg"
    algo = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "femurseg" and algo.AlgorithmVersion == __version__


def test_empty_mask_still_gives_a_valid_seg(tmp_path):
    vol = _series(tmp_path)
    seg = hd.seg.segread(write_dicom_seg(tmp_path / "seg.dcm", np.zeros(vol.data.shape, np.uint8), vol))
    assert seg.number_of_frames == vol.data.shape[0]


def test_non_dicom_input_is_refused(tmp_path):
    vol = io.make_volume(np.zeros(SHAPE, np.float32), SPACING)
    with pytest.raises(FemursegError, match="DICOM series"):
        write_dicom_seg(tmp_path / "seg.dcm", np.zeros(SHAPE, np.uint8), vol)
    assert not (tmp_path / "seg.dcm").exists()


def test_headers_highdicom_refuses_give_one_femurseg_error_and_no_files(run3d, tmp_path):
    """A series without the Frame of Reference UID (Type 1 in the MR and CT IODs, so a SEG needs
    it): a FemursegError naming the way out, not highdicom's traceback, and nothing written."""
    vol = _series(tmp_path)
    for f in vol.dicom_files:
        ds = pydicom.dcmread(f)
        del ds.FrameOfReferenceUID
        ds.save_as(f)
    vol = io.read_image(tmp_path / "dcm")
    with pytest.raises(FemursegError, match="do not allow a DICOM SEG.*without --dicom-seg"):
        write_dicom_seg(tmp_path / "seg.dcm", _mask(vol), vol)
    pred = P.load_predictor(run3d, device="cpu")
    outs = P.outputs_for(tmp_path / "out.nii.gz", dicom_seg=True)
    with pytest.raises(FemursegError, match="Frame Of Reference"):
        P.predict_file(pred, tmp_path / "dcm", outs, threshold="otsu")
    assert not list(tmp_path.glob("seg.dcm")) and not list(tmp_path.glob("out*"))


def test_a_series_without_slice_thickness_gets_its_slice_spacing(tmp_path):
    vol = _series(tmp_path)
    for f in vol.dicom_files:
        ds = pydicom.dcmread(f)
        if "SliceThickness" in ds:
            del ds.SliceThickness
        ds.save_as(f)
    vol = io.read_image(tmp_path / "dcm")
    seg = hd.seg.segread(write_dicom_seg(tmp_path / "seg.dcm", _mask(vol), vol))
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SliceThickness) == pytest.approx(SPACING[0])
    assert "SliceThickness" not in pydicom.dcmread(vol.dicom_files[0])  # the source files are not touched


def test_predict_writes_seg_beside_the_mask(run3d, tmp_path):
    vol = _series(tmp_path, shuffle=True)
    pred = P.load_predictor(run3d, device="cpu")
    outs = P.outputs_for(tmp_path / "out.nii.gz", dicom_seg=True)
    assert outs.dicom_seg == tmp_path / "out.dcm"
    P.predict_file(pred, tmp_path / "dcm", outs, threshold="otsu")
    mask = io.read_image(tmp_path / "out.nii.gz", dtype=None)
    assert mask.geometry.matches(vol.geometry) is None
    seg = hd.seg.segread(outs.dicom_seg)
    sources = [pydicom.dcmread(f) for f in vol.dicom_files]
    px = seg.get_pixels_by_source_instance(source_sop_instance_uids=[s.SOPInstanceUID for s in sources],
                                           segment_numbers=[1])[..., 0]
    native = vol.native_array(mask.data)
    for s, frame in zip(sources, px):
        assert np.array_equal(frame, native[_native_index(s, vol)])
    # --dicom-seg-out elsewhere
    other = P.outputs_for(tmp_path / "out2.nii.gz", dicom_seg_out=tmp_path / "segs.dcm")
    assert other.dicom_seg == tmp_path / "segs.dcm"
