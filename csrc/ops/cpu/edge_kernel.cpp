// CPU kernel of lipfast::generate_edge (SCHP's generate_edge_tensor, SPEC
// section 3), one pass over the labels in their own integer dtype (uint8, int16,
// int32, int64), read through their strides: no float copy, no contiguous copy,
// no conv.
//
// raw[y, x] = 1 where, for one of the pairs (y-1, x), (y, x+1), (y+1, x+1),
// (y+1, x-1) inside the image, the two labels differ and both are != 255.
// out[y, x] = OR of raw over the 3x3 neighbourhood inside the image (SCHP's
// 3x3 all-ones conv with zero padding 1, nonzero -> 1).
//
// Parallel over (image, output row) in chunks: each chunk walks its rows in
// order keeping the horizontally dilated raw rows y-1, y, y+1 in a ring of three
// W-byte buffers, so every raw row is computed once per chunk (plus two at the
// chunk's edges). The row loops are branch-free and vectorise; a row of a
// strided input (stride along W != 1) is first gathered into a W-value buffer.
// Memory: 4 x W bytes (+ 3 x W labels for strided input) per thread; the int64
// output is written once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

namespace lipfast {
namespace ops {
namespace {

constexpr int64_t kIgnore = 255;

struct View {
  int64_t H, W, sb, sh, sw;
};

// Pointer to row r of image b as a contiguous row: the labels themselves when
// the row is contiguous (stride 1), else a copy into tmp (W values).
template <typename L>
const L* row_ptr(const L* lab, const View& v, int64_t b, int64_t r, L* tmp) {
  const L* src = lab + b * v.sb + r * v.sh;
  if (v.sw == 1) return src;
  for (int64_t x = 0; x < v.W; ++x) tmp[x] = src[x * v.sw];
  return tmp;
}

// raw[x] |= (a[x] != n[x]) & (a[x] != 255) & (n[x] != 255) for x in [0, len):
// branch-free, so the compiler vectorises it.
template <typename L>
inline void mark_pairs(const L* a, const L* n, int64_t len, uint8_t* raw) {
  const L ign = static_cast<L>(kIgnore);
  for (int64_t x = 0; x < len; ++x) {
    raw[x] |= static_cast<uint8_t>((a[x] != n[x]) & (a[x] != ign) & (n[x] != ign));
  }
}

// Raw edges of row r of image b, dilated along the row, into hrow[0..W).
// tmp: room for 3 x W labels (row copies for strided input).
template <typename L>
void dilated_raw_row(const L* lab, const View& v, int64_t b, int64_t r, uint8_t* raw,
                     uint8_t* hrow, L* tmp) {
  const int64_t W = v.W;
  const L* cur = row_ptr<L>(lab, v, b, r, tmp);
  std::fill(raw, raw + W, uint8_t(0));
  if (r >= 1) mark_pairs<L>(cur, row_ptr<L>(lab, v, b, r - 1, tmp + W), W, raw);  // above
  if (W > 1) {
    mark_pairs<L>(cur, cur + 1, W - 1, raw);  // right
    if (r + 1 < v.H) {
      const L* dn = row_ptr<L>(lab, v, b, r + 1, tmp + 2 * W);
      mark_pairs<L>(cur, dn + 1, W - 1, raw);      // below-right
      mark_pairs<L>(cur + 1, dn, W - 1, raw + 1);  // below-left (x >= 1)
    }
  }
  hrow[0] = raw[0] | (W > 1 ? raw[1] : uint8_t(0));
  for (int64_t x = 1; x + 1 < W; ++x) hrow[x] = raw[x - 1] | raw[x] | raw[x + 1];
  if (W > 1) hrow[W - 1] = raw[W - 2] | raw[W - 1];
}

template <typename L>
void edge_impl(const L* lab, const View& v, int64_t B, int64_t* out) {
  const int64_t H = v.H, W = v.W;
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(W, 1));
  at::parallel_for(0, B * H, grain, [&](int64_t t0, int64_t t1) {
    std::vector<uint8_t> buf(4 * W);
    std::vector<L> tmp(v.sw == 1 ? 0 : 3 * W);
    uint8_t* raw = buf.data();
    uint8_t* ring[3] = {buf.data() + W, buf.data() + 2 * W, buf.data() + 3 * W};
    // ring[r % 3] holds row r of image have_b for r in [have_r - 2, have_r]
    int64_t have_b = -1, have_r = -2;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / H, y = t % H;
      // make rows y-1, y, y+1 (those inside the image) available in the ring
      int64_t from = y - 1;
      if (have_b == b && have_r >= y - 1 && have_r <= y + 1) from = have_r + 1;
      for (int64_t r = std::max<int64_t>(from, 0); r <= std::min(y + 1, H - 1); ++r) {
        dilated_raw_row<L>(lab, v, b, r, raw, ring[r % 3], tmp.data());
      }
      have_b = b;
      have_r = std::min(y + 1, H - 1);
      const uint8_t* a = y >= 1 ? ring[(y - 1) % 3] : nullptr;
      const uint8_t* m = ring[y % 3];
      const uint8_t* c = y + 1 < H ? ring[(y + 1) % 3] : nullptr;
      int64_t* o = out + (b * H + y) * W;
      for (int64_t x = 0; x < W; ++x) {
        uint8_t e = m[x];
        if (a) e |= a[x];
        if (c) e |= c[x];
        o[x] = static_cast<int64_t>(e);
      }
    }
  });
}

at::Tensor generate_edge_cpu(const at::Tensor& labels, int64_t edge_width) {
  TORCH_CHECK_VALUE(labels.dim() == 3, "generate_edge expects B x H x W labels, got shape ",
                    labels.sizes());
  const auto st = labels.scalar_type();
  TORCH_CHECK_TYPE(st == at::kByte || st == at::kShort || st == at::kInt || st == at::kLong,
                   "generate_edge expects integer labels (uint8/int16/int32/int64), got ", st);
  TORCH_CHECK_VALUE(edge_width == 3,
                    "generate_edge: only edge_width=3 (SCHP's 3x3 dilation) is supported, got ",
                    edge_width);
  TORCH_CHECK_VALUE(labels.device().is_cpu(), "generate_edge: the CPU kernel got a ",
                    labels.device(), " tensor");
  const int64_t B = labels.size(0), H = labels.size(1), W = labels.size(2);
  at::Tensor out = at::empty({B, H, W}, labels.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  const View v{H, W, labels.stride(0), labels.stride(1), labels.stride(2)};
  int64_t* po = out.mutable_data_ptr<int64_t>();
  AT_DISPATCH_INTEGRAL_TYPES(st, "generate_edge_cpu", [&] {
    edge_impl<scalar_t>(labels.const_data_ptr<scalar_t>(), v, B, po);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lipfast, CPU, m) { m.impl("generate_edge", &generate_edge_cpu); }

}  // namespace ops
}  // namespace lipfast
