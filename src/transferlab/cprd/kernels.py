"""C kernels for CPRD's CPU hot spots, compiled on first use (see core/native.py); PyTorch does the same without.

Why C: on CPU, the hard-negative mining was ~70% of CPRD's cost over InfoNCE and the teacher-order
sort a good part of the rest; neither `topk`/`sort` (scalar, ~10 ns per element) nor a chain of
vectorised PyTorch ops (a few microseconds of dispatch each) gets close to a single loop.

`topk_rows_native`: row-wise top-k of a float32 matrix, skipping blocked entries; the same result as
`x.masked_fill(blocked, -inf).topk(k)` (values sorted descending; among equal values the lower column
first). The idea is that of `loss._threshold_topk` (a safe threshold from group maxima), in one call:
1. group maxima: column j's group is {j, j + w, j + 2w, ...} (w = cols / g), an elementwise max of g
   slabs, which vectorises in both layouts (row-major, and a transposed view such as `sim.t()`);
2. a threshold tau with at least kk = k + extra group maxima >= tau, found by bisection between the
   row's smallest and largest group max (each step one vectorised count). Those kk maxima are distinct
   entries, at most `extra` of them blocked, so the k largest unblocked entries are all >= tau;
3. one scan of the row that skips 16-entry blocks without an entry >= tau and inserts the others into
   a sorted list of k; once the list is full, an entry must beat its last one (so ties keep the
   lower column), and the bar rises as the list improves.
Rows with a NaN, or with fewer than k unblocked entries, return a status and the caller falls back.

`argsort_rows_desc_native`: the stable descending argsort of each row of a short-row matrix (the
teacher's order of the K mined negatives): Batcher's odd-even merge sort network, applied to all rows
at once so that every compare-exchange is a vectorised pass over rows; the column index breaks ties,
which makes the network's order that of a stable sort.
"""

from __future__ import annotations

import ctypes

import torch

from ..core import native

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
typedef int64_t i64;
#define STEPS 8  /* bisection steps: 6 or more leave ~k + 4 survivors per row of 512 (exact k-th: k + 3) */

/* bit i set where a[i] >= t[i] (i < 16); t is one value or one per lane */
static inline uint32_t hits16(const float *restrict a, const float *restrict t, int per_lane) {
#if defined(__SSE2__)
    uint32_t h = 0;
    for (int q = 0; q < 4; q++) {
        __m128 tv = per_lane ? _mm_loadu_ps(t + 4 * q) : _mm_set1_ps(*t);
        h |= (uint32_t)_mm_movemask_ps(_mm_cmpge_ps(_mm_loadu_ps(a + 4 * q), tv)) << (4 * q);
    }
    return h;
#else
    uint32_t h = 0;
    for (int i = 0; i < 16; i++) h |= (uint32_t)(a[i] >= t[per_lane ? i : 0]) << i;
    return h;
#endif
}

static inline uint32_t hits(const float *restrict a, const float *restrict t, int per_lane, i64 len) {
    if (len == 16) return hits16(a, t, per_lane);
    uint32_t h = 0;
    for (i64 i = 0; i < len; i++) h |= (uint32_t)(a[i] >= t[per_lane ? i : 0]) << i;
    return h;
}

/* insert x (column c) into the descending list v/id of m entries (capacity k; the last drops when full) */
static inline void put(float *restrict v, i64 *restrict id, i64 m, i64 k, float x, i64 c) {
    i64 j = m < k ? m : k - 1;
    while (j > 0 && v[j - 1] < x) { v[j] = v[j - 1]; id[j] = id[j - 1]; j--; }   /* strict: ties stay first */
    v[j] = x; id[j] = c;
}

/* per row r: the largest tested t with at least kk of its w group maxima >= t, by bisection between
   the row's smallest and largest maximum. gm[j * rows + r] holds maximum j of row r; the loops run over
   rows innermost, so they vectorise for any number of rows. */
static void thresholds(const float *restrict gm, i64 rows, i64 w, i64 kk, float *restrict lo,
                       float *restrict hi, float *restrict mid, int32_t *restrict cnt) {
    for (i64 r = 0; r < rows; r++) lo[r] = hi[r] = gm[r];
    for (i64 j = 1; j < w; j++)
        for (i64 r = 0; r < rows; r++) {
            float x = gm[j * rows + r];
            lo[r] = x < lo[r] ? x : lo[r]; hi[r] = x > hi[r] ? x : hi[r];
        }
    for (i64 r = 0; r < rows; r++) if (!(hi[r] - lo[r] < 3.0e38f)) hi[r] = lo[r];  /* infinities: keep lo */
    for (int s = 0; s < STEPS; s++) {
        for (i64 r = 0; r < rows; r++) { cnt[r] = 0; mid[r] = lo[r] + (hi[r] - lo[r]) * 0.5f; }
        for (i64 j = 0; j < w; j++)
            for (i64 r = 0; r < rows; r++) cnt[r] += gm[j * rows + r] >= mid[r];
        for (i64 r = 0; r < rows; r++) {
            if (cnt[r] >= kk) lo[r] = mid[r]; else hi[r] = mid[r];
        }
    }
}

/* rows x cols matrix x[r * rs + c * cs] with cs == 1 (row-major) or rs == 1 (a transposed view);
   blocked b[r * brs + c * bcs] or NULL. Writes the k largest unblocked entries of each row, sorted,
   to vals/idx [rows, k]. Returns 0, or 1 (a NaN: topk ranks it first, the caller falls back),
   2 (a row has fewer than k unblocked entries), 3 (out of memory). */
int tl_topk_rows(const float *restrict x, i64 rows, i64 cols, i64 rs, i64 cs,
                 const uint8_t *restrict b, i64 brs, i64 bcs, i64 k, i64 kk, i64 g,
                 float *restrict vals, i64 *restrict idx) {
    i64 w = cols / g;
    float *gm = malloc(sizeof(float) * w * rows), *tau = malloc(sizeof(float) * rows);
    float *hi = malloc(sizeof(float) * rows), *mid = malloc(sizeof(float) * rows), *row = malloc(sizeof(float) * w);
    int32_t *cnt = malloc(sizeof(int32_t) * rows);
    i64 *n = calloc((size_t)rows, sizeof(i64));
    int status = 0, nan = 0;
    if (!gm || !tau || !hi || !mid || !row || !cnt || !n) { status = 3; goto done; }
    /* 1. group maxima gm[j][r] = max_a x[r, a * w + j], read in memory order; a NaN anywhere is flagged
       (comparisons would skip it) */
    if (cs == 1) {
        for (i64 r = 0; r < rows; r++) {
            const float *xr = x + r * rs;
            for (i64 j = 0; j < w; j++) { row[j] = xr[j]; nan |= xr[j] != xr[j]; }
            for (i64 a = 1; a < g; a++) {
                const float *s = xr + a * w;
                for (i64 j = 0; j < w; j++) { row[j] = s[j] > row[j] ? s[j] : row[j]; nan |= s[j] != s[j]; }
            }
            for (i64 j = 0; j < w; j++) gm[j * rows + r] = row[j];
        }
    } else {
        for (i64 j = 0; j < w; j++) {
            float *gj = gm + j * rows; const float *s0 = x + j * cs;
            for (i64 r = 0; r < rows; r++) { gj[r] = s0[r]; nan |= s0[r] != s0[r]; }
            for (i64 a = 1; a < g; a++) {
                const float *s = x + (a * w + j) * cs;
                for (i64 r = 0; r < rows; r++) { gj[r] = s[r] > gj[r] ? s[r] : gj[r]; nan |= s[r] != s[r]; }
            }
        }
    }
    if (nan) { status = 1; goto done; }
    /* 2. a safe bound per row */
    thresholds(gm, rows, w, kk, tau, hi, mid, cnt);
    /* 3. scan: only entries >= the bar reach the list; the bar rises to the list's last once it is full */
    if (cs == 1) {
        for (i64 r = 0; r < rows; r++) {
            const float *xr = x + r * rs; const uint8_t *br = b ? b + r * brs : 0;
            float *v = vals + r * k; i64 *id = idx + r * k, m = 0; float t = tau[r];
            for (i64 c0 = 0; c0 < cols; c0 += 16) {
                uint32_t hit = hits(xr + c0, &t, 0, cols - c0 < 16 ? cols - c0 : 16);
                while (hit) {                       /* lowest column first */
                    i64 c = c0 + __builtin_ctz(hit); hit &= hit - 1;
                    float e = xr[c];
                    if ((br && br[c * bcs]) || (m == k && !(e > v[k - 1]))) continue;
                    put(v, id, m, k, e, c);
                    if (m < k) m++;
                    if (m == k && v[k - 1] > t) t = v[k - 1];
                }
            }
            n[r] = m;
        }
    } else {
        for (i64 c = 0; c < cols; c++) {
            const float *xc = x + c * cs; const uint8_t *bc = b ? b + c * bcs : 0;
            for (i64 r0 = 0; r0 < rows; r0 += 16) {
                uint32_t hit = hits(xc + r0, tau + r0, 1, rows - r0 < 16 ? rows - r0 : 16);
                while (hit) {
                    i64 r = r0 + __builtin_ctz(hit); hit &= hit - 1;
                    float e = xc[r], *v = vals + r * k;
                    if ((bc && bc[r * brs]) || (n[r] == k && !(e > v[k - 1]))) continue;
                    put(v, idx + r * k, n[r], k, e, c);
                    if (n[r] < k) n[r]++;
                    if (n[r] == k && v[k - 1] > tau[r]) tau[r] = v[k - 1];
                }
            }
        }
    }
    for (i64 r = 0; r < rows; r++) if (n[r] < k) { status = 2; break; }
done:
    free(gm); free(tau); free(hi); free(mid); free(row); free(cnt); free(n);
    return status;
}


/* one compare-exchange of slabs a and b for every row: b's element moves first if it is larger, or
   equal with a lower column. Written with bit masks, not `?:`, so that the compiler vectorises it. */
static void exchange(float *restrict va, float *restrict vb, int32_t *restrict ia, int32_t *restrict ib, i64 rows) {
    for (i64 r = 0; r < rows; r++) {
        union { float f; int32_t i; } x = {va[r]}, y = {vb[r]}, hi, lo;
        int32_t a = ia[r], b = ib[r];
        int32_t m = -((int32_t)(y.f > x.f) | ((int32_t)(y.f == x.f) & (int32_t)(b < a)));  /* all ones: swap */
        hi.i = (y.i & m) | (x.i & ~m); lo.i = (x.i & m) | (y.i & ~m);
        va[r] = hi.f; vb[r] = lo.f;
        ia[r] = (b & m) | (a & ~m); ib[r] = (a & m) | (b & ~m);
    }
}

/* Stable descending argsort of each row of t [rows, k] (row-major) into order [rows, k]. The rows are
   transposed into n (k rounded up to a power of two) slabs of `rows` values, padded with -inf and
   column ids >= k (so padding sorts last), and run through Batcher's odd-even merge sort network.
   Element (value, column) a comes before b when a's value is larger, or equal with a lower column.
   Returns 1 if t holds a NaN (no order is defined; the caller sorts with torch), 3 if out of memory. */
int tl_argsort_rows_desc(const float *restrict t, i64 rows, i64 k, i64 *restrict order) {
    i64 n = 1;
    while (n < k) n <<= 1;
    float *v = malloc(sizeof(float) * n * rows);
    int32_t *id = malloc(sizeof(int32_t) * n * rows);
    int status = 0, nan = 0;
    if (!v || !id) { status = 3; goto done; }
    for (i64 j = 0; j < n; j++)
        for (i64 r = 0; r < rows; r++) {
            float x = j < k ? t[r * k + j] : -__builtin_inff();
            v[j * rows + r] = x; id[j * rows + r] = (int32_t)j; nan |= x != x;
        }
    if (nan) { status = 1; goto done; }
    for (i64 p = 1; p < n; p <<= 1)
        for (i64 d = p; d >= 1; d >>= 1)
            for (i64 j = d % p; j + d < n; j += 2 * d)
                for (i64 i = 0; i < d && i + j + d < n; i++) {
                    if ((i + j) / (2 * p) != (i + j + d) / (2 * p)) continue;
                    exchange(v + (i + j) * rows, v + (i + j + d) * rows, id + (i + j) * rows,
                             id + (i + j + d) * rows, rows);
                }
    for (i64 r = 0; r < rows; r++)
        for (i64 j = 0; j < k; j++) order[r * k + j] = id[j * rows + r];
done:
    free(v); free(id);
    return status;
}
"""


def _library():
    lib = native.load("cprd_kernels", SOURCE)
    if lib is not None and not getattr(lib, "_typed", False):
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.tl_topk_rows.restype = ctypes.c_int
        lib.tl_topk_rows.argtypes = [ptr, i64, i64, i64, i64, ptr, i64, i64, i64, i64, i64, ptr, ptr]
        lib.tl_argsort_rows_desc.restype = ctypes.c_int
        lib.tl_argsort_rows_desc.argtypes = [ptr, i64, i64, ptr]
        lib._typed = True
    return lib


def available() -> bool:
    return _library() is not None


def topk_rows_native(x: torch.Tensor, k: int, blocked: torch.Tensor | None,
                     extra: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(values, indices) like the masked `topk`, or None when the C path does not apply or declines.

    `extra` should be at least the number of blocked entries of any row (it widens the bound); a smaller
    one cannot make the answer wrong, only make the kernel decline (it then finds fewer than k entries
    above the bound, and any k unblocked entries above a bound are the top k).
    """
    lib = _library()
    n, c = x.shape
    kk = k + extra
    if lib is None or x.device.type != "cpu" or x.dtype != torch.float32 or n == 0 or k < 1 or kk > c:
        return None
    if blocked is not None and (blocked.shape != x.shape or blocked.dtype != torch.bool or blocked.device != x.device):
        return None  # the C code trusts shapes; the PyTorch path reports such input properly
    if x.stride(1) != 1 and x.stride(0) != 1:
        x = x.contiguous()
    # groups of g columns with at least kk groups (for the bound) and few of them (for its cost)
    g = next(g for g in (8, 4, 2, 1) if c % g == 0 and c // g >= kk)
    b, brs, bcs = None, 0, 0
    if blocked is not None:
        b = blocked.view(torch.uint8)
        brs, bcs = b.stride()
    vals = torch.empty(n, k, dtype=torch.float32)
    idx = torch.empty(n, k, dtype=torch.int64)
    status = lib.tl_topk_rows(x.data_ptr(), n, c, x.stride(0), x.stride(1), None if b is None else b.data_ptr(),
                              brs, bcs, k, kk, g, vals.data_ptr(), idx.data_ptr())
    if status == 3:
        raise MemoryError("tl_topk_rows: out of memory")
    return (vals, idx) if status == 0 else None


def argsort_rows_desc_native(t: torch.Tensor) -> torch.Tensor | None:
    """`torch.sort(t, dim=1, descending=True, stable=True).indices` for a float32 CPU matrix with short rows
    (at most 64), or None when the C path does not apply (no compiler, other dtype or device, NaN)."""
    lib = _library()
    if lib is None or t.device.type != "cpu" or t.dtype != torch.float32 or t.dim() != 2 or not 0 < t.shape[1] <= 64:
        return None
    t = t.contiguous()
    order = torch.empty(t.shape, dtype=torch.int64)
    if t.shape[0] == 0:
        return order
    status = lib.tl_argsort_rows_desc(t.data_ptr(), t.shape[0], t.shape[1], order.data_ptr())
    if status == 3:
        raise MemoryError("tl_argsort_rows_desc: out of memory")
    return order if status == 0 else None
