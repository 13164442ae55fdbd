#include "manifest.h"

#include <fstream>
#include <sstream>

#include "../tokenizer/json.h"
#include "api_error.h"

namespace flamingo_rt::capi {
namespace {

using tokenizer_detail::JsonValue;

[[noreturn]] void bad(const std::string& path, const std::string& what) {
  throw ApiError(FLAMINGO_ERR_FORMAT, path + ": " + what);
}

const JsonValue& field(const JsonValue& obj, const std::string& key, JsonValue::Type type, const std::string& path) {
  const JsonValue* v = obj.find(key);
  if (v == nullptr) bad(path, "expected a field \"" + key + "\", found none");
  if (v->type != type) {
    bad(path, "expected \"" + key + "\" to be " + tokenizer_detail::json_type_name(type) + ", got " +
                  tokenizer_detail::json_type_name(v->type));
  }
  return *v;
}

int64_t integer(const JsonValue& obj, const std::string& key, const std::string& path, int64_t lo = 0) {
  const JsonValue& v = field(obj, key, JsonValue::Type::kNumber, path);
  if (!v.is_integer || v.integer < lo) bad(path, "expected \"" + key + "\" to be an integer >= " + std::to_string(lo));
  return v.integer;
}

std::vector<int64_t> shape(const JsonValue& obj, const std::string& key, size_t rank, const std::string& path) {
  const JsonValue& v = field(obj, key, JsonValue::Type::kArray, path);
  if (v.array.size() != rank) {
    bad(path, "expected \"" + key + "\" of rank " + std::to_string(rank) + ", got " + std::to_string(v.array.size()));
  }
  std::vector<int64_t> out;
  for (const JsonValue& d : v.array) {
    if (d.type != JsonValue::Type::kNumber || !d.is_integer || d.integer < 1) bad(path, "expected positive sizes in \"" + key + "\"");
    out.push_back(d.integer);
  }
  return out;
}

std::array<float, 3> triple(const JsonValue& obj, const std::string& key, const std::string& path) {
  const JsonValue& v = field(obj, key, JsonValue::Type::kArray, path);
  if (v.array.size() != 3) bad(path, "expected \"" + key + "\" with 3 numbers");
  std::array<float, 3> out{};
  for (int i = 0; i < 3; ++i) {
    if (v.array[i].type != JsonValue::Type::kNumber) bad(path, "expected numbers in \"" + key + "\"");
    out[i] = static_cast<float>(v.array[i].number);
  }
  return out;
}

}  // namespace

Manifest read_manifest(const std::string& folder) {
  const std::string path = folder + "/manifest.json";
  std::ifstream f(path, std::ios::binary);
  if (!f) throw ApiError(FLAMINGO_ERR_IO, path + ": cannot open (is this an export folder from `flamingo-rt export`?)");
  std::stringstream ss;
  ss << f.rdbuf();
  JsonValue root;
  try {
    root = tokenizer_detail::parse_json(ss.str(), path);
  } catch (const std::exception& e) {
    throw ApiError(FLAMINGO_ERR_FORMAT, e.what());
  }
  if (root.type != JsonValue::Type::kObject) bad(path, "expected a JSON object");
  if (field(root, "format", JsonValue::Type::kString, path).string != "flamingo_rt-export") {
    bad(path, "expected \"format\": \"flamingo_rt-export\"");
  }
  if (const int64_t v = integer(root, "manifest_version", path); v != 2) {
    bad(path, "expected manifest_version 2, got " + std::to_string(v) + ": the export is from another flamingo_rt "
              "version (version 2 encodes a batch of media a call); re-export the model");
  }
  Manifest m;
  m.device = field(root, "device", JsonValue::Type::kString, path).string;
  m.dtype = field(root, "dtype", JsonValue::Type::kString, path).string;
  m.torch_version = field(root, "torch_version", JsonValue::Type::kString, path).string;
  m.max_seq_len = static_cast<int>(integer(root, "max_seq_len", path, 1));
  m.max_media = static_cast<int>(integer(root, "max_media", path, 1));
  m.max_frames = static_cast<int>(integer(root, "max_frames", path, 1));
  m.max_beams = static_cast<int>(integer(root, "max_beams", path, 1));
  m.image_size = static_cast<int>(integer(root, "image_size", path, 1));
  m.vocab_size = static_cast<int>(integer(root, "vocab_size", path, 1));
  m.image_mean = triple(root, "image_mean", path);
  m.image_std = triple(root, "image_std", path);
  const JsonValue& sp = field(root, "special_tokens", JsonValue::Type::kObject, path);
  m.image_id = static_cast<int32_t>(integer(sp, "image", path));
  m.eoc_id = static_cast<int32_t>(integer(sp, "endofchunk", path));
  m.pad_id = static_cast<int32_t>(integer(sp, "pad", path));
  m.eos_id = static_cast<int32_t>(integer(sp, "eos", path));
  const JsonValue& shapes = field(root, "shapes", JsonValue::Type::kObject, path);
  m.kv_cache_shape = shape(shapes, "kv_cache", 6, path);
  m.media_cache_shape = shape(shapes, "media_cache", 7, path);
  m.media_kv_shape = shape(shapes, "media_kv", 5, path);
  const JsonValue& pk = field(root, "packages", JsonValue::Type::kObject, path);
  m.encode_package = folder + "/" + field(pk, "encode_media", JsonValue::Type::kString, path).string;
  m.step_package = folder + "/" + field(pk, "token_step", JsonValue::Type::kString, path).string;
  m.decode_package = folder + "/" + field(pk, "decode_step", JsonValue::Type::kString, path).string;
  if (pk.find("score_step") != nullptr)
    m.score_package = folder + "/" + field(pk, "score_step", JsonValue::Type::kString, path).string;
  if (m.kv_cache_shape[4] != m.max_seq_len) bad(path, "kv_cache slots differ from max_seq_len");
  if (m.media_cache_shape[3] != m.max_media) bad(path, "media_cache slots differ from max_media");
  return m;
}

}  // namespace flamingo_rt::capi
