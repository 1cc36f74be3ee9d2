// libcbrecord: records the PC/SC calls of a real program (a PKCS#11 module inside a
// browser, pkcs11-tool, curl ...) as a cb-replay trace.
//
// It stands in for libpcsclite.so.1: a directory holding a symlink libpcsclite.so.1 ->
// libcbrecord.so is put first on LD_LIBRARY_PATH (scripts: cb-record). Middleware that
// dlopen("libpcsclite.so.1") (the Cryptolib, OpenSC) then load this library, which forwards
// every call to the real library (CBRECORD_REAL, default the system's libpcsclite.so.1,
// loaded by path with RTLD_LOCAL) and appends one trace line per call to CBRECORD_TRACE.
//
// Secrets: the data of VERIFY / CHANGE REFERENCE DATA / RESET RETRY COUNTER is never written:
// a PIN padded to 8 bytes with FF or 00 becomes {PIN} / {PIN00}, anything else makes the
// whole trace unusable (a "# UNRECORDABLE" line) rather than leak it.
//
// Format: tests/tools/replay/README.md ("Trace format"); handles and contexts are named h1,
// c1 ... in the order they appear, readers r0, r1 ... by their position in the last
// SCardListReaders answer ("pnp" for \\?PnP?\Notification).
#include <PCSC/winscard.h>
#include <PCSC/wintypes.h>
#include <dlfcn.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

struct Real {
  void* lib = nullptr;
#define CBREC_FN(name, ret, args) ret(*name) args = nullptr;
  CBREC_FN(EstablishContext, LONG, (DWORD, LPCVOID, LPCVOID, LPSCARDCONTEXT))
  CBREC_FN(ReleaseContext, LONG, (SCARDCONTEXT))
  CBREC_FN(IsValidContext, LONG, (SCARDCONTEXT))
  CBREC_FN(Connect, LONG, (SCARDCONTEXT, LPCSTR, DWORD, DWORD, LPSCARDHANDLE, LPDWORD))
  CBREC_FN(Reconnect, LONG, (SCARDHANDLE, DWORD, DWORD, DWORD, LPDWORD))
  CBREC_FN(Disconnect, LONG, (SCARDHANDLE, DWORD))
  CBREC_FN(BeginTransaction, LONG, (SCARDHANDLE))
  CBREC_FN(EndTransaction, LONG, (SCARDHANDLE, DWORD))
  CBREC_FN(Status, LONG, (SCARDHANDLE, LPSTR, LPDWORD, LPDWORD, LPDWORD, LPBYTE, LPDWORD))
  CBREC_FN(GetStatusChange, LONG, (SCARDCONTEXT, DWORD, SCARD_READERSTATE*, DWORD))
  CBREC_FN(Control, LONG, (SCARDHANDLE, DWORD, LPCVOID, DWORD, LPVOID, DWORD, LPDWORD))
  CBREC_FN(Transmit, LONG, (SCARDHANDLE, const SCARD_IO_REQUEST*, LPCBYTE, DWORD, SCARD_IO_REQUEST*, LPBYTE, LPDWORD))
  CBREC_FN(ListReaderGroups, LONG, (SCARDCONTEXT, LPSTR, LPDWORD))
  CBREC_FN(ListReaders, LONG, (SCARDCONTEXT, LPCSTR, LPSTR, LPDWORD))
  CBREC_FN(FreeMemory, LONG, (SCARDCONTEXT, LPCVOID))
  CBREC_FN(Cancel, LONG, (SCARDCONTEXT))
  CBREC_FN(GetAttrib, LONG, (SCARDHANDLE, DWORD, LPBYTE, LPDWORD))
  CBREC_FN(SetAttrib, LONG, (SCARDHANDLE, DWORD, LPCBYTE, DWORD))
  CBREC_FN(StringifyError, const char*, (LONG))
#undef CBREC_FN
};

std::once_flag g_once;
Real g_real;
std::mutex g_mu;
std::FILE* g_out = nullptr;
Clock::time_point g_start;
Clock::time_point g_last;
std::map<SCARDCONTEXT, int> g_ctx;
std::map<SCARDHANDLE, int> g_handles;
std::vector<std::string> g_readers;  // the last SCardListReaders answer
std::map<SCARDHANDLE, uint16_t> g_last_sw;

template <typename F>
void bind(F& fn, const char* name) {
  fn = reinterpret_cast<F>(::dlsym(g_real.lib, name));
  if (!fn) {
    std::fprintf(stderr, "libcbrecord: %s missing in the real libpcsclite\n", name);
    std::abort();
  }
}

void init() {
  std::call_once(g_once, [] {
    const char* real = std::getenv("CBRECORD_REAL");
    if (!real || !*real) real = "/usr/lib/x86_64-linux-gnu/libpcsclite.so.1";
    g_real.lib = ::dlopen(real, RTLD_NOW | RTLD_LOCAL);
    if (!g_real.lib) {
      std::fprintf(stderr, "libcbrecord: cannot load %s: %s\n", real, ::dlerror());
      std::abort();
    }
    bind(g_real.EstablishContext, "SCardEstablishContext");
    bind(g_real.ReleaseContext, "SCardReleaseContext");
    bind(g_real.IsValidContext, "SCardIsValidContext");
    bind(g_real.Connect, "SCardConnect");
    bind(g_real.Reconnect, "SCardReconnect");
    bind(g_real.Disconnect, "SCardDisconnect");
    bind(g_real.BeginTransaction, "SCardBeginTransaction");
    bind(g_real.EndTransaction, "SCardEndTransaction");
    bind(g_real.Status, "SCardStatus");
    bind(g_real.GetStatusChange, "SCardGetStatusChange");
    bind(g_real.Control, "SCardControl");
    bind(g_real.Transmit, "SCardTransmit");
    bind(g_real.ListReaderGroups, "SCardListReaderGroups");
    bind(g_real.ListReaders, "SCardListReaders");
    bind(g_real.FreeMemory, "SCardFreeMemory");
    bind(g_real.Cancel, "SCardCancel");
    bind(g_real.GetAttrib, "SCardGetAttrib");
    bind(g_real.SetAttrib, "SCardSetAttrib");
    bind(g_real.StringifyError, "pcsc_stringify_error");
    const char* path = std::getenv("CBRECORD_TRACE");
    if (path && *path) {
      g_out = std::fopen(path, "a");
      if (g_out) {
        // Line-buffered: a program that exits without cleaning up loses nothing.
        std::setvbuf(g_out, nullptr, _IOLBF, 0);
        std::fprintf(g_out, "# recorded by libcbrecord (pid %d)\n", static_cast<int>(::getpid()));
      }
    }
    g_start = g_last = Clock::now();
  });
}

std::string hexs(const BYTE* p, std::size_t n) {
  static const char* d = "0123456789ABCDEF";
  std::string s;
  for (std::size_t i = 0; i < n; ++i) {
    s += d[p[i] >> 4];
    s += d[p[i] & 15];
  }
  return s;
}

std::string rvs(LONG rv) {
  char b[16];
  std::snprintf(b, sizeof b, "0x%08lX", static_cast<unsigned long>(rv) & 0xFFFFFFFFul);
  return b;
}

std::string ctx_name(SCARDCONTEXT c) {
  auto it = g_ctx.find(c);
  return it == g_ctx.end() ? "c?" : "c" + std::to_string(it->second);
}

std::string handle_name(SCARDHANDLE h) {
  auto it = g_handles.find(h);
  return it == g_handles.end() ? "h?" : "h" + std::to_string(it->second);
}

std::string reader_ref(const char* name) {
  if (!name) return "r?";
  if (std::strcmp(name, "\\\\?PnP?\\Notification") == 0) return "pnp";
  for (std::size_t i = 0; i < g_readers.size(); ++i) {
    if (g_readers[i] == name) return "r" + std::to_string(i);
  }
  return "r?";
}

std::string share(DWORD s) {
  return s == SCARD_SHARE_EXCLUSIVE ? "exclusive" : s == SCARD_SHARE_DIRECT ? "direct" : "shared";
}

std::string protos(DWORD p) {
  std::string s;
  if (p & SCARD_PROTOCOL_T0) s += "t0";
  if (p & SCARD_PROTOCOL_T1) s += s.empty() ? "t1" : ",t1";
  if (p & SCARD_PROTOCOL_RAW) s += s.empty() ? "raw" : ",raw";
  return s.empty() ? "none" : s;
}

std::string disp(DWORD d) {
  return d == SCARD_RESET_CARD ? "reset" : d == SCARD_UNPOWER_CARD ? "unpower" : d == SCARD_EJECT_CARD ? "eject" : "leave";
}

// One line; the time since the previous call and since the start as a comment.
void emit(const std::string& line) {
  if (!g_out) return;
  const auto now = Clock::now();
  const double gap = std::chrono::duration<double, std::milli>(now - g_last).count();
  const double at = std::chrono::duration<double, std::milli>(now - g_start).count();
  g_last = now;
  std::fprintf(g_out, "%-60s # t=%.1f gap=%.1f\n", line.c_str(), at, gap);
}

// VERIFY (20), CHANGE REFERENCE DATA (24), RESET RETRY COUNTER (2C) carry secrets.
bool secret_ins(BYTE ins) { return ins == 0x20 || ins == 0x24 || ins == 0x2C; }

std::string apdu_text(LPCBYTE cmd, DWORD len, bool& ok) {
  ok = true;
  if (len < 4 || !secret_ins(cmd[1]) || len <= 5) return hexs(cmd, len);
  // Case 3 short: header, Lc, data. Only a padded PIN is recordable, as a placeholder.
  const std::size_t lc = cmd[4];
  if (cmd[1] == 0x20 && lc == 8 && len == 13) {
    std::size_t digits = 0;
    while (digits < 8 && cmd[5 + digits] >= '0' && cmd[5 + digits] <= '9') ++digits;
    bool ff = digits >= 4, zero = digits >= 4;
    for (std::size_t i = digits; i < 8; ++i) {
      ff = ff && cmd[5 + i] == 0xFF;
      zero = zero && cmd[5 + i] == 0x00;
    }
    if (ff || zero) return hexs(cmd, 5) + (ff ? " {PIN}" : " {PIN00}");
  }
  ok = false;
  return hexs(cmd, 4) + " <secret>";
}

}  // namespace

extern "C" {

// Same values as libpcsclite's: programs pass their addresses as SCARD_PCI_T0/T1/RAW.
#pragma GCC visibility push(default)
const SCARD_IO_REQUEST g_rgSCardT0Pci = {SCARD_PROTOCOL_T0, sizeof(SCARD_IO_REQUEST)};
const SCARD_IO_REQUEST g_rgSCardT1Pci = {SCARD_PROTOCOL_T1, sizeof(SCARD_IO_REQUEST)};
const SCARD_IO_REQUEST g_rgSCardRawPci = {SCARD_PROTOCOL_RAW, sizeof(SCARD_IO_REQUEST)};
#pragma GCC visibility pop

#define CBREC_EXPORT __attribute__((visibility("default")))

CBREC_EXPORT LONG SCardEstablishContext(DWORD scope, LPCVOID r1, LPCVOID r2, LPSCARDCONTEXT ctx) {
  init();
  LONG rv = g_real.EstablishContext(scope, r1, r2, ctx);
  std::lock_guard<std::mutex> l(g_mu);
  std::string name = "c?";
  if (rv == SCARD_S_SUCCESS) {
    const int n = static_cast<int>(g_ctx.size()) + 1;
    g_ctx[*ctx] = n;
    name = "c" + std::to_string(n);
  }
  emit("establish " + name + " -> " + rvs(rv));
  return rv;
}

CBREC_EXPORT LONG SCardReleaseContext(SCARDCONTEXT ctx) {
  init();
  LONG rv = g_real.ReleaseContext(ctx);
  std::lock_guard<std::mutex> l(g_mu);
  emit("release " + ctx_name(ctx) + " -> " + rvs(rv));
  return rv;
}

CBREC_EXPORT LONG SCardIsValidContext(SCARDCONTEXT ctx) {
  init();
  LONG rv = g_real.IsValidContext(ctx);
  std::lock_guard<std::mutex> l(g_mu);
  emit("isvalid " + ctx_name(ctx) + " -> " + rvs(rv));
  return rv;
}

CBREC_EXPORT LONG SCardListReaders(SCARDCONTEXT ctx, LPCSTR groups, LPSTR readers, LPDWORD len) {
  init();
  const bool autoalloc = len && *len == SCARD_AUTOALLOCATE;
  const bool size_only = readers == nullptr && !autoalloc;
  LONG rv = g_real.ListReaders(ctx, groups, readers, len);
  std::lock_guard<std::mutex> l(g_mu);
  if (rv == SCARD_S_SUCCESS && readers && len) {
    const char* p = autoalloc ? *reinterpret_cast<char**>(readers) : readers;
    g_readers.clear();
    for (; p && *p; p += std::strlen(p) + 1) g_readers.emplace_back(p);
  }
  emit("list " + ctx_name(ctx) + (size_only ? " size" : " names") + " -> " + rvs(rv));
  return rv;
}

CBREC_EXPORT LONG SCardListReaderGroups(SCARDCONTEXT ctx, LPSTR groups, LPDWORD len) {
  init();
  LONG rv = g_real.ListReaderGroups(ctx, groups, len);
  std::lock_guard<std::mutex> l(g_mu);
  emit("groups " + ctx_name(ctx) + " -> " + rvs(rv));
  return rv;
}

CBREC_EXPORT LONG SCardFreeMemory(SCARDCONTEXT ctx, LPCVOID mem) {
  init();
  return g_real.FreeMemory(ctx, mem);  // local to libpcsclite: no call to pcscd
}

CBREC_EXPORT LONG SCardGetStatusChange(SCARDCONTEXT ctx, DWORD timeout, SCARD_READERSTATE* states, DWORD n) {
  init();
  std::string line;
  {
    std::lock_guard<std::mutex> l(g_mu);
    char b[32];
    std::snprintf(b, sizeof b, " %ld", timeout == INFINITE ? -1L : static_cast<long>(timeout));
    line = "gsc " + ctx_name(ctx) + b;
    for (DWORD i = 0; i < n; ++i) {
      std::snprintf(b, sizeof b, ":0x%lX", static_cast<unsigned long>(states[i].dwCurrentState));
      line += " " + reader_ref(states[i].szReader) + b;
    }
  }
  LONG rv = g_real.GetStatusChange(ctx, timeout, states, n);
  std::lock_guard<std::mutex> l(g_mu);
  emit(line + " -> " + rvs(rv));
  return rv;
}

CBREC_EXPORT LONG SCardCancel(SCARDCONTEXT ctx) {
  init();
  LONG rv = g_real.Cancel(ctx);
  std::lock_guard<std::mutex> l(g_mu);
  emit("cancel " + ctx_name(ctx) + " -> " + rvs(rv));
  return rv;
}

CBREC_EXPORT LONG SCardConnect(SCARDCONTEXT ctx, LPCSTR reader, DWORD share_mode, DWORD pref, LPSCARDHANDLE h,
                               LPDWORD proto) {
  init();
  LONG rv = g_real.Connect(ctx, reader, share_mode, pref, h, proto);
  std::lock_guard<std::mutex> l(g_mu);
  std::string name;
  if (rv == SCARD_S_SUCCESS) {
    const int k = static_cast<int>(g_handles.size()) + 1;
    g_handles[*h] = k;
    name = " h" + std::to_string(k);
  }
  emit("connect " + ctx_name(ctx) + " " + reader_ref(reader) + " " + share(share_mode) + " " + protos(pref) + " -> " +
       rvs(rv) + name);
  return rv;
}

CBREC_EXPORT LONG SCardReconnect(SCARDHANDLE h, DWORD share_mode, DWORD pref, DWORD init_disp, LPDWORD proto) {
  init();
  LONG rv = g_real.Reconnect(h, share_mode, pref, init_disp, proto);
  std::lock_guard<std::mutex> l(g_mu);
  emit("reconnect " + handle_name(h) + " " + share(share_mode) + " " + protos(pref) + " " + disp(init_disp) + " -> " +
       rvs(rv));
  return rv;
}

CBREC_EXPORT LONG SCardDisconnect(SCARDHANDLE h, DWORD d) {
  init();
  LONG rv = g_real.Disconnect(h, d);
  std::lock_guard<std::mutex> l(g_mu);
  emit("disconnect " + handle_name(h) + " " + disp(d) + " -> " + rvs(rv));
  return rv;
}

CBREC_EXPORT LONG SCardBeginTransaction(SCARDHANDLE h) {
  init();
  LONG rv = g_real.BeginTransaction(h);
  std::lock_guard<std::mutex> l(g_mu);
  emit("begin " + handle_name(h) + " -> " + rvs(rv));
  return rv;
}

CBREC_EXPORT LONG SCardEndTransaction(SCARDHANDLE h, DWORD d) {
  init();
  LONG rv = g_real.EndTransaction(h, d);
  std::lock_guard<std::mutex> l(g_mu);
  emit("end " + handle_name(h) + " " + disp(d) + " -> " + rvs(rv));
  return rv;
}

CBREC_EXPORT LONG SCardStatus(SCARDHANDLE h, LPSTR name, LPDWORD name_len, LPDWORD state, LPDWORD proto, LPBYTE atr,
                              LPDWORD atr_len) {
  init();
  LONG rv = g_real.Status(h, name, name_len, state, proto, atr, atr_len);
  std::lock_guard<std::mutex> l(g_mu);
  emit("status " + handle_name(h) + " -> " + rvs(rv));
  return rv;
}

CBREC_EXPORT LONG SCardControl(SCARDHANDLE h, DWORD code, LPCVOID in, DWORD in_len, LPVOID out, DWORD out_len,
                               LPDWORD ret) {
  init();
  LONG rv = g_real.Control(h, code, in, in_len, out, out_len, ret);
  std::lock_guard<std::mutex> l(g_mu);
  char b[16];
  std::snprintf(b, sizeof b, "0x%08lX", static_cast<unsigned long>(code));
  // Control data may be a PIN-pad buffer: recorded only when empty (feature queries).
  emit("control " + handle_name(h) + " " + b + (in_len ? " <" + std::to_string(in_len) + " bytes not recorded>" : "") +
       " -> " + rvs(rv));
  return rv;
}

CBREC_EXPORT LONG SCardGetAttrib(SCARDHANDLE h, DWORD attr, LPBYTE buf, LPDWORD len) {
  init();
  const bool size_only = buf == nullptr;
  LONG rv = g_real.GetAttrib(h, attr, buf, len);
  std::lock_guard<std::mutex> l(g_mu);
  char b[16];
  std::snprintf(b, sizeof b, "0x%08lX", static_cast<unsigned long>(attr));
  emit("getattrib " + handle_name(h) + " " + b + (size_only ? " size" : "") + " -> " + rvs(rv));
  return rv;
}

CBREC_EXPORT LONG SCardSetAttrib(SCARDHANDLE h, DWORD attr, LPCBYTE buf, DWORD len) {
  init();
  LONG rv = g_real.SetAttrib(h, attr, buf, len);
  std::lock_guard<std::mutex> l(g_mu);
  char b[16];
  std::snprintf(b, sizeof b, "0x%08lX", static_cast<unsigned long>(attr));
  emit("setattrib " + handle_name(h) + " " + b + " " + hexs(buf, len) + " -> " + rvs(rv));
  return rv;
}

CBREC_EXPORT LONG SCardTransmit(SCARDHANDLE h, const SCARD_IO_REQUEST* send_pci, LPCBYTE cmd, DWORD cmd_len,
                                SCARD_IO_REQUEST* recv_pci, LPBYTE resp, LPDWORD resp_len) {
  init();
  LONG rv = g_real.Transmit(h, send_pci, cmd, cmd_len, recv_pci, resp, resp_len);
  std::lock_guard<std::mutex> l(g_mu);
  bool ok = true;
  std::string text = apdu_text(cmd, cmd_len, ok);
  if (!ok) emit("# UNRECORDABLE: a secret other than a padded PIN was sent (trace unusable)");
  const uint16_t prev = g_last_sw[h];
  std::string line;
  if (cmd_len == 5 && cmd[1] == 0xC0 && cmd[2] == 0 && cmd[3] == 0 && (prev >> 8) == 0x61 && cmd[4] == (prev & 0xFF)) {
    line = "getresponse " + handle_name(h);  // the Le the previous 61xx announced
  } else {
    line = "apdu " + handle_name(h) + " " + text;
  }
  if (rv == SCARD_S_SUCCESS && resp_len && *resp_len >= 2) {
    const uint16_t sw = static_cast<uint16_t>((resp[*resp_len - 2] << 8) | resp[*resp_len - 1]);
    g_last_sw[h] = sw;
    char b[16];
    std::snprintf(b, sizeof b, "%04X", sw);
    // A PIN status query (VERIFY without data) answers 63Cx or 9000 depending on whether the
    // PIN was verified before: a replay starts from whatever the previous run left.
    const bool pin_status = cmd_len >= 4 && cmd[1] == 0x20 && (cmd_len == 4 || (cmd_len == 5 && cmd[4] == 0));
    if (pin_status && ((sw & 0xFFF0) == 0x63C0 || sw == 0x9000)) std::snprintf(b, sizeof b, "63C?|9000");
    emit(line + " -> " + b);
  } else {
    emit(line + " => " + rvs(rv));
  }
  return rv;
}

CBREC_EXPORT const char* pcsc_stringify_error(LONG rv) {
  init();
  return g_real.StringifyError(rv);
}

}  // extern "C"
