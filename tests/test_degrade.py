"""Degradations: measured effects match their parameters; spec parsing and errors."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data

from lm4lv_core.image import degrade as D
from lm4lv_core.errors import ConfigError, LM4LVError


def grey(h: int = 128, w: int = 128, level: int = 128) -> np.ndarray:
    return np.full((h, w, 3), level, dtype=np.uint8)


@pytest.fixture(scope="module")
def astro() -> np.ndarray:
    return np.ascontiguousarray(skimage.data.astronaut()[::4, ::4])  # 128x128 RGB


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_registry_has_all_documented_degradations():
    expected = {"noise", "blur", "motion_blur", "rain", "salt_pepper", "mask", "jpeg", "downup",
                "lowlight", "rotate", "flip"}
    assert expected == set(D.REGISTRY)
    for row in D.describe():
        assert row["help"] and all("=" in p for p in row["params"])


@pytest.mark.parametrize("name", sorted(D.REGISTRY))
def test_every_degradation_is_pure_and_returns_uint8(name, astro):
    before = astro.copy()
    pipe = D.parse_spec(name)
    a, b = pipe(astro, rng(7)), pipe(astro, rng(7))
    assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
    np.testing.assert_array_equal(a, b)  # same generator state -> same output
    np.testing.assert_array_equal(astro, before)  # input untouched


def test_noise_sigma_matches_measured_std():
    out = D.add_noise(grey(), rng(), sigma=25)
    diff = out.astype(float) - 128
    assert abs(diff.std() - 25) < 1
    assert abs(diff.mean()) < 1
    assert not np.array_equal(D.add_noise(grey(), rng(0)), D.add_noise(grey(), rng(1)))


def test_noise_gray_is_same_in_all_channels():
    out = D.add_noise(grey(), rng(), sigma=10, gray=True).astype(int)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    assert abs((out - 128).std() - 10) < 1


def test_blur_of_impulse_is_the_gaussian_kernel():
    img = np.zeros((41, 41, 3), np.uint8)
    img[20, 20] = 255
    out = D.add_blur(img, sigma=2.0).astype(float)[..., 0]
    x = np.arange(-6, 7)
    k = np.exp(-x**2 / 8.0)
    k /= k.sum()
    expect = 255 * np.outer(k, k)
    assert np.abs(out[14:27, 14:27] - expect).max() <= 0.5 + 1e-9
    assert out.sum() == pytest.approx(255, abs=13 * 13 * 0.5)
    np.testing.assert_array_equal(D.add_blur(img, sigma=0), img)
    small = D.add_blur(img, sigma=2.0, ksize=3).astype(float)[..., 0]
    assert np.count_nonzero(small) == 9  # kernel size respected


def test_blur_reduces_detail_monotonically(astro):
    def hf(x):
        return np.abs(np.diff(x.astype(float), axis=1)).mean()
    assert hf(astro) > hf(D.add_blur(astro, sigma=1)) > hf(D.add_blur(astro, sigma=3))


@pytest.mark.parametrize("angle,axis", [(0, 1), (90, 0)])
def test_motion_blur_spreads_along_its_direction(angle, axis):
    img = np.zeros((41, 41, 3), np.uint8)
    img[20, 20] = 255
    out = D.add_motion_blur(img, length=9, angle=angle)[..., 0]
    ys, xs = np.nonzero(out)
    extent_along = np.ptp(xs if axis == 1 else ys) + 1
    extent_across = np.ptp(ys if axis == 1 else xs) + 1
    assert extent_along == 9 and extent_across == 1
    assert out.sum() == pytest.approx(255, abs=9)


def test_rain_brightens_more_with_more_drops(astro):
    np.testing.assert_array_equal(D.add_rain(astro, rng(), amount=0), astro)
    light = D.add_rain(astro, rng(), amount=0.002)
    heavy = D.add_rain(astro, rng(), amount=0.02)
    assert (light >= astro).all() and (heavy >= astro).all()  # screen blend never darkens
    changed = lambda x: (x != astro).any(axis=2).mean()  # noqa: E731
    assert 0 < changed(light) < changed(heavy)
    assert heavy.mean() > light.mean() > astro.mean()


def test_salt_pepper_amount_is_fraction_of_pixels():
    out = D.add_salt_pepper(grey(), rng(), amount=0.1)
    changed = (out != 128).any(axis=2)
    assert abs(changed.mean() - 0.1) < 0.01
    vals = out[changed]
    assert set(np.unique(vals)) <= {0, 255}
    assert abs((vals[:, 0] == 255).mean() - 0.5) < 0.05
    only_salt = D.add_salt_pepper(grey(), rng(), amount=0.1, salt=1.0)
    assert set(np.unique(only_salt)) == {128, 255}


def test_mask_pixels_exact_ratio():
    out = D.add_mask(grey(64, 64), rng(), ratio=0.25, value=7)
    masked = (out == 7).all(axis=2)
    assert masked.sum() == 64 * 64 // 4


def test_mask_patches_are_grid_aligned():
    out = D.add_mask(grey(64, 64), rng(), ratio=0.25, patch=16)
    masked = (out == 0).all(axis=2)
    cells = masked.reshape(4, 16, 4, 16).transpose(0, 2, 1, 3).reshape(16, -1)
    assert set(cells.mean(axis=1)) <= {0.0, 1.0}  # every patch all or nothing
    assert cells.all(axis=1).sum() == 4


def test_jpeg_quality_controls_error(astro):
    def err(q):
        return np.abs(D.add_jpeg(astro, q).astype(float) - astro).mean()
    assert err(10) > err(50) > err(95)
    np.testing.assert_array_equal(D.add_jpeg(astro, 30), D.add_jpeg(astro, 30))


def test_downup_keeps_size_and_loses_detail(astro):
    np.testing.assert_array_equal(D.add_downup(astro, factor=1), astro)
    out2, out4 = D.add_downup(astro, factor=2), D.add_downup(astro, factor=4)
    assert out4.shape == astro.shape
    err = lambda x: np.abs(x.astype(float) - astro).mean()  # noqa: E731
    assert 0 < err(out2) < err(out4)
    np.testing.assert_array_equal(D.add_downup(grey(), factor=4), grey())


def test_lowlight_formula():
    out = D.add_lowlight(grey(), rng(), brightness=0.3, gamma=1.5)
    assert (out == round(255 * 0.3 * (128 / 255) ** 1.5)).all()
    np.testing.assert_array_equal(D.add_lowlight(grey(), rng(), brightness=1, gamma=1), grey())
    noisy = D.add_lowlight(grey(), rng(), brightness=1, gamma=1, noise=10).astype(float)
    assert abs(noisy.std() - 10) < 1


def test_rotate_and_flip():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    for angle in (90, 180, 270):
        out = D.rotate(img, angle)
        np.testing.assert_array_equal(out, np.rot90(img, angle // 90))
    assert D.rotate(img, 90).shape == (3, 2, 3)
    np.testing.assert_array_equal(D.flip(img, "h"), img[:, ::-1])
    np.testing.assert_array_equal(D.flip(img, "v"), img[::-1])
    np.testing.assert_array_equal(D.flip(D.flip(img, "h"), "h"), img)
    np.testing.assert_array_equal(D.parse_spec("rotate:angle=270")(img, rng()),
                                  np.rot90(img, 3))


def test_parse_spec_canonical_slug_and_aliases():
    p = D.parse_spec("blur:sigma=2+noise:sigma=15")
    assert [s.name for s in p.steps] == ["blur", "noise"]
    assert p.spec == "blur:sigma=2+noise:sigma=15"
    assert p.slug == "blur_sigma2+noise_sigma15"
    assert p.steps[0].params() == {"sigma": 2.0, "ksize": 0}
    assert D.parse_spec("SP:amount=0.1").spec == "salt_pepper:amount=0.1"
    assert D.parse_spec("motion-blur").spec == "motion_blur"
    # canonical order of parameters is the definition order
    assert D.parse_spec("noise:gray=1,sigma=5").spec == "noise:sigma=5,gray=true"


def test_chain_applies_in_order(astro):
    chained = D.parse_spec("blur:sigma=2+noise:sigma=15")(astro, rng(3))
    g = rng(3)
    manual = D.add_noise(D.add_blur(astro, 2.0), g, 15.0)
    np.testing.assert_array_equal(chained, manual)


def test_ranges_and_choices_are_sampled_per_image():
    pipe = D.parse_spec("noise:sigma=10..50")
    assert pipe.slug == "noise_sigma10to50"
    stds = [(pipe(grey(), rng(s)).astype(float) - 128).std() for s in range(20)]
    assert 9 < min(stds) and max(stds) < 51 and max(stds) - min(stds) > 5
    img = np.zeros((2, 3, 3), np.uint8)
    shapes = {D.parse_spec("rotate:angle=90|180")(img, rng(s)).shape for s in range(20)}
    assert shapes == {(3, 2, 3), (2, 3, 3)}


@pytest.mark.parametrize("spec,needle", [
    ("foo", "unknown degradation 'foo'; valid: noise, blur"),
    ("blur:sgma=2", "has no parameter 'sgma'; valid: sigma, ksize"),
    ("blur:sigma=abc", "blur:sigma: expected float"),
    ("noise:sigma=300", "must be in [0, 255]"),
    ("blur:ksize=4", "must be odd"),
    ("rotate:angle=45", "one of 90|180|270"),
    ("jpeg:quality=2.5", "expected int"),
    ("noise:sigma", "needs a value"),
    ("noise:sigma=1,sigma=2", "given twice"),
    ("noise:sigma=50..10", "empty range"),
    ("", "empty degradation spec"),
    ("blur+", "empty degradation name"),
])
def test_bad_specs_raise_one_line_errors(spec, needle):
    with pytest.raises(ConfigError) as exc:
        D.parse_spec(spec)
    assert needle in str(exc.value) and "\n" not in str(exc.value)
    assert isinstance(exc.value, LM4LVError)


def test_non_uint8_input_is_rejected():
    with pytest.raises(ValueError):
        D.add_blur(np.zeros((4, 4, 3), np.float32))
