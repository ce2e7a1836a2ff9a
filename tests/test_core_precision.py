"""The float32-tile kernels against float64 references on hard cases, and the 2-pass mask call.

Hard cases: large column means with small variances (cancellation in Eq. 4), 12-bit and
24-bit counts, float64 data with 1e6 offsets.  The tolerance is the one the kernels
promise: 1e-6 of the result's scale (its largest magnitude).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CountingArray, make_region, make_tiny_data

from tmask_validate import core
from tmask_validate.core import _kernels

#: scan 40 x 30 (1200 patterns: several 128/256-row flush blocks), detector 24 x 40 (960
#: pixels: two column blocks of the stats kernel; WIDE below has several apply flush blocks)
SHAPE = (40, 30, 24, 40)
TOL = 1e-6


@pytest.fixture
def tiles():
    """Force the float32 tiles on every size (normally only data >= 16 Mi elements)."""
    prev_min, prev_flag = _kernels.FAST_MIN_ELEMENTS, core.use_float32()
    _kernels.FAST_MIN_ELEMENTS = 0
    core.use_float32(True)
    if not core.use_numba():
        pytest.skip("numba disabled: no float32 tiles")
    yield
    _kernels.FAST_MIN_ELEMENTS = prev_min
    core.use_float32(prev_flag)


def hard_data(kind: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sy, sx, ky, kx = SHAPE
    yy, xx = np.meshgrid(np.arange(sy), np.arange(sx), indexing="ij")
    signal = np.cos(2 * np.pi * yy / 7.3) * np.sin(2 * np.pi * xx / 5.1 + 0.3)
    resp = rng.uniform(-1, 1, (ky, kx))
    if kind == "float32_offset":  # mean 1e4, sigma ~0.05
        d = 1e4 + 0.03 * signal[..., None, None] * resp + rng.normal(0, 0.03, (sy, sx, ky, kx))
        return d.astype(np.float32)
    if kind == "float64_offset":  # mean 1e6, sigma ~1e-3
        d = 1e6 + 1e-3 * (signal[..., None, None] * resp + rng.normal(0, 1, (sy, sx, ky, kx)))
        return d
    if kind == "uint16_12bit":  # 12-bit counts near the top of the range, sigma ~3
        lam = 4000 + 3 * signal[..., None, None] * resp
        return np.clip(rng.poisson(np.clip(lam, 0, None) / 400) * 0 + np.round(
            lam + rng.normal(0, 3, lam.shape)), 0, 4095).astype(np.uint16)
    if kind == "uint16_poisson":  # low-dose 12-bit counts, wide range
        lam = 20 * (1 + 0.5 * signal[..., None, None] * resp) * rng.uniform(0.1, 50, (ky, kx))
        return np.clip(rng.poisson(lam), 0, 4095).astype(np.uint16)
    if kind == "uint32_24bit":  # 24-bit counts near 2**24, sigma ~50
        lam = 1.6e7 + 50 * signal[..., None, None] * resp
        return np.round(lam + rng.normal(0, 50, lam.shape)).astype(np.uint32)
    if kind == "uint8":
        lam = 200 + 20 * signal[..., None, None] * resp
        return np.clip(np.round(lam + rng.normal(0, 10, lam.shape)), 0, 255).astype(np.uint8)
    raise ValueError(kind)


KINDS = ["float32_offset", "float64_offset", "uint16_12bit", "uint16_poisson", "uint32_24bit",
         "uint8"]


# ----------------------------------------------------------------------------- references
def ref_D(data):
    a = np.asarray(data, dtype=np.float64)
    return a.reshape(a.shape[0] * a.shape[1], -1)


def ref_mean(D):
    """Column means without the rounding of a 1e9-sized running sum (exact differences)."""
    return D[0] + (D - D[0]).mean(axis=0)


def ref_Dhat(D, normalisation="pcc"):
    mean = ref_mean(D)
    cen = D - mean  # two-pass: no cancellation
    std = np.sqrt((cen * cen).mean(axis=0))
    out = np.zeros_like(D)
    ok = std > 0
    if normalisation == "mean":
        ok &= mean != 0
    out[:, ok] = cen[:, ok] / std[ok]
    if normalisation == "mean":
        out[:, ok] /= mean[ok]
    return out


def ref_pcc(data, templates, region=None):
    D = ref_D(data)
    sel = np.ones(D.shape[0], bool) if region is None else region.reshape(-1)
    Dh = ref_Dhat(D[sel])
    out = []
    for t in templates.reshape(templates.shape[0], -1):
        ts = t[sel]
        out.append(((ts - ts.mean()) / ts.std()) @ Dh / sel.sum())
    return np.array(out).reshape(-1, *np.shape(data)[2:])


def close(got, want, what):
    scale = np.abs(want).max()
    err = np.abs(np.asarray(got) - want).max()
    assert err <= TOL * scale, f"{what}: max error {err:.3g} = {err / scale:.3g} of scale"


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("kind", KINDS)
def test_tiles_match_float64_reference_on_hard_cases(tiles, kind):
    data = hard_data(kind)
    rng = np.random.default_rng(5)
    tmpl = rng.normal(size=(5, *SHAPE[:2]))
    D = ref_D(data)
    want_r = ref_pcc(data, tmpl)
    r, img = core.template_mask_image(data, tmpl)
    close(r, want_r, "pcc_mask")
    want_img = (ref_Dhat(D) @ want_r.reshape(5, -1).T).T.reshape(5, *SHAPE[:2])
    close(img, want_img, "template image")
    # column statistics: mean to 1e-6 of sigma (the scale that matters after centring)
    st = core.column_stats(data)
    sd = np.sqrt(((D - ref_mean(D)) ** 2).mean(0))
    assert np.abs(st.mean.ravel() - ref_mean(D)).max() <= TOL * sd.max(), "mean"
    close(st.std.ravel(), sd, "std")
    # weighted masks, both normalisations, and raw virtual images
    w = rng.normal(size=(6, *SHAPE[2:]))
    for norm in ("pcc", "mean"):
        close(core.apply_mask(data, w, normalisation=norm),
              (ref_Dhat(D, norm) @ w.reshape(6, -1).T).T.reshape(6, *SHAPE[:2]), norm)
    close(core.virtual_images(data, np.abs(w)),
          (D @ np.abs(w).reshape(6, -1).T).T.reshape(6, *SHAPE[:2]), "virtual images")
    com = core.center_of_mass(data, center_px=(0, 0))  # scale: the detector position
    tot = D.sum(1)
    ky, kx = np.meshgrid(np.arange(SHAPE[2]), np.arange(SHAPE[3]), indexing="ij")
    want_com = np.stack([(D @ ky.ravel()) / tot, (D @ kx.ravel()) / tot])
    close(com, want_com.reshape(2, *SHAPE[:2]), "centre of mass")


def test_tiles_really_run_and_float64_switch(tiles):
    """The tiles differ from the float64 kernels by rounding only; the switch turns them off."""
    data = hard_data("float32_offset")
    tmpl = np.random.default_rng(1).normal(size=SHAPE[:2])
    fast = core.pcc_mask(data, tmpl)
    core.use_float32(False)
    exact = core.pcc_mask(data, tmpl)
    want = ref_pcc(data, tmpl[None])[0]
    np.testing.assert_allclose(exact, want, atol=1e-10 * np.abs(want).max())
    assert 0 < np.abs(fast - exact).max() <= TOL * np.abs(want).max()


def test_tiles_exact_for_integer_counts_and_binary_masks(tiles):
    """12-bit counts x binary masks: every float32 partial sum is an exact integer."""
    data = hard_data("uint16_poisson")
    D = ref_D(data)
    masks = np.random.default_rng(2).random((3, *SHAPE[2:])) > 0.5
    got = core.virtual_images(data, masks)
    want = (D @ masks.reshape(3, -1).T.astype(np.float64)).T.reshape(3, *SHAPE[:2])
    np.testing.assert_array_equal(got, want)
    com = core.center_of_mass(data, center_px=(0, 0))
    ky, kx = np.meshgrid(np.arange(SHAPE[2]), np.arange(SHAPE[3]), indexing="ij")
    np.testing.assert_allclose(com[0].ravel(), (D @ ky.ravel()) / D.sum(1), rtol=1e-15)


def test_tiles_keep_constant_columns_at_zero(tiles):
    for kind in ("float32_offset", "uint16_12bit", "float64_offset"):
        data = hard_data(kind).copy()
        data[..., 3, 4] = data[0, 0, 3, 4]  # constant column
        data[..., 5, 6] = 0
        st = core.column_stats(data)
        assert st.std[3, 4] == 0 and st.std[5, 6] == 0, kind
        r = core.pcc_mask(data, np.random.default_rng(0).normal(size=SHAPE[:2]))
        assert r[3, 4] == 0 and r[5, 6] == 0, kind


def test_tiles_with_region_and_partial_chunks(tiles):
    data = hard_data("uint16_12bit")
    sy, sx = SHAPE[:2]
    yy, xx = np.meshgrid(np.arange(sy), np.arange(sx), indexing="ij")
    region = (yy * 3 + xx * 5) % 7 < 4
    tmpl = np.random.default_rng(3).normal(size=(2, sy, sx))
    want = ref_pcc(data, tmpl, region)
    for cb in (None, 7 * SHAPE[2] * SHAPE[3] * 2 + 3):  # odd chunks: 1-3 leftover rows
        close(core.pcc_mask(data, tmpl, region=region, chunk_bytes=cb), want, f"region {cb}")


# ----------------------------------------------------------------------------- two passes
@pytest.mark.parametrize("use_region", [False, True])
def test_apply_of_pcc_mask_takes_two_passes_and_same_result(use_region):
    data = make_tiny_data(np.uint16)
    region = make_region() if use_region else None
    tmpl = np.random.default_rng(4).normal(size=(3, *data.shape[:2]))
    counting = CountingArray(data)
    mask = core.pcc_mask(counting, tmpl, region=region)
    assert counting.passes == 1
    img = core.apply_mask(counting, mask, normalisation="mean", threshold=0.0)
    assert counting.passes == 2
    # the three-pass call of before (plain array mask: fresh statistics)
    want = core.apply_mask(data, np.asarray(mask), normalisation="mean", threshold=0.0)
    np.testing.assert_allclose(img, want, rtol=1e-13, atol=1e-13)
    assert isinstance(mask, core.PCCMask) and not isinstance(np.asarray(mask), core.PCCMask)


def test_carried_stats_are_not_used_on_other_data():
    data = make_tiny_data(np.float64)  # 35 patterns: 17 of them sampled by the digests
    tmpl = np.random.default_rng(5).normal(size=data.shape[:2])
    mask = core.pcc_mask(data, tmpl)
    sampled = np.unique(np.round(np.linspace(0, 34, 17)).astype(int))
    for j in (0, 34, int(sampled[7])):
        other = data.copy()
        other.reshape(35, -1)[j, 3] += 5.0
        counting = CountingArray(other)
        got = core.apply_mask(counting, mask)
        want = core.apply_mask(other, np.asarray(mask))
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        assert counting.passes == 3  # mismatch seen: fresh statistics, then the image
    # the carried statistics are those of a fresh column_stats pass
    st = core.column_stats(data)
    np.testing.assert_allclose(mask.column_stats.mean, st.mean, rtol=1e-15)
    np.testing.assert_allclose(mask.column_stats.std, st.std, rtol=1e-15)


# ----------------------------------------------------------------------------- MIB memmap
@pytest.mark.parametrize("bits", [1, 6, 12, 24])
def test_mib_memmap_streams_like_the_array(tmp_path, bits):
    from tmask_validate import io

    rng = np.random.default_rng(bits)
    d = rng.integers(0, 2**bits, size=(6, 7, 20, 24)).astype(np.uint32)
    path = io.write_mib(tmp_path / "scan.mib", d, bit_depth=bits)
    mm = io.mib_memmap(path)
    assert mm.shape == d.shape and not mm.flags.writeable
    np.testing.assert_array_equal(mm, d)
    np.testing.assert_array_equal(mm, io.load(path).values)
    tmpl = rng.normal(size=(3, 6, 7))
    w = rng.random((4, 20, 24))
    for cb in (None, 3 * 20 * 24 * 4 + 1):  # one block / many staged blocks
        r, img = core.template_mask_image(mm, tmpl, chunk_bytes=cb)
        r0, img0 = core.template_mask_image(d, tmpl)
        np.testing.assert_allclose(r, r0, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(img, img0, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(core.virtual_images(mm, w > 0.5, chunk_bytes=cb),
                                      core.virtual_images(d, w > 0.5))
        np.testing.assert_allclose(core.center_of_mass(mm, chunk_bytes=cb),
                                   core.center_of_mass(d), rtol=1e-13, atol=1e-13)


def test_mib_memmap_reads_ahead_only_for_the_header_scan(tmp_path, monkeypatch):
    import os

    from tmask_validate import io

    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise on this platform")
    d = np.random.default_rng(1).integers(0, 4096, size=(3, 4, 8, 8))
    path = io.write_mib(tmp_path / "scan.mib", d, bit_depth=12, frames_per_trigger=1)
    calls = []
    real = os.posix_fadvise

    def spy(fd, offset, length, advice):
        calls.append(advice)
        return real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    # scan shape from the flyback gaps: the header scan reads the whole file ahead once
    assert io.mib_memmap(path).shape == d.shape
    assert calls == [os.POSIX_FADV_WILLNEED]
    # scan shape given: nothing read up front
    calls.clear()
    np.testing.assert_array_equal(io.mib_memmap(path, scan_shape=(3, 4)), d)
    assert calls == []
    # a file larger than half the free memory is not read ahead
    monkeypatch.setattr(io, "_readahead_budget_bytes", lambda: 0)
    assert io.mib_memmap(path).shape == d.shape
    assert calls == []


def test_mib_memmap_bad_files(tmp_path):
    from tmask_validate import io

    d = np.random.default_rng(0).integers(0, 4096, size=(3, 4, 8, 8))
    path = io.write_mib(tmp_path / "scan.mib", d, bit_depth=12, frames_per_trigger=1)
    assert io.mib_memmap(path).shape == d.shape  # from the flyback gaps
    with pytest.raises(ValueError, match="needs 6 frames"):
        io.mib_memmap(path, scan_shape=(2, 3))
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])
    with pytest.raises(ValueError, match="truncated"):
        io.mib_memmap(path)


# ----------------------------------------------------------------------------- wide rows
#: 110 patterns (110 % 8 = 6 and 110 % 4 = 2 leftover rows for the float64 tail), 2400 pixels
#: per pattern: three 1024-column float32 partials of the apply kernel
WIDE = (11, 10, 30, 80)


def wide_data(kind: str) -> np.ndarray:
    rng = np.random.default_rng(11)
    sy, sx, ky, kx = WIDE
    sig = rng.normal(size=(sy, sx, 1, 1)) * rng.uniform(-1, 1, (ky, kx))
    if kind == "float32_offset":
        return (1e4 + 0.03 * sig + rng.normal(0, 0.03, WIDE)).astype(np.float32)
    if kind == "uint16_12bit":
        return np.clip(np.round(4000 + 3 * sig + rng.normal(0, 3, WIDE)), 0, 4095).astype(
            np.uint16)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["float32_offset", "uint16_12bit"])
def test_tiles_on_wide_rows_and_leftover_rows(tiles, kind):
    """Several apply flush blocks per row; 1, 3, 4 (row kernel), 6 (column blocks) templates."""
    data = wide_data(kind)
    D = ref_D(data)
    rng = np.random.default_rng(12)
    for k in (1, 3, 4, 6):
        tmpl = rng.normal(size=(k, *WIDE[:2]))
        want_r = ref_pcc(data, tmpl)
        r, img = core.template_mask_image(data, tmpl)
        close(r, want_r, f"pcc_mask k={k}")
        want_img = (ref_Dhat(D) @ want_r.reshape(k, -1).T).T.reshape(k, *WIDE[:2])
        close(img, want_img, f"template image k={k}")
    w = rng.normal(size=(5, *WIDE[2:]))
    close(core.apply_mask(data, w), (ref_Dhat(D) @ w.reshape(5, -1).T).T.reshape(5, *WIDE[:2]),
          "apply")
    close(core.virtual_images(data, np.abs(w)),
          (D @ np.abs(w).reshape(5, -1).T).T.reshape(5, *WIDE[:2]), "virtual images")


def test_tiles_exact_for_16bit_counts_and_binary_masks(tiles):
    """Full-range uint16 counts x binary masks on wide rows: still exact integers."""
    data = np.random.default_rng(13).integers(60000, 65536, size=WIDE, dtype=np.uint16)
    masks = np.random.default_rng(14).random((5, *WIDE[2:])) > 0.3
    got = core.virtual_images(data, masks)
    want = (ref_D(data) @ masks.reshape(5, -1).T.astype(np.float64)).T.reshape(5, *WIDE[:2])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", ["float32_offset", "uint16_12bit", "uint8"])
def test_tiles_column_block_kernel_for_few_templates(tiles, kind, monkeypatch):
    """Wide detectors send <= 4 templates to the column-block kernel too: same results."""
    monkeypatch.setattr(_kernels, "ROWS_MAX_BYTES", 0)
    data = hard_data(kind)
    D = ref_D(data)
    st = core.column_stats(data)
    sd = np.sqrt(((D - ref_mean(D)) ** 2).mean(0))
    assert np.abs(st.mean.ravel() - ref_mean(D)).max() <= TOL * sd.max(), "mean"
    close(st.std.ravel(), sd, "std")
    tmpl = np.random.default_rng(15).normal(size=(2, *SHAPE[:2]))
    close(core.pcc_mask(data, tmpl), ref_pcc(data, tmpl), "pcc_mask k=2")


@pytest.mark.parametrize("kind", ["float32_offset", "float64_offset", "uint32_24bit"])
@pytest.mark.parametrize("rows", [SHAPE[0], SHAPE[0] - 1])
def test_tiles_panel_kernel_for_many_masks(tiles, kind, rows):
    """>= 12 masks on 4-byte or wider data take the 32-row panel kernel: same results.

    13 masks (3 tiles of 4 and one leftover); 1200 patterns (37 full panels and a half one)
    or 1170 (2 leftover rows for numpy as well); 13 templates through the 4-row statistics.
    """
    data = hard_data(kind)[:rows]
    assert _kernels.ApplyPlan(np.zeros(4), np.zeros((13, 4)), data.dtype).panel
    assert not _kernels.ApplyPlan(np.zeros(4), np.zeros((11, 4)), data.dtype).panel
    D = ref_D(data)
    rng = np.random.default_rng(16)
    w = rng.normal(size=(13, *SHAPE[2:]))
    scan = (rows, SHAPE[1])
    close(core.apply_mask(data, w), (ref_Dhat(D) @ w.reshape(13, -1).T).T.reshape(13, *scan),
          "apply 13 masks")
    close(core.virtual_images(data, np.abs(w)),
          (D @ np.abs(w).reshape(13, -1).T).T.reshape(13, *scan), "virtual images 13")
    tmpl = rng.normal(size=(13, *scan))
    want_r = ref_pcc(data, tmpl)
    r, img = core.template_mask_image(data, tmpl)
    close(r, want_r, "pcc_mask k=13")
    close(img, (ref_Dhat(D) @ want_r.reshape(13, -1).T).T.reshape(13, *scan), "image k=13")
