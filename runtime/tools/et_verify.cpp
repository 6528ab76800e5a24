// et-verify: run an exported verifier on tensors from a safetensors file.
//
//   et-verify score   --model DIR --in inputs.safetensors --out energies.safetensors
//   et-verify correct --model DIR --in inputs.safetensors --out actions.safetensors
//   et-verify rerank  --model DIR --in inputs.safetensors --out best.safetensors [--correct-best]
//   et-verify info    --model DIR
//
// Inputs by name: context (B, S, D), pad_mask (B, S) bool (optional: no padding), candidates
// (B, C, H, Da) for score/rerank, actions (B, H, Da) for correct; other tensors are ignored.
// Outputs: score -> energies (B, C); correct -> actions (B, H, Da); rerank -> chunk (B, H, Da),
// index (B,) int64, energies (B, C).
// --repeat N times N more calls after the first and prints median/p99 ms; --timings FILE
// writes every call's milliseconds as JSON (a call includes copying its result to the CPU).
// Exit status: 0 ok, 1 error (package, input, file), 2 usage.
#include "energy_train/safetensors.h"
#include "energy_train/verifier.h"

#include <ATen/Parallel.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <string>
#include <vector>

namespace {

constexpr const char* kUsage =
    "usage: et-verify {score|correct|rerank|info} --model DIR [--in FILE] [--out FILE]\n"
    "                 [--correct-best] [--repeat N] [--timings FILE] [--threads N]\n";

struct Usage : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Args {
  std::string command, model, in, out, timings;
  bool correct_best = false;
  int repeat = 0, threads = 0;
};

int to_int(const std::string& flag, const std::string& v) {
  try {
    size_t pos = 0;
    const int n = std::stoi(v, &pos);
    if (pos == v.size() && n >= 0) return n;
  } catch (const std::exception&) {
  }
  throw Usage(flag + ": expected a non-negative integer, got '" + v + "'");
}

Args parse(int argc, char** argv) {
  if (argc < 2) throw Usage("missing command");
  Args a;
  a.command = argv[1];
  if (a.command == "-h" || a.command == "--help") {
    std::cout << kUsage;
    std::exit(0);
  }
  if (a.command != "score" && a.command != "correct" && a.command != "rerank" &&
      a.command != "info")
    throw Usage("unknown command '" + a.command + "'");
  for (int i = 2; i < argc; ++i) {
    const std::string flag = argv[i];
    const auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw Usage(flag + ": missing value");
      return argv[++i];
    };
    if (flag == "--model") a.model = value();
    else if (flag == "--in") a.in = value();
    else if (flag == "--out") a.out = value();
    else if (flag == "--timings") a.timings = value();
    else if (flag == "--repeat") a.repeat = to_int(flag, value());
    else if (flag == "--threads") a.threads = to_int(flag, value());
    else if (flag == "--correct-best") a.correct_best = true;
    else throw Usage("unknown option '" + flag + "'");
  }
  if (a.model.empty()) throw Usage("--model DIR is required");
  if (a.command != "info" && (a.in.empty() || a.out.empty()))
    throw Usage(a.command + ": --in FILE and --out FILE are required");
  return a;
}

const at::Tensor& need(const std::map<std::string, at::Tensor>& t, const std::string& name,
                       const std::string& file) {
  auto it = t.find(name);
  if (it == t.end()) {
    std::string have;
    for (const auto& [k, v] : t) have += (have.empty() ? "" : ", ") + k;
    throw energy_train::InputError("input file " + file + " has no tensor '" + name +
                                   "' (it has: " + (have.empty() ? "none" : have) + ")");
  }
  return it->second;
}

double percentile(std::vector<double> v, double q) {  // linear interpolation, q in [0, 1]
  std::sort(v.begin(), v.end());
  const double pos = q * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (pos - static_cast<double>(lo)) * (v[hi] - v[lo]);
}

void info(const energy_train::Verifier& v) {
  const auto& m = v.manifest();
  std::cout << "verifier " << v.directory() << ": torch " << m.torch_version << ", " << m.device
            << ", " << m.dtype << "\n  model: state_dim " << m.state_dim << ", act_dim "
            << m.act_dim << ", hidden " << m.hidden << ", heads " << m.heads << ", H "
            << m.chunk_steps << "\n  dims:";
  for (const auto& [name, r] : m.dims) std::cout << " " << name << " [" << r.first << ", " << r.second << "]";
  std::cout << "\n  correction: " << m.steps << " step(s), alpha " << m.alpha << ", clip_frac "
            << m.clip_frac << "\n";
  for (const auto& [name, f] : m.functions) {
    std::cout << "  " << name << " (" << f.file << "):";
    for (const auto& t : f.inputs) std::cout << " " << t.name << " " << t.dtype;
    std::cout << " -> " << f.output.name << " " << f.output.dtype << "\n";
  }
}

int run(const Args& a) {
  if (a.threads > 0) at::set_num_threads(a.threads);
  energy_train::Verifier v(a.model);
  if (a.command == "info") {
    info(v);
    return 0;
  }
  const auto in = energy_train::load_safetensors(a.in);
  const at::Tensor& context = need(in, "context", a.in);
  const auto mask_it = in.find("pad_mask");
  const at::Tensor pad_mask = mask_it == in.end() ? at::Tensor() : mask_it->second;
  const std::string moving = a.command == "correct" ? "actions" : "candidates";
  const at::Tensor& x = need(in, moving, a.in);
  at::Tensor device_ctx = context, device_mask = pad_mask, device_x = x;
  if (v.manifest().device == "cuda") {  // the file holds CPU tensors
    device_ctx = context.to(c10::Device(c10::DeviceType::CUDA));
    device_mask = pad_mask.defined() ? pad_mask.to(device_ctx.device()) : pad_mask;
    device_x = x.to(device_ctx.device());
  }

  std::map<std::string, at::Tensor> out;
  const std::function<void()> call = [&] {
    if (a.command == "score") {
      out["energies"] = v.score(device_ctx, device_mask, device_x).cpu();
    } else if (a.command == "correct") {
      out["actions"] = v.correct(device_ctx, device_mask, device_x).cpu();
    } else {
      auto r = v.rerank(device_ctx, device_mask, device_x, a.correct_best);
      out = {{"chunk", r.chunk.cpu()}, {"index", r.index.cpu()}, {"energies", r.energies.cpu()}};
    }
  };
  std::vector<double> ms;
  for (int i = 0; i <= a.repeat; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    call();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                     .count());
  }
  energy_train::save_safetensors(a.out, out, {{"function", a.command}, {"verifier", a.model}});
  if (a.repeat > 0) {
    const std::vector<double> timed(ms.begin() + 1, ms.end());  // the first call warms up
    std::cerr << "et-verify " << a.command << ": " << timed.size() << " calls, median "
              << percentile(timed, 0.5) << " ms, p99 " << percentile(timed, 0.99) << " ms\n";
    if (!a.timings.empty()) {
      std::ofstream f(a.timings);
      f << nlohmann::json{{"command", a.command}, {"first_ms", ms[0]}, {"ms", timed},
                          {"threads", at::get_num_threads()}}
               .dump()
        << "\n";
      if (!f) throw std::runtime_error("cannot write " + a.timings);
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  try {
    args = parse(argc, argv);
  } catch (const Usage& e) {
    std::cerr << "et-verify: " << e.what() << "\n" << kUsage;
    return 2;
  }
  try {
    return run(args);
  } catch (const std::exception& e) {
    std::cerr << "et-verify: error: " << e.what() << "\n";
    return 1;
  }
}
