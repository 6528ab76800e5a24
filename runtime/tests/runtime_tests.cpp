// C++ tests of the runtime, one ctest test per ET_TEST case (CMakeLists.txt reads the names
// from this file). `runtime_tests NAME` runs one case: exit 0 pass, 1 fail, 77 skipped.
//
// Cases marked `model` need an exported verifier and reference data written by Python
// (tests/test_runtime.py does both): ET_TEST_MODEL_DIR = the export_verifier directory,
// ET_TEST_DATA = a safetensors file with the inputs and energy_scores / correct_actions
// outputs. Without them those cases are skipped (exit 77), never passed.
#include "energy_train/safetensors.h"
#include "energy_train/verifier.h"

#include <ATen/ops/equal.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/zeros.h>
#include <nlohmann/json.hpp>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <unistd.h>
#include <vector>

namespace fs = std::filesystem;
using energy_train::InputError;
using energy_train::PackageError;
using energy_train::SafetensorsError;
using energy_train::Verifier;

// --------------------------------------------------------------------------------------------
// a minimal harness
// --------------------------------------------------------------------------------------------
struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct Skip : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct Case {
  std::string name;
  std::function<void()> fn;
};
std::vector<Case>& cases() {
  static std::vector<Case> c;
  return c;
}
struct Register {
  Register(const char* name, std::function<void()> fn) { cases().push_back({name, std::move(fn)}); }
};
#define ET_TEST(name)                          \
  static void name();                          \
  static Register register_##name(#name, name); \
  static void name()

#define ET_CHECK(cond)                                                                        \
  do {                                                                                     \
    if (!(cond))                                                                           \
      throw Failure(std::string(__FILE__) + ":" + std::to_string(__LINE__) + ": ET_CHECK(" + \
                    #cond + ") failed");                                                   \
  } while (0)

// `expr` must throw `Type` whose message holds every one of `parts`.
template <typename Type>
void check_throws(const std::function<void()>& expr, const std::vector<std::string>& parts,
                  int line) {
  try {
    expr();
  } catch (const Type& e) {
    const std::string msg = e.what();
    for (const auto& p : parts)
      if (msg.find(p) == std::string::npos)
        throw Failure("line " + std::to_string(line) + ": message lacks '" + p + "': " + msg);
    std::cout << "  raised as expected: " << msg << "\n";
    return;
  } catch (const std::exception& e) {
    throw Failure("line " + std::to_string(line) + ": wrong exception type: " + e.what());
  }
  throw Failure("line " + std::to_string(line) + ": nothing was thrown");
}
#define ET_CHECK_THROWS(Type, expr, ...) check_throws<Type>([&] { expr; }, __VA_ARGS__, __LINE__)

// max|out - ref| / max|ref| in float64; any NaN fails
void check_close(const std::string& name, const at::Tensor& ref, const at::Tensor& out,
                 double tol) {
  if (ref.sizes() != out.sizes())
    throw Failure(name + ": shape mismatch");
  const at::Tensor r = ref.to(at::kDouble), o = out.to(at::kDouble);
  if (o.isnan().any().item<bool>()) throw Failure(name + ": NaN in the output");
  const double scale = std::max(r.abs().max().item<double>(), 1e-30);
  const double err = o.sub(r).abs().max().item<double>() / scale;
  const bool bitwise = at::equal(ref, out);
  std::cout << "  " << name << ": relative error " << err << (bitwise ? " (bitwise equal)" : "")
            << "\n";
  if (!(err <= tol)) throw Failure(name + ": relative error " + std::to_string(err) + " > " +
                                   std::to_string(tol));
}

std::string env(const char* name) {
  const char* v = std::getenv(name);
  if (!v || !*v) throw Skip(std::string("set ") + name + " (tests/test_runtime.py does)");
  return v;
}
std::string model_dir() { return env("ET_TEST_MODEL_DIR"); }
const std::map<std::string, at::Tensor>& data() {
  static const auto d = energy_train::load_safetensors(env("ET_TEST_DATA"));
  return d;
}
const at::Tensor& T(const std::string& name) {
  auto it = data().find(name);
  if (it == data().end()) throw Failure("ET_TEST_DATA has no tensor '" + name + "'");
  return it->second;
}

// A scratch directory removed at scope exit.
struct TempDir {
  fs::path path;
  TempDir() {
    static std::atomic<int> n{0};
    path = fs::temp_directory_path() /
           ("et-runtime-test-" + std::to_string(::getpid()) + "-" + std::to_string(n++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
};

// A copy of the exported directory, to break.
fs::path copy_model(const TempDir& tmp) {
  const fs::path dst = tmp.path / "verifier";
  fs::copy(model_dir(), dst, fs::copy_options::recursive);
  return dst;
}

nlohmann::json read_json(const fs::path& p) {
  std::ifstream f(p);
  return nlohmann::json::parse(f);
}
void write_text(const fs::path& p, const std::string& s) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f << s;
}

const Verifier& verifier() {
  static const Verifier v(model_dir());
  return v;
}

// --------------------------------------------------------------------------------------------
// no model needed
// --------------------------------------------------------------------------------------------
ET_TEST(safetensors_roundtrip) {
  TempDir tmp;
  std::map<std::string, at::Tensor> t = {
      {"f32", at::randn({3, 5})},
      {"f64", at::randn({2, 2}, at::kDouble)},
      {"f16", at::randn({4}).to(at::kHalf)},
      {"bf16", at::randn({4}).to(at::kBFloat16)},
      {"bool", at::randn({2, 3}).gt(0)},
      {"i64", at::arange(7, at::kLong)},
      {"u8", at::arange(5, at::kLong).to(at::kByte)},
      {"empty", at::zeros({0, 3})},
      {"strided", at::randn({4, 6}).t()},  // written contiguous
  };
  const auto file = (tmp.path / "t.safetensors").string();
  energy_train::save_safetensors(file, t, {{"note", "x"}});
  const auto back = energy_train::load_safetensors(file);
  ET_CHECK(back.size() == t.size());
  for (const auto& [name, v] : t) {
    ET_CHECK(back.count(name));
    ET_CHECK(back.at(name).scalar_type() == v.scalar_type());
    ET_CHECK(back.at(name).sizes() == v.sizes());
    ET_CHECK(at::equal(back.at(name), v));
  }
}

ET_TEST(safetensors_malformed) {
  TempDir tmp;
  const auto file = (tmp.path / "bad.safetensors").string();
  const auto with_header = [&](const std::string& header, size_t data_bytes) {
    std::string s(8, '\0');
    for (int i = 0; i < 8; ++i) s[i] = static_cast<char>(header.size() >> (8 * i));
    write_text(file, s + header + std::string(data_bytes, '\0'));
  };
  write_text(file, "abc");
  ET_CHECK_THROWS(SafetensorsError, energy_train::load_safetensors(file), {"truncated"});
  with_header("{", 0);
  ET_CHECK_THROWS(SafetensorsError, energy_train::load_safetensors(file), {"malformed JSON"});
  with_header(R"({"x": {"dtype": "F8", "shape": [1], "data_offsets": [0, 1]}})", 1);
  ET_CHECK_THROWS(SafetensorsError, energy_train::load_safetensors(file), {"'x'", "unsupported dtype 'F8'"});
  with_header(R"({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}})", 4);
  ET_CHECK_THROWS(SafetensorsError, energy_train::load_safetensors(file), {"'x'", "8 bytes"});
  with_header(R"({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", 4);
  ET_CHECK_THROWS(SafetensorsError, energy_train::load_safetensors(file), {"past the data"});
  with_header(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
              R"( "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})", 8);
  ET_CHECK_THROWS(SafetensorsError, energy_train::load_safetensors(file), {"overlap"});
  std::string huge(8, '\xff');
  write_text(file, huge);
  ET_CHECK_THROWS(SafetensorsError, energy_train::load_safetensors(file), {"header length"});
  ET_CHECK_THROWS(SafetensorsError, energy_train::load_safetensors((tmp.path / "none").string()),
               {"cannot open"});
}

ET_TEST(sha256_known_values) {
  TempDir tmp;
  write_text(tmp.path / "abc", "abc");
  write_text(tmp.path / "empty", "");
  ET_CHECK(energy_train::sha256_file((tmp.path / "abc").string()) ==
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  ET_CHECK(energy_train::sha256_file((tmp.path / "empty").string()) ==
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  std::string big(3 << 20, 'x');  // spans several read blocks
  write_text(tmp.path / "big", big);
  ET_CHECK(energy_train::sha256_file((tmp.path / "big").string()).size() == 64);
  ET_CHECK_THROWS(PackageError, energy_train::sha256_file((tmp.path / "none").string()), {"cannot read"});
}

ET_TEST(manifest_errors) {
  TempDir tmp;
  ET_CHECK_THROWS(PackageError, Verifier((tmp.path / "nowhere").string()), {"does not exist"});
  ET_CHECK_THROWS(PackageError, Verifier(tmp.path.string()), {"manifest.json", "missing"});
  write_text(tmp.path / "manifest.json", "{not json");
  ET_CHECK_THROWS(PackageError, Verifier(tmp.path.string()), {"malformed JSON"});
  write_text(tmp.path / "manifest.json", R"({"format": "other", "format_version": 1})");
  ET_CHECK_THROWS(PackageError, Verifier(tmp.path.string()), {"expected format 'energy-train-verifier'"});
  write_text(tmp.path / "manifest.json",
             R"({"format": "energy-train-verifier", "format_version": 1, "torch": "2.13.0"})");
  ET_CHECK_THROWS(PackageError, Verifier(tmp.path.string()), {"missing key 'device'"});
}

// --------------------------------------------------------------------------------------------
// an exported verifier (ET_TEST_MODEL_DIR, ET_TEST_DATA)
// --------------------------------------------------------------------------------------------
ET_TEST(score_matches_python) {
  const at::Tensor e = verifier().score(T("context"), T("pad_mask"), T("candidates"));
  check_close("score vs energy_scores", T("energies"), e, 1e-5);
}

ET_TEST(correct_matches_python) {
  const at::Tensor a = verifier().correct(T("context"), T("pad_mask"), T("actions"));
  check_close("correct vs correct_actions", T("corrected"), a, 1e-5);
  ET_CHECK(!at::equal(a, T("actions")));  // the correction moved the actions
}

ET_TEST(rerank_picks_lowest_energy) {
  const auto r = verifier().rerank(T("context"), T("pad_mask"), T("candidates"));
  check_close("rerank energies vs energy_scores", T("energies"), r.energies, 1e-5);
  ET_CHECK(at::equal(r.index, r.energies.argmin(1)));
  ET_CHECK(at::equal(r.index, T("energies").argmin(1)));
  const int64_t B = T("candidates").size(0);
  for (int64_t b = 0; b < B; ++b)
    ET_CHECK(at::equal(r.chunk[b], T("candidates")[b][r.index[b].item<int64_t>()]));
  const auto rc = verifier().rerank(T("context"), T("pad_mask"), T("candidates"), true);
  ET_CHECK(at::equal(rc.chunk, verifier().correct(T("context"), T("pad_mask"), r.chunk)));
}

ET_TEST(rerank_never_picks_nan) {
  // the verifier itself never makes NaN here; check the selection on energies with NaN
  at::Tensor c = T("candidates").clone();
  c[0][0].fill_(std::numeric_limits<float>::quiet_NaN());  // candidate 0 of sample 0 -> NaN
  const auto r = verifier().rerank(T("context"), T("pad_mask"), c);
  ET_CHECK(r.energies[0][0].isnan().item<bool>());
  ET_CHECK(r.index[0].item<int64_t>() != 0);
  // a chunk with an inf value is never picked either (the rule the Python rerank shares)
  at::Tensor d = T("candidates").clone();
  const int64_t low = verifier().rerank(T("context"), T("pad_mask"), d).index[0].item<int64_t>();
  d[0][low][0][0] = std::numeric_limits<float>::infinity();
  const auto r2 = verifier().rerank(T("context"), T("pad_mask"), d);
  ET_CHECK(r2.index[0].item<int64_t>() != low && r2.chunk.isfinite().all().item<bool>());
  // a sample with no finite candidate: an error, never a NaN chunk
  d[0].fill_(std::numeric_limits<float>::quiet_NaN());
  ET_CHECK_THROWS(InputError, verifier().rerank(T("context"), T("pad_mask"), d),
                  {"rerank: samples [0] have no candidate with a finite energy"});
}

ET_TEST(optional_mask_and_strides) {
  const at::Tensor& ctx = T("context");
  const at::Tensor none = verifier().score(ctx, at::Tensor(), T("candidates"));
  const at::Tensor zeros = verifier().score(
      ctx, at::zeros({ctx.size(0), ctx.size(1)}, ctx.options().dtype(at::kBool)), T("candidates"));
  ET_CHECK(at::equal(none, zeros));
  // non-contiguous views of the same values give the same energies
  const at::Tensor ctx_t = ctx.transpose(0, 1).contiguous().transpose(0, 1);
  const at::Tensor cand_t = T("candidates").transpose(2, 3).contiguous().transpose(2, 3);
  ET_CHECK(!ctx_t.is_contiguous() && !cand_t.is_contiguous());
  ET_CHECK(at::equal(verifier().score(ctx_t, T("pad_mask"), cand_t),
                  verifier().score(ctx, T("pad_mask"), T("candidates"))));
}

ET_TEST(several_batch_and_context_sizes) {
  // the package runs at sizes it was not traced at (B = 1, S = 1 included)
  const at::Tensor& ctx = T("context");
  const at::Tensor& mask = T("pad_mask");
  const at::Tensor& cand = T("candidates");
  const at::Tensor full = verifier().score(ctx, mask, cand);
  const auto e1 = verifier().score(ctx.slice(0, 1, 2), mask.slice(0, 1, 2), cand.slice(0, 1, 2));
  check_close("batch of 1", full.slice(0, 1, 2), e1, 1e-5);
  const auto c1 = verifier().score(ctx, mask, cand.slice(1, 0, 1));
  check_close("one candidate", full.slice(1, 0, 1), c1, 1e-5);
  const auto s1 = verifier().score(ctx.slice(1, 0, 1), mask.slice(1, 0, 1), cand);
  ET_CHECK(s1.sizes() == full.sizes() && !s1.isnan().any().item<bool>());
}

ET_TEST(bad_dtype) {
  const auto& v = verifier();
  ET_CHECK_THROWS(InputError, v.score(T("context").to(at::kDouble), T("pad_mask"), T("candidates")),
               {"score", "'context'", "expected dtype float32", "got float64"});
  ET_CHECK_THROWS(InputError, v.score(T("context"), T("pad_mask").to(at::kFloat), T("candidates")),
               {"'pad_mask'", "expected dtype bool", "got float32"});
  ET_CHECK_THROWS(InputError, v.correct(T("context"), T("pad_mask"), T("actions").to(at::kHalf)),
               {"correct", "'actions'", "expected dtype float32", "got float16"});
}

ET_TEST(bad_shape) {
  const auto& v = verifier();
  const at::Tensor& ctx = T("context");
  const at::Tensor& cand = T("candidates");
  const int64_t D = ctx.size(2);
  ET_CHECK_THROWS(InputError, v.score(ctx.narrow(2, 0, D - 1), T("pad_mask"), cand),
               {"'context'", "expected size " + std::to_string(D) + " at dim 2"});
  ET_CHECK_THROWS(InputError, v.score(ctx[0], T("pad_mask"), cand),
               {"'context'", "expected 3 dims [batch, context_len, " + std::to_string(D) + "]"});
  ET_CHECK_THROWS(InputError, v.score(ctx, T("pad_mask"), cand.narrow(2, 0, cand.size(2) - 1)),
               {"'candidates'", "at dim 2"});
  ET_CHECK_THROWS(InputError, v.score(ctx, T("pad_mask"), cand.narrow(0, 0, 1)),
               {"'candidates'", "(batch) = 1", "input 'context' has batch = " +
                                                    std::to_string(ctx.size(0))});
  ET_CHECK_THROWS(InputError, v.score(ctx, T("pad_mask").narrow(1, 0, 1), cand),
               {"'pad_mask'", "(context_len) = 1", "'context' has context_len"});
  ET_CHECK_THROWS(InputError, v.correct(ctx, T("pad_mask"), cand), {"correct", "'actions'", "expected 3 dims"});
  ET_CHECK_THROWS(InputError, v.score(at::Tensor(), T("pad_mask"), cand), {"'context' is undefined"});
}

ET_TEST(outside_exported_range) {
  const auto& v = verifier();
  const auto& m = v.manifest();
  const auto [s_lo, s_hi] = m.dims.at("context_len");
  const auto [b_lo, b_hi] = m.dims.at("batch");
  const auto [c_lo, c_hi] = m.dims.at("candidates");
  const at::Tensor& ctx = T("context");
  const int64_t B = ctx.size(0), D = ctx.size(2), H = m.chunk_steps, Da = m.act_dim;
  const auto mask = [&](int64_t b, int64_t s) { return at::zeros({b, s}, at::kBool); };
  const std::string range = "[" + std::to_string(s_lo) + ", " + std::to_string(s_hi) + "]";
  ET_CHECK_THROWS(InputError, v.score(at::randn({B, s_hi + 1, D}), mask(B, s_hi + 1), T("candidates")),
               {"score", "'context'", "(context_len) = " + std::to_string(s_hi + 1),
                "outside the exported range " + range});
  ET_CHECK_THROWS(InputError, v.correct(at::randn({B, s_hi + 1, D}), mask(B, s_hi + 1), T("actions")),
               {"correct", "(context_len) = " + std::to_string(s_hi + 1)});
  ET_CHECK_THROWS(InputError,
               v.score(at::randn({b_hi + 1, 2, D}), mask(b_hi + 1, 2), at::randn({b_hi + 1, 1, H, Da})),
               {"(batch) = " + std::to_string(b_hi + 1), "outside the exported range"});
  ET_CHECK_THROWS(InputError, v.score(ctx, T("pad_mask"), at::randn({B, c_hi + 1, H, Da})),
               {"'candidates'", "(candidates) = " + std::to_string(c_hi + 1)});
  ET_CHECK_THROWS(InputError, v.score(at::randn({0, 2, D}), mask(0, 2), at::randn({0, 1, H, Da})),
               {"(batch) = 0", "outside the exported range"});
  ET_CHECK(b_lo >= 1 && c_lo >= 1);
}

ET_TEST(tampered_package) {
  TempDir tmp;
  const fs::path dir = copy_model(tmp);
  {
    std::fstream f(dir / "score.pt2", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(1000);
    f.put('\x5a');
  }
  ET_CHECK_THROWS(PackageError, Verifier(dir.string()), {"score.pt2", "sha256", "modified"});
  fs::resize_file(dir / "score.pt2", 100);
  ET_CHECK_THROWS(PackageError, Verifier(dir.string()), {"score.pt2", "sha256"});
}

ET_TEST(missing_package) {
  TempDir tmp;
  const fs::path dir = copy_model(tmp);
  fs::remove(dir / "correct.pt2");
  ET_CHECK_THROWS(PackageError, Verifier(dir.string()), {"missing file correct.pt2", "'correct'"});
}

ET_TEST(manifest_disagrees_with_package) {
  TempDir tmp;
  const fs::path dir = copy_model(tmp);
  const auto original = read_json(dir / "manifest.json");
  auto widened = original;
  widened["dims"]["context_len"][1] = widened["dims"]["context_len"][1].get<int64_t>() * 4;
  write_text(dir / "manifest.json", widened.dump());
  ET_CHECK_THROWS(PackageError, Verifier(dir.string()), {"does not describe", "compiled for"});
  auto retyped = original;
  retyped["functions"]["score"]["inputs"][0]["dtype"] = "float64";
  write_text(dir / "manifest.json", retyped.dump());
  ET_CHECK_THROWS(PackageError, Verifier(dir.string()), {"does not describe score.pt2"});
  auto old = original;
  old["torch"] = "1.13.1+cpu";
  write_text(dir / "manifest.json", old.dump());
  ET_CHECK_THROWS(PackageError, Verifier(dir.string()), {"exported with torch 1.13.1+cpu", "re-export"});
}

ET_TEST(only_score_exported) {
  TempDir tmp;
  const fs::path dir = copy_model(tmp);
  auto m = read_json(dir / "manifest.json");
  m["functions"].erase("correct");
  write_text(dir / "manifest.json", m.dump());
  const Verifier v(dir.string());
  ET_CHECK(v.has("score") && !v.has("correct"));
  ET_CHECK_THROWS(InputError, v.correct(T("context"), T("pad_mask"), T("actions")),
               {"correct: not exported"});
  ET_CHECK_THROWS(InputError, v.rerank(T("context"), T("pad_mask"), T("candidates"), true),
               {"correct_best"});
}

ET_TEST(concurrent_calls) {
  const at::Tensor ref = verifier().score(T("context"), T("pad_mask"), T("candidates"));
  std::vector<std::thread> threads;
  std::atomic<int> mismatches{0};
  for (int i = 0; i < 4; ++i)
    threads.emplace_back([&] {
      for (int k = 0; k < 5; ++k)
        if (!at::equal(verifier().score(T("context"), T("pad_mask"), T("candidates")), ref))
          ++mismatches;
    });
  for (auto& t : threads) t.join();
  ET_CHECK(mismatches == 0);
}

// --------------------------------------------------------------------------------------------
int main(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "--list") {
    for (const auto& c : cases()) std::cout << c.name << "\n";
    return 0;
  }
  int failed = 0, skipped = 0, passed = 0;
  for (const auto& c : cases()) {
    if (argc == 2 && c.name != argv[1]) continue;
    std::cout << "[ RUN  ] " << c.name << "\n";
    try {
      c.fn();
      ++passed;
      std::cout << "[  OK  ] " << c.name << "\n";
    } catch (const Skip& e) {
      ++skipped;
      std::cout << "[ SKIP ] " << c.name << ": " << e.what() << "\n";
    } catch (const std::exception& e) {
      ++failed;
      std::cout << "[ FAIL ] " << c.name << ": " << e.what() << "\n";
    }
  }
  if (passed + failed + skipped == 0) {
    std::cerr << "no test named " << (argc == 2 ? argv[1] : "") << "\n";
    return 1;
  }
  if (failed) return 1;
  return (skipped && !passed) ? 77 : 0;
}
