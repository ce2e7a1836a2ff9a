"""tmask_validate: template masks for atomic-resolution 4D-STEM.

Layers (data flows one way):

- :mod:`tmask_validate.core` -- D-matrix maths on plain arrays (numpy/numba only).
- :mod:`tmask_validate.templates`, :mod:`tmask_validate.metrics` -- templates from site tables,
  and the image metrics shared by every image type.
- :mod:`tmask_validate.structures` (ASE) and :mod:`tmask_validate.simulate` (the only abTEM user).
- :mod:`tmask_validate.io` -- readers for experimental formats and our zarr stores.
- :mod:`tmask_validate.analysis`, :mod:`tmask_validate.plots`, :mod:`tmask_validate.report`,
  :mod:`tmask_validate.cli` -- what the workflow calls.
"""

__version__ = "0.1.0"
