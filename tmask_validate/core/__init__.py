"""D-matrix maths for template masks on 4D-STEM data (numpy/numba only).

Data are ``[scan_y, scan_x, ky, kx]`` arrays (numpy, np.memmap, zarr, dask; uint8/16/32 or
float32/64) seen as the ``m x n`` matrix D of the paper (Eq. 1).  Everything streams row
chunks with float64 accumulators; the normalised matrix D̂ is never formed.

Public names
------------
column_stats, ColumnStats, pcc_mask, apply_mask, template_mask_image, eigen_image
    PCC masks (Eqs. 4-6, 8, 9), normalised mask application (Eq. 7), eigen-image (Eq. 10).
scattering_angle_mrad, annular_mask, virtual_detector_masks, virtual_images
    Virtual detectors (Eq. 2), all masks in one pass.
center_of_mass, integrated_center_of_mass, estimate_center_px
    CoM (points towards atoms) and iCoM (atoms bright).
sorted_d_matrix, angular_profiles
    Arrays behind Fig. 1c and Fig. 2c.
use_numba, use_float32, DEFAULT_CHUNK_BYTES
    Backend switches (compiled kernels vs plain numpy; float32 tiles vs float64 throughout
    for large data) and the default chunk byte budget.
PCCMask
    The mask :func:`pcc_mask` returns: an ndarray carrying the data's column statistics.
"""

from ._detectors import (
    annular_mask,
    center_of_mass,
    estimate_center_px,
    integrated_center_of_mass,
    scattering_angle_mrad,
    virtual_detector_masks,
    virtual_images,
)
from ._figures import angular_profiles, sorted_d_matrix
from ._kernels import use_float32, use_numba
from ._pcc import (
    NORMALISATIONS,
    ColumnStats,
    PCCMask,
    apply_mask,
    column_stats,
    eigen_image,
    pcc_mask,
    template_mask_image,
)
from ._stream import DEFAULT_CHUNK_BYTES

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "NORMALISATIONS",
    "ColumnStats",
    "PCCMask",
    "angular_profiles",
    "annular_mask",
    "apply_mask",
    "center_of_mass",
    "column_stats",
    "eigen_image",
    "estimate_center_px",
    "integrated_center_of_mass",
    "pcc_mask",
    "scattering_angle_mrad",
    "sorted_d_matrix",
    "template_mask_image",
    "use_float32",
    "use_numba",
    "virtual_detector_masks",
    "virtual_images",
]
