// cdrsession doctor: the session's PKCS#11 middleware (the Cryptolib CPS by default). A probe
// loads the module in a child process (a crashing or hanging module cannot take the doctor
// down) with the session's PCSCLITE_CSOCK_NAME, lists its slots and tokens and prints them as
// JSON; the doctor turns that into facts (this file) and a verdict (doctor.cpp).
#pragma once

#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace cardbridge::session {

// Where the RPM of ANS's Cryptolib CPS installs its PKCS#11 module.
inline constexpr const char* kCryptolibModule = "/opt/santesocial/CPS/lib/libcps3_pkcs11_lux.so";

struct Pkcs11Slot {
  std::string description;   // usually the PC/SC reader name (the module may cut it)
  bool token_present = false;
  std::string token_label;   // when C_GetTokenInfo succeeded
  std::string token_serial;
  std::string token_model;
  std::string token_error;   // CKR_... when C_GetTokenInfo failed (e.g. CKR_TOKEN_NOT_RECOGNIZED)
};

struct Pkcs11Facts {
  std::string module;        // the path checked
  bool exists = false;
  std::string load_error;    // dlopen, C_GetFunctionList or C_Initialize failure; empty: loaded
  bool timed_out = false;    // the probe did not finish in time
  std::vector<Pkcs11Slot> slots;
};

// The probe's JSON (run_pkcs11_probe's output) as facts; a malformed document becomes a load error.
Pkcs11Facts parse_pkcs11_probe(const std::string& module, const nlohmann::json& probe);

// Runs in the probe process: loads |module|, lists slots and tokens, returns the JSON document.
nlohmann::json run_pkcs11_probe(const std::string& module);

// Starts |self| (this program) as "cdrsession pkcs11-probe --module M" with
// PCSCLITE_CSOCK_NAME=|socket| and waits at most |timeout| for its answer. |as_uid|: run the
// probe as that user (root's `doctor --user`: the shim admits its own user only).
Pkcs11Facts probe_pkcs11(const std::string& self, const std::string& module, const std::string& socket,
                         std::chrono::seconds timeout, std::optional<unsigned> as_uid = std::nullopt);

// Name of a CK_RV (CKR_PIN_INCORRECT ...), "0x%08lX" for others.
std::string ckr_name(unsigned long rv);

}  // namespace cardbridge::session
