"""NIfTI maps open correctly in viewers: float32, the source affine, sform and qform set."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from anomri.io.nifti import save_volume


def test_map_keeps_the_source_grid(tmp_path) -> None:
    affine = np.array([[-2.5, 0, 0, 90], [0, 2.5, 0, -126], [0, 0, 2.5, -72], [0, 0, 0, 1]])
    source = nib.Nifti1Image(np.zeros((4, 5, 6, 3), np.int16), affine)
    source.set_sform(affine, code=2)
    source.set_qform(affine, code=1)
    source.header.set_xyzt_units("mm", "sec")
    data = np.random.default_rng(0).normal(size=(4, 5, 6))
    path = tmp_path / "map.nii.gz"
    save_volume(path, data, source)
    img = nib.load(path)
    assert img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.get_sform(), affine)
    np.testing.assert_allclose(img.get_qform(), affine, atol=1e-5)
    assert int(img.header["sform_code"]) == 2 and int(img.header["qform_code"]) == 1
    assert img.header.get_xyzt_units()[0] == "mm"
    np.testing.assert_allclose(np.asarray(img.dataobj), data.astype(np.float32))
    assert [p.name for p in tmp_path.iterdir()] == ["map.nii.gz"]  # no temporary file left


def test_unset_codes_become_scanner(tmp_path) -> None:
    source = nib.Nifti1Image(np.zeros((3, 3, 3), np.float32), np.eye(4))
    source.header["sform_code"] = 0
    source.header["qform_code"] = 0
    save_volume(tmp_path / "m.nii.gz", np.ones((3, 3, 3)), source)
    img = nib.load(tmp_path / "m.nii.gz")
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
