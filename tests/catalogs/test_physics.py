"""Line physics of the generator against independent references (scipy, PyAstronomy, analytic moments)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PyAstronomy import pyasl
from scipy import integrate, special
from starcast.catalogs import physics


def gaussian_line(lam, centre=4450.0, sigma=0.1, depth=0.5):
    return 1.0 - depth * np.exp(-0.5 * ((lam - centre) / sigma) ** 2)


@pytest.mark.parametrize("sigma,gamma", [(0.1, 0.001), (0.1, 0.1), (0.05, 1.0), (0.3, 0.02)])
def test_voigt_matches_scipy_voigt_profile(sigma, gamma):
    dl = np.linspace(-20, 20, 4001)
    ours = np.array([physics.voigt(x, sigma, gamma) for x in dl])
    ref = special.voigt_profile(dl, sigma, gamma)
    assert np.max(np.abs(ours - ref)) < 2e-4 * ref.max()


@pytest.mark.parametrize("epsilon", [0.0, 0.3, 0.6, 1.0])
def test_rotation_profile_integrates_to_one(epsilon):
    total, _ = integrate.quad(lambda x: physics.rotation_profile(np.array([x]), 2.5, epsilon)[0], -2.5, 2.5)
    assert total == pytest.approx(1.0, abs=1e-7)


@pytest.mark.parametrize("vsini", [0.0, 1.0, 50.0, 450.0])
@pytest.mark.parametrize("epsilon", [0.0, 0.6])
@pytest.mark.parametrize("sigma", [0.0, 6.37])
def test_velocity_kernel_sums_to_one_with_the_analytic_width(vsini, epsilon, sigma):
    dv = 3.0
    k = physics.velocity_kernel(dv, vsini, epsilon, sigma)
    v = dv * (np.arange(k.size) - k.size // 2)
    assert k.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.allclose(k, k[::-1], atol=1e-15)
    if 0 < vsini < 10 * dv and sigma == 0:
        return  # a profile binned onto a few pixels has no clean analytic second moment
    # Second moment of Gray's profile: <x^2> = [(1-eps)/4 + 2 eps/15] / (1 - eps/3). Binning the
    # rotation profile on cells of width u adds u^2/12 (Sheppard's correction): u = dv alone, dv/8
    # under a Gaussian (then sampled at pixel centres, which adds nothing).
    x2 = ((1 - epsilon) / 4 + 2 * epsilon / 15) / (1 - epsilon / 3)
    cell = dv / 8 if sigma > 0 else dv
    expected = vsini**2 * x2 + sigma**2 + (cell**2 / 12 if vsini > 0 else 0.0)
    assert np.sum(k * v * v) == pytest.approx(expected, rel=2e-3)


@pytest.mark.parametrize("zeta,epsilon", [(25.0, 0.6), (60.0, 0.0), (8.0, 1.0)])
def test_macroturbulence_kernel_matches_a_disc_sampled_by_monte_carlo(zeta, epsilon):
    """Against an independent construction: points drawn uniformly over the visible disc, weighed by
    their limb-darkened intensity, half moving along the surface normal and half along the surface
    in the plane of the line of sight, each with Gaussian speeds of 1/e half width zeta (Gray's
    radial-tangential model); and the analytic variance zeta^2 / 4 (+ dv^2 / 12 of the binning)."""
    dv = 1.0
    k = physics.macroturbulence_kernel(dv, zeta, epsilon)
    half = k.size // 2
    v = dv * (np.arange(k.size) - half)
    assert k.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(k, k[::-1], atol=1e-15)
    assert np.sum(k * v * v) == pytest.approx(zeta**2 / 4 + dv**2 / 12, rel=1e-3)
    rng = np.random.default_rng(1)
    n = 2_000_000
    r = np.sqrt(rng.uniform(size=n))  # uniform over the disc's projected area
    mu = np.sqrt(1.0 - r * r)
    projection = np.where(rng.uniform(size=n) < 0.5, mu, r)  # radial: cos theta; tangential: sin theta
    speed = rng.normal(0.0, zeta / np.sqrt(2.0), n)  # exp(-(u / zeta)^2)
    counts = np.histogram(speed * projection, bins=(np.arange(-half, half + 2) - 0.5) * dv,
                          weights=1.0 - epsilon + epsilon * mu)[0]
    reference = counts / counts.sum()
    assert np.max(np.abs(k - reference)) < 0.02 * k.max()


@pytest.mark.parametrize("vsini", [15.0, 80.0, 300.0])
@pytest.mark.parametrize("epsilon", [0.0, 0.6, 1.0])
def test_rotational_broadening_agrees_with_pyastronomy(vsini, epsilon):
    lam = np.arange(4420.0, 4480.0, 0.05)
    flux = gaussian_line(lam)
    ours = physics.rotational_broadening(lam, flux, vsini, epsilon)
    ref = pyasl.rotBroad(lam, flux, epsilon, vsini)
    assert np.max(np.abs(ours - ref)) < 1e-3  # the continuum is 1
    assert np.min(ours) > np.min(flux)  # the line got shallower


def test_rotational_broadening_with_zero_vsini_is_identity():
    lam = np.arange(4420.0, 4480.0, 0.05)
    flux = gaussian_line(lam)
    assert np.array_equal(physics.rotational_broadening(lam, flux, 0.0), flux)


def test_instrumental_broadening_adds_widths_in_quadrature():
    lam = np.arange(4400.0, 4500.0, 0.01)
    sigma0, r = 0.1, 20000.0
    out = physics.instrumental_broadening(lam, gaussian_line(lam, sigma=sigma0, depth=0.3), r)
    sigma_i = 4450.0 / r / (2 * np.sqrt(2 * np.log(2)))
    s = np.hypot(sigma0, sigma_i)
    expected = 1 - 0.3 * sigma0 / s * np.exp(-0.5 * ((lam - 4450.0) / s) ** 2)
    assert np.max(np.abs(out - expected)) < 2e-4


@settings(max_examples=25, deadline=None)
@given(vsini=st.floats(5.0, 400.0), epsilon=st.floats(0.0, 1.0), centre=st.floats(4440.0, 4460.0))
def test_rotational_broadening_conserves_equivalent_width(vsini, epsilon, centre):
    lam = np.arange(4400.0, 4500.0, 0.05)
    flux = gaussian_line(lam, centre=centre, sigma=0.2)
    out = physics.rotational_broadening(lam, flux, vsini, epsilon)
    assert np.sum(1 - out) == pytest.approx(np.sum(1 - flux), rel=2e-3)


def test_line_strengths_are_positive_and_finite_over_the_label_space():
    for teff in np.linspace(15000, 30000, 7):
        for logg in np.linspace(1.75, 4.75, 7):
            w = physics.line_strengths(teff, logg)
            assert np.all(np.isfinite(w)) and np.all(w >= 0)
