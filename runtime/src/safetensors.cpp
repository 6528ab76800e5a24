#include "energy_train/safetensors.h"

#include <ATen/ops/empty.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <utility>
#include <vector>

namespace energy_train {
namespace {

using nlohmann::json;

constexpr uint64_t kMaxHeader = 100ull << 20;  // the format's own limit (100 MB)

struct DType {
  const char* name;
  c10::ScalarType type;
};
constexpr DType kDTypes[] = {
    {"F64", c10::kDouble}, {"F32", c10::kFloat}, {"F16", c10::kHalf}, {"BF16", c10::kBFloat16},
    {"I64", c10::kLong},   {"I32", c10::kInt},   {"I16", c10::kShort}, {"I8", c10::kChar},
    {"U8", c10::kByte},    {"BOOL", c10::kBool},
};

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw SafetensorsError("safetensors " + path + ": " + what);
}

c10::ScalarType parse_dtype(const std::string& path, const std::string& tensor,
                            const std::string& name) {
  for (const auto& d : kDTypes)
    if (name == d.name) return d.type;
  std::string known;
  for (const auto& d : kDTypes) known += std::string(known.empty() ? "" : ", ") + d.name;
  fail(path, "tensor '" + tensor + "': unsupported dtype '" + name + "' (supported: " + known + ")");
}

const char* dtype_name(c10::ScalarType t) {
  for (const auto& d : kDTypes)
    if (t == d.type) return d.name;
  throw SafetensorsError(std::string("safetensors: cannot write dtype ") + c10::toString(t));
}

}  // namespace

std::map<std::string, at::Tensor> load_safetensors(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail(path, "cannot open the file");
  f.seekg(0, std::ios::end);
  const uint64_t size = static_cast<uint64_t>(f.tellg());
  f.seekg(0);
  if (size < 8) fail(path, "truncated: " + std::to_string(size) + " bytes, no header length");
  unsigned char len_bytes[8];
  f.read(reinterpret_cast<char*>(len_bytes), 8);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | len_bytes[i];  // little-endian
  if (n > kMaxHeader || n > size - 8)
    fail(path, "header length " + std::to_string(n) + " exceeds the file (" +
                   std::to_string(size) + " bytes) or the 100 MB limit");
  std::string header(n, '\0');
  f.read(header.data(), static_cast<std::streamsize>(n));
  json h;
  try {
    h = json::parse(header);
  } catch (const json::exception& e) {
    fail(path, std::string("malformed JSON header: ") + e.what());
  }
  if (!h.is_object()) fail(path, "the header is not a JSON object");
  const uint64_t data_size = size - 8 - n;

  struct Entry {
    std::string name;
    c10::ScalarType type;
    std::vector<int64_t> shape;
    uint64_t begin, end;
  };
  std::vector<Entry> entries;
  for (const auto& [name, v] : h.items()) {
    if (name == "__metadata__") continue;
    const auto bad = [&](const std::string& what) { fail(path, "tensor '" + name + "': " + what); };
    if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") ||
        !v.contains("data_offsets"))
      bad("expected an object with dtype, shape and data_offsets");
    if (!v["dtype"].is_string()) bad("dtype is not a string");
    Entry e{name, parse_dtype(path, name, v["dtype"].get<std::string>()), {}, 0, 0};
    if (!v["shape"].is_array()) bad("shape is not an array");
    uint64_t numel = 1;
    for (const auto& d : v["shape"]) {
      if (!d.is_number_unsigned()) bad("shape holds a negative or non-integer size");
      const uint64_t s = d.get<uint64_t>();
      if (s != 0 && numel > std::numeric_limits<uint64_t>::max() / 8 / s) bad("shape overflows");
      numel *= s;
      e.shape.push_back(static_cast<int64_t>(s));
    }
    const auto& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() ||
        !off[1].is_number_unsigned())
      bad("data_offsets is not a pair of non-negative integers");
    e.begin = off[0].get<uint64_t>();
    e.end = off[1].get<uint64_t>();
    const uint64_t nbytes = numel * c10::elementSize(e.type);
    if (e.end < e.begin || e.end - e.begin != nbytes)
      bad("data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) +
          ") do not hold " + std::to_string(nbytes) + " bytes (shape x dtype)");
    if (e.end > data_size)
      bad("data_offsets end " + std::to_string(e.end) + " is past the data (" +
          std::to_string(data_size) + " bytes)");
    entries.push_back(std::move(e));
  }
  std::vector<const Entry*> by_offset;
  for (const auto& e : entries) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(),
            [](const Entry* a, const Entry* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < by_offset.size(); ++i)
    if (by_offset[i]->begin < by_offset[i - 1]->end)
      fail(path, "tensors '" + by_offset[i - 1]->name + "' and '" + by_offset[i]->name +
                     "' overlap");

  std::map<std::string, at::Tensor> out;
  for (const auto& e : entries) {
    at::Tensor t = at::empty(e.shape, at::TensorOptions().dtype(e.type));
    f.seekg(static_cast<std::streamoff>(8 + n + e.begin));
    f.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(e.end - e.begin));
    if (!f) fail(path, "tensor '" + e.name + "': read failed");
    out.emplace(e.name, std::move(t));
  }
  return out;
}

void save_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  json h = json::object();
  if (!metadata.empty()) h["__metadata__"] = metadata;
  std::vector<at::Tensor> data;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    if (!t.defined()) throw SafetensorsError("safetensors " + path + ": tensor '" + name +
                                             "' is undefined");
    at::Tensor c = t.to(at::kCPU).contiguous();
    const uint64_t nbytes = static_cast<uint64_t>(c.numel()) * c.element_size();
    h[name] = {{"dtype", dtype_name(c.scalar_type())},
               {"shape", c.sizes().vec()},
               {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
    data.push_back(std::move(c));
  }
  std::string header = h.dump();
  header.append((8 - header.size() % 8) % 8, ' ');  // align the data to 8 bytes
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) throw SafetensorsError("safetensors " + path + ": cannot open for writing");
    unsigned char len_bytes[8];
    uint64_t n = header.size();
    for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<unsigned char>(n >> (8 * i));
    f.write(reinterpret_cast<const char*>(len_bytes), 8);
    f.write(header.data(), static_cast<std::streamsize>(header.size()));
    for (const auto& c : data)
      f.write(static_cast<const char*>(c.data_ptr()),
              static_cast<std::streamsize>(c.numel() * c.element_size()));
    if (!f) throw SafetensorsError("safetensors " + path + ": write failed");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0)
    throw SafetensorsError("safetensors " + path + ": cannot replace the file");
}

}  // namespace energy_train
