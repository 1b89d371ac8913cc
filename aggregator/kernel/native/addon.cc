// N-API bindings of the limb kernels. Every function works on the
// caller's typed-array memory in place (no copy), checks the array types
// and lengths, and throws TypeError or RangeError naming the argument.
#include <node_api.h>

#include <cstdio>
#include <vector>

#include "kernels.h"

namespace {

constexpr size_t MAX_ARGS = 8;

struct Args {
  napi_env env;
  size_t count = MAX_ARGS;
  napi_value values[MAX_ARGS];
};

bool getArgs(napi_env env, napi_callback_info info, Args& args,
             size_t expected) {
  args.env = env;
  if (napi_get_cb_info(env, info, &args.count, args.values, nullptr,
                       nullptr) != napi_ok) {
    return false;
  }
  if (args.count < expected) {
    char message[96];
    std::snprintf(message, sizeof message, "expected %zu arguments, got %zu",
                  expected, args.count);
    napi_throw_type_error(env, nullptr, message);
    return false;
  }
  return true;
}

// Reads the data pointer and length of a typed array of `type`, or throws
// TypeError.
template <typename T>
bool typedArray(napi_env env, napi_value value, napi_typedarray_type type,
                const char* name, T** data, size_t* length) {
  bool isTypedArray = false;
  napi_is_typedarray(env, value, &isTypedArray);
  napi_typedarray_type actual;
  void* raw = nullptr;
  if (isTypedArray) {
    napi_get_typedarray_info(env, value, &actual, length, &raw, nullptr,
                             nullptr);
  }
  if (!isTypedArray || actual != type) {
    char message[96];
    std::snprintf(message, sizeof message, "%s must be a %s", name,
                  type == napi_float32_array ? "Float32Array"
                                             : "Float64Array");
    napi_throw_type_error(env, nullptr, message);
    return false;
  }
  *data = static_cast<T*>(raw);
  return true;
}

bool number(napi_env env, napi_value value, const char* name, double* out) {
  if (napi_get_value_double(env, value, out) == napi_ok) return true;
  char message[96];
  std::snprintf(message, sizeof message, "%s must be a number", name);
  napi_throw_type_error(env, nullptr, message);
  return false;
}

bool rangeError(napi_env env, const char* name, size_t length,
                size_t expected) {
  char message[128];
  std::snprintf(message, sizeof message,
                "%s has length %zu, expected at least %zu", name, length,
                expected);
  napi_throw_range_error(env, nullptr, message);
  return false;
}

napi_value numberValue(napi_env env, double value) {
  napi_value result;
  napi_create_double(env, value, &result);
  return result;
}

// State limbs: three Float64Arrays, each at least `count` long.
struct Separate {
  double* whole;
  double* high;
  double* low;
};

bool separate(napi_env env, const napi_value* argv, size_t count,
              Separate* state) {
  size_t lengths[3];
  const char* names[3] = {"whole", "high", "low"};
  double** targets[3] = {&state->whole, &state->high, &state->low};
  for (int i = 0; i < 3; i++) {
    if (!typedArray(env, argv[i], napi_float64_array, names[i], targets[i],
                    &lengths[i])) {
      return false;
    }
    if (lengths[i] < count) {
      return rangeError(env, names[i], lengths[i], count);
    }
  }
  return true;
}

// Adds one update: (whole, high, low, values, numExamples, maxAbsValue).
// Returns -1, or the first invalid index with the state unchanged.
napi_value AddSeparate(napi_env env, napi_callback_info info) {
  Args args;
  if (!getArgs(env, info, args, 6)) return nullptr;
  float* values;
  size_t count;
  double n, maxAbs;
  Separate state;
  if (!typedArray(env, args.values[3], napi_float32_array, "values", &values,
                  &count) ||
      !separate(env, args.values, count, &state) ||
      !number(env, args.values[4], "numExamples", &n) ||
      !number(env, args.values[5], "maxAbsValue", &maxAbs)) {
    return nullptr;
  }
  int64_t invalid = kernels().addSeparate(state.whole, state.high, state.low,
                                          values, count, n, maxAbs);
  return numberValue(env, static_cast<double>(invalid));
}

napi_value SubtractSeparate(napi_env env, napi_callback_info info) {
  Args args;
  if (!getArgs(env, info, args, 5)) return nullptr;
  float* values;
  size_t count;
  double n;
  Separate state;
  if (!typedArray(env, args.values[3], napi_float32_array, "values", &values,
                  &count) ||
      !separate(env, args.values, count, &state) ||
      !number(env, args.values[4], "numExamples", &n)) {
    return nullptr;
  }
  kernels().subtractSeparate(state.whole, state.high, state.low, values,
                             count, n);
  return nullptr;
}

// Arguments shared by the batched kernels: (whole, high, low, updates,
// numExamples, maxAbsValues), updates being an array of equal-length
// Float32Arrays and the other two Float64Arrays with one entry per update.
struct Batch {
  Separate state;
  std::vector<const float*> values;
  double* n;
  double* maxAbs;
  size_t count = 0;
};

bool batch(napi_env env, const napi_value* argv, Batch* out) {
  bool isArray = false;
  napi_is_array(env, argv[3], &isArray);
  if (!isArray) {
    napi_throw_type_error(env, nullptr, "updates must be an array");
    return false;
  }
  uint32_t updates;
  napi_get_array_length(env, argv[3], &updates);
  for (uint32_t k = 0; k < updates; k++) {
    napi_value element;
    napi_get_element(env, argv[3], k, &element);
    char name[32];
    std::snprintf(name, sizeof name, "updates[%u]", k);
    float* values;
    size_t count;
    if (!typedArray(env, element, napi_float32_array, name, &values,
                    &count)) {
      return false;
    }
    if (k > 0 && count != out->count) {
      char message[128];
      std::snprintf(message, sizeof message,
                    "%s has length %zu, expected %zu like updates[0]", name,
                    count, out->count);
      napi_throw_range_error(env, nullptr, message);
      return false;
    }
    out->count = count;
    out->values.push_back(values);
  }
  size_t nLength, maxLength;
  if (!typedArray(env, argv[4], napi_float64_array, "numExamples", &out->n,
                  &nLength) ||
      !typedArray(env, argv[5], napi_float64_array, "maxAbsValues",
                  &out->maxAbs, &maxLength)) {
    return false;
  }
  if (nLength < updates) {
    return rangeError(env, "numExamples", nLength, updates);
  }
  if (maxLength < updates) {
    return rangeError(env, "maxAbsValues", maxLength, updates);
  }
  return separate(env, argv, out->count, &out->state);
}

// Converts a batch result to -1 when the batch was added, or else to
// [update, index] of the first invalid value (by update, then index).
napi_value failureValue(napi_env env, BatchFailure failure) {
  if (failure.update < 0) return numberValue(env, -1);
  napi_value pair;
  napi_create_array_with_length(env, 2, &pair);
  napi_set_element(env, pair, 0,
                   numberValue(env, static_cast<double>(failure.update)));
  napi_set_element(env, pair, 1,
                   numberValue(env, static_cast<double>(failure.index)));
  return pair;
}

napi_value AddBatchRegisters(napi_env env, napi_callback_info info) {
  Args args;
  if (!getArgs(env, info, args, 6)) return nullptr;
  Batch input;
  if (!batch(env, args.values, &input)) return nullptr;
  BatchFailure failure = kernels().addBatchRegisters(
      input.state.whole, input.state.high, input.state.low,
      input.values.data(), input.n, input.maxAbs, input.values.size(),
      input.count);
  return failureValue(env, failure);
}

// Instruction set of the kernels picked for this CPU.
napi_value InstructionSet(napi_env env, napi_callback_info) {
  napi_value result;
  napi_create_string_utf8(env, kernels().instructionSet, NAPI_AUTO_LENGTH,
                          &result);
  return result;
}

napi_value Init(napi_env env, napi_value exports) {
  napi_property_descriptor properties[] = {
      {"addSeparate", nullptr, AddSeparate, nullptr, nullptr, nullptr,
       napi_enumerable, nullptr},
      {"subtractSeparate", nullptr, SubtractSeparate, nullptr, nullptr,
       nullptr, napi_enumerable, nullptr},
      {"addBatchRegisters", nullptr, AddBatchRegisters, nullptr, nullptr,
       nullptr, napi_enumerable, nullptr},
      {"instructionSet", nullptr, InstructionSet, nullptr, nullptr, nullptr,
       napi_enumerable, nullptr},
  };
  napi_define_properties(env, exports, sizeof properties / sizeof *properties,
                         properties);
  return exports;
}

}  // namespace

NAPI_MODULE(NODE_GYP_MODULE_NAME, Init)
