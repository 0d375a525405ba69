// Sequence packing for multimodal pretraining: First-Fit-Decreasing (FFD) and Best-Fit-Decreasing (BFD)
// bin packing of samples (token lengths, optionally images per sample) into fixed-size contexts, as in
// Open-Qwen2VL (FFD into 4096-token contexts) with InternVL2.5's cap on images per pack.
//
// Both algorithms visit items in the same order: length descending, ties by original index ascending, so the
// same input always gives the same bins. The plain-Python specification is
// mllm_mega/data/packing.py:pack_ffd_reference / pack_bfd_reference; the tests require identical bins.
//
// Cost (n packable items, B bins):
//   sort: O(n + capacity) counting sort when capacity is small, else O(n log n) comparison sort.
//   FFD, no image cap: O(n log n). A max segment tree over bin residual capacities; the leftmost leaf with
//     residual >= length is found by one root-to-leaf descent. Leaves beyond the last open bin hold empty
//     "virtual" bins (residual = capacity), so the descent opens a new bin exactly when no open bin fits.
//     A bin full on max_items gets residual -1 and is never chosen again, which keeps the descent exact.
//   FFD, image cap: each node also stores the minimum images used in its subtree; the descent prunes a
//     subtree unless max residual >= length AND min images <= max_images - images(item). Both bounds hold
//     for some bins of a subtree but maybe not for the same bin, so the descent may backtrack. Typical data
//     costs O(log B) per item; the worst case (bins alternating "roomy but image-full" and "image-free but
//     token-full") is O(B) per item, O(n B) overall. The result is always exact first fit.
//   BFD, no image cap: an ordered set of (residual, bin), O(n log n).
//   BFD, image cap: one ordered set of (residual, bin) per distinct images-used level; each item queries the
//     levels <= max_images - images(item): O(n L log B) with L <= min(max_images + 1, B) levels.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

// Counting sort is used when the capacity (number of distinct keys) is at most this plus 4 * n.
constexpr int64_t kCountingSortSlack = 1 << 16;
constexpr int64_t kNoLimit = std::numeric_limits<int64_t>::max();

// A validated 1-D int32/int64 numpy array, readable without the GIL.
struct IntColumn {
    const char* data = nullptr;
    int64_t stride = 0;
    int64_t size = 0;
    bool is64 = true;

    int64_t operator[](int64_t i) const {
        const char* p = data + i * stride;
        if (is64) {
            int64_t v;
            std::memcpy(&v, p, sizeof v);
            return v;
        }
        int32_t v;
        std::memcpy(&v, p, sizeof v);
        return v;
    }
};

IntColumn to_column(const py::array& arr, const char* name) {
    if (arr.ndim() != 1) {
        throw std::invalid_argument(std::string(name) + " must be a 1-D array, got ndim=" +
                                    std::to_string(arr.ndim()));
    }
    IntColumn c;
    if (py::isinstance<py::array_t<int64_t>>(arr)) {
        c.is64 = true;
    } else if (py::isinstance<py::array_t<int32_t>>(arr)) {
        c.is64 = false;
    } else {
        throw std::invalid_argument(std::string(name) + " must have dtype int32 or int64 (native byte order), got " +
                                    py::str(arr.dtype()).cast<std::string>());
    }
    c.data = static_cast<const char*>(arr.data());
    c.stride = arr.ndim() ? arr.strides(0) : 0;
    c.size = arr.shape(0);
    return c;
}

struct Caps {
    int64_t capacity = 0;
    bool has_image_cap = false;
    int64_t max_images = kNoLimit;
    int64_t max_items = kNoLimit;
};

struct Packing {
    std::vector<int64_t> offsets;     // (num_bins + 1,)
    std::vector<int64_t> indices;     // (num_packed,)
    std::vector<int64_t> unpackable;  // ascending original indices
};

// Validated item data plus the visiting order of the packable items.
struct Prepared {
    std::vector<int64_t> lengths;  // (n,)
    std::vector<int64_t> images;   // (n,) when an image cap is set, else empty
    std::vector<int64_t> order;    // packable item indices, length descending, index ascending
    std::vector<int64_t> unpackable;
};

Prepared prepare(const IntColumn& lengths, const std::optional<IntColumn>& images, const Caps& caps,
                 bool allow_unpackable) {
    Prepared p;
    const int64_t n = lengths.size;
    p.lengths.resize(n);
    for (int64_t i = 0; i < n; ++i) {
        const int64_t v = lengths[i];
        if (v < 0) {
            throw std::invalid_argument("lengths[" + std::to_string(i) + "] = " + std::to_string(v) +
                                        " is negative");
        }
        p.lengths[i] = v;
    }
    if (images) {
        for (int64_t i = 0; i < n; ++i) {
            const int64_t v = (*images)[i];
            if (v < 0) {
                throw std::invalid_argument("images[" + std::to_string(i) + "] = " + std::to_string(v) +
                                            " is negative");
            }
            if (caps.has_image_cap) p.images.push_back(v);
        }
    }
    std::vector<int64_t> packable;
    packable.reserve(n);
    for (int64_t i = 0; i < n; ++i) {
        const bool too_long = p.lengths[i] > caps.capacity;
        const bool too_many_images = caps.has_image_cap && p.images[i] > caps.max_images;
        if (!too_long && !too_many_images) {
            packable.push_back(i);
            continue;
        }
        if (!allow_unpackable) {
            if (too_long) {
                throw std::invalid_argument("lengths[" + std::to_string(i) + "] = " + std::to_string(p.lengths[i]) +
                                            " exceeds capacity = " + std::to_string(caps.capacity) +
                                            " (pass allow_unpackable=True to get such items back instead)");
            }
            throw std::invalid_argument("images[" + std::to_string(i) + "] = " + std::to_string(p.images[i]) +
                                        " exceeds max_images = " + std::to_string(caps.max_images) +
                                        " (pass allow_unpackable=True to get such items back instead)");
        }
        p.unpackable.push_back(i);
    }

    const int64_t m = static_cast<int64_t>(packable.size());
    if (caps.capacity <= 4 * m + kCountingSortSlack) {
        // Stable counting sort on key = capacity - length: ascending key is descending length, and the
        // stable scatter of an index-ascending input keeps ties in index order.
        std::vector<int64_t> start(caps.capacity + 2, 0);
        for (int64_t i : packable) ++start[caps.capacity - p.lengths[i] + 1];
        for (int64_t k = 1; k < static_cast<int64_t>(start.size()); ++k) start[k] += start[k - 1];
        p.order.resize(m);
        for (int64_t i : packable) p.order[start[caps.capacity - p.lengths[i]]++] = i;
    } else {
        p.order = std::move(packable);
        const std::vector<int64_t>& len = p.lengths;
        std::sort(p.order.begin(), p.order.end(), [&len](int64_t a, int64_t b) {
            return len[a] != len[b] ? len[a] > len[b] : a < b;
        });
    }
    return p;
}

// Builds CSR bins from the bin of each placed item (placement order).
void to_csr(const std::vector<int64_t>& order, const std::vector<int64_t>& bin_of, int64_t num_bins, Packing& out) {
    out.offsets.assign(num_bins + 1, 0);
    for (int64_t b : bin_of) ++out.offsets[b + 1];
    for (int64_t b = 0; b < num_bins; ++b) out.offsets[b + 1] += out.offsets[b];
    std::vector<int64_t> cursor(out.offsets.begin(), out.offsets.end() - 1);
    out.indices.resize(order.size());
    for (size_t k = 0; k < order.size(); ++k) out.indices[cursor[bin_of[k]]++] = order[k];
}

class FirstFitTree {
  public:
    FirstFitTree(int64_t num_leaves, const Caps& caps) : caps_(caps) {
        size_ = 1;
        while (size_ < num_leaves) size_ <<= 1;
        residual_.assign(2 * size_, caps.capacity);
        if (caps.has_image_cap) min_images_.assign(2 * size_, 0);
        items_.assign(size_, 0);
        images_.assign(size_, 0);
    }

    // Leftmost bin (open or the next virtual empty one) that takes the item.
    int64_t find(int64_t length, int64_t num_images) const {
        if (!caps_.has_image_cap) {
            int64_t node = 1;
            while (node < size_) node = residual_[2 * node] >= length ? 2 * node : 2 * node + 1;
            return node - size_;
        }
        return find_capped(1, length, caps_.max_images - num_images) - size_;
    }

    void place(int64_t bin, int64_t length, int64_t num_images) {
        int64_t node = bin + size_;
        ++items_[bin];
        images_[bin] += num_images;
        const bool dead = items_[bin] >= caps_.max_items;
        residual_[node] = dead ? -1 : residual_[node] - length;
        if (caps_.has_image_cap) min_images_[node] = dead ? kNoLimit : images_[bin];
        for (node >>= 1; node >= 1; node >>= 1) {
            const int64_t r = std::max(residual_[2 * node], residual_[2 * node + 1]);
            int64_t mi = 0;
            if (caps_.has_image_cap) mi = std::min(min_images_[2 * node], min_images_[2 * node + 1]);
            if (r == residual_[node] && (!caps_.has_image_cap || mi == min_images_[node])) break;
            residual_[node] = r;
            if (caps_.has_image_cap) min_images_[node] = mi;
        }
    }

  private:
    // Returns the leaf node id, or -1 when no bin under `node` takes the item.
    int64_t find_capped(int64_t node, int64_t length, int64_t image_limit) const {
        if (residual_[node] < length || min_images_[node] > image_limit) return -1;
        if (node >= size_) return node;
        const int64_t left = find_capped(2 * node, length, image_limit);
        return left >= 0 ? left : find_capped(2 * node + 1, length, image_limit);
    }

    Caps caps_;
    int64_t size_;
    std::vector<int64_t> residual_;    // max residual in the subtree; -1 for bins closed by max_items
    std::vector<int64_t> min_images_;  // min images used in the subtree (image cap only)
    std::vector<int64_t> items_;       // per bin
    std::vector<int64_t> images_;      // per bin
};

Packing run_ffd(const IntColumn& lengths, const std::optional<IntColumn>& images, const Caps& caps,
                bool allow_unpackable) {
    Prepared p = prepare(lengths, images, caps, allow_unpackable);
    const int64_t m = static_cast<int64_t>(p.order.size());
    FirstFitTree tree(std::max<int64_t>(m, 1), caps);
    std::vector<int64_t> bin_of(m);
    int64_t num_bins = 0;
    for (int64_t k = 0; k < m; ++k) {
        const int64_t i = p.order[k];
        const int64_t img = caps.has_image_cap ? p.images[i] : 0;
        // At most k bins are open, so a virtual empty leaf always exists: find never fails.
        const int64_t b = tree.find(p.lengths[i], img);
        if (b == num_bins) ++num_bins;
        tree.place(b, p.lengths[i], img);
        bin_of[k] = b;
    }
    Packing out;
    to_csr(p.order, bin_of, num_bins, out);
    out.unpackable = std::move(p.unpackable);
    return out;
}

using BinSet = std::set<std::pair<int64_t, int64_t>>;  // (residual, bin)

Packing run_bfd(const IntColumn& lengths, const std::optional<IntColumn>& images, const Caps& caps,
                bool allow_unpackable) {
    Prepared p = prepare(lengths, images, caps, allow_unpackable);
    const int64_t m = static_cast<int64_t>(p.order.size());
    std::vector<int64_t> bin_of(m);
    std::vector<int64_t> items;
    std::vector<int64_t> used_images;
    // Open bins that can still take an item, grouped by images used (a single group without an image cap).
    std::map<int64_t, BinSet> levels;
    int64_t num_bins = 0;
    for (int64_t k = 0; k < m; ++k) {
        const int64_t i = p.order[k];
        const int64_t len = p.lengths[i];
        const int64_t img = caps.has_image_cap ? p.images[i] : 0;
        const int64_t image_limit = caps.max_images - img;
        // Smallest (residual, bin) with residual >= len over the levels that have room for the images.
        BinSet* best_set = nullptr;
        BinSet::iterator best;
        for (auto lv = levels.begin(); lv != levels.end() && lv->first <= image_limit; ++lv) {
            auto it = lv->second.lower_bound({len, std::numeric_limits<int64_t>::min()});
            if (it != lv->second.end() && (best_set == nullptr || *it < *best)) {
                best_set = &lv->second;
                best = it;
            }
        }
        int64_t b;
        BinSet::node_type node;
        if (best_set == nullptr) {
            b = num_bins++;
            items.push_back(0);
            used_images.push_back(0);
            BinSet tmp{{caps.capacity, b}};
            node = tmp.extract(tmp.begin());
        } else {
            b = best->second;
            const int64_t old_level = used_images[b];
            node = best_set->extract(best);
            if (best_set->empty()) levels.erase(old_level);
        }
        ++items[b];
        used_images[b] += img;
        bin_of[k] = b;
        if (items[b] < caps.max_items) {
            node.value().first -= len;
            levels[caps.has_image_cap ? used_images[b] : 0].insert(std::move(node));
        }
    }
    Packing out;
    to_csr(p.order, bin_of, num_bins, out);
    out.unpackable = std::move(p.unpackable);
    return out;
}

// Hands a vector to numpy without a copy; the capsule frees it with the array.
py::array_t<int64_t> to_numpy(std::vector<int64_t>&& v) {
    auto* owned = new std::vector<int64_t>(std::move(v));
    py::capsule free_when_done(owned, [](void* ptr) { delete static_cast<std::vector<int64_t>*>(ptr); });
    return py::array_t<int64_t>(static_cast<py::ssize_t>(owned->size()), owned->data(), free_when_done);
}

using Algorithm = Packing (*)(const IntColumn&, const std::optional<IntColumn>&, const Caps&, bool);

py::tuple pack(Algorithm algorithm, const py::array& lengths, int64_t capacity, const std::optional<py::array>& images,
               std::optional<int64_t> max_images, std::optional<int64_t> max_items, bool allow_unpackable) {
    if (capacity <= 0) throw std::invalid_argument("capacity must be > 0, got " + std::to_string(capacity));
    const IntColumn len_col = to_column(lengths, "lengths");
    std::optional<IntColumn> img_col;
    if (images) {
        img_col = to_column(*images, "images");
        if (img_col->size != len_col.size) {
            throw std::invalid_argument("images has " + std::to_string(img_col->size) + " entries but lengths has " +
                                        std::to_string(len_col.size));
        }
    }
    Caps caps;
    caps.capacity = capacity;
    if (max_images) {
        if (!images) throw std::invalid_argument("max_images is set but images is None");
        if (*max_images < 0) {
            throw std::invalid_argument("max_images must be >= 0, got " + std::to_string(*max_images));
        }
        caps.has_image_cap = true;
        caps.max_images = *max_images;
    }
    if (max_items) {
        if (*max_items < 1) throw std::invalid_argument("max_items must be >= 1, got " + std::to_string(*max_items));
        caps.max_items = *max_items;
    }
    Packing result;
    {
        // The numpy buffers stay alive (the caller holds them) and no Python object is touched here.
        py::gil_scoped_release release;
        result = algorithm(len_col, img_col, caps, allow_unpackable);
    }
    return py::make_tuple(to_numpy(std::move(result.offsets)), to_numpy(std::move(result.indices)),
                          to_numpy(std::move(result.unpackable)));
}

}  // namespace

PYBIND11_MODULE(_packer, m) {
    m.doc() = "First-Fit-Decreasing / Best-Fit-Decreasing sequence packing (see mllm_mega.data.packing).";
#define MLLM_PACK_RETURNS                                                                                  \
    "Returns (offsets, indices, unpackable), int64 arrays: bin b holds indices[offsets[b]:offsets[b+1]]\n" \
    "(bins in creation order, items in placement order); unpackable lists, ascending, the items longer\n"  \
    "than capacity or with more than max_images images (always empty unless allow_unpackable)."
    m.def(
        "ffd",
        [](const py::array& lengths, int64_t capacity, const std::optional<py::array>& images,
           std::optional<int64_t> max_images, std::optional<int64_t> max_items, bool allow_unpackable) {
            return pack(run_ffd, lengths, capacity, images, max_images, max_items, allow_unpackable);
        },
        "First-Fit-Decreasing: each item (length descending, ties by index) goes to the first bin, in\n"
        "creation order, that satisfies every cap.\n" MLLM_PACK_RETURNS,
        py::arg("lengths").noconvert(), py::arg("capacity"), py::arg("images").noconvert() = py::none(),
        py::arg("max_images") = py::none(), py::arg("max_items") = py::none(), py::arg("allow_unpackable") = false);
    m.def(
        "bfd",
        [](const py::array& lengths, int64_t capacity, const std::optional<py::array>& images,
           std::optional<int64_t> max_images, std::optional<int64_t> max_items, bool allow_unpackable) {
            return pack(run_bfd, lengths, capacity, images, max_images, max_items, allow_unpackable);
        },
        "Best-Fit-Decreasing: each item (length descending, ties by index) goes to the bin with the smallest\n"
        "residual capacity that satisfies every cap, ties by earliest bin.\n" MLLM_PACK_RETURNS,
        py::arg("lengths").noconvert(), py::arg("capacity"), py::arg("images").noconvert() = py::none(),
        py::arg("max_images") = py::none(), py::arg("max_items") = py::none(), py::arg("allow_unpackable") = false);
#undef MLLM_PACK_RETURNS
}
