"""Compiled inner loops (numba) of the kymograph window analysis.

The window analysis (:mod:`stream.flow`, :mod:`stream.radon`) spends its time in a few loops over
every sample of a ``(T, N)`` kymograph window (rows = frames, columns = px along the centerline):
line sums at many speeds (:func:`line_sums`, :func:`row_line_scores`), the binning and
re-registration of the Lagrangian material profile (:func:`material_bins`, :func:`shift_scores`)
and the rows' cross-power spectra at several lags (:func:`lag_cross_power`). In numpy they need
one image warp per speed or ``T × N`` index and weight arrays per pass; here they are plain loops,
compiled on first use and cached on disk (``cache=True``; the first call in a process costs
≈ 0.4 s to load them). Results equal the OpenCV/numpy formulations they replace to float
rounding (``tests/test_kernels.py``); on 2408 recorded windows of five clips the window results
(speeds, flow verdicts, events) were identical.

Inputs are float64 arrays (kymograph values in any unit; spectra complex), speeds in px/frame,
positions in px (columns) and frames (rows). Every function returns new arrays and changes
nothing but the scratch buffers it is explicitly given (:func:`line_sums_into`).
"""
from __future__ import annotations

import math

import numba
import numpy as np


def line_sums(k: np.ndarray, speeds: np.ndarray, anchor: float) -> np.ndarray:
    """Sums of ``k`` (T, N) along the straight lines ``x = anchor + v (t − j)`` (column x,
    row t) for every speed ``v`` in ``speeds`` and every crossing frame ``j = 0 … T−1``:
    ``(len(speeds), T)``. Samples are linearly interpolated between the two nearest pixels and
    pixels outside the window count 0 — the shear-and-sum of :mod:`stream.radon`: a line with
    |v| ≤ 1 px/frame is sampled once per row, a faster one once per column.

    Method: within a run of samples that interpolate the same two pixel rows (fast lines) or
    columns (slow lines) the interpolation weight is linear in the sample index, so the run's
    contribution comes from prefix sums of ``k`` and of ``index × k`` along that row/column.
    The runs of a line, relative to its crossing frame, are the same for every ``j``, so each run
    is added to all lines at once (a contiguous loop over ``j``): the work is the number of
    rows (columns) a line crosses times T, not its number of samples."""
    T, N = k.shape
    return line_sums_into(k, speeds, anchor, line_sums_workspace(T, N))


def line_sums_workspace(T: int, N: int):
    """Zeroed prefix-sum buffers for :func:`line_sums_into` on (T, N) windows (reusable: the
    parts it writes are overwritten on every call, the rest stays zero)."""
    return (np.zeros((N + 1, 3 * T)), np.zeros((N + 1, 3 * T)), np.zeros((N, 3 * T + 1)), np.zeros((N, 3 * T + 1)))


@numba.njit(cache=True, nogil=True)
def line_sums_into(k: np.ndarray, speeds: np.ndarray, anchor: float, work) -> np.ndarray:
    """:func:`line_sums` with the prefix-sum buffers of :func:`line_sums_workspace` (no
    allocation of ~1 MB per call)."""
    T, N = k.shape
    V = speeds.shape[0]
    out = np.zeros((V, T))
    P0, P1, Q0, Q1 = work
    # prefix sums stored [column, row + T] with zero rows before and after the window (rows
    # −T … 2T − 1), so that rows outside it contribute nothing without a test:
    # P0[s, T + r] = Σ_{s' < s} k[r, s'], P1[s, T + r] = Σ_{s' < s} s'·k[r, s']
    kt = np.ascontiguousarray(k.T)          # (N, T): both prefix sums below run along memory
    for s in range(N):
        for r in range(T):
            x = kt[s, r]
            P0[s + 1, T + r] = P0[s, T + r] + x
            P1[s + 1, T + r] = P1[s, T + r] + s * x
    # Q0[c, T + t] = Σ_{t' < t} k[t', c] for t = −T … 2T (constant outside 0 … T): sums over a
    # row range clipped to the window come out of unclipped indices; Q1 likewise with t'·k
    for c in range(N):
        a0 = 0.0
        a1 = 0.0
        for t in range(T):
            x = kt[c, t]
            a0 += x
            a1 += t * x
            Q0[c, T + t + 1] = a0
            Q1[c, T + t + 1] = a1
        for t in range(2 * T + 1, 3 * T + 1):
            Q0[c, t] = a0
            Q1[c, t] = a1
    for i in range(V):
        v = speeds[i]
        if abs(v) > 1.0:
            # sample at column s, row y = j + (s − anchor)/v, between rows r = j + m and r + 1
            # with weight f = alpha + s/v on the run of columns where floor(y) − j = m
            iv = 1.0 / v
            u0 = -anchor * iv
            u1 = (N - 1 - anchor) * iv
            m_lo = int(math.floor(min(u0, u1)))
            m_hi = int(math.floor(max(u0, u1)))
            for m in range(m_lo, m_hi + 1):
                if v > 0:
                    s_lo = int(math.ceil(anchor + v * m))
                    s_hi = int(math.ceil(anchor + v * (m + 1))) - 1
                else:
                    s_lo = int(math.floor(anchor + v * (m + 1))) + 1
                    s_hi = int(math.floor(anchor + v * m))
                s_lo = max(s_lo, 0)
                s_hi = min(s_hi, N - 1)
                if s_hi < s_lo:
                    continue
                alpha = -m - anchor * iv
                ca, cb = 1.0 - alpha, alpha
                j0 = max(0, -m - 1)               # rows j + m and j + m + 1 must not both be outside
                j1 = min(T - 1, T - 1 - m)
                if j1 < j0:
                    continue
                nj = j1 - j0 + 1
                r0 = T + j0 + m                   # row of P for j0; slices keep every index ≥ 0 (no
                a0 = P0[s_hi + 1, r0:r0 + nj + 1]  # wrap-around test: the loop vectorizes)
                b0 = P0[s_lo, r0:r0 + nj + 1]
                a1 = P1[s_hi + 1, r0:r0 + nj + 1]
                b1 = P1[s_lo, r0:r0 + nj + 1]
                o = out[i, j0:j0 + nj]
                for jj in range(nj):
                    acc = ca * (a0[jj] - b0[jj]) - iv * (a1[jj] - b1[jj])
                    acc += cb * (a0[jj + 1] - b0[jj + 1]) + iv * (a1[jj + 1] - b1[jj + 1])
                    o[jj] += acc
        elif v != 0.0:
            # sample at row t = j + tau, column x = anchor + v tau, between columns c and c + 1
            # with weight g = x − c on the run of rows where floor(x) = c
            iv = 1.0 / v
            x0 = anchor - v * (T - 1)
            x1 = anchor + v * (T - 1)
            c_lo = max(int(math.floor(min(x0, x1))), -1)
            c_hi = min(int(math.floor(max(x0, x1))), N - 1)
            for c in range(c_lo, c_hi + 1):
                if v > 0:
                    tau_lo = int(math.ceil((c - anchor) * iv))
                    tau_hi = int(math.ceil((c + 1 - anchor) * iv)) - 1
                else:
                    tau_lo = int(math.floor((c + 1 - anchor) * iv)) + 1
                    tau_hi = int(math.floor((c - anchor) * iv))
                tau_lo = max(tau_lo, -(T - 1))
                tau_hi = min(tau_hi, T - 1)
                if tau_hi < tau_lo:
                    continue
                j0 = max(0, -tau_hi)
                j1 = min(T - 1, T - 1 - tau_lo)
                if j1 < j0:
                    continue
                g0 = anchor + v * 0.0 - c            # g = g0 + v (t − j) = (g0 − v j) + v t
                nj = j1 - j0 + 1
                lo0 = T + j0 + tau_lo                # Q columns of j0 (lo) and j0 (hi); slices: see above
                hi0 = T + j0 + tau_hi + 1
                o = out[i, j0:j0 + nj]
                if c >= 0:
                    qa = Q0[c, hi0:hi0 + nj]
                    qb = Q0[c, lo0:lo0 + nj]
                    ra = Q1[c, hi0:hi0 + nj]
                    rb = Q1[c, lo0:lo0 + nj]
                if c + 1 <= N - 1:
                    qa1 = Q0[c + 1, hi0:hi0 + nj]
                    qb1 = Q0[c + 1, lo0:lo0 + nj]
                    ra1 = Q1[c + 1, hi0:hi0 + nj]
                    rb1 = Q1[c + 1, lo0:lo0 + nj]
                for jj in range(nj):
                    b = g0 - v * (j0 + jj)
                    acc = 0.0
                    if c >= 0:
                        acc += (1.0 - b) * (qa[jj] - qb[jj]) - v * (ra[jj] - rb[jj])
                    if c + 1 <= N - 1:
                        acc += b * (qa1[jj] - qb1[jj]) + v * (ra1[jj] - rb1[jj])
                    o[jj] += acc
        else:
            c = int(math.floor(anchor))
            g = anchor - c
            tot = 0.0
            for t in range(T):
                if 0 <= c <= N - 1:
                    tot += (1.0 - g) * k[t, c]
                if 0 <= c + 1 <= N - 1:
                    tot += g * k[t, c + 1]
            for j in range(T):
                out[i, j] = tot
    return out


@numba.njit(cache=True, nogil=True)
def material_bins(ke: np.ndarray, X: np.ndarray):
    """Linear binning of a kymograph window's samples by material coordinate.

    Sample ``ke[t, c]`` belongs to material ``m = c − X[t]`` (px); bins are 1 px wide from
    ``m0 = −max(X)`` (column 0 at the largest displacement). Returns ``(m0, sums, weights)``:
    per bin the weighted sum of the samples and the sum of their weights (each sample splits
    between its two nearest bins)."""
    T, N = ke.shape
    xmax = X[0]
    for t in range(T):
        xmax = max(xmax, X[t])
    m0 = -xmax
    umax = 0.0
    for t in range(T):
        umax = max(umax, xmax - X[t])
    nb = int(math.floor(umax)) + N + 1
    sums = np.zeros(nb)
    weights = np.zeros(nb)
    for t in range(T):
        u = xmax - X[t]
        off = int(math.floor(u))
        f = u - off
        g = 1.0 - f
        for c in range(N):
            w = ke[t, c]
            b = off + c
            sums[b] += g * w
            sums[b + 1] += f * w
            weights[b] += g
            weights[b + 1] += f
    return m0, sums, weights


@numba.njit(cache=True, nogil=True, fastmath=True)
def shift_scores(kr: np.ndarray, p: np.ndarray, X: np.ndarray, m0: float, S: int) -> np.ndarray:
    """Correlation of every row of ``kr`` (T, N) with the material profile ``p`` (bin b at
    material ``m0 + b`` px) as that row would see it when displaced by ``X[t] + dx``:
    ``score[dx + S, t] = Σ_c kr[t, c] · p(c − X[t] − dx)`` for ``dx = −S … S`` px, the profile
    linearly interpolated and 0 outside its bins. Shape ``(2S + 1, T)``."""
    T, N = kr.shape
    nb = p.shape[0]
    L = N + 2 * S
    score = np.empty((2 * S + 1, T))
    tpl = np.empty(L)
    for t in range(T):
        pos0 = -S - X[t] - m0               # bin position of template column 0 (column −S)
        i0 = int(math.floor(pos0))
        f = pos0 - i0
        for e in range(L):
            i = i0 + e
            if i < 0 or i > nb - 1 or (i == nb - 1 and f > 0.0):
                tpl[e] = 0.0
            elif i == nb - 1:
                tpl[e] = p[i]
            else:
                tpl[e] = (1.0 - f) * p[i] + f * p[i + 1]
        row = kr[t]
        for q in range(2 * S + 1):          # shift dx = q − S reads template columns o + c, o = S − dx
            seg = tpl[2 * S - q:2 * S - q + N]   # 1-D slices indexed from 0: no wrap-around test,
            acc = 0.0                             # the dot product vectorizes (4× faster)
            for c in range(N):
                acc += row[c] * seg[c]
            score[q, t] = acc
    return score


@numba.njit(cache=True, nogil=True)
def row_line_scores(k: np.ndarray, speeds: np.ndarray, anchor: float, tau_lo: float, n_grid: int,
                    step: float):
    """Fine sinogram of :func:`stream.radon.row_sinogram`: for every speed ``v`` (px/frame) and
    every bin ``g`` of the crossing-time grid ``tau_lo + g·step`` (frames), lines
    ``x = anchor + v (t − tau)`` sampled once per row ``t`` (linear interpolation along x, 0
    outside), with intercepts ``tau`` every ``min(step, 1/|v|)`` frames inside the bin; each
    line's sum divided by √(number of rows on which it lies inside the kymograph) and the
    largest of these per bin kept. Returns ``(score, count)``, both ``(len(speeds), n_grid)``."""
    T, N = k.shape
    M = speeds.shape[0]
    score = np.zeros((M, n_grid))
    count = np.zeros((M, n_grid))
    for i in range(M):
        v = speeds[i]
        av = abs(v)
        dtau = min(step, 1.0 / av) if av > 0 else step
        sub = max(1, int(round(step / dtau)))
        dtau = step / sub
        for g in range(n_grid):
            best = -np.inf
            best_c = 0.0
            for q in range(sub):
                tau = tau_lo + dtau * (g * sub + q)
                if av > 0:
                    e0 = tau + (0 - anchor) / v
                    e1 = tau + (N - 1 - anchor) / v
                    lo = max(min(e0, e1), 0.0)
                    hi = min(max(e0, e1), T - 1.0)
                    c = max(math.floor(hi) - math.ceil(lo) + 1.0, 0.0)
                else:
                    c = float(T) if 0.0 <= anchor <= N - 1 else 0.0
                # rows on which the line lies inside the kymograph (−1 < x < N)
                if av > 0:
                    ta = tau + (-1.0 - anchor) / v
                    tb = tau + (N - anchor) / v
                    t0 = max(0, int(math.floor(min(ta, tb))))
                    t1 = min(T - 1, int(math.ceil(max(ta, tb))))
                else:
                    t0 = 0
                    t1 = T - 1
                # rows whose two neighbouring pixels are both inside (0 ≤ x ≤ N − 2) need no test
                if av > 0:
                    ua = tau + (0.0 - anchor) / v
                    ub = tau + (N - 2.0 - anchor) / v
                    ta = max(t0, int(math.ceil(min(ua, ub))))
                    tb = min(t1, int(math.floor(max(ua, ub))))
                else:
                    ta, tb = t0, t1
                    if not (0.0 <= anchor <= N - 2.0):
                        ta, tb = t1 + 1, t1
                if tb < ta:
                    ta, tb = t1 + 1, t1
                acc = 0.0
                for t in range(ta, tb + 1):
                    x = anchor + v * (t - tau)
                    ci = min(max(int(x), 0), N - 2)
                    f = x - ci
                    acc += (1.0 - f) * k[t, ci] + f * k[t, ci + 1]
                for t in range(t0, t1 + 1):
                    if ta <= t <= tb:
                        continue
                    x = anchor + v * (t - tau)
                    if x <= -1.0 or x >= N:
                        continue
                    ci = int(math.floor(x))
                    f = x - ci
                    if ci >= 0:
                        acc += (1.0 - f) * k[t, ci]
                    if ci + 1 <= N - 1:
                        acc += f * k[t, ci + 1]
                z = acc / math.sqrt(max(c, 1.0)) if c > 0 else 0.0
                if z > best:
                    best = z
                    best_c = c
            score[i, g] = best
            count[i, g] = best_c
    return score, count


@numba.njit(cache=True, nogil=True)
def lag_cross_power(f: np.ndarray, lags: np.ndarray) -> np.ndarray:
    """``P[l, b] = Σ_t conj(f[t, b]) · f[t + lags[l], b]``: the cross-power spectra of rows
    ``lags[l]`` frames apart, summed over the window, for row spectra ``f`` (T, nf) complex."""
    T, nf = f.shape
    L = lags.shape[0]
    out = np.zeros((L, nf), np.complex128)
    for t in range(T):
        for li in range(L):
            u = t + lags[li]
            if u >= T:
                continue
            for b in range(nf):
                out[li, b] += np.conj(f[t, b]) * f[u, b]
    return out


# ------------------------------------------------------------------ registration (stream.stabilize)
# fastmath without "nnan"/"ninf": the NaN guard on p must survive compilation
@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract", "arcp"})
def ecc_translation(img: np.ndarray, gxi: np.ndarray, gyi: np.ndarray, tzm: np.ndarray, w: np.ndarray,
                    max_iter: int, eps: float, limit: float):
    """Translation ``(px, py)`` with ``img(x + p) ≈ a·T(x) + b`` maximizing the zero-normalized
    correlation of ``img`` warped by p and the template — the criterion of OpenCV's ECC for
    ``MOTION_TRANSLATION`` (Evangelidis & Psarakis 2008: forward-additive Gauss–Newton on the
    image's gradients with the closed-form photometric scale λ of their eq. 21; the Hessian of
    the zero-mean Jacobian as in the paper), in one pass over the pixels per iteration.

    ``img`` float32, pre-blurred, and ``gxi``/``gyi`` its gradients (grey levels per px), each
    ``(s0 + 2·pad, s1 + 2·pad)`` with ``pad = ceil(limit) + 2`` (the image's border replicated,
    the gradients' zero: ``cv2.copyMakeBorder``), so every sample stays inside; ``tzm`` (s0, s1)
    the (equally blurred) template minus its weighted mean, ``w`` 0/1 pixel weights (the
    template's mask). A translation samples every pixel with the same bilinear weights. Stops
    when an update moves p by < ``eps`` px or after ``max_iter`` updates; gives up when |p| >
    ``limit`` on either axis. Returns ``(px, py, cc, ok)``, cc the
    correlation at the last evaluated p."""
    s0, s1 = tzm.shape
    px = 0.0
    py = 0.0
    cc = 0.0
    pad = int(math.ceil(limit)) + 2             # the caller's arrays carry this border
    if (img.shape[0] < s0 + 2 * pad or img.shape[1] < s1 + 2 * pad or gxi.shape != img.shape
            or gyi.shape != img.shape or w.shape != tzm.shape):
        return px, py, 0.0, False
    tt = 0.0                                    # ‖t̄‖²
    for y in range(s0):
        for x in range(s1):
            tt += w[y, x] * tzm[y, x] * tzm[y, x]
    for _ in range(max_iter):
        ix = math.floor(px)
        iy = math.floor(py)
        if ix < -(pad - 1) or ix > pad - 2 or iy < -(pad - 1) or iy > pad - 2:
            return px, py, 0.0, False          # (cannot happen after the limit test; belt and braces)
        fx = px - ix
        fy = py - iy
        # per-pixel arithmetic and each row's sums in float32 (8 AVX2 lanes, not 4), the rows summed
        # in float64. On 302 ROI matches of the benchmark clip the poses moved < 1e-6 px from
        # all-float64 sums, and a match took 0.58 instead of 0.89–0.96 ms (blur and padding included)
        w00 = np.float32((1.0 - fx) * (1.0 - fy))
        w01 = np.float32(fx * (1.0 - fy))
        w10 = np.float32((1.0 - fx) * fy)
        w11 = np.float32(fx * fy)
        n = 0.0
        si = 0.0
        sii = 0.0
        sit = 0.0
        sgx = 0.0
        sgy = 0.0
        sgxi = 0.0
        sgyi = 0.0
        sgxt = 0.0
        sgyt = 0.0
        sxx = 0.0
        sxy = 0.0
        syy = 0.0
        c0 = ix + pad
        z = np.float32(0.0)
        for y in range(s0):
            r = y + iy + pad
            # row views: the loop indices below are provably ≥ 0 (no wrap-around checks: vectorizes)
            a0 = img[r, c0:c0 + s1 + 1]
            a1 = img[r + 1, c0:c0 + s1 + 1]
            bx0 = gxi[r, c0:c0 + s1 + 1]
            bx1 = gxi[r + 1, c0:c0 + s1 + 1]
            by0 = gyi[r, c0:c0 + s1 + 1]
            by1 = gyi[r + 1, c0:c0 + s1 + 1]
            tr = tzm[y]
            wr = w[y]
            rn = z
            rsi = z
            rsii = z
            rsit = z
            rgx = z
            rgy = z
            rgxi = z
            rgyi = z
            rgxt = z
            rgyt = z
            rxx = z
            rxy = z
            ryy = z
            for x in range(s1):
                v = w00 * a0[x] + w01 * a0[x + 1] + w10 * a1[x] + w11 * a1[x + 1]
                gx = w00 * bx0[x] + w01 * bx0[x + 1] + w10 * bx1[x] + w11 * bx1[x + 1]
                gy = w00 * by0[x] + w01 * by0[x + 1] + w10 * by1[x] + w11 * by1[x + 1]
                m = wr[x]
                t = tr[x]
                vm = v * m
                gxm = gx * m
                gym = gy * m
                rn += m
                rsi += vm
                rsii += vm * v
                rsit += vm * t
                rgx += gxm
                rgy += gym
                rgxi += gxm * v
                rgyi += gym * v
                rgxt += gxm * t
                rgyt += gym * t
                rxx += gxm * gx
                rxy += gxm * gy
                ryy += gym * gy
            n += rn
            si += rsi
            sii += rsii
            sit += rsit
            sgx += rgx
            sgy += rgy
            sgxi += rgxi
            sgyi += rgyi
            sgxt += rgxt
            sgyt += rgyt
            sxx += rxx
            sxy += rxy
            syy += ryy
        if n < 3.0:
            return px, py, 0.0, False
        mu = si / n
        mgx = sgx / n
        mgy = sgy / n
        ii = sii - n * mu * mu                  # ‖ī‖²
        it = sit                                # t̄ᵀī (t̄ has zero weighted mean)
        # zero-mean Jacobian G̃: H = G̃ᵀG̃, G̃ᵀī, G̃ᵀt̄
        h00 = sxx - n * mgx * mgx
        h01 = sxy - n * mgx * mgy
        h11 = syy - n * mgy * mgy
        det = h00 * h11 - h01 * h01
        if ii <= 1e-12 or not det > 1e-12 * max(1.0, h00 * h11):
            return px, py, 0.0, False
        gix = sgxi - mgx * si
        giy = sgyi - mgy * si
        gtx = sgxt
        gty = sgyt
        cc = it / math.sqrt(ii * tt) if tt > 0.0 else 0.0
        i00 = h11 / det
        i01 = -h01 / det
        i11 = h00 / det
        hix = i00 * gix + i01 * giy             # H⁻¹ G̃ᵀī
        hiy = i01 * gix + i11 * giy
        ipi = gix * hix + giy * hiy             # īᵀPī
        tpi = gtx * hix + gty * hiy             # t̄ᵀPī
        den = it - tpi
        if den <= 0.0:
            return px, py, cc, False
        lam = (ii - ipi) / den
        bx = lam * gtx - gix
        by = lam * gty - giy
        dx = i00 * bx + i01 * by
        dy = i01 * bx + i11 * by
        px += dx
        py += dy
        if not (abs(px) <= limit and abs(py) <= limit):
            return px, py, cc, False
        if dx * dx + dy * dy < eps * eps:
            break
    return px, py, cc, True


@numba.njit(cache=True, nogil=True)
def pair_cumsum(f: np.ndarray, lag: int) -> np.ndarray:
    """Running sums of the lag-``lag`` cross-power spectra of the rows of ``f`` (T, nf) complex:
    ``C[s] = Σ_{t<s} conj(f[t])·f[t + lag]`` for s = 0 … T − lag, in ``f``'s precision, one pass
    (numpy's product + cumsum: 14× slower)."""
    T, nf = f.shape
    n = T - lag
    c = np.empty((n + 1, nf), f.dtype)
    c[0, :] = 0
    for s in range(n):
        a = f[s]
        b = f[s + lag]
        prev = c[s]
        cur = c[s + 1]
        for j in range(nf):
            cur[j] = prev[j] + a[j].conjugate() * b[j]
    return c


# ------------------------------------------------------------------ robust statistics
@numba.njit(cache=True, nogil=True)
def median(x: np.ndarray) -> float:
    """``np.median`` of a 1-D float64 array (the same value: the middle element, or the mean of
    the two middle ones), without numpy's per-call dispatch (≈ 80 µs → a few µs on small arrays).
    Finite input only: with NaNs numba returns an arbitrary element where numpy returns NaN (no
    caller passes NaN: kymograph windows are finite)."""
    return np.median(x)


@numba.njit(cache=True, nogil=True)
def row_median_mad(a: np.ndarray):
    """Per row of a 2-D float64 array: ``(median, median absolute deviation from it)``."""
    r = a.shape[0]
    med = np.empty(r)
    mad = np.empty(r)
    for i in range(r):
        m = np.median(a[i])
        med[i] = m
        mad[i] = np.median(np.abs(a[i] - m))
    return med, mad


@numba.njit(cache=True, nogil=True)
def running_median5(v: np.ndarray) -> np.ndarray:
    """``median(v[max(0, i − 2):i + 3])`` for every i (windows truncated at the ends)."""
    n = v.shape[0]
    out = np.empty(n)
    for i in range(n):
        out[i] = np.median(v[max(0, i - 2):min(n, i + 3)])
    return out


@numba.njit(cache=True, nogil=True)
def material_span(X: np.ndarray, m0: float, nb: int, n: int):
    """For every 1-px material bin ``b`` (coordinate ``m0 + b``) of a kymograph with ``n``
    columns and per-row displacement ``X`` (float64): ``(rows, cover, gap)`` — how many rows see it
    inside the kymograph (``0 ≤ m + X(t) ≤ n − 1``) and the distance it covers there (largest −
    smallest ``X(t)`` among those rows; 0 if none). Rows sorted by displacement; the two ends of
    each bin's row range move monotonically with the bin (:func:`stream.flow._material_span`).

    Also ``gap`` (px): half the sum of the two displacement steps that straddle the kymograph's
    ends — from the last row that saw the material before it entered (``m + X < 0``) to the
    first that saw it inside, and likewise at the exit — 0 at an end the window's rows do not
    reach past. The material travelled ``cover`` … ``cover + 2·gap`` inside the kymograph;
    ``cover + gap`` is the midpoint (fast flow moves tens of px between frames, so ``cover``
    alone falls short of the length by up to two frame steps depending on when the frames
    happened to be taken)."""
    xs = np.sort(X)
    k = xs.shape[0]
    rows = np.zeros(nb)
    cover = np.zeros(nb)
    gap = np.zeros(nb)
    # lo = #{xs < −mb}, hi = #{xs ≤ n − 1 − mb}: both only decrease as b grows, so two pointers
    # walk down from their values at b = 0 (np.searchsorted's left / right conventions)
    lo = np.searchsorted(xs, -m0, side="left")
    hi = np.searchsorted(xs, (n - 1) - m0, side="right")
    for b in range(nb):
        mb = m0 + b
        while lo > 0 and xs[lo - 1] >= -mb:
            lo -= 1
        while hi > 0 and xs[hi - 1] > (n - 1) - mb:
            hi -= 1
        r = hi - lo
        if r > 0:
            rows[b] = r
            cover[b] = xs[min(max(hi - 1, 0), k - 1)] - xs[min(max(lo, 0), k - 1)]
            g = 0.0
            if lo > 0:
                g += xs[lo] - xs[lo - 1]
            if hi < k:
                g += xs[hi] - xs[hi - 1]
            gap[b] = 0.5 * g
    return rows, cover, gap


def warm_up() -> None:
    """Load every kernel (for the argument types the stage passes) now rather than on its first
    real call: the first call in a process loads the compiled code from the on-disk cache, which
    initializes numba and takes ≈ 0.2–0.4 s with the GIL held — a live stage would stall (and drop
    frames) on it mid-stream. Idempotent and cheap once loaded."""
    f32, f64 = np.float32, np.float64
    a32 = np.zeros((8, 8), f32)
    ecc_translation(np.zeros((14, 14), f32), np.zeros((14, 14), f32), np.zeros((14, 14), f32), a32,
                    np.ones((8, 8), f32), 1, 0.01, 1.0)
    v = np.arange(5, dtype=f64)
    median(v)
    row_median_mad(np.zeros((2, 5), f64))
    running_median5(v)
    material_span(v, 0.0, 3, 4)
    speeds = np.array([0.5, 2.0], f64)
    k = np.zeros((6, 8), f64)
    line_sums_into(k, speeds, 2.0, line_sums_workspace(6, 8))
    x6 = np.arange(6, dtype=f64)   # one displacement per row of k (these loops do not bounds-check)
    material_bins(k, x6)
    shift_scores(k, np.zeros(8, f64), x6, 0.0, 1)
    row_line_scores(k, speeds, 2.0, 0.0, 4, 0.5)
    lag_cross_power(np.zeros((6, 5), np.complex64), np.array([1, 2], np.int64))
    pair_cumsum(np.zeros((6, 5), np.complex64), 1)
