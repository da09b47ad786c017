"""Test helpers: build small volumes and DICOM series in memory."""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from femurseg.core import io


def ball(shape=(12, 20, 24), centre=None, radius=5.0, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Boolean ellipsoid of ``radius`` mm in a canonical array."""
    centre = np.asarray(centre if centre is not None else [(s - 1) / 2 for s in shape], float)
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    d2 = sum(((g - c) * sp) ** 2 for g, c, sp in zip(grids, centre, spacing))
    return d2 <= radius**2


def write_dicom_series(vol: io.Volume, folder: Path, data: np.ndarray | None = None, series_uid: str | None = None,
                       study_uid: str | None = None) -> list[Path]:
    """Write ``vol`` (canonical data, native geometry) as an MR DICOM series, one file per native slice."""
    folder.mkdir(parents=True, exist_ok=True)
    native = vol.native_array(vol.data if data is None else data)  # [k, j, i]
    g = vol.geometry
    d = np.asarray(g.direction).reshape(3, 3)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    lo, hi = float(native.min()), float(native.max())
    slope = (hi - lo) / 4000.0 if hi > lo else 1.0
    paths = []
    for k in range(native.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality = "MR"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Hip", "PH0001", "19500101", "F"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = datetime.date(2026, 1, 1).strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "A1", ""
        ds.Manufacturer = "femurseg-test"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        pos = np.asarray(g.origin) + d[:, 2] * g.spacing[2] * k
        ds.ImagePositionPatient = [f"{x:.6f}" for x in pos]
        ds.ImageOrientationPatient = [f"{x:.6f}" for x in np.r_[d[:, 0], d[:, 1]]]
        ds.PixelSpacing = [f"{g.spacing[1]:.6f}", f"{g.spacing[0]:.6f}"]
        ds.SliceThickness = f"{g.spacing[2]:.6f}"
        ds.Rows, ds.Columns = native.shape[1], native.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = f"{lo:.6f}", f"{slope:.9f}"
        ds.PixelData = np.round((native[k] - lo) / slope).astype(np.uint16).tobytes()
        p = folder / f"IM{k:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths
