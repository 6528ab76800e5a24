#include "energy_train/verifier.h"

#include <ATen/Context.h>
#include <ATen/Version.h>
#include <ATen/ops/zeros.h>
#include <c10/core/InferenceMode.h>
#include <nlohmann/json.hpp>
#include <openssl/evp.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/version.h>

#include <cctype>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>

namespace energy_train {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr const char* kFormat = "energy-train-verifier";
constexpr int kFormatVersion = 1;
constexpr const char* kSpecKey = "energy_train.spec";  // the package's own copy of its spec

c10::ScalarType scalar_type(const std::string& dtype) {
  if (dtype == "float32") return c10::kFloat;
  if (dtype == "float64") return c10::kDouble;
  if (dtype == "float16") return c10::kHalf;
  if (dtype == "bfloat16") return c10::kBFloat16;
  if (dtype == "bool") return c10::kBool;
  throw PackageError("unsupported dtype '" + dtype + "' in the manifest");
}

std::string dtype_name(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat: return "float32";
    case c10::kDouble: return "float64";
    case c10::kHalf: return "float16";
    case c10::kBFloat16: return "bfloat16";
    case c10::kBool: return "bool";
    default: return c10::toString(t);
  }
}

std::string shape_str(c10::IntArrayRef s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  return o.str() + "]";
}

std::string spec_shape_str(const TensorSpec& t) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < t.shape.size(); ++i) {
    o << (i ? ", " : "");
    if (const auto* n = std::get_if<int64_t>(&t.shape[i])) o << *n;
    else o << std::get<std::string>(t.shape[i]);
  }
  return o.str() + "]";
}

// -------------------------------------------------------------------------------------------
// manifest
// -------------------------------------------------------------------------------------------
struct ManifestReader {
  std::string path;
  [[noreturn]] void fail(const std::string& what) const {
    throw PackageError("manifest " + path + ": " + what);
  }
  const json& at(const json& j, const std::string& key, const std::string& where) const {
    if (!j.is_object() || !j.contains(key)) fail("missing key '" + key + "' in " + where);
    return j[key];
  }
  template <typename T>
  T get(const json& j, const std::string& key, const std::string& where) const {
    const json& v = at(j, key, where);
    try {
      return v.get<T>();
    } catch (const json::exception&) {
      fail("'" + key + "' in " + where + " has the wrong type: " + v.dump());
    }
  }
  TensorSpec tensor(const json& j, const std::string& where,
                    const std::map<std::string, std::pair<int64_t, int64_t>>& dims) const {
    TensorSpec t;
    t.name = get<std::string>(j, "name", where);
    t.dtype = get<std::string>(j, "dtype", where);
    try {
      scalar_type(t.dtype);
    } catch (const PackageError& e) {
      fail(std::string(e.what()) + " (" + where + ")");
    }
    const json& shape = at(j, "shape", where);
    if (!shape.is_array()) fail("'shape' of " + where + " is not an array");
    for (const auto& d : shape) {
      if (d.is_number_integer() && d.get<int64_t>() >= 0) {
        t.shape.emplace_back(d.get<int64_t>());
      } else if (d.is_string() && dims.count(d.get<std::string>())) {
        t.shape.emplace_back(d.get<std::string>());
      } else {
        fail("'shape' of " + where + " holds " + d.dump() +
             ", neither a size nor a dynamic dim listed in 'dims'");
      }
    }
    return t;
  }
};

// -------------------------------------------------------------------------------------------
// input checks: every dim against the manifest, dynamic dims against their range and against
// the same dim of the other inputs
// -------------------------------------------------------------------------------------------
struct Bound {
  int64_t value;
  std::string input;
  size_t dim;
};

void check_inputs(const std::string& fn, const FunctionSpec& spec, const Manifest& m,
                  const std::vector<at::Tensor>& inputs) {
  std::map<std::string, Bound> bound;
  for (size_t i = 0; i < spec.inputs.size(); ++i) {
    const TensorSpec& s = spec.inputs[i];
    const at::Tensor& t = inputs[i];
    const std::string who = fn + ": input '" + s.name + "'";
    if (!t.defined()) throw InputError(who + " is undefined");
    const c10::ScalarType want = scalar_type(s.dtype);
    if (t.scalar_type() != want)
      throw InputError(who + ": expected dtype " + s.dtype + ", got " +
                       dtype_name(t.scalar_type()));
    if (t.device().type() != (m.device == "cuda" ? c10::DeviceType::CUDA : c10::DeviceType::CPU))
      throw InputError(who + ": expected a " + m.device + " tensor, got one on " +
                       t.device().str() + " (the package was exported for " + m.device + ")");
    if (t.dim() != static_cast<int64_t>(s.shape.size()))
      throw InputError(who + ": expected " + std::to_string(s.shape.size()) + " dims " +
                       spec_shape_str(s) + ", got shape " + shape_str(t.sizes()));
    for (size_t d = 0; d < s.shape.size(); ++d) {
      const int64_t got = t.size(static_cast<int64_t>(d));
      if (const auto* n = std::get_if<int64_t>(&s.shape[d])) {
        if (got != *n)
          throw InputError(who + ": expected size " + std::to_string(*n) + " at dim " +
                           std::to_string(d) + " (shape " + spec_shape_str(s) + "), got shape " +
                           shape_str(t.sizes()));
        continue;
      }
      const std::string& name = std::get<std::string>(s.shape[d]);
      const auto [lo, hi] = m.dims.at(name);
      if (got < lo || got > hi)
        throw InputError(who + ": dim " + std::to_string(d) + " (" + name + ") = " +
                         std::to_string(got) + " is outside the exported range [" +
                         std::to_string(lo) + ", " + std::to_string(hi) + "], got shape " +
                         shape_str(t.sizes()));
      auto it = bound.find(name);
      if (it == bound.end()) {
        bound.emplace(name, Bound{got, s.name, d});
      } else if (it->second.value != got) {
        throw InputError(who + ": dim " + std::to_string(d) + " (" + name + ") = " +
                         std::to_string(got) + " but input '" + it->second.input + "' has " +
                         name + " = " + std::to_string(it->second.value) + " at dim " +
                         std::to_string(it->second.dim));
      }
    }
  }
}

// The size of the dynamic dim `name` in the (checked) inputs.
int64_t dim_of(const FunctionSpec& spec, const std::vector<at::Tensor>& inputs,
               const std::string& name) {
  for (size_t i = 0; i < spec.inputs.size(); ++i)
    for (size_t k = 0; k < spec.inputs[i].shape.size(); ++k)
      if (const auto* s = std::get_if<std::string>(&spec.inputs[i].shape[k]); s && *s == name)
        return inputs[i].size(static_cast<int64_t>(k));
  throw PackageError("the output's dim '" + name + "' is no input's dim");
}

json tensor_json(const TensorSpec& t) {
  json shape = json::array();
  for (const auto& d : t.shape) {
    if (const auto* n = std::get_if<int64_t>(&d)) shape.push_back(*n);
    else shape.push_back(std::get<std::string>(d));
  }
  return json{{"name", t.name}, {"dtype", t.dtype}, {"shape", shape}};
}

// What energy_train.deploy embeds in a package about itself (deploy._embedded_spec).
json embedded_spec(const FunctionSpec& spec, const Manifest& m) {
  json dims = json::object();
  for (const auto& t : spec.inputs)
    for (const auto& d : t.shape)
      if (const auto* n = std::get_if<std::string>(&d))
        dims[*n] = {m.dims.at(*n).first, m.dims.at(*n).second};
  json out = {{"device", m.device}, {"dims", dims}, {"output", tensor_json(spec.output)},
              {"inputs", json::array()}};
  for (const auto& t : spec.inputs) out["inputs"].push_back(tensor_json(t));
  return out;
}

// A CPU package's kernels are compiled for the exporting machine's vector ISA (AOTInductor's
// AOTI_CPU_ISA, e.g. "AVX512 AVX512_VNNI"); on a CPU without it they would die on an illegal
// instruction. Refuse instead when this CPU's ATen capability (DEFAULT < AVX2 < AVX512) is lower.
void check_cpu_isa(const std::string& dir, const std::string& file,
                   const std::unordered_map<std::string, std::string>& meta) {
  auto it = meta.find("AOTI_CPU_ISA");
  if (it == meta.end()) return;
  std::string isa = it->second.substr(0, it->second.find(' '));
  for (auto& c : isa) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  const std::string cpu = at::get_cpu_capability();  // "AVX512", "AVX2", "DEFAULT", ...
  const auto rank = [](const std::string& x) {
    return x == "AVX512" ? 2 : x == "AVX2" ? 1 : 0;
  };
  if (rank(isa) > rank(cpu))
    throw PackageError("verifier " + dir + ": " + file + " was compiled for " + it->second +
                       " and this CPU runs ATen at " + cpu +
                       " (or ATEN_CPU_CAPABILITY lowers it): re-export on a machine like this one");
}

int parse_major_minor(const std::string& v, int* minor) {
  int major = -1;
  *minor = -1;
  if (std::sscanf(v.c_str(), "%d.%d", &major, minor) != 2) return -1;
  return major;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
Manifest read_manifest(const std::string& dir) {
  ManifestReader r{(fs::path(dir) / "manifest.json").string()};
  std::ifstream f(r.path);
  if (!f) {
    if (!fs::is_directory(dir))
      throw PackageError("verifier directory " + dir + " does not exist");
    r.fail("missing or unreadable (export one with energy_train.deploy.export_verifier)");
  }
  json j;
  try {
    j = json::parse(f);
  } catch (const json::exception& e) {
    r.fail(std::string("malformed JSON: ") + e.what());
  }
  if (!j.is_object()) r.fail("not a JSON object");
  const std::string format = r.get<std::string>(j, "format", "the manifest");
  const int version = r.get<int>(j, "format_version", "the manifest");
  if (format != kFormat || version != kFormatVersion)
    r.fail("expected format '" + std::string(kFormat) + "' version " +
           std::to_string(kFormatVersion) + ", got '" + format + "' version " +
           std::to_string(version));
  Manifest m;
  m.torch_version = r.get<std::string>(j, "torch", "the manifest");
  m.device = r.get<std::string>(j, "device", "the manifest");
  if (m.device != "cpu" && m.device != "cuda")
    r.fail("'device' must be cpu or cuda, got '" + m.device + "'");
  m.dtype = r.get<std::string>(j, "dtype", "the manifest");
  const json& model = r.at(j, "model", "the manifest");
  m.state_dim = r.get<int64_t>(model, "state_dim", "'model'");
  m.act_dim = r.get<int64_t>(model, "act_dim", "'model'");
  m.hidden = r.get<int64_t>(model, "hidden", "'model'");
  m.heads = r.get<int64_t>(model, "heads", "'model'");
  const auto chunk = r.get<std::vector<int64_t>>(j, "chunk", "the manifest");
  if (chunk.size() != 2) r.fail("'chunk' must be [H, Da]");
  m.chunk_steps = chunk[0];
  const json& dims = r.at(j, "dims", "the manifest");
  if (!dims.is_object()) r.fail("'dims' is not an object");
  for (const auto& [name, range] : dims.items()) {
    const auto v = r.get<std::vector<int64_t>>(dims, name, "'dims'");
    if (v.size() != 2 || v[0] < 0 || v[0] > v[1])
      r.fail("dims '" + name + "' must be [min, max] with 0 <= min <= max, got " + range.dump());
    m.dims[name] = {v[0], v[1]};
  }
  const json& corr = r.at(j, "correction", "the manifest");
  m.steps = r.get<int64_t>(corr, "steps", "'correction'");
  m.alpha = r.get<double>(corr, "alpha", "'correction'");
  m.clip_frac = r.get<double>(corr, "clip_frac", "'correction'");
  const json& fns = r.at(j, "functions", "the manifest");
  if (!fns.is_object() || fns.empty()) r.fail("'functions' is empty or not an object");
  for (const auto& [name, fj] : fns.items()) {
    if (name != "score" && name != "correct") r.fail("unknown function '" + name + "'");
    const std::string where = "function '" + name + "'";
    FunctionSpec spec;
    spec.file = r.get<std::string>(fj, "file", where);
    if (spec.file.empty() || fs::path(spec.file).has_parent_path() || spec.file[0] == '.')
      r.fail(where + ": 'file' must be a plain file name, got '" + spec.file + "'");
    const json& ins = r.at(fj, "inputs", where);
    if (!ins.is_array() || ins.size() != 3) r.fail(where + ": expected 3 inputs");
    for (size_t i = 0; i < ins.size(); ++i)
      spec.inputs.push_back(r.tensor(ins[i], where + " input " + std::to_string(i), m.dims));
    spec.output = r.tensor(r.at(fj, "output", where), where + " output", m.dims);
    m.functions[name] = std::move(spec);
  }
  const json& files = r.at(j, "files", "the manifest");
  if (!files.is_object()) r.fail("'files' is not an object");
  for (const auto& [file, sha] : files.items()) m.files[file] = r.get<std::string>(files, file, "'files'");
  for (const auto& [name, spec] : m.functions)
    if (!m.files.count(spec.file))
      r.fail("function '" + name + "': its file '" + spec.file + "' has no sha256 in 'files'");
  return m;
}

std::string sha256_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw PackageError("cannot read " + path);
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1)
    throw PackageError("sha256: OpenSSL initialisation failed");
  std::vector<char> buf(1 << 20);
  while (f) {
    f.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    if (f.gcount() > 0) EVP_DigestUpdate(ctx.get(), buf.data(), static_cast<size_t>(f.gcount()));
  }
  if (!f.eof()) throw PackageError("read error in " + path);
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx.get(), md, &len);
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < len; ++i) {
    out += hex[md[i] >> 4];
    out += hex[md[i] & 15];
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
struct Verifier::Impl {
  std::string dir;
  Manifest manifest;
  std::map<std::string, std::unique_ptr<torch::inductor::AOTIModelPackageLoader>> packages;

  at::Tensor run(const std::string& fn, std::vector<at::Tensor> inputs) const {
    auto it = packages.find(fn);
    if (it == packages.end())
      throw InputError(fn + ": not exported in " + dir + " (manifest lists " +
                       [&] {
                         std::string s;
                         for (const auto& [k, v] : packages) s += (s.empty() ? "" : ", ") + k;
                         return s;
                       }() + ")");
    const FunctionSpec& spec = manifest.functions.at(fn);
    if (!inputs[1].defined() && inputs[0].defined() && inputs[0].dim() >= 2)
      inputs[1] = at::zeros({inputs[0].size(0), inputs[0].size(1)},
                            inputs[0].options().dtype(c10::kBool));  // no padding
    check_inputs(fn, spec, manifest, inputs);
    for (auto& t : inputs) t = t.contiguous();  // the package assumes contiguous inputs
    c10::InferenceMode guard;
    std::vector<at::Tensor> out = it->second->run(inputs);
    if (out.size() != 1) throw PackageError(fn + ": the package returned " +
                                            std::to_string(out.size()) + " outputs, expected 1");
    // the output's shape follows from the inputs: a package that disagrees is broken
    std::vector<int64_t> want;
    for (const auto& d : spec.output.shape)
      want.push_back(std::holds_alternative<int64_t>(d)
                         ? std::get<int64_t>(d)
                         : dim_of(spec, inputs, std::get<std::string>(d)));
    if (out[0].sizes() != c10::IntArrayRef(want))
      throw PackageError(fn + ": the package returned shape " + shape_str(out[0].sizes()) +
                         ", expected " + shape_str(want) + " (re-export it)");
    return out[0];
  }
};

Verifier::Verifier(const std::string& dir, VerifierOptions options) : impl_(new Impl) {
  impl_->dir = dir;
  impl_->manifest = read_manifest(dir);
  const Manifest& m = impl_->manifest;
  int minor = -1;
  const int major = parse_major_minor(m.torch_version, &minor);
  if (major != TORCH_VERSION_MAJOR || minor != TORCH_VERSION_MINOR)
    throw PackageError("verifier " + dir + ": exported with torch " + m.torch_version +
                       ", this runtime is built against torch " + TORCH_VERSION +
                       "; re-export with torch " + std::to_string(TORCH_VERSION_MAJOR) + "." +
                       std::to_string(TORCH_VERSION_MINOR));
  if (m.device == "cuda" && !at::globalContext().hasCUDA())
    throw PackageError("verifier " + dir + ": exported for cuda, and this libtorch has no CUDA");
  for (const auto& [name, spec] : m.functions) {
    const std::string path = (fs::path(dir) / spec.file).string();
    if (!fs::is_regular_file(path))
      throw PackageError("verifier " + dir + ": missing file " + spec.file +
                         " (listed in manifest.json for '" + name + "')");
    if (options.verify_files) {
      const std::string sha = sha256_file(path);
      if (sha != m.files.at(spec.file))
        throw PackageError("verifier " + dir + ": " + spec.file +
                           " does not match its sha256 in manifest.json (expected " +
                           m.files.at(spec.file) + ", got " + sha +
                           "): the file was modified or truncated");
    }
    // read the package's metadata before loading its shared library
    std::unordered_map<std::string, std::string> meta;
    try {
      meta = torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(path, "model");
    } catch (const std::exception& e) {
      throw PackageError("verifier " + dir + ": cannot read " + spec.file + ": " + e.what());
    }
    if (m.device == "cpu") check_cpu_isa(dir, spec.file, meta);
    // the package's own record of its signature must be the manifest's
    auto it = meta.find(kSpecKey);
    if (it == meta.end())
      throw PackageError("verifier " + dir + ": " + spec.file +
                         " was not written by energy_train.deploy (no '" + kSpecKey +
                         "' in its metadata)");
    json embedded;
    try {
      embedded = json::parse(it->second);
    } catch (const json::exception&) {
      throw PackageError("verifier " + dir + ": " + spec.file + ": malformed embedded spec");
    }
    const json mine = embedded_spec(spec, m);
    if (mine != embedded)
      throw PackageError("verifier " + dir + ": manifest.json does not describe " + spec.file +
                         ": the package was compiled for " + embedded.dump() +
                         ", the manifest says " + mine.dump());
    std::unique_ptr<torch::inductor::AOTIModelPackageLoader> pkg;
    try {
      pkg = std::make_unique<torch::inductor::AOTIModelPackageLoader>(
          path, "model", /*run_single_threaded=*/false, /*num_runners=*/1,
          static_cast<c10::DeviceIndex>(options.device_index));
    } catch (const std::exception& e) {
      throw PackageError("verifier " + dir + ": cannot load " + spec.file + ": " + e.what());
    }
    impl_->packages.emplace(name, std::move(pkg));
  }
}

Verifier::~Verifier() = default;
Verifier::Verifier(Verifier&&) noexcept = default;
Verifier& Verifier::operator=(Verifier&&) noexcept = default;

at::Tensor Verifier::score(const at::Tensor& context, const at::Tensor& pad_mask,
                           const at::Tensor& candidates) const {
  return impl_->run("score", {context, pad_mask, candidates});
}

at::Tensor Verifier::correct(const at::Tensor& context, const at::Tensor& pad_mask,
                             const at::Tensor& actions) const {
  return impl_->run("correct", {context, pad_mask, actions});
}

Reranked Verifier::rerank(const at::Tensor& context, const at::Tensor& pad_mask,
                          const at::Tensor& candidates, bool correct_best) const {
  if (correct_best && !has("correct"))
    throw InputError("rerank: correct_best needs 'correct', which is not exported in " +
                     impl_->dir);
  Reranked r;
  r.energies = score(context, pad_mask, candidates);
  // the rule the Python rerank shares: a candidate whose energy is not finite (NaN, inf) or
  // whose chunk holds a non-finite value is never picked; a sample without another is an error
  const at::Tensor ok =
      r.energies.isfinite().logical_and(candidates.isfinite().flatten(2).all(2));
  const at::Tensor none = ok.any(1).logical_not();
  if (none.any().item<bool>()) {
    const at::Tensor rows = none.nonzero().flatten().cpu();
    std::string list;
    for (int64_t i = 0; i < std::min<int64_t>(rows.size(0), 8); ++i)
      list += (i ? ", " : "") + std::to_string(rows[i].item<int64_t>());
    throw InputError("rerank: samples [" + list + "] have no candidate with a finite energy and "
                     "finite values (NaN/inf in the candidates, the context or the model); "
                     "nothing safe to pick");
  }
  const double inf = std::numeric_limits<double>::infinity();
  r.index = r.energies.masked_fill(ok.logical_not(), inf).argmin(1);
  const int64_t B = candidates.size(0);
  r.chunk = candidates.contiguous()
                .gather(1, r.index.view({B, 1, 1, 1}).expand({B, 1, candidates.size(2),
                                                               candidates.size(3)}))
                .squeeze(1);
  if (correct_best) r.chunk = correct(context, pad_mask, r.chunk);
  return r;
}

bool Verifier::has(const std::string& function) const {
  return impl_->packages.count(function) > 0;
}
const Manifest& Verifier::manifest() const { return impl_->manifest; }
const std::string& Verifier::directory() const { return impl_->dir; }

}  // namespace energy_train
