"""femurseg's files read by independent implementations: dcmqi (3D Slicer's DICOM SEG converter),
pydicom against the Segmentation IOD, meshio for the meshes, nibabel and SimpleITK for the masks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from helpers import ball
from test_dicom_seg import _mask, _series

from femurseg.core import io
from femurseg.core.dicom_seg import write_dicom_seg


def _segimage2itkimage() -> str | None:
    exe = shutil.which("segimage2itkimage") or str(Path(sys.executable).parent / "segimage2itkimage")
    return exe if Path(exe).exists() else None


@pytest.mark.parametrize("oblique,shuffle", [(False, False), (False, True), (True, False)])
def test_dcmqi_reads_our_seg_voxel_for_voxel(tmp_path, oblique, shuffle):
    """DICOM series -> femurseg SEG -> dcmqi's segimage2itkimage -> the same mask as femurseg's NIfTI,
    voxel for voxel on the source geometry (oblique series and shuffled file order included)."""
    exe = _segimage2itkimage()
    if exe is None:
        pytest.skip("dcmqi is not installed (pip install dcmqi; in the test extra where its wheel installs)")
    vol = _series(tmp_path, oblique=oblique, shuffle=shuffle)
    mask = _mask(vol)
    seg = write_dicom_seg(tmp_path / "seg.dcm", mask, vol)
    nii = io.write_like(tmp_path / "mask.nii.gz", mask, vol, np.uint8)
    out = tmp_path / "dcmqi"
    out.mkdir()
    r = subprocess.run([exe, "--inputDICOM", str(seg), "--outputDirectory", str(out), "-t", "nii"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    written = sorted(p for p in out.iterdir() if p.name.endswith((".nii", ".nii.gz")))
    assert len(written) == 1, [p.name for p in out.iterdir()]
    theirs = sitk.ReadImage(str(written[0]))
    ours = sitk.ReadImage(str(nii))
    # dcmqi writes the frames' extent; put it on our grid (nearest neighbour, 0 outside)
    on_ours = sitk.Resample(theirs, ours, sitk.Transform(), sitk.sitkNearestNeighbor, 0, ours.GetPixelID())
    a, b = sitk.GetArrayFromImage(on_ours) > 0, sitk.GetArrayFromImage(ours) > 0
    assert b.any() and np.array_equal(a, b)
    assert np.allclose(theirs.GetDirection(), ours.GetDirection(), atol=1e-4)


SEG_REQUIRED = (
    # SOP Common, General Series/Study, Patient, Frame of Reference, Segmentation Series / Image,
    # Multi-frame Functional Groups, Multi-frame Dimension, Image Pixel, Common Instance Reference
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber",
    "InstanceNumber", "FrameOfReferenceUID", "ContentLabel", "ContentCreatorName", "ImageType",
    "SegmentationType", "SegmentSequence", "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
    "NumberOfFrames", "DimensionOrganizationSequence", "DimensionIndexSequence", "Rows", "Columns",
    "BitsAllocated", "BitsStored", "HighBit", "SamplesPerPixel", "PhotometricInterpretation", "PixelData",
    "ReferencedSeriesSequence", "ContentDate", "ContentTime", "Manufacturer",
)


def test_seg_has_the_segmentation_iod_attributes(tmp_path):
    """The attributes the Segmentation IOD (PS3.3 A.51) requires, checked with pydicom alone."""
    vol = _series(tmp_path)
    ds = pydicom.dcmread(write_dicom_seg(tmp_path / "seg.dcm", _mask(vol), vol))
    missing = [k for k in SEG_REQUIRED if k not in ds]
    assert missing == []
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and ds.Modality == "SEG"
    assert ds.SegmentationType == "BINARY" and ds.BitsAllocated == 1
    for seg in ds.SegmentSequence:
        for k in ("SegmentNumber", "SegmentLabel", "SegmentAlgorithmType", "SegmentedPropertyCategoryCodeSequence",
                  "SegmentedPropertyTypeCodeSequence"):
            assert k in seg, k
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert "PixelMeasuresSequence" in shared and "PlaneOrientationSequence" in shared
    for frame in ds.PerFrameFunctionalGroupsSequence:  # a functional group may be shared or per frame
        for group in ("PlanePositionSequence", "FrameContentSequence", "SegmentIdentificationSequence",
                      "DerivationImageSequence"):
            assert group in frame or group in shared, group


def test_meshes_read_by_meshio_with_the_distance_scalar(tmp_path):
    meshio = pytest.importorskip("meshio", reason="meshio is not installed (pip install -e '.[test]')")
    from femurseg.evaluation.report.surface import coloured_surface, write_ply

    spacing = (1.5, 1.0, 1.0)
    ref = ball((20, 32, 32), radius=9.0, spacing=spacing)
    pred = ball((20, 32, 32), radius=10.0, spacing=spacing)
    mesh = coloured_surface(pred, ref, spacing)
    ply = meshio.read(write_ply(tmp_path / "m.ply", mesh, spacing))
    n = len(mesh.verts)
    assert ply.points.shape == (n, 3) and sum(len(c.data) for c in ply.cells) == len(mesh.faces)
    d_ply = np.asarray(ply.point_data["distance"], float).ravel()
    assert np.allclose(d_ply, mesh.distance, atol=1e-3)
    assert 0.5 < float(np.median(d_ply)) < 1.5  # the predicted ball is ~1 mm larger


def test_vtk_mesh_read_by_vtk(tmp_path):
    """The legacy VTK POLYDATA file in VTK's own reader (meshio reads no POLYDATA; ParaView uses this reader)."""
    vtk = pytest.importorskip("vtk", reason="VTK is not installed (pip install vtk: a 140 MB wheel, not in the test extra)")
    from vtk.util.numpy_support import vtk_to_numpy

    from femurseg.evaluation.report.surface import coloured_surface, write_vtk

    spacing = (1.5, 1.0, 1.0)
    mesh = coloured_surface(ball((20, 32, 32), radius=10.0, spacing=spacing), ball((20, 32, 32), radius=9.0,
                                                                                  spacing=spacing), spacing)
    reader = vtk.vtkPolyDataReader()
    reader.SetFileName(str(write_vtk(tmp_path / "m.vtk", mesh, spacing)))
    reader.Update()
    poly = reader.GetOutput()
    assert poly.GetNumberOfPoints() == len(mesh.verts) and poly.GetNumberOfPolys() == len(mesh.faces)
    d = vtk_to_numpy(poly.GetPointData().GetArray("distance_mm"))
    assert np.allclose(d, mesh.distance, atol=1e-3)


def test_masks_read_alike_by_nibabel_and_simpleitk(tmp_path):
    """A mask written by femurseg (NIfTI) has the same voxels and geometry in nibabel and SimpleITK."""
    import nibabel as nib

    vol = _series(tmp_path, oblique=True)
    path = io.write_like(tmp_path / "mask.nii.gz", _mask(vol), vol, np.uint8)
    img_nib, img_itk = nib.load(str(path)), sitk.ReadImage(str(path))
    a_nib = np.asarray(img_nib.dataobj)
    a_itk = sitk.GetArrayFromImage(img_itk).transpose(2, 1, 0)  # ITK's array is z, y, x
    assert a_nib.dtype == np.uint8 and np.array_equal(a_nib, a_itk)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    direction = np.asarray(img_itk.GetDirection()).reshape(3, 3)
    ras_affine = np.eye(4)
    ras_affine[:3, :3] = lps_to_ras @ direction @ np.diag(img_itk.GetSpacing())
    ras_affine[:3, 3] = lps_to_ras @ np.asarray(img_itk.GetOrigin())
    assert np.allclose(img_nib.affine, ras_affine, atol=1e-4)
