"""D-matrix maths for template masks on 4D-STEM data (numpy/numba only).

Data are ``[scan_y, scan_x, ky, kx]`` arrays (numpy, np.memmap, zarr, dask; uint8/16/32 or
float32/64) seen as the ``m x n`` matrix D of the paper (Eq. 1).  Everything streams row
chunks with float64 accumulators; the normalised matrix D̂ is never formed.

Public names
------------
column_stats, ColumnStats, pcc_mask, apply_mask, template_mask_image, eigen_image
    PCC masks (Eqs. 4-6, 8, 9), normalised mask application (Eq. 7), eigen-image (Eq. 10).
crossfit_template_image, crossfit_apply_masks
    Held-out (cross-fitted) template-mask images: each fold's mask fitted on the other folds;
    per-fold masks applied with out-of-fold normalisation.
scattering_angle_mrad, annular_mask, virtual_detector_masks, virtual_images
    Virtual detectors (Eq. 2), all masks in one pass.
center_of_mass, integrated_center_of_mass, estimate_center_px
    CoM (points towards atoms) and iCoM (atoms bright).
sorted_d_matrix, angular_profiles, binned_profile, sites_near_line
    Arrays behind Fig. 1c, Fig. 2c (azimuthal mean) and Fig. 5d (sites on a line, periodic).
use_numba, use_float32, DEFAULT_CHUNK_BYTES
    Backend switches (compiled kernels vs plain numpy; float32 tiles vs float64 throughout
    for large data) and the default chunk byte budget.
PCCMask
    The mask :func:`pcc_mask` returns: an ndarray carrying the data's column statistics.
"""

from ._crossfit import crossfit_apply_masks, crossfit_template_image
from ._detectors import (
    annular_mask,
    center_of_mass,
    estimate_center_px,
    integrated_center_of_mass,
    scattering_angle_mrad,
    virtual_detector_masks,
    virtual_images,
)
from ._figures import angular_profiles, binned_profile, sites_near_line, sorted_d_matrix
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
    "binned_profile",
    "annular_mask",
    "apply_mask",
    "center_of_mass",
    "column_stats",
    "crossfit_apply_masks",
    "crossfit_template_image",
    "eigen_image",
    "estimate_center_px",
    "integrated_center_of_mass",
    "pcc_mask",
    "scattering_angle_mrad",
    "sites_near_line",
    "sorted_d_matrix",
    "template_mask_image",
    "use_float32",
    "use_numba",
    "virtual_detector_masks",
    "virtual_images",
]
