"""Compiled C++ block-sparse flash kernel for CPU (float32), parallel over (batch, head, query block).

One kernel serves every interval-pattern variant: it walks a ``BlockMap`` (the key blocks each
query block visits), runs an online softmax over them, skips the element test on *full* blocks
and applies the intervals' test on partial ones.  Nothing outside the map is computed.  The
inner products use GCC vector extensions (16 floats), so the source is portable across x86 ISAs;
it is built once per machine with ``torch.utils.cpp_extension.load_inline`` (about a minute)
into torch's extension cache, keyed by the source hash.  Key blocks of 16, 32 or 64 keys each have
an instantiation.  If the build fails, or the call is outside what it handles (non-float32,
non-CPU, another key block width), the caller falls back to ``cpu_blocked``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from typing import Optional

import torch
import torch.nn.functional as F

from codegen.naive import as4d
from codegen.pattern import BlockMap

logger = logging.getLogger(__name__)

BK = 64  # the key block width artifacts name by default
BLOCKS = (16, 32, 64)  # key block widths the kernel is compiled for

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <vector>
#include <limits>

// A 16-float vector as the native vectors of this CPU: one on AVX-512, two on AVX2. (GCC lowers a 64-byte
// generic vector on AVX2 by keeping it in memory and moving it through integer registers: 10x slower.)
#ifdef __AVX512F__
constexpr int VW = 16;
#else
constexpr int VW = 8;
#endif
constexpr int NS = 16 / VW;
typedef float vf __attribute__((vector_size(VW * 4)));
typedef int vi __attribute__((vector_size(VW * 4)));
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4)));  // the same vector at any float address
struct v16 {
  vf x[NS];
  float operator[](int l) const { return x[l / VW][l % VW]; }
};
static inline v16 operator+(v16 a, v16 b) { for (int i = 0; i < NS; ++i) a.x[i] += b.x[i]; return a; }
static inline v16& operator+=(v16& a, v16 b) { for (int i = 0; i < NS; ++i) a.x[i] += b.x[i]; return a; }
static inline v16 operator-(v16 a, float c) { for (int i = 0; i < NS; ++i) a.x[i] -= c; return a; }
static inline v16 operator*(v16 a, float c) { for (int i = 0; i < NS; ++i) a.x[i] *= c; return a; }
static inline v16 operator*(float c, v16 a) { for (int i = 0; i < NS; ++i) a.x[i] = c * a.x[i]; return a; }
static inline v16 vmax(v16 a, v16 b) {
  for (int i = 0; i < NS; ++i) a.x[i] = (a.x[i] > b.x[i]) ? a.x[i] : b.x[i];
  return a;
}

static inline v16 ld(const float* p) {
  v16 r;
  for (int i = 0; i < NS; ++i) r.x[i] = *(const vfu*)(p + i * VW);
  return r;
}
static inline void st(float* p, v16 r) { for (int i = 0; i < NS; ++i) *(vfu*)(p + i * VW) = r.x[i]; }
static inline vf vsplat(float c) { vf r = {}; return r + c; }
static inline v16 splat(float c) { v16 r; for (int i = 0; i < NS; ++i) r.x[i] = vsplat(c); return r; }

// exp on one native vector: 2^(x log2 e) = 2^n * 2^f, f in [-0.5, 0.5], degree-6 polynomial (rel err ~2e-7)
static inline vf vexp1(vf x) {
  const vf lo = vsplat(-87.0f), hi = vsplat(88.0f);
  vf neg = (x < lo) ? vsplat(1.0f) : vsplat(0.0f);  // exact 0 below the float range (and for -inf)
  x = (x < lo) ? lo : x;
  x = (x > hi) ? hi : x;
  vf t = x * 1.44269504088896341f;
  vf r = t + ((t >= vsplat(0.0f)) ? vsplat(0.5f) : vsplat(-0.5f));
  vi n = __builtin_convertvector(r, vi);
  vf f = t - __builtin_convertvector(n, vf);
  vf p = vsplat(1.5403530393381606e-4f);
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  vi bits = (n + 127) << 23;
  vf out = p * (vf)bits;
  return (neg > vsplat(0.0f)) ? vsplat(0.0f) : out;
}
static inline v16 vexp(v16 x) { for (int i = 0; i < NS; ++i) x.x[i] = vexp1(x.x[i]); return x; }

// s[4][BK] = scale * q[4][E] . kt[E][k0:k0+BK], one 16-key chunk at a time: 4 accumulators, so the tile
// fits in the 16 registers of AVX2 (a 16-float vector is two of them) as well as in AVX-512's 32
template <int BK>
static inline void qk_tile(const float* __restrict q, const float* __restrict kt, int64_t E, int64_t Mp,
                           float scale, float* __restrict s) {
  for (int c = 0; c < BK / 16; ++c) {
    v16 a0 = splat(0.f), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t e = 0; e < E; ++e) {
      const v16 kv = ld(kt + e * Mp + 16 * c);
      a0 += q[e] * kv; a1 += q[E + e] * kv; a2 += q[2 * E + e] * kv; a3 += q[3 * E + e] * kv;
    }
    st(s + 16 * c, a0 * scale); st(s + BK + 16 * c, a1 * scale);
    st(s + 2 * BK + 16 * c, a2 * scale); st(s + 3 * BK + 16 * c, a3 * scale);
  }
}

#ifdef __AVX512F__
// BK = 64 on AVX-512: written out, so the 16 accumulators stay in its 32 registers (on AVX2 they would
// need 32 of its 16 and spill on every step: the chunked form above is used there)
template <>
inline void qk_tile<64>(const float* __restrict q, const float* __restrict kt, int64_t E, int64_t Mp,
                        float scale, float* __restrict s) {
  constexpr int BK = 64;
  v16 a00 = splat(0.f), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
  v16 a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;
  for (int64_t e = 0; e < E; ++e) {
    const float* kr = kt + e * Mp;
    const v16 k0 = ld(kr), k1 = ld(kr + 16), k2 = ld(kr + 32), k3 = ld(kr + 48);
    const float q0 = q[e], q1 = q[E + e], q2 = q[2 * E + e], q3 = q[3 * E + e];
    a00 += q0 * k0; a01 += q0 * k1; a02 += q0 * k2; a03 += q0 * k3;
    a10 += q1 * k0; a11 += q1 * k1; a12 += q1 * k2; a13 += q1 * k3;
    a20 += q2 * k0; a21 += q2 * k1; a22 += q2 * k2; a23 += q2 * k3;
    a30 += q3 * k0; a31 += q3 * k1; a32 += q3 * k2; a33 += q3 * k3;
  }
  st(s, a00 * scale); st(s + 16, a01 * scale); st(s + 32, a02 * scale); st(s + 48, a03 * scale);
  st(s + BK, a10 * scale); st(s + BK + 16, a11 * scale); st(s + BK + 32, a12 * scale); st(s + BK + 48, a13 * scale);
  st(s + 2 * BK, a20 * scale); st(s + 2 * BK + 16, a21 * scale);
  st(s + 2 * BK + 32, a22 * scale); st(s + 2 * BK + 48, a23 * scale);
  st(s + 3 * BK, a30 * scale); st(s + 3 * BK + 16, a31 * scale);
  st(s + 3 * BK + 32, a32 * scale); st(s + 3 * BK + 48, a33 * scale);
}
#endif

// acc[4][NC*16] += p[4][BK] . v[BK][NC*16] (row stride Fp), one 16-column chunk at a time (4 accumulators:
// AVX2's registers hold them; the sums run over j in the same order, so the result does not change)
template <int BK, int NC>
static inline void pv_tile(const float* __restrict p, const float* __restrict v, int64_t Fp, float* __restrict acc) {
  for (int c = 0; c < NC; ++c) {
    v16 a0 = ld(acc + c * 16), a1 = ld(acc + Fp + c * 16);
    v16 a2 = ld(acc + 2 * Fp + c * 16), a3 = ld(acc + 3 * Fp + c * 16);
    for (int j = 0; j < BK; ++j) {
      const v16 w = ld(v + j * Fp + c * 16);
      a0 += p[j] * w; a1 += p[BK + j] * w; a2 += p[2 * BK + j] * w; a3 += p[3 * BK + j] * w;
    }
    st(acc + c * 16, a0); st(acc + Fp + c * 16, a1); st(acc + 2 * Fp + c * 16, a2); st(acc + 3 * Fp + c * 16, a3);
  }
}

template <int BK>
torch::Tensor attn_fwd_bk(torch::Tensor q, torch::Tensor kt, torch::Tensor vp, torch::Tensor idx,
                          torch::Tensor num, torch::Tensor full, torch::Tensor lo, torch::Tensor hi,
                          torch::Tensor mask, std::vector<int64_t> mstride, int64_t m_len, int64_t block_q,
                          double scale_d, double softcap_d) {
  constexpr int NV = BK / 16;
  const int64_t B = q.size(0), H = q.size(1), P = q.size(2), E = q.size(3);
  const int64_t G = kt.size(1), Mp = kt.size(3), Fp = vp.size(3);
  const int64_t rep = H / G, BQ = block_q, nq = (P + BQ - 1) / BQ;
  const int64_t S = idx.size(3), T = lo.size(-1);
  // intervals [P, T] shared by every head, or [H, P, T]: one pattern per head (per-head plans)
  const int64_t lh = (lo.dim() == 3 && lo.size(0) > 1) ? P * T : 0;
  const int64_t ib = idx.size(0) > 1 ? 1 : 0, ih = idx.size(1) > 1 ? 1 : 0;
  const float scale = (float)scale_d, cap = (float)softcap_d;
  const float NEG = -std::numeric_limits<float>::infinity();
  const bool has_mask = mask.numel() > 0;
  auto out = torch::empty({B, H, P, Fp}, q.options());
  const float* Q = q.data_ptr<float>(); const float* KT = kt.data_ptr<float>(); const float* V = vp.data_ptr<float>();
  const int64_t* IDX = idx.data_ptr<int64_t>(); const int64_t* NUM = num.data_ptr<int64_t>();
  const bool* FULL = full.data_ptr<bool>();
  const int64_t* LO = lo.data_ptr<int64_t>(); const int64_t* HI = hi.data_ptr<int64_t>();
  const float* MK = has_mask ? mask.data_ptr<float>() : nullptr;
  float* O = out.data_ptr<float>();
  at::parallel_for(0, B * H * nq, 1, [&](int64_t begin, int64_t end) {
    const int64_t BQ4 = (BQ + 3) / 4 * 4;  // micro-tiles are 4 rows
    std::vector<float> qt(BQ4 * E), s(BQ4 * BK), acc(BQ4 * Fp), mrow(BQ4), lrow(BQ4);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % nq, bh = task / nq, h = bh % H, b = bh / H, g = h / rep;
      const int64_t q0 = qb * BQ, rows = std::min(BQ, P - q0);
      std::fill(s.begin(), s.end(), 0.f);  // padded query rows keep zero weights
      std::fill(qt.begin(), qt.end(), 0.f);
      std::memcpy(qt.data(), Q + ((b * H + h) * P + q0) * E, sizeof(float) * rows * E);
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(mrow.begin(), mrow.end(), NEG);
      std::fill(lrow.begin(), lrow.end(), 0.f);
      const int64_t moff = ((b * ib) * idx.size(1) + h * ih) * nq + qb;
      const int64_t nblk = NUM[moff];
      const float* kbase = KT + (b * G + g) * E * Mp;
      const float* vbase = V + (b * G + g) * Mp * Fp;
      for (int64_t si = 0; si < nblk; ++si) {
        const int64_t kb = IDX[moff * S + si];
        const bool isfull = FULL[moff * S + si];
        const int64_t k0 = kb * BK;
        // S = scale * Q K^T for this key block, 4 query rows at a time (qt is zero-padded to BQ rows)
        for (int64_t i = 0; i < rows; i += 4)
          qk_tile<BK>(qt.data() + i * E, kbase + k0, E, Mp, scale, s.data() + i * BK);
        for (int64_t i = 0; i < rows; ++i) {
          float* si_ = s.data() + i * BK;
          const int64_t qi = q0 + i;
          if (cap > 0.f)
            for (int j = 0; j < BK; ++j) si_[j] = cap * std::tanh(si_[j] / cap);
          if (!isfull) {  // partial block: 0 on the intervals' keys, -inf elsewhere (and past m_len)
            float add[BK];
            for (int j = 0; j < BK; ++j) add[j] = NEG;
            const int64_t last = std::min<int64_t>(k0 + BK, m_len) - 1;
            for (int64_t t = 0; t < T; ++t) {
              const int64_t a = std::max(LO[h * lh + qi * T + t], k0), z = std::min(HI[h * lh + qi * T + t], last);
              for (int64_t j = a; j <= z; ++j) add[j - k0] = 0.f;
            }
            for (int c = 0; c < NV; ++c) st(si_ + c * 16, ld(si_ + c * 16) + ld(add + c * 16));
          }
          if (has_mask) {
            const float* mrowp = MK + b * mstride[0] + h * mstride[1] + qi * mstride[2];
            const int64_t jmax = std::min<int64_t>(BK, m_len - k0);
            for (int64_t j = 0; j < jmax; ++j) si_[j] += mrowp[(k0 + j) * mstride[3]];
          }
          // online softmax update of row i
          v16 mx = ld(si_);
          for (int c = 1; c < NV; ++c) { v16 x = ld(si_ + c * 16); mx = vmax(x, mx); }
          float bmax = mx[0];
          for (int l = 1; l < 16; ++l) bmax = std::max(bmax, mx[l]);
          const float mnew = std::max(mrow[i], bmax);
          if (mnew == NEG) { std::memset(si_, 0, sizeof(float) * BK); continue; }  // nothing visible yet
          const float alpha = (mrow[i] == NEG) ? 0.f : std::exp(mrow[i] - mnew);
          v16 sum = splat(0.f);
          for (int c = 0; c < NV; ++c) { v16 p = vexp(ld(si_ + c * 16) - mnew); st(si_ + c * 16, p); sum += p; }
          float bsum = 0.f;
          for (int l = 0; l < 16; ++l) bsum += sum[l];
          lrow[i] = lrow[i] * alpha + bsum;
          mrow[i] = mnew;
          if (alpha != 1.f) { float* o = acc.data() + i * Fp; for (int64_t f = 0; f < Fp; ++f) o[f] *= alpha; }
        }
        // acc += P V, 4 rows and up to 64 value columns at a time
        for (int64_t i = 0; i < rows; i += 4)
          for (int64_t f0 = 0; f0 < Fp; f0 += 64) {
            const float* vb = vbase + k0 * Fp + f0;
            float* ab = acc.data() + i * Fp + f0;
            switch (std::min<int64_t>(4, (Fp - f0) / 16)) {
              case 4: pv_tile<BK, 4>(s.data() + i * BK, vb, Fp, ab); break;
              case 3: pv_tile<BK, 3>(s.data() + i * BK, vb, Fp, ab); break;
              case 2: pv_tile<BK, 2>(s.data() + i * BK, vb, Fp, ab); break;
              default: pv_tile<BK, 1>(s.data() + i * BK, vb, Fp, ab); break;
            }
          }
      }
      for (int64_t i = 0; i < rows; ++i) {
        float* o = O + ((b * H + h) * P + q0 + i) * Fp;
        const float inv = lrow[i] > 0.f ? 1.f / lrow[i] : 0.f;
        for (int64_t f = 0; f < Fp; ++f) o[f] = acc[i * Fp + f] * inv;
      }
    }
  });
  return out;
}

// one entry point; the key block width (16, 32 or 64) picks the instantiation
torch::Tensor attn_fwd(torch::Tensor q, torch::Tensor kt, torch::Tensor vp, torch::Tensor idx,
                       torch::Tensor num, torch::Tensor full, torch::Tensor lo, torch::Tensor hi,
                       torch::Tensor mask, std::vector<int64_t> mstride, int64_t m_len, int64_t block_q,
                       int64_t block_k, double scale_d, double softcap_d) {
  switch (block_k) {
    case 16: return attn_fwd_bk<16>(q, kt, vp, idx, num, full, lo, hi, mask, mstride, m_len, block_q,
                                    scale_d, softcap_d);
    case 32: return attn_fwd_bk<32>(q, kt, vp, idx, num, full, lo, hi, mask, mstride, m_len, block_q,
                                    scale_d, softcap_d);
    case 64: return attn_fwd_bk<64>(q, kt, vp, idx, num, full, lo, hi, mask, mstride, m_len, block_q,
                                    scale_d, softcap_d);
    default: TORCH_CHECK(false, "attn_fwd: key blocks of 16, 32 or 64, not ", block_k);
  }
}
"""

_LOCK = threading.Lock()
_STATE: dict = {}


def source_hash() -> str:
    """sha256 prefix of the kernel source (names the build in torch's extension cache)."""
    return hashlib.sha256(SOURCE.encode()).hexdigest()[:12]


def load():
    """Build (once per machine) and return the extension module, or None if it cannot be built."""
    with _LOCK:
        if "mod" in _STATE:
            return _STATE["mod"]
        mod = None
        if os.environ.get("REWRITER_NO_CPP") != "1":
            try:
                from torch.utils.cpp_extension import load_inline
                mod = load_inline(
                    name=f"rewriter_attn_cpu_{source_hash()}", cpp_sources=SOURCE, functions=["attn_fwd"],
                    extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                    verbose=False)
            except Exception as exc:  # no compiler, headers or ninja: the portable path stays correct
                logger.warning("rewriter: C++ attention kernel unavailable (%s); using the gathered-SDPA "
                               "path", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                mod = None
        _STATE["mod"] = mod
        return mod


def applies(q: torch.Tensor, bm: BlockMap) -> bool:
    """Whether the compiled kernel handles this call (float32 CPU, key blocks of 16, 32 or 64)."""
    return q.device.type == "cpu" and q.dtype == torch.float32 and bm.block_k in BLOCKS


def try_run(q, k, v, mask, scale, softcap, bm: BlockMap, lo, hi) -> Optional[torch.Tensor]:
    """Run the compiled kernel when it is built and applies; None means use the portable path."""
    if not applies(q, bm) or torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return None
    mod = load()
    if mod is None:
        return None
    bsz, h, p, e = q.shape
    m, f = k.shape[2], v.shape[-1]
    bk = bm.block_k
    nk = -(-m // bk)
    fp = -(-f // 16) * 16
    # pad only when the lengths need it: a zero-width pad still copies the whole tensor
    kp = F.pad(k, (0, 0, 0, nk * bk - m)) if nk * bk != m else k
    kt = kp.transpose(-1, -2).contiguous()
    vp = F.pad(v, (0, fp - f, 0, nk * bk - m)).contiguous() if (fp != f or nk * bk != m) else v.contiguous()
    idx, num, full = bm.idx, bm.num, bm.full
    if idx.dim() == 2:
        idx, num, full = idx[None, None], num[None, None], full[None, None]
    if mask is None:
        mk, strides = torch.empty(0), [0, 0, 0, 0]
    else:
        m4 = as4d(mask)
        if m4.dtype == torch.bool:
            m4 = torch.zeros(m4.shape).masked_fill_(~m4, float("-inf"))
        m4 = m4.float().contiguous()
        strides = [0 if m4.shape[d] == 1 else m4.stride(d) for d in range(4)]
        mk = m4
    out = mod.attn_fwd(q.contiguous(), kt, vp, idx.contiguous(), num.contiguous(), full.contiguous(),
                       lo.contiguous(), hi.contiguous(), mk, strides, m, bm.block_q, bk, float(scale), float(softcap))
    return out[..., :f] if fp != f else out
