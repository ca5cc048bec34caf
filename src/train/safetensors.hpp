// The safetensors file format (the Hugging Face layout: an 8-byte little-endian header length,
// a JSON header mapping each tensor name to {dtype, shape, data_offsets} plus an optional
// "__metadata__" of string -> string, then the raw little-endian data), written atomically and
// read with every structural property checked before anything is returned.
//
// Files written here carry a 64-bit checksum in the metadata (key kChecksumKey) that covers the
// data section and the header's content, so a flipped byte anywhere is caught at load time rather
// than silently changing a weight or a step counter. The module knows nothing about models: it
// moves named, typed, shaped byte ranges; checkpoint.cpp maps those onto backend tensors.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/dtype.hpp"
#include "core/tensor.hpp"

namespace moelab {

// Element types of the safetensors spec that moelab reads and writes (a superset of core DType:
// i64 is needed for counters and loader positions).
enum class SafeDType : uint8_t { f32, f64, bf16, i32, i64, f8_e4m3, f8_e5m2 };

size_t safe_dtype_size(SafeDType t);
// The spec's spelling: "F32", "F64", "BF16", "I32", "I64", "F8_E4M3", "F8_E5M2".
const char* safe_dtype_name(SafeDType t);
// The file dtype that stores a core dtype bit-for-bit.
SafeDType safe_dtype_of(DType t);

// One tensor to write: borrowed host memory of safe_dtype_size(dtype) * numel(shape) bytes.
struct SafetensorsTensor {
  std::string name;
  SafeDType dtype = SafeDType::f32;
  Shape shape;
  const void* data = nullptr;
};

// One tensor of a file that was read: its bytes are SafetensorsFile::data[offset, offset + bytes).
struct SafetensorsEntry {
  std::string name;
  SafeDType dtype = SafeDType::f32;
  Shape shape;
  size_t offset = 0;
  size_t bytes = 0;
};

// A whole file, validated, held in host memory.
struct SafetensorsFile {
  std::string path;
  std::map<std::string, std::string> metadata;  // without the checksum key
  std::vector<SafetensorsEntry> entries;        // in data order
  std::vector<uint8_t> data;                    // the data section

  const SafetensorsEntry* find(const std::string& name) const;
  const uint8_t* bytes(const SafetensorsEntry& e) const { return data.data() + e.offset; }
};

// Metadata key holding the checksum ("fnv64x4:" and 16 lowercase hex digits).
inline constexpr const char* kSafetensorsChecksumKey = "moelab.checksum";

// Writes PATH.tmp, fsyncs it, renames it over PATH and fsyncs the folder, so PATH is always
// either the old file or the complete new one. Tensors are laid out in the given order.
// Throws moelab::Error on duplicate or empty names, a reserved metadata key, or an I/O failure.
void write_safetensors(const std::string& path, const std::vector<SafetensorsTensor>& tensors,
                       const std::map<std::string, std::string>& metadata);

// Reads and validates the whole file: header length inside the file, JSON well-formed with no
// duplicate names, known dtypes, offsets that tile the data section exactly (no gaps, overlaps or
// trailing bytes) and agree with dtype * shape, and the checksum. With require_checksum false a
// file without a checksum (e.g. from another tool) is accepted; a present one is always checked.
// Errors are moelab::Error naming the file and the first problem found.
SafetensorsFile read_safetensors(const std::string& path, bool require_checksum = true);

// The checksum's hash: FNV-1a's multiply-xor step over little-endian 64-bit words in four
// interleaved lanes (so it runs at memory speed), tail bytes folded one at a time, lanes and
// length mixed at the end. Deterministic across machines; not cryptographic.
uint64_t checksum64(const void* data, size_t bytes, uint64_t seed = 0);

}  // namespace moelab
