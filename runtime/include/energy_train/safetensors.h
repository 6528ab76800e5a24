// Read and write safetensors files (the format of the safetensors package): an 8-byte
// little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, the bytes.
// Tensors come back as contiguous CPU tensors that own their memory.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <stdexcept>
#include <string>

namespace energy_train {

class SafetensorsError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Every tensor of the file, by name. Throws SafetensorsError naming the file and the problem
// (truncated file, malformed header, unknown dtype, offsets out of range or overlapping).
std::map<std::string, at::Tensor> load_safetensors(const std::string& path);

// Write tensors (any device, any strides: copied to contiguous CPU) to path, replacing it.
void save_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

}  // namespace energy_train
