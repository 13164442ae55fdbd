#include "api_error.h"

#include <c10/util/Exception.h>

#include "flamingo_rt/tokenizer.h"

namespace flamingo_rt::capi {
namespace {
thread_local std::string last_error;
}

void set_last_error(const std::string& message) { last_error = message; }
void clear_last_error() { last_error.clear(); }

flamingo_status status_of_current_exception(const char* where) noexcept {
  try {
    try {
      throw;
    } catch (const ApiError& e) {
      set_last_error(std::string(where) + ": " + e.what());
      return e.status();
    } catch (const TokenizerError& e) {
      set_last_error(std::string(where) + ": " + e.what());
      switch (e.kind()) {
        case TokenizerError::Kind::kIo: return FLAMINGO_ERR_IO;
        case TokenizerError::Kind::kBadInput: return FLAMINGO_ERR_INVALID_ARGUMENT;
        default: return FLAMINGO_ERR_FORMAT;
      }
    } catch (const c10::Error& e) {
      set_last_error(std::string(where) + ": " + e.what_without_backtrace());
      return FLAMINGO_ERR_RUNTIME;
    } catch (const std::bad_alloc&) {
      set_last_error(std::string(where) + ": out of memory");
      return FLAMINGO_ERR_RUNTIME;
    } catch (const std::exception& e) {
      set_last_error(std::string(where) + ": " + e.what());
      return FLAMINGO_ERR_RUNTIME;
    } catch (...) {
      set_last_error(std::string(where) + ": unknown exception");
      return FLAMINGO_ERR_RUNTIME;
    }
  } catch (...) {  // even formatting the message failed
    return FLAMINGO_ERR_RUNTIME;
  }
}

}  // namespace flamingo_rt::capi

extern "C" const char* flamingo_last_error(void) {
  return flamingo_rt::capi::last_error.c_str();
}
