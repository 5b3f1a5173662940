"""The synthetic light-sheet generator: structures, optics, determinism, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_lsmfm.synth import (
    KINDS,
    SynthVolume,
    blur,
    degrade,
    gaussian_psf_sigma_vox,
    make_structures,
    make_volume,
)
from napari_lsmfm.synth.optics import depth_attenuation, illumination_field, stripe_field

SMALL = (24, 64, 64)


@pytest.fixture(scope="module")
def volumes() -> dict[str, SynthVolume]:
    """One default-size volume per kind, shared by the tests below."""
    return {kind: make_volume(kind) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_dtypes_and_record(volumes, kind):
    vol = volumes[kind]
    assert vol.image.shape == vol.labels.shape == vol.clean.shape == (48, 128, 128)
    assert vol.image.dtype == np.uint16
    assert vol.labels.dtype == np.uint16
    assert vol.clean.dtype == np.float32
    assert 0.0 <= vol.clean.min() and vol.clean.max() <= 1.0
    assert vol.voxel_size == (2.0, 1.0, 1.0)
    assert vol.kind == kind
    assert vol.label_kind == ("semantic" if kind == "vessels" else "instance")
    for key in (
        "seed",
        "shape",
        "voxel_size",
        "density",
        "psf_sigma_um",
        "psf_sigma_vox",
        "photons",
        "read_noise",
        "background",
        "stripes",
        "attenuation",
        "illumination",
        "n_objects",
    ):
        assert key in vol.params, key
    assert vol.params["psf_sigma_vox"] == (1.5, 1.0, 1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_volume_other_seed_differs(kind):
    a = make_volume(kind, shape=SMALL, seed=3)
    b = make_volume(kind, shape=SMALL, seed=3)
    c = make_volume(kind, shape=SMALL, seed=4)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.clean, b.clean)
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.labels, c.labels)


@pytest.mark.parametrize("kind", KINDS)
def test_labels_sit_on_bright_signal(volumes, kind):
    vol = volumes[kind]
    inside = vol.labels > 0
    assert inside.any()
    assert vol.image[inside].mean() > 1.3 * vol.image[~inside].mean()
    assert vol.clean[inside].mean() > 3 * vol.clean[~inside].mean()


def _half_width_um(image: np.ndarray, axis: int, step_um: float) -> float:
    """Lag (um) at which the normalised autocorrelation along ``axis`` falls to 1/2."""
    x = image.astype(np.float64)
    x -= x.mean()
    acf = np.real(np.fft.ifftn(np.abs(np.fft.fftn(x)) ** 2))
    profile = np.moveaxis(acf, axis, 0)[:, 0, 0] / acf[0, 0, 0]
    k = int(np.nonzero(profile < 0.5)[0][0])
    lag = k - 1 + (profile[k - 1] - 0.5) / (profile[k - 1] - profile[k])  # linear interpolation
    return lag * step_um


def _axial_over_lateral(image: np.ndarray, voxel_size) -> float:
    z, y, x = (_half_width_um(image, ax, voxel_size[ax]) for ax in range(3))
    return z / max(y, x)


def test_axial_blur_exceeds_lateral():
    # Isotropic voxels and isotropic structures: the anisotropy comes from the PSF.
    vol = make_volume("nuclei", shape=(64, 64, 64), voxel_size=(1.0, 1.0, 1.0), seed=1)
    assert _axial_over_lateral(vol.clean, vol.voxel_size) < 1.1
    assert _axial_over_lateral(vol.image, vol.voxel_size) > 1.15


@pytest.mark.parametrize("kind", ["nuclei", "vessels"])
def test_anisotropy_in_default_volume(volumes, kind):
    vol = volumes[kind]
    clean = _axial_over_lateral(vol.clean, vol.voxel_size)
    assert _axial_over_lateral(vol.image, vol.voxel_size) > 1.2 * clean


def test_blur_widths_follow_sigmas():
    delta = np.zeros((31, 31, 31), np.float32)
    delta[15, 15, 15] = 1.0
    sigma = gaussian_psf_sigma_vox((3.0, 1.0, 1.0), (1.0, 0.5, 0.5))
    assert sigma == (3.0, 2.0, 2.0)
    psf = blur(delta, sigma)
    assert psf.dtype == np.float32
    coords = np.arange(31) - 15
    widths = [
        np.sqrt((psf.sum(axis=tuple(a for a in range(3) if a != ax)) * coords**2).sum())
        for ax in range(3)
    ]
    np.testing.assert_allclose(widths, sigma, rtol=0.05)


def test_nuclei_are_distinct_instances_some_touching(volumes):
    vol = volumes["nuclei"]
    ids = np.unique(vol.labels)[1:]
    assert len(ids) == vol.params["n_objects"] >= 50
    assert ids.max() == len(ids)
    # Nearly every nucleus is one connected piece.
    pieces = [
        ndi.label(vol.labels[s] == i)[1]
        for i, s in enumerate(ndi.find_objects(vol.labels), start=1)
    ]
    assert np.mean(np.array(pieces) == 1) > 0.95
    # Touching pairs: face-adjacent voxels with two different nonzero ids.
    pairs = set()
    for ax in range(3):
        a = np.moveaxis(vol.labels, ax, 0)
        lo, hi = a[:-1], a[1:]
        touch = (lo > 0) & (hi > 0) & (lo != hi)
        pairs |= {
            tuple(sorted(p)) for p in zip(lo[touch].tolist(), hi[touch].tolist(), strict=True)
        }
    assert len(pairs) >= 5


def test_vessels_form_one_connected_tree(volumes):
    vol = volumes["vessels"]
    assert set(np.unique(vol.labels).tolist()) == {0, 1}
    comps, n = ndi.label(vol.labels, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(comps.ravel())[1:]
    assert sizes.max() > 0.95 * sizes.sum()
    # A branching tree, not a blob: thin (most label voxels near the surface).
    inner = ndi.binary_erosion(vol.labels, iterations=2)
    assert inner.sum() < 0.5 * vol.labels.sum()
    assert vol.params["n_objects"] > 20  # segments


def test_plaques_have_unlabelled_speckles(volumes):
    vol = volumes["plaques"]
    ids = np.unique(vol.labels)[1:]
    assert len(ids) == vol.params["n_objects"] >= 3
    assert vol.params["n_speckles"] > 20
    far = ndi.distance_transform_edt(vol.labels == 0, sampling=vol.voxel_size) > 3.0
    bright = vol.clean > 0.12
    _, n_unlabelled = ndi.label(bright & far)
    assert n_unlabelled >= 20


def test_plaques_have_bright_core_and_dim_halo(volumes):
    vol = volumes["plaques"]
    core = ndi.binary_erosion(vol.labels > 0, iterations=2)
    rim = (vol.labels > 0) & ~ndi.binary_erosion(vol.labels > 0)
    assert vol.clean[core].max() > 0.6
    assert vol.clean[rim].mean() < 0.5 * vol.clean[core].max()


@pytest.mark.parametrize("kind", KINDS)
def test_density_scales_object_count(kind):
    counts = []
    for density in (0.5, 1.0, 2.0):
        vol = make_volume(kind, shape=(32, 96, 96), density=density, seed=2)
        counts.append((vol.params["n_objects"], int((vol.labels > 0).sum())))
    assert counts[0][0] < counts[1][0] < counts[2][0]
    assert counts[0][1] < counts[2][1]


@pytest.mark.parametrize("kind", KINDS)
def test_zero_density_is_empty(kind):
    vol = make_volume(kind, shape=SMALL, density=0.0)
    assert vol.labels.max() == 0
    assert vol.params["n_objects"] == 0


def test_make_structures_direct():
    rng = np.random.default_rng(0)
    info: dict = {}
    clean, labels = make_structures("plaques", SMALL, (2.0, 1.0, 1.0), 2.0, rng, info=info)
    assert clean.shape == labels.shape == SMALL
    assert clean.dtype == np.float32 and labels.dtype == np.uint16
    assert info["n_objects"] == labels.max()


def test_light_sheet_fields():
    shape = (16, 64, 96)
    rng = np.random.default_rng(0)
    stripes = stripe_field(shape, 0.3, rng)
    assert stripes.shape == shape and 0 < stripes.min() and stripes.max() <= 1
    # Shadows run along x (propagation): smooth along x, sharp across y.
    assert np.abs(np.diff(stripes, axis=1)).mean() > 5 * np.abs(np.diff(stripes, axis=2)).mean()
    assert stripes.min() < 0.8
    field = illumination_field(shape, 0.4, rng)
    assert field.shape == (1, 64, 96)
    np.testing.assert_allclose([field.min(), field.max()], [0.6, 1.0], atol=1e-5)
    depth = depth_attenuation(shape, 0.3)
    np.testing.assert_allclose(depth[[0, -1], 0, 0], [1.0, 0.7], rtol=1e-5)
    assert np.all(np.diff(depth[:, 0, 0]) < 0)


def test_degrade_noise_and_offset():
    rng = np.random.default_rng(0)
    flat = np.full((8, 32, 32), 0.5, np.float32)
    kw = dict(psf_sigma_vox=(1.5, 1.0, 1.0), stripes=0.0, attenuation=0.0, illumination=0.0)
    img = degrade(flat, rng, photons=400, read_noise=2.0, background=20, **kw)
    assert img.dtype == np.uint16
    # Poisson: variance ~ mean photons (220) plus read noise variance (4).
    assert abs(img.mean() - (100 + 20 + 200)) < 2
    assert 180 < img.var() < 270
    dark = degrade(np.zeros_like(flat), rng, photons=400, read_noise=2.0, background=0, **kw)
    assert abs(dark.mean() - 100) < 0.5 and 3 < dark.var() < 5
    with pytest.raises(ValueError, match="stripes"):
        degrade(
            flat,
            rng,
            photons=400,
            read_noise=2.0,
            background=20,
            psf_sigma_vox=(1, 1, 1),
            stripes=1.5,
            attenuation=0,
            illumination=0,
        )


def test_depth_attenuation_visible(volumes):
    vol = volumes["nuclei"]
    top = vol.image[:8].astype(float) - vol.params["offset"]
    bottom = vol.image[-8:].astype(float) - vol.params["offset"]
    inside_top = vol.labels[:8] > 0
    inside_bottom = vol.labels[-8:] > 0
    assert top[inside_top].mean() > bottom[inside_bottom].mean()


def test_bad_arguments_say_what_to_do():
    with pytest.raises(ValueError, match="nuclei, vessels, plaques"):
        make_volume("cells")
    with pytest.raises(ValueError, match="voxel_size"):
        make_volume("nuclei", voxel_size=(0, 1, 1))
    with pytest.raises(ValueError, match="density"):
        make_volume("nuclei", density=-1)


def test_default_volume_is_fast():
    start = time.perf_counter()
    make_volume("vessels")
    # Budget 2 s on a quiet machine; loose here so a busy CI runner does not flake.
    assert time.perf_counter() - start < 6.0
