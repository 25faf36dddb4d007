"""The standard method and the physics limit that starcast is measured against: a chi^2 template fit
over a grid of model spectra, and the Cramer-Rao bound from the grid's derivatives and the noise.

Templates are stars of a `catalogs.gridsynth.BroadenedLibrary` (cubic RBF between nodes, linear in
v sin i) put through the engine's own preprocessing with the data's noise level and mask, so data and
templates are continuum-normalised identically. chi^2 = sum ivar (x - template)^2 on the model grid,
minimised by a search over a bank of node templates then scipy's trust-region least squares; errors
from delta chi^2 = 1 (marginalised: sqrt of the diagonal of the inverse Fisher matrix J^T ivar J).
The bound is computed on the raw observed pixels with the continuum marginalised, so it holds for any
estimator (the preprocessed pixels are correlated and carry the continuum fit's noise; chi^2 ignores it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..catalogs.gridsynth import BroadenedLibrary, Survey
from ..catalogs.schema import Flag
from ..kernels.preprocess import PreprocessSettings, preprocess

PARAMS = ("teff", "logg", "vsini")  # K, dex, km/s: the order of theta everywhere here
STEP = np.array([50.0, 0.025, 1.0])  # central-difference steps (a twentieth of a node step; km/s)
SCALE = np.array([1000.0, 0.25, 10.0])  # the optimiser's parameter scale (one node step; km/s)
METALS_STEP = 0.02  # dex: the central-difference step in metals (a fifth of a library's metal rung)
METALS_SCALE = 0.1  # dex: the optimiser's scale in metals (a library's metal rung)


def noise_level(flux: np.ndarray, flux_err: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """(B,) the 1-sigma noise of the continuum-normalised flux, 1 / median(flux / flux_err) over the
    good pixels: what a template must be preprocessed with to be clipped and normalised as the data."""
    good = (flux_err > 0) & np.isfinite(flux) & np.isfinite(flux_err)
    if mask is not None:
        good &= ~mask
    ratio = np.where(good, flux / np.where(good, flux_err, 1.0), np.nan)
    return 1.0 / np.nanmedian(ratio, axis=1)


def bounds(lib: BroadenedLibrary) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) of theta: the box of the library's nodes and its v sin i ladder."""
    return np.array([*lib.nodes.min(0), lib.vsini[0]]), np.array([*lib.nodes.max(0), lib.vsini[-1]])


def parameter_space(lib: BroadenedLibrary, metals_free: bool) -> tuple[np.ndarray, ...]:
    """(lo, hi, step, scale) of theta: PARAMS, and with `metals_free` the metals (dex) as a fourth
    parameter within the library's metal rungs."""
    lo, hi = bounds(lib)
    if not metals_free:
        return lo, hi, STEP, SCALE
    return (np.append(lo, lib.metals[0]), np.append(hi, lib.metals[-1]), np.append(STEP, METALS_STEP),
            np.append(SCALE, METALS_SCALE))


@dataclass
class Templates:
    """Noise-free stars of `lib` on the model grid `grid_values` (A), preprocessed with `settings`."""

    lib: BroadenedLibrary
    grid_values: np.ndarray
    settings: PreprocessSettings

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return bounds(self.lib)

    def preprocessed(self, flux: np.ndarray, noise: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """(B, D) spectra `flux` (B, P) on the observed grid, continuum 1, preprocessed as data with
        a constant noise `noise` (B,) and the data's `mask` (B, P); NaN rows where that fails (the
        optimiser then steps back, the bank search skips them)."""
        b = len(flux)
        err = np.broadcast_to(np.asarray(noise, np.float32)[:, None], flux.shape)
        mask = np.zeros(flux.shape, bool) if mask is None else mask
        table = Survey(flux=flux, flux_err=err, mask=mask, labels={}, snr=np.ones(b, np.float32),
                       rv=np.zeros(b), ids=np.arange(b, dtype=np.int64)).table(self.lib.obs)
        pre = preprocess(table, self.grid_values, self.settings)
        return np.where((pre.flags & Flag.PREPROCESS_FAILED)[:, None] != 0, np.nan, pre.x)

    def __call__(self, theta: np.ndarray, noise: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """(B, D) templates at theta (B, 3), preprocessed with the noise (B,) and mask (B, P) of data."""
        theta = np.atleast_2d(theta)
        return self.preprocessed(self.lib.spectra(*theta.T), noise, mask)

    def jacobian(self, theta: np.ndarray, noise: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """(B, D, 3) d template / d theta (central differences)."""
        rep = lambda a: None if a is None else np.repeat(a, 2 * len(PARAMS), axis=0)  # noqa: E731
        return derivatives(lambda t: self(t, rep(np.asarray(noise)), rep(mask)), theta, *self.bounds())


def derivatives(model, theta: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                step: np.ndarray = STEP) -> np.ndarray:
    """(B, D, K) d model / d theta at theta (B, K) by central differences of `step`, one-sided at the
    bounds (lo, hi); `model` maps (2 K B, K) parameters, 2 K per row, to (2 K B, D) spectra."""
    theta = np.atleast_2d(theta)
    b, k = theta.shape
    plus = np.clip(theta[:, None, :] + np.diag(step)[None], lo, hi)
    minus = np.clip(theta[:, None, :] - np.diag(step)[None], lo, hi)
    x = model(np.concatenate([plus, minus], axis=1).reshape(-1, k)).reshape(b, 2 * k, -1)
    width = np.einsum("bkk->bk", plus - minus)
    return np.transpose((x[:, :k] - x[:, k:]) / width[:, :, None], (0, 2, 1))


def fisher(jac: np.ndarray, ivar: np.ndarray) -> np.ndarray:
    """(B, K, K) Fisher matrices J^T diag(ivar) J (J: B, D, K) of independent Gaussian pixels: 1/2 the
    Hessian of chi^2 (Gauss-Newton)."""
    return np.einsum("bdi,bd,bdj->bij", jac, ivar, jac)


def sigma_from_fisher(f: np.ndarray) -> np.ndarray:
    """(B, K) sqrt(diag(F^-1)): the Cramer-Rao bound, or the marginalised delta chi^2 = 1 errors.
    A singular F (a parameter the spectrum does not constrain) gives inf for that parameter."""
    out = np.full(f.shape[:2], np.inf)
    for i, m in enumerate(f):
        scale = np.sqrt(np.diag(m))
        if np.all(scale > 0) and np.linalg.cond(m / np.outer(scale, scale)) < 1e12:
            out[i] = np.sqrt(np.diag(np.linalg.inv(m / np.outer(scale, scale)))) / scale
    return out


def continuum_basis(npix: int, degree: int) -> np.ndarray:
    """(npix, degree + 1) Legendre polynomials over the observed grid, as `gridsynth.draw_survey`'s."""
    return np.polynomial.legendre.legvander(np.linspace(-1.0, 1.0, npix), degree)


def cramer_rao(lib: BroadenedLibrary, theta: np.ndarray, ivar: np.ndarray,
               continuum_degree: int | None = 3, *, metals: np.ndarray | None = None,
               metals_free: bool = False) -> np.ndarray:
    """(B, 3) sigma_CRB of any unbiased estimator of theta (B, 3) from observed spectra (continuum 1)
    with independent pixels of inverse variance `ivar` (B, P, on the library's observed grid: the
    raw data, before resampling correlates neighbouring pixels and the continuum fit adds its noise).
    The continuum is unknown: a multiplicative Legendre polynomial of `continuum_degree` (the data's),
    marginalised as nuisance parameters; None = a known continuum. The stars' `metals` (B,) dex
    default to the grid's composition (0); with `metals_free` the estimator does not know them:
    they are marginalised too (a library with metal rungs)."""
    theta = np.atleast_2d(theta)
    metals = np.zeros(len(theta)) if metals is None else np.asarray(metals, np.float64)
    lo, hi, step, _ = parameter_space(lib, metals_free)
    if metals_free:
        theta = np.concatenate([theta, metals[:, None]], axis=1)
        jac = derivatives(lambda t: lib.spectra(*t.T), theta, lo, hi, step)
    else:
        per_row = np.repeat(metals, 2 * theta.shape[1])  # `derivatives` evaluates 2 K points per row
        jac = derivatives(lambda t: lib.spectra(*t.T, per_row), theta, lo, hi, step)
    if continuum_degree is not None:
        basis = continuum_basis(jac.shape[1], continuum_degree)
        jac = np.concatenate([jac, lib.spectra(*theta[:, :3].T, metals)[:, :, None] * basis[None]], axis=2)
    return sigma_from_fisher(fisher(jac, ivar))[:, :len(PARAMS)]


@dataclass
class Fit:
    """chi^2 fits of B spectra: best theta (B, K), delta chi^2 = 1 sigmas (B, K), chi^2 at the
    minimum and the number of pixels it sums over (ivar > 0), template evaluations per spectrum."""

    theta: np.ndarray
    sigma: np.ndarray
    chi2: np.ndarray
    npix: np.ndarray
    nfev: np.ndarray


@dataclass
class TemplateFitter:
    """Fits spectra with `templates`: chi^2 over a bank (every node of the library at every `bank_step`-th
    rung of its v sin i ladder, preprocessed once per noise level of `bank_snr`), then least squares."""

    templates: Templates
    bank_step: int = 2
    bank_snr: tuple = (10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
    max_nfev: int = 60
    _banks: dict = field(default_factory=dict, repr=False)

    def bank_theta(self) -> np.ndarray:
        lib = self.templates.lib
        v = lib.vsini[::self.bank_step]
        return np.stack([np.repeat(lib.nodes[:, 0], len(v)), np.repeat(lib.nodes[:, 1], len(v)),
                         np.tile(v, len(lib.nodes))], axis=1)

    def bank(self, level: int) -> np.ndarray:
        """(N, D) float32 templates of `bank_theta()` at noise 1 / bank_snr[level]."""
        if level not in self._banks:
            lib = self.templates.lib.at_metals(0.0)
            flux = np.asarray(lib.flux)[:, 0, ::self.bank_step].reshape(-1, lib.flux.shape[3])
            noise = np.full(len(flux), 1.0 / self.bank_snr[level])
            parts = [self.templates.preprocessed(flux[s:s + 4096], noise[s:s + 4096])
                     for s in range(0, len(flux), 4096)]
            self._banks[level] = np.concatenate(parts).astype(np.float32)
        return self._banks[level]

    def start(self, x: np.ndarray, ivar: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """(B, 3) the bank's theta of least chi^2 for each spectrum (the bank at the nearest noise)."""
        level = np.argmin(np.abs(np.log(1.0 / noise[:, None]) - np.log(self.bank_snr)[None]), axis=1)
        theta, out = self.bank_theta(), np.empty((len(x), 3))
        for lev in np.unique(level):
            rows = np.flatnonzero(level == lev)
            t = self.bank(int(lev))
            w = ivar[rows].astype(np.float32)
            chi2 = -2.0 * (w * x[rows]) @ t.T + w @ (t * t).T  # + sum w x^2, the same for every template
            out[rows] = theta[np.argmin(np.where(np.isnan(chi2), np.inf, chi2), axis=1)]
        return out

    def fit(self, x: np.ndarray, ivar: np.ndarray, noise: np.ndarray, mask: np.ndarray | None = None) -> Fit:
        """Fit preprocessed spectra x (B, D) with inverse variances `ivar` (B, D); `noise` (B,) and
        `mask` (B, P): the data's noise level (`noise_level`) and bad pixels on the observed grid."""
        lo, hi = self.templates.bounds()
        theta0 = np.clip(self.start(x, ivar, noise), lo, hi)
        theta, nfev = np.empty_like(theta0), np.zeros(len(x), np.int64)
        for i in range(len(x)):
            theta[i], nfev[i] = self._refine(x[i], ivar[i], theta0[i], noise[i:i + 1],
                                             None if mask is None else mask[i:i + 1])
        model = self.templates(theta, noise, mask)
        chi2 = np.sum(ivar * (x - model) ** 2, axis=1)
        sigma = sigma_from_fisher(fisher(self.templates.jacobian(theta, noise, mask), ivar))
        return Fit(theta=theta, sigma=sigma, chi2=chi2, npix=np.sum(ivar > 0, axis=1), nfev=nfev)

    def _refine(self, x: np.ndarray, ivar: np.ndarray, theta0: np.ndarray, noise: np.ndarray,
                mask: np.ndarray | None) -> tuple[np.ndarray, int]:
        """(theta, template evaluations) of least chi^2 near theta0 for one spectrum."""
        from scipy.optimize import least_squares

        w = np.sqrt(ivar.astype(np.float64))
        res = least_squares(lambda t: w * (self.templates(t, noise, mask)[0] - x), theta0,
                            jac=lambda t: w[:, None] * self.templates.jacobian(t, noise, mask)[0],
                            bounds=self.templates.bounds(), x_scale=SCALE, method="trf",
                            max_nfev=self.max_nfev)
        return res.x, res.nfev


@dataclass
class ContinuumFitter:
    """chi^2 on the raw observed pixels (known rv) with the continuum fitted jointly: the model is
    S(theta) x a Legendre polynomial of `degree`, its coefficients solved by weighted linear least
    squares for every theta (variable projection), so the sigmas are marginalised over them. Starts
    from given labels (e.g. a `TemplateFitter`'s) and needs no preprocessing, so it loses nothing to
    the continuum normalisation and can reach `cramer_rao` with the same degree. With `metals_free`
    the metals are fitted too (a fourth column of theta, from 0), as by an estimator that does not
    assume the grid's composition; else the stars are taken to be of it."""

    lib: BroadenedLibrary
    degree: int = 3
    max_nfev: int = 60
    metals_free: bool = False

    def residuals(self, theta: np.ndarray, flux: np.ndarray, w: np.ndarray) -> np.ndarray:
        """(N, P) sqrt(ivar) (flux - S(theta) poly) of one spectrum `flux` (P,) for N labels theta."""
        basis = continuum_basis(len(flux), self.degree)
        a = self.lib.spectra(*np.atleast_2d(theta).T)[:, :, None] * (w[:, None] * basis)[None]
        rhs = np.einsum("npk,p->nk", a, w * flux)[..., None]
        coef = np.linalg.solve(np.einsum("npk,npl->nkl", a, a), rhs)[..., 0]
        return (w * flux)[None] - np.einsum("npk,nk->np", a, coef)

    def fit(self, flux: np.ndarray, flux_err: np.ndarray, mask: np.ndarray, theta0: np.ndarray) -> Fit:
        """Fit observed spectra flux (B, P) with errors and mask (B, P), starting at theta0 (B, 3)."""
        from scipy.optimize import least_squares

        lo, hi, _, scale = parameter_space(self.lib, self.metals_free)
        if self.metals_free:
            theta0 = np.concatenate([theta0, np.zeros((len(theta0), 1))], axis=1)
        good = ~mask & (flux_err > 0) & np.isfinite(flux) & np.isfinite(flux_err)
        w = np.where(good, 1.0 / np.where(good, flux_err, 1.0), 0.0)
        f = np.where(good, flux, 0.0).astype(np.float64)
        out = Fit(theta=np.empty(theta0.shape), sigma=np.empty(theta0.shape), chi2=np.empty(len(f)),
                  npix=good.sum(axis=1), nfev=np.zeros(len(f), np.int64))
        for i in range(len(f)):
            res = least_squares(lambda t, i=i: self.residuals(t, f[i], w[i])[0], np.clip(theta0[i], lo, hi),
                                jac=lambda t, i=i: self._jacobian(t, f[i], w[i])[0], bounds=(lo, hi),
                                x_scale=scale, method="trf", max_nfev=self.max_nfev)
            jac = self._jacobian(res.x, f[i], w[i])
            out.theta[i], out.chi2[i], out.nfev[i] = res.x, 2.0 * res.cost, res.nfev
            out.sigma[i] = sigma_from_fisher(fisher(jac, np.ones(jac.shape[:2])))[0]
        return out

    def _jacobian(self, theta, flux, w):
        lo, hi, step, _ = parameter_space(self.lib, self.metals_free)
        return derivatives(lambda t: self.residuals(t, flux, w), theta, lo, hi, step)
