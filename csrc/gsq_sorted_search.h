// The exact lookup for d <= 2 (docs/spec.md, "Lookup"), the part every backend shares: the keys,
// the search of one row over codes bucketed by key, and the bound that proves its winner. Plain
// C++ that also compiles as CUDA device code; the bucketing itself is backend-specific
// (cpu/gsq_cpu_sorted_search.cpp).
//
// Lookup vectors. n = l2(z), c^_j = l2(c_j) (raw z and c_j when l2 is off), where l2(x) =
// x / max(r, eps) in fp32 and r = sqrt(sum_k x_k^2) computed in float64 and rounded once to fp32.
// For d <= 2 each x_k^2 is exact in float64 and the sum rounds once, so these vectors are the same
// bits on every device and in the oracle (gsq_kernels/lookup.py). The distance ||n - c^||^2 is
// computed in float64 (the differences are exact, then two squares and a sum, no FMA), exactly
// as the oracle computes it; ties go to the lowest index.
//
// Keys. d = 1: the value c^. d = 2: the pseudo-angle of the code, in [0, 4],
//   p = r, 2 - r, 2 + r, 4 - r in quadrants 1..4,  r = |y| / (|x| + |y|),
// which increases with the angle theta and costs one division instead of an atan2. In the first
// quadrant p = sin / (sin + cos), so dp/dtheta = 1 / (sin + cos)^2 lies in [1/2, 1] (likewise in
// the others): two directions whose keys differ by g are at least g radians apart. A bucket b of
// B holds the codes with floor((key - origin) * scale) = b; at d = 2, origin = 0 and scale = B / 4
// with B a power of two, so bucket edges are exact.
//
// The bound. A row in bucket b has scored every code in buckets b - w .. b + w (and the short
// codes); every other code has a key outside that window, at least
// g = (distance from the row's key to the window's nearer edge) - slack away:
//   d = 1: ||n - c^||^2 >= g^2.
//   d = 2: ||n - c^||^2 = (|n| - |c^|)^2 + 2 |n| |c^| (1 - cos phi) >= 4 |n| |c^| sin^2(phi / 2)
//          with phi >= min(g, pi) the angle between them, and |c^| >= kMinCodeNorm for every
//          bucketed code (shorter codes are "short": scored against every row).
// When the bound exceeds the best distance found, no outside code is as near (a tie needs
// equality), so the best is the nearest code; otherwise the window doubles.
// The d = 2 slack covers the fp32 key of a code taken from its raw coordinates (the direction of
// c^ up to one rounding per coordinate; r within 2u, one more rounding in [0, 4]: below 3e-7 in
// all) and the float64 key of the row.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__) || defined(GSQ_CUDA_EMULATION)
#define GSQ_HOST_DEVICE __host__ __device__
#else
#define GSQ_HOST_DEVICE
#endif

namespace gsq_sorted {

constexpr double kKeySlack = 1.0 / (1 << 19);
// Bucketed d = 2 codes have ||c|| > 2 eps, so c^ = c / r has norm 1 up to a few ulps.
constexpr double kMinCodeNorm = 1.0 - 1.0 / (1 << 18);
// Relative slack on a bound for its own float64 rounding (a few operations at 2^-53 each).
constexpr double kBoundShrink = 1.0 - 1.0 / (1ll << 40);
constexpr double kPi = 3.14159265358979323846;
// Codes per bucket on average: a row scores a few times this many codes.
constexpr int64_t kCodesPerBucket = 4;
// A CPU build may fill only the buckets within this many of a row's bucket; the rows that need
// more are searched again after a build within kWideHalfWindow of theirs, then after a full one.
constexpr int64_t kMarkedHalfWindow = 2;
constexpr int64_t kWideHalfWindow = 64;

// The codes as the search reads them. Bucket b in [0, num_buckets) holds the members
// [bucket_start[b], bucket_end[b]); bucket num_buckets holds the short codes. `built` (null: all)
// says which buckets hold their codes; a search that needs any other bucket gives up.
struct SortedView {
  int dim;
  int64_t num_buckets;
  double key_origin;
  double key_scale;
  const int64_t* bucket_start;
  const int64_t* bucket_end;
  const int32_t* members;     // code indices
  const float* member_codes;  // (members, dim): their c^
  const uint8_t* built;       // num_buckets + 1, or null
};

// The buckets: a power of two, about num_codes / kCodesPerBucket of them, and the map
// bucket = floor((key - origin) * scale). d = 2: keys in [0, 4], so origin 0 and scale B / 4
// (exact: the bucket of an fp32 key is the floor of an exact product). d = 1: over the range
// [low, high] of the codes' keys (one bucket when low >= high: a single value, or no finite code).
struct BucketMap {
  int64_t num_buckets;
  double origin;
  double scale;
};

GSQ_HOST_DEVICE inline BucketMap bucket_map(int dim, int64_t num_codes, float low, float high) {
  int64_t buckets = 1;
  while (buckets * 2 * kCodesPerBucket <= num_codes) buckets *= 2;
  if (dim == 2) return {buckets, 0.0, static_cast<double>(buckets) / 4};
  if (!(low < high)) return {1, 0.0, 0.0};
  return {buckets, static_cast<double>(low),
          static_cast<double>(buckets) / (static_cast<double>(high) - low)};
}

// A d = 2 code is short (scored against every row, not bucketed) unless
// max(4.5 eps^2, 1e-37) < x^2 + y^2 <= FLT_MAX in fp32: then r > 2 eps and fits fp32, so c^ = c / r
// has norm 1 up to a few ulps (kMinCodeNorm).
GSQ_HOST_DEVICE inline float long_code_norm_sq(float eps) {
  const float threshold = 4.5f * eps * eps;
  return threshold > 1e-37f ? threshold : 1e-37f;
}

// The bucket of a raw d = 2 code: num_buckets (last + 1) for a short code, num_buckets + 1 for one
// holding NaN/inf. Its key is that of the raw coordinates, whose direction c^ keeps up to one
// rounding per coordinate (within kKeySlack). Without branches, so loops over codes vectorize.
GSQ_HOST_DEVICE inline int32_t code_bucket_2d(float x, float y, float long_norm_sq, float scale,
                                              int32_t last) {
  const float ax = fabsf(x), ay = fabsf(y);
  const float r = ay / (ax + ay);
  // pseudo_angle(x, y) as base + sign r by quadrant (exact in fp32): base 0, 2, 4, 2 and sign
  // +1, -1, -1, +1 for (x >= 0, y >= 0), (<, >=), (>=, <), (<, <).
  const float right = x >= 0 ? 1.0f : 0.0f, upper = y >= 0 ? 1.0f : 0.0f;
  const float base = 2.0f + 2.0f * right * (1.0f - 2.0f * upper);
  const float sign = 1.0f - 2.0f * (right - upper) * (right - upper);
  const float position = (base + sign * r) * scale;
  // Key 4 is angle 2 pi: bucket 0 (the number of buckets is a power of two).
  const int32_t b = static_cast<int32_t>(position > 0 ? position : 0.0f) & last;
  const float norm_sq = x * x + y * y;
  const bool is_long = (norm_sq > long_norm_sq) & (norm_sq <= 3.4028234e38f);
  const bool finite = (x - x) + (y - y) == 0;  // false for NaN and +-inf
  const int32_t kept = is_long ? b : last + 1;
  return finite ? kept : last + 2;
}

// The bucket of a raw d = 1 code (its key is c^, computed exactly: r = |x|), or last + 2 for NaN
// and +-inf.
GSQ_HOST_DEVICE inline int32_t code_bucket_1d(float x, bool l2_normalize, float eps, double origin,
                                              double scale, int32_t last) {
  const float ax = fabsf(x);
  const float key = l2_normalize ? x / (ax > eps ? ax : eps) : x;
  const double position = (static_cast<double>(key) - origin) * scale;
  const int32_t b = static_cast<int32_t>(position > 0 ? position : 0.0);
  return x - x == 0 ? (b < last ? b : last) : last + 2;
}

template <typename T>
GSQ_HOST_DEVICE inline T pseudo_angle(T x, T y) {
  const T ax = fabs(x);
  const T ay = fabs(y);
  const T r = ay / (ax + ay);
  if (y >= 0) return x >= 0 ? r : T(2) - r;
  return x < 0 ? T(2) + r : T(4) - r;
}

// n = l2(x) (or x) for one vector of `dim` <= 2 coordinates, as the file comment defines it.
GSQ_HOST_DEVICE inline void lookup_vector(const float* x, int dim, bool l2_normalize, float eps,
                                          float* out) {
  if (!l2_normalize) {
    for (int k = 0; k < dim; ++k) out[k] = x[k];
    return;
  }
  double sum_squares = 0;
  for (int k = 0; k < dim; ++k) sum_squares += static_cast<double>(x[k]) * x[k];
  const float norm = static_cast<float>(sqrt(sum_squares));
  const float denom = norm > eps ? norm : eps;
  for (int k = 0; k < dim; ++k) out[k] = x[k] / denom;
}

struct Best {
  double distance;
  int64_t index;
};

GSQ_HOST_DEVICE inline void scan_bucket(const SortedView& s, int64_t b, const double* n,
                                        Best& best) {
  const int64_t end = s.bucket_end[b];
  for (int64_t p = s.bucket_start[b]; p < end; ++p) {
    const float* c = s.member_codes + p * s.dim;
    const double dx = n[0] - static_cast<double>(c[0]);
    const double dx2 = dx * dx;
    double distance = dx2;
    if (s.dim == 2) {
      const double dy = n[1] - static_cast<double>(c[1]);
      const double dy2 = dy * dy;
      distance = dx2 + dy2;
    }
    const int64_t j = s.members[p];
    if (distance < best.distance || (distance == best.distance && j < best.index)) {
      best.distance = distance;
      best.index = j;
    }
  }
}

// A lower bound on the distance from the row to every code outside buckets b - w .. b + w, or
// +inf when those cover every bucket (see the file comment).
GSQ_HOST_DEVICE inline double outside_bound(const SortedView& s, const double* n, double key,
                                            int64_t b, int64_t w) {
  const double inf = HUGE_VAL;
  const int64_t B = s.num_buckets;
  if (s.dim == 2) {
    if (2 * w + 1 >= B) return inf;
    const double width = 4.0 / static_cast<double>(B);
    const double to_left = key - static_cast<double>(b - w) * width;
    const double to_right = static_cast<double>(b + w + 1) * width - key;
    const double gap = (to_left < to_right ? to_left : to_right) - kKeySlack;
    if (gap <= 0) return 0;
    // sin(h) >= h - h^3 / 6 >= 0 for 0 <= h <= pi / 2: a cheaper lower bound than sin itself.
    const double half = (gap < kPi ? gap : kPi) / 2;
    const double sin_half = half - half * half * half / 6;
    const double norm = sqrt(n[0] * n[0] + n[1] * n[1]);
    return 4 * norm * kMinCodeNorm * sin_half * sin_half * kBoundShrink;
  }
  const bool left_done = b - w <= 0;
  const bool right_done = b + w >= B - 1;
  if (left_done && right_done) return inf;
  // Keys span [origin, origin + B / scale]; the slack covers the rounding of the bucket
  // products and of the edges, far above float64's 2^-52 relative error.
  const double slack = static_cast<double>(B) / s.key_scale / (1ll << 40);
  double gap = inf;
  if (!left_done) gap = n[0] - (s.key_origin + static_cast<double>(b - w) / s.key_scale) - slack;
  if (!right_done) {
    const double to_right = s.key_origin + static_cast<double>(b + w + 1) / s.key_scale - n[0];
    gap = gap < to_right - slack ? gap : to_right - slack;
  }
  if (gap <= 0) return 0;
  return gap * gap * kBoundShrink;
}

// The bucket of a row's key (float64); at d = 2 a key of 4 (angle 2 pi) becomes 0, bucket 0.
GSQ_HOST_DEVICE inline int64_t row_bucket(const SortedView& s, double& key) {
  const int64_t B = s.num_buckets;
  const int64_t b = static_cast<int64_t>(floor((key - s.key_origin) * s.key_scale));
  if (s.dim == 2) {
    if (b < B) return b;
    key -= 4;
    return 0;
  }
  return b < 0 ? 0 : (b > B - 1 ? B - 1 : b);
}

// Whether the row n needs every bucket: d = 2 and |n| < 1/2 (||z|| < eps / 2), too short for its
// angle to locate the winner.
GSQ_HOST_DEVICE inline bool needs_every_bucket(int dim, const double* n) {
  return dim == 2 && n[0] * n[0] + n[1] * n[1] < 0.25;
}

// The key of a row and its bucket, for marking and searching.
GSQ_HOST_DEVICE inline int64_t row_key_bucket(const SortedView& s, const double* n, double& key) {
  key = s.dim == 2 ? pseudo_angle<double>(n[0], n[1]) : n[0];
  return row_bucket(s, key);
}

// search_row for a row that does not need every bucket, given its key and bucket
// (row_key_bucket).
GSQ_HOST_DEVICE inline bool search_row_from(const SortedView& s, const double* n, double key,
                                            int64_t b, Best& best) {
  const int64_t B = s.num_buckets;
  if (s.built != nullptr && !s.built[b]) return false;
  scan_bucket(s, b, n, best);
  // The window b - done .. b + done is scanned; it doubles until the bound proves the winner, so
  // a row far from every code (an empty arc) takes O(log B) bounds, not O(B).
  for (int64_t done = 0;;) {
    // +inf once the window covers every bucket (best may be +inf too: no finite code at all).
    const double bound = outside_bound(s, n, key, b, done);
    if (bound > best.distance || bound == HUGE_VAL) return true;
    const int64_t next = done == 0 ? 1 : 2 * done;
    for (int64_t w = done + 1; w <= next; ++w) {
      // Stop once the buckets scanned cover all (d = 2: 2w - 1 of them; d = 1: both ends).
      if (s.dim == 2 ? 2 * w - 1 >= B : (b - w < 0 && b + w >= B)) break;
      int64_t left = b - w, right = b + w;
      if (s.dim == 2) {  // the circle: B is a power of two, so & (B - 1) is the modulo
        left &= B - 1;
        right &= B - 1;
      }
      const bool has_left = left >= 0, has_right = right < B && right != left;
      if (s.built != nullptr && ((has_left && !s.built[left]) || (has_right && !s.built[right]))) {
        return false;
      }
      if (has_left) scan_bucket(s, left, n, best);
      if (has_right) scan_bucket(s, right, n, best);
    }
    done = next;
  }
}

// Widens `best` (already holding the short codes) to the nearest code of row n. Returns false if
// that needs a bucket that is not built.
GSQ_HOST_DEVICE inline bool search_row(const SortedView& s, const double* n, Best& best) {
  if (needs_every_bucket(s.dim, n)) {
    for (int64_t b = 0; b < s.num_buckets; ++b) {
      if (s.built != nullptr && !s.built[b]) return false;
      scan_bucket(s, b, n, best);
    }
    return true;
  }
  double key;
  const int64_t b = row_key_bucket(s, n, key);
  return search_row_from(s, n, key, b, best);
}

}  // namespace gsq_sorted
