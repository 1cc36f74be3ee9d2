#include "cardbridge/session/doctor_pkcs11.hpp"

#include <dlfcn.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <fmt/format.h>
#include <p11-kit/pkcs11.h>

namespace cardbridge::session {

namespace {

std::string fixed(const unsigned char* p, std::size_t n) {
  std::string s(reinterpret_cast<const char*>(p), n);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\0')) s.pop_back();
  for (char& c : s) {
    if (static_cast<unsigned char>(c) < 0x20) c = ' ';
  }
  return s;
}

}  // namespace

std::string ckr_name(unsigned long rv) {
  switch (rv) {
    case CKR_OK: return "CKR_OK";
    case CKR_GENERAL_ERROR: return "CKR_GENERAL_ERROR";
    case CKR_FUNCTION_FAILED: return "CKR_FUNCTION_FAILED";
    case CKR_ARGUMENTS_BAD: return "CKR_ARGUMENTS_BAD";
    case CKR_DEVICE_ERROR: return "CKR_DEVICE_ERROR";
    case CKR_DEVICE_REMOVED: return "CKR_DEVICE_REMOVED";
    case CKR_TOKEN_NOT_PRESENT: return "CKR_TOKEN_NOT_PRESENT";
    case CKR_TOKEN_NOT_RECOGNIZED: return "CKR_TOKEN_NOT_RECOGNIZED";
    case CKR_SLOT_ID_INVALID: return "CKR_SLOT_ID_INVALID";
    case CKR_CRYPTOKI_ALREADY_INITIALIZED: return "CKR_CRYPTOKI_ALREADY_INITIALIZED";
    case CKR_HOST_MEMORY: return "CKR_HOST_MEMORY";
    case CKR_PIN_LOCKED: return "CKR_PIN_LOCKED";
    case 0x80000001UL: return "CKR_VENDOR_DEFINED+1";  // the Cryptolib: a bad EF_ACTUA
    default: return fmt::format("0x{:08X}", rv);
  }
}

nlohmann::json run_pkcs11_probe(const std::string& module) {
  nlohmann::json out = {{"module", module}};
  void* lib = ::dlopen(module.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    out["load_error"] = fmt::format("dlopen: {}", ::dlerror());
    return out;
  }
  auto get_list = reinterpret_cast<CK_C_GetFunctionList>(::dlsym(lib, "C_GetFunctionList"));
  CK_FUNCTION_LIST_PTR f = nullptr;
  if (!get_list || get_list(&f) != CKR_OK || !f) {
    out["load_error"] = "no usable C_GetFunctionList: not a PKCS#11 module";
    return out;
  }
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  CK_RV rv = f->C_Initialize(&args);
  if (rv != CKR_OK && rv != CKR_CRYPTOKI_ALREADY_INITIALIZED) {
    out["load_error"] = "C_Initialize: " + ckr_name(rv);
    return out;
  }
  CK_ULONG n = 0;
  rv = f->C_GetSlotList(CK_FALSE, nullptr, &n);
  std::vector<CK_SLOT_ID> ids(n);
  if (rv == CKR_OK && n > 0) rv = f->C_GetSlotList(CK_FALSE, ids.data(), &n);
  if (rv != CKR_OK) {
    out["load_error"] = "C_GetSlotList: " + ckr_name(rv);
    f->C_Finalize(nullptr);
    return out;
  }
  ids.resize(n);
  out["slots"] = nlohmann::json::array();
  for (CK_SLOT_ID id : ids) {
    CK_SLOT_INFO si{};
    if (f->C_GetSlotInfo(id, &si) != CKR_OK) continue;
    nlohmann::json slot = {{"description", fixed(si.slotDescription, sizeof si.slotDescription)},
                           {"token_present", (si.flags & CKF_TOKEN_PRESENT) != 0}};
    if (si.flags & CKF_TOKEN_PRESENT) {
      CK_TOKEN_INFO ti{};
      CK_RV trv = f->C_GetTokenInfo(id, &ti);
      if (trv == CKR_OK) {
        slot["token_label"] = fixed(ti.label, sizeof ti.label);
        slot["token_serial"] = fixed(ti.serialNumber, sizeof ti.serialNumber);
        slot["token_model"] = fixed(ti.model, sizeof ti.model);
      } else {
        slot["token_error"] = ckr_name(trv);
      }
    }
    out["slots"].push_back(slot);
  }
  f->C_Finalize(nullptr);
  return out;
}

Pkcs11Facts parse_pkcs11_probe(const std::string& module, const nlohmann::json& probe) {
  Pkcs11Facts f;
  f.module = module;
  f.exists = true;
  if (!probe.is_object()) {
    f.load_error = "the probe gave no answer";
    return f;
  }
  f.load_error = probe.value("load_error", "");
  if (!f.load_error.empty()) return f;
  if (!probe.contains("slots") || !probe["slots"].is_array()) {
    f.load_error = "the probe's answer has no slot list";
    return f;
  }
  for (const auto& s : probe["slots"]) {
    if (!s.is_object()) continue;
    Pkcs11Slot slot;
    slot.description = s.value("description", "");
    slot.token_present = s.value("token_present", false);
    slot.token_label = s.value("token_label", "");
    slot.token_serial = s.value("token_serial", "");
    slot.token_model = s.value("token_model", "");
    slot.token_error = s.value("token_error", "");
    f.slots.push_back(std::move(slot));
  }
  return f;
}

Pkcs11Facts probe_pkcs11(const std::string& self, const std::string& module, const std::string& socket,
                         std::chrono::seconds timeout, std::optional<unsigned> as_uid) {
  Pkcs11Facts f;
  f.module = module;
  struct stat st {};
  if (::stat(module.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return f;  // exists = false
  f.exists = true;
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) {
    f.load_error = fmt::format("pipe: {}", std::strerror(errno));
    return f;
  }
  const pid_t pid = ::fork();
  if (pid < 0) {
    ::close(fds[0]);
    ::close(fds[1]);
    f.load_error = fmt::format("fork: {}", std::strerror(errno));
    return f;
  }
  if (pid == 0) {
    ::dup2(fds[1], 1);
    int null = ::open("/dev/null", O_RDWR);
    if (null >= 0) ::dup2(null, 0);
    ::setenv("PCSCLITE_CSOCK_NAME", socket.c_str(), 1);
    if (as_uid) {
      // Become the user (groups, gid, uid: in that order), with the user's HOME (the module
      // may keep a cache there).
      passwd* pw = ::getpwuid(static_cast<uid_t>(*as_uid));
      if (!pw || ::initgroups(pw->pw_name, pw->pw_gid) != 0 || ::setgid(pw->pw_gid) != 0 ||
          ::setuid(pw->pw_uid) != 0 || ::setuid(0) == 0)
        ::_exit(126);
      ::setenv("HOME", pw->pw_dir, 1);
      ::setenv("USER", pw->pw_name, 1);
      ::setenv("LOGNAME", pw->pw_name, 1);
    }
    ::execl(self.c_str(), self.c_str(), "pkcs11-probe", "--module", module.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  ::close(fds[1]);
  std::string text;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      f.timed_out = true;
      break;
    }
    pollfd p{fds[0], POLLIN, 0};
    int r = ::poll(&p, 1, static_cast<int>(left.count()));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) continue;
    char buf[4096];
    ssize_t got = ::read(fds[0], buf, sizeof buf);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) break;
    text.append(buf, static_cast<std::size_t>(got));
  }
  ::close(fds[0]);
  if (f.timed_out) ::kill(pid, SIGKILL);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (f.timed_out) {
    f.load_error = fmt::format("the module did not answer within {} s", timeout.count());
    return f;
  }
  auto j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded()) {
    f.load_error = WIFSIGNALED(status) ? fmt::format("the module crashed (signal {})", WTERMSIG(status))
                                       : fmt::format("the probe failed (exit {})", WEXITSTATUS(status));
    return f;
  }
  return parse_pkcs11_probe(module, j);
}

}  // namespace cardbridge::session
