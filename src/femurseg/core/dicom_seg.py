"""DICOM Segmentation (SEG) output for a predicted femur mask, written with highdicom.

A SEG object lets PACS viewers, OHIF and 3D Slicer (QuantitativeReporting / "DICOM" module)
load the mask as an overlay on the source MR/CT series. What we write:

* ``SegmentationType`` BINARY, one segment, number 1, label "Femur":
  segmented property category SCT 91723000 "Anatomical Structure", type SCT 71341001 "Femur"
  (the codes 3D Slicer's default terminology uses for the femur), algorithm type AUTOMATIC,
  algorithm identification "femurseg" + package version, family DCM 123110 "Artificial Intelligence".
* One frame per source slice (``omit_empty_frames=False``), in the order of the source
  datasets as :func:`femurseg.core.io.read_image` sorted them (``Volume.dicom_files``); each frame
  references its source SOP instance (Derivation Image / Source Image Sequence) and carries the
  source's plane position and orientation, so the overlay is exact also for oblique series.
* New Series Instance UID in the source's study, Series Number = source series number + 1000.
* A source without Slice Thickness (Type 2, but written empty or left out by some converters,
  SimpleITK among them) gets, in the headers read for the SEG only, the series' slice spacing
  from its geometry: highdicom needs a thickness for the SEG's pixel measures. A source without
  a Frame of Reference UID cannot carry a SEG (the overlay is defined by it) and is refused.

The mask arrives in femurseg's canonical ``(A, I, L)`` order; :meth:`Volume.native_array`
maps it back to the native NumPy order ``[k, j, i]``, where ``native[k]`` is the pixel array
(rows x columns) of ``Volume.dicom_files[k]``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from femurseg.core.errors import FemursegError, atomic_path
from femurseg.core.io import Volume

SEGMENT_LABEL = "Femur"
SERIES_NUMBER_OFFSET = 1000


def _codes():
    from pydicom.sr.codedict import codes

    category = codes.SCT.AnatomicalStructure  # SCT 91723000
    femur = codes.SCT.Femur  # SCT 71341001
    family = codes.cid7162.ArtificialIntelligence  # DCM 123110
    return category, femur, family


def read_source_datasets(volume: Volume) -> list:
    """The source series' datasets (headers only) in ``volume.dicom_files`` order."""
    import pydicom

    if not volume.dicom_files:
        src = volume.source or "input"
        kind = Path(src).suffix or "non-DICOM"
        raise FemursegError(f"{src}: a DICOM SEG needs a DICOM series as input (got a {kind} image)")
    datasets = []
    for f in volume.dicom_files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises InvalidDicomError, OSError, ...
            raise FemursegError(f"{f}: cannot read DICOM header for the SEG: {exc}") from None
        if ds.get("SliceThickness") in (None, ""):
            ds.SliceThickness = f"{float(volume.geometry.spacing[2]):.6g}"  # the spacing between the slices, mm
        datasets.append(ds)
    return datasets


def build_segmentation(mask: np.ndarray, volume: Volume, *, series_description: str = "femurseg Femur",
                       content_label: str = "FEMUR"):
    """Build a ``highdicom.seg.Segmentation`` for a canonical mask on ``volume``'s grid.

    Args:
        mask: canonical ``(n_coronal, rows, cols)`` array, non-zero = femur (the shape of ``volume.data``).
        volume: the DICOM series the mask was predicted on (``volume.dicom_files`` set by ``read_image``).

    Returns:
        the Segmentation dataset (not yet written).
    """
    import highdicom as hd
    from pydicom.uid import ExplicitVRLittleEndian

    from femurseg import __version__

    if tuple(mask.shape) != tuple(volume.data.shape):
        raise ValueError(f"mask shape {mask.shape} != volume shape {volume.data.shape}")
    sources = read_source_datasets(volume)
    native = volume.native_array(np.asarray(mask) > 0).astype(np.uint8)  # [k, j, i]: frame k = dicom_files[k]
    if native.shape[0] != len(sources):
        raise FemursegError(f"{volume.source}: {len(sources)} DICOM files but {native.shape[0]} slices in the volume")
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    if native.shape[1:] != (rows, cols):
        raise FemursegError(f"{volume.source}: DICOM frames are {rows}x{cols} "
                            f"but the volume slices are {native.shape[1:]}")

    category, femur, family = _codes()
    algorithm = hd.AlgorithmIdentificationSequence(name="femurseg", family=family, version=__version__)
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=category,
        segmented_property_type=femur,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=hd.UID(),
        tracking_id="femurseg femur",
    )
    try:
        src_series = int(getattr(sources[0], "SeriesNumber", 0) or 0)
    except (TypeError, ValueError):
        src_series = 0
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=native,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[segment],
            series_instance_uid=hd.UID(),
            series_number=src_series + SERIES_NUMBER_OFFSET,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="femurseg",
            manufacturer_model_name="femurseg",
            software_versions=__version__,
            device_serial_number="1",
            content_label=content_label,
            content_description="Proximal femur, automatic CNN segmentation",
            omit_empty_frames=False,
            transfer_syntax_uid=ExplicitVRLittleEndian,
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:  # highdicom's checks of the source headers
        raise FemursegError(f"{volume.source}: the series' DICOM headers do not allow a DICOM SEG ({exc}); "
                            "the mask itself can still be written without --dicom-seg") from None
    seg.SeriesDescription = series_description
    if "ContentCreatorName" not in seg:  # Type 2 in the Segmentation IOD: present, empty (no human creator)
        seg.ContentCreatorName = ""
    return seg


def write_dicom_seg(path: str | os.PathLike, mask: np.ndarray, volume: Volume) -> Path:
    """Write ``mask`` (canonical, on ``volume``'s grid) as a DICOM SEG referencing ``volume``'s series.

    The file is written atomically (temporary name, then rename). Returns the path.
    """
    p = Path(path)
    seg = build_segmentation(mask, volume)
    with atomic_path(p) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return p
