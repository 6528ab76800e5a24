// energy_train::Verifier: the trained energy model at test time, without Python.
//
// A directory written by energy_train.deploy.export_verifier holds two AOTInductor packages
// (score.pt2, correct.pt2) and manifest.json. Verifier loads them, checks every file's sha256
// and every input against the manifest, and runs them through libtorch:
//
//   energy_train::Verifier v("verifier_dir");
//   at::Tensor e    = v.score(context, pad_mask, candidates);   // (B, C) energies, lower = better
//   at::Tensor a    = v.correct(context, pad_mask, actions);    // (B, H, Da), k clipped steps
//   auto best       = v.rerank(context, pad_mask, candidates);  // best.chunk (B, H, Da)
//
// Shapes: context (B, S, D), pad_mask (B, S) bool with true = ignore that key (an undefined
// tensor means no padding), candidates (B, C, H, Da), actions (B, H, Da); B, S, C within the
// ranges the package was exported for, dtypes and device exactly as exported. Any mismatch is
// an InputError that names the function, the input, what was expected and what was received;
// a missing, tampered or inconsistent package is a PackageError. Calls are thread-safe.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <variant>
#include <vector>

namespace energy_train {

// Base of every error the runtime throws on purpose.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
// The package directory: missing or unreadable file, sha256 mismatch, malformed manifest,
// manifest and package disagree, torch version or device the runtime cannot run.
class PackageError : public Error {
 public:
  using Error::Error;
};
// An argument: dtype, device, number of dimensions, a size, a size outside the exported range,
// sizes that disagree between inputs.
class InputError : public Error {
 public:
  using Error::Error;
};

// One tensor of a function's signature: a dim is a fixed size or the name of a dynamic range.
struct TensorSpec {
  std::string name;
  std::string dtype;  // "float32", "bool", ...
  std::vector<std::variant<int64_t, std::string>> shape;
};

struct FunctionSpec {
  std::string file;  // package file, relative to the directory
  std::vector<TensorSpec> inputs;
  TensorSpec output;
};

struct Manifest {
  std::string torch_version;  // the exporting torch, e.g. "2.13.0+cpu"
  std::string device;         // "cpu" or "cuda"
  std::string dtype;
  int64_t state_dim = 0, act_dim = 0, hidden = 0, heads = 0;
  int64_t chunk_steps = 0;  // H
  std::map<std::string, std::pair<int64_t, int64_t>> dims;  // name -> [min, max]
  int64_t steps = 0;
  double alpha = 0, clip_frac = 0;
  std::map<std::string, FunctionSpec> functions;  // "score", "correct"
  std::map<std::string, std::string> files;        // file -> sha256 (hex)
};

// Parse and validate dir/manifest.json (no package is loaded). Throws PackageError.
Manifest read_manifest(const std::string& dir);

// Hex sha256 of a file's bytes. Throws PackageError if it cannot be read.
std::string sha256_file(const std::string& path);

struct Reranked {
  at::Tensor chunk;     // (B, H, Da): the candidate with the lowest energy (corrected if asked)
  at::Tensor index;     // (B,) int64: its index among the C candidates
  at::Tensor energies;  // (B, C): every candidate's energy, as score() returns them
};

struct VerifierOptions {
  // CUDA packages: which device (-1: the current one). Ignored on the CPU.
  int device_index = -1;
  // Check sha256 of every package file before loading it (a few ms per MB).
  bool verify_files = true;
};

class Verifier {
 public:
  // Loads dir/manifest.json and every package it lists. Throws PackageError.
  explicit Verifier(const std::string& dir, VerifierOptions options = {});
  ~Verifier();
  Verifier(Verifier&&) noexcept;
  Verifier& operator=(Verifier&&) noexcept;
  Verifier(const Verifier&) = delete;
  Verifier& operator=(const Verifier&) = delete;

  // (B, C) energies of candidates (B, C, H, Da); each context is encoded once.
  at::Tensor score(const at::Tensor& context, const at::Tensor& pad_mask,
                   const at::Tensor& candidates) const;
  // actions (B, H, Da) after the exported number of steps of
  // a <- a - alpha * dE/da, each step clipped to clip_frac * |a| (per sample).
  at::Tensor correct(const at::Tensor& context, const at::Tensor& pad_mask,
                     const at::Tensor& actions) const;
  // Best-of-C: the lowest-energy candidate per sample, then, if correct_best, the correction
  // applied to it. A candidate whose energy is not finite (NaN, inf) or whose chunk holds a
  // non-finite value is never chosen; a sample with no other candidate is an InputError (the
  // rule energy_train.integrations.openvla_oft.rerank shares).
  Reranked rerank(const at::Tensor& context, const at::Tensor& pad_mask,
                  const at::Tensor& candidates, bool correct_best = false) const;

  bool has(const std::string& function) const;
  const Manifest& manifest() const;
  const std::string& directory() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace energy_train
