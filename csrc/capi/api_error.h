// Errors inside the C API implementation: ApiError carries a flamingo_status; guard() turns
// any exception into a status and the calling thread's last-error message.
#pragma once

#include <stdexcept>
#include <string>

#include "flamingo_rt/flamingo_rt.h"

namespace flamingo_rt::capi {

class ApiError : public std::runtime_error {
 public:
  ApiError(flamingo_status status, const std::string& what) : std::runtime_error(what), status_(status) {}
  flamingo_status status() const noexcept { return status_; }

 private:
  flamingo_status status_;
};

void set_last_error(const std::string& message);
void clear_last_error();

// Runs fn(); returns FLAMINGO_OK, or the status of the exception it threw (message saved).
template <class Fn>
flamingo_status guard(const char* where, Fn&& fn) noexcept;

flamingo_status status_of_current_exception(const char* where) noexcept;

template <class Fn>
flamingo_status guard(const char* where, Fn&& fn) noexcept {
  try {
    clear_last_error();
    fn();
    return FLAMINGO_OK;
  } catch (...) {
    return status_of_current_exception(where);
  }
}

}  // namespace flamingo_rt::capi
