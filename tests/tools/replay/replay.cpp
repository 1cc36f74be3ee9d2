// cb-replay: replays a PC/SC call trace (tests/bench/traces/*.trace) through the system
// libpcsclite against whatever PCSCLITE_CSOCK_NAME points at (a desk's pcscd, a
// CardBridge shim, a pcscd with a relayed card), checks every result and status word,
// and reports the wall time and, when the redirector has a control socket (--control),
// the desk round trips the trace cost (shim status stats.round_trips before/after).
//
// The trace format is documented at the top of every .trace file and in README.md next
// to this file. Output: one line per run and a summary, or one JSON object (--json).
// Exit status: 0 when every call behaved as the trace expects, 1 otherwise, 2 on usage.
#include <PCSC/winscard.h>
#include <PCSC/wintypes.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;
using Bytes = std::vector<uint8_t>;

namespace {

enum class Op {
  kEstablish, kList, kWait, kConnect, kReconnect, kStatus, kBegin, kEnd, kApdu, kGetResponse,
  kReadFile, kDisconnect, kRelease, kSleep, kMark,
  // recorded traces (cb-record): calls of real middleware
  kGsc, kIsValid, kGroups, kCancel, kControl, kGetAttrib
};

enum class ListMode { kBoth, kSize, kNames };

struct Step {
  Op op = Op::kMark;
  int line = 0;
  std::string source;                 // the trace line, for messages
  std::string hex;                    // kApdu: command template ({PIN}, {PIN00}, {SW2})
  std::vector<std::string> expect;    // SW patterns (4 hex digits, '?' = any nibble)
  uint32_t number = 0;                // wait/sleep ms, readfile chunk, share mode, control code, attribute
  uint32_t protocols = 0;             // connect/reconnect
  uint32_t disposition = SCARD_LEAVE_CARD;
  std::string label;                  // kMark
  // Recorded traces name contexts (c1 ...), card handles (h1 ...) and readers (r0 = the first
  // listed, pnp = the PnP notification reader); hand-written traces use one of each.
  std::string ctx = "c1";
  std::string handle = "h1";
  std::string new_handle = "h1";      // kConnect: the name bound on success
  std::string reader;                 // kConnect: "" = the --reader one
  std::vector<std::pair<std::string, uint32_t>> states;  // kGsc: reader, current state
  int64_t timeout_ms = 0;             // kGsc (-1 = INFINITE)
  ListMode list = ListMode::kBoth;
  bool size_only = false;             // kGetAttrib
  std::optional<uint32_t> rv;         // "-> 0x...": the return code the call must give
};

struct Call {  // one PC/SC call as executed (for --breakdown)
  int line = 0;
  std::string label;
  std::string what;
  double ms = 0;
  std::optional<int64_t> round_trips;
};

std::string hex(const BYTE* p, std::size_t n) {
  static const char* d = "0123456789ABCDEF";
  std::string s;
  for (std::size_t i = 0; i < n; ++i) {
    s += d[p[i] >> 4];
    s += d[p[i] & 15];
  }
  return s;
}

std::optional<Bytes> unhex(const std::string& t) {
  Bytes out;
  int hi = -1;
  for (char c : t) {
    if (c == ' ' || c == ':') continue;
    int v = (c >= '0' && c <= '9') ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : -1;
    if (v < 0) return std::nullopt;
    if (hi < 0) {
      hi = v;
    } else {
      out.push_back(static_cast<uint8_t>(hi * 16 + v));
      hi = -1;
    }
  }
  if (hi >= 0) return std::nullopt;
  return out;
}

std::string rv_text(LONG rv) {
  char b[64];
  std::snprintf(b, sizeof b, "0x%08lX (%s)", static_cast<unsigned long>(rv), pcsc_stringify_error(rv));
  return b;
}

bool sw_matches(const std::string& pattern, uint16_t sw) {
  char actual[5];
  std::snprintf(actual, sizeof actual, "%04X", sw);
  if (pattern.size() != 4) return false;
  for (std::size_t i = 0; i < 4; ++i) {
    const char p = static_cast<char>(std::toupper(static_cast<unsigned char>(pattern[i])));
    if (p != '?' && p != actual[i]) return false;
  }
  return true;
}

std::string ins_name(uint8_t ins) {
  switch (ins) {
    case 0xA4: return "SELECT";
    case 0xB0: return "READ BINARY";
    case 0xC0: return "GET RESPONSE";
    case 0xCA: case 0xCB: return "GET DATA";
    case 0x20: return "VERIFY";
    case 0x22: return "MSE";
    case 0x88: return "INTERNAL AUTHENTICATE";
    case 0x2A: return "PSO";
    case 0x84: return "GET CHALLENGE";
    default: return "INS " + hex(&ins, 1);
  }
}

// File size (tag 80, else 81) in an FCP (62) or FCI (6F, possibly with a nested 62).
std::optional<uint32_t> fcp_size(const Bytes& d) {
  if (d.size() < 2 || (d[0] != 0x62 && d[0] != 0x6F)) return std::nullopt;
  std::optional<uint32_t> s80, s81;
  auto walk = [&](auto&& self, std::size_t pos, std::size_t end) -> void {
    while (pos + 2 <= end) {
      const uint8_t tag = d[pos];
      std::size_t len = d[pos + 1], hdr = 2;
      if (len == 0x81 && pos + 3 <= end) {
        len = d[pos + 2];
        hdr = 3;
      } else if (len == 0x82 && pos + 4 <= end) {
        len = (std::size_t{d[pos + 2]} << 8) | d[pos + 3];
        hdr = 4;
      }
      if (pos + hdr + len > end) return;
      if ((tag == 0x80 || tag == 0x81) && len >= 1 && len <= 4) {
        uint32_t v = 0;
        for (std::size_t i = 0; i < len; ++i) v = (v << 8) | d[pos + hdr + i];
        (tag == 0x80 ? s80 : s81) = v;
      } else if (tag == 0x62) {
        self(self, pos + hdr, pos + hdr + len);
      }
      pos += hdr + len;
    }
  };
  std::size_t len = d[1], hdr = 2;
  if (len == 0x81 && d.size() >= 3) {
    len = d[2];
    hdr = 3;
  } else if (len == 0x82 && d.size() >= 4) {
    len = (std::size_t{d[2]} << 8) | d[3];
    hdr = 4;
  }
  walk(walk, hdr, std::min(d.size(), hdr + len));
  return s80 ? s80 : s81;
}

std::vector<std::string> split_ws(const std::string& s) {
  std::istringstream in(s);
  std::vector<std::string> out;
  std::string w;
  while (in >> w) out.push_back(w);
  return out;
}

uint32_t parse_protocols(const std::string& s) {
  uint32_t p = 0;
  std::string t = s;
  std::transform(t.begin(), t.end(), t.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  if (t.find("t0") != std::string::npos) p |= SCARD_PROTOCOL_T0;
  if (t.find("t1") != std::string::npos) p |= SCARD_PROTOCOL_T1;
  if (t.find("raw") != std::string::npos) p |= SCARD_PROTOCOL_RAW;
  return p;
}

std::optional<uint32_t> parse_disposition(const std::string& s) {
  if (s == "leave") return SCARD_LEAVE_CARD;
  if (s == "reset") return SCARD_RESET_CARD;
  if (s == "unpower") return SCARD_UNPOWER_CARD;
  if (s == "eject") return SCARD_EJECT_CARD;
  return std::nullopt;
}

bool is_name(const std::string& t, char kind) {
  return t.size() >= 2 && t[0] == kind && std::all_of(t.begin() + 1, t.end(), [](char c) { return c >= '0' && c <= '9'; });
}

std::string parse_trace(const std::string& path, std::vector<Step>& steps) {
  std::ifstream in(path);
  if (!in) return "cannot open " + path;
  std::string raw;
  int n = 0;
  std::string label;
  while (std::getline(in, raw)) {
    ++n;
    // '#' starts a comment at the start of a line or after a blank ("PKCS#15" stays).
    std::string line = raw;
    for (std::size_t i = 0; i < raw.size(); ++i) {
      if (raw[i] == '#' && (i == 0 || raw[i - 1] == ' ' || raw[i - 1] == '\t')) {
        line = raw.substr(0, i);
        break;
      }
    }
    auto words = split_ws(line);
    if (words.empty()) continue;
    Step s;
    s.line = n;
    s.source = raw;
    auto bad = [&](const std::string& why) { return path + ":" + std::to_string(n) + ": " + why + ": " + raw; };
    // "... -> SW[|SW...]", "... -> 0xRV [hN]" (a call's return code, the handle it makes),
    // "apdu ... => 0xRV" (a transmit that fails)
    auto arrow = std::find_if(words.begin(), words.end(), [](const std::string& w) { return w == "->" || w == "=>"; });
    std::vector<std::string> args(words.begin() + 1, arrow);
    if (arrow != words.end()) {
      const bool failing = *arrow == "=>";
      for (auto it = arrow + 1; it != words.end(); ++it) {
        const std::string& t = *it;
        if (t.size() > 2 && t[0] == '0' && (t[1] == 'x' || t[1] == 'X')) {
          try {
            s.rv = static_cast<uint32_t>(std::stoul(t, nullptr, 16));
          } catch (...) {
            return bad("bad return code '" + t + "'");
          }
          continue;
        }
        if (is_name(t, 'h')) {
          s.new_handle = t;
          continue;
        }
        if (failing) return bad("'=> 0xRV' expected");
        std::size_t start = 0;
        while (start <= t.size()) {
          auto bar = t.find('|', start);
          auto one = t.substr(start, bar == std::string::npos ? std::string::npos : bar - start);
          if (one.size() != 4) return bad("bad status word pattern '" + one + "'");
          s.expect.push_back(one);
          if (bar == std::string::npos) break;
          start = bar + 1;
        }
      }
    }
    const std::string& w = words[0];
    // Optional leading context / handle name.
    auto take = [&](char kind, std::string& into) {
      if (!args.empty() && is_name(args[0], kind)) {
        into = args[0];
        args.erase(args.begin());
      }
    };
    auto need = [&](std::size_t k) { return args.size() == k; };
    auto number = [&](const std::string& t, uint32_t& out) {
      try {
        out = static_cast<uint32_t>(std::stoul(t, nullptr, 0));
        return true;
      } catch (...) {
        return false;
      }
    };
    auto share = [](const std::string& t) -> uint32_t {
      return t == "shared" ? SCARD_SHARE_SHARED : t == "exclusive" ? SCARD_SHARE_EXCLUSIVE
             : t == "direct" ? SCARD_SHARE_DIRECT : 0;
    };
    if (w == "establish") {
      take('c', s.ctx);
      if (!need(0)) return bad("establish [cN]");
      s.op = Op::kEstablish;
    } else if (w == "release" || w == "isvalid" || w == "groups" || w == "cancel") {
      take('c', s.ctx);
      if (!need(0)) return bad(w + " [cN]");
      s.op = w == "release" ? Op::kRelease : w == "isvalid" ? Op::kIsValid : w == "groups" ? Op::kGroups : Op::kCancel;
    } else if (w == "list") {
      take('c', s.ctx);
      s.op = Op::kList;
      if (need(1) && args[0] == "size") {
        s.list = ListMode::kSize;
      } else if (need(1) && args[0] == "names") {
        s.list = ListMode::kNames;
      } else if (!need(0)) {
        return bad("list [cN] [size|names]");
      }
    } else if (w == "wait" && need(1)) {
      s.op = Op::kWait;
      if (!number(args[0], s.number)) return bad("timeout in ms expected");
    } else if (w == "gsc") {
      take('c', s.ctx);
      if (args.empty()) return bad("gsc [cN] MS READER:STATE...");
      try {
        s.timeout_ms = std::stoll(args[0]);
      } catch (...) {
        return bad("timeout in ms expected (-1 = INFINITE)");
      }
      for (std::size_t i = 1; i < args.size(); ++i) {
        auto colon = args[i].find(':');
        uint32_t st = 0;
        if (colon == std::string::npos || !number(args[i].substr(colon + 1), st)) return bad("READER:STATE expected");
        s.states.emplace_back(args[i].substr(0, colon), st);
      }
      s.op = Op::kGsc;
    } else if (w == "connect") {
      take('c', s.ctx);
      if (!args.empty() && (args[0] == "pnp" || is_name(args[0], 'r'))) {
        s.reader = args[0];
        args.erase(args.begin());
      }
      if (args.size() != 2 || (s.number = share(args[0])) == 0) return bad("connect [cN] [rK] SHARE PROTOS");
      s.protocols = parse_protocols(args[1]);
      s.op = Op::kConnect;
    } else if (w == "reconnect") {
      take('h', s.handle);
      if (args.size() < 2 || args.size() > 3 || (s.number = share(args[0])) == 0)
        return bad("reconnect [hN] SHARE PROTOS [DISP]");
      s.protocols = parse_protocols(args[1]);
      auto d = args.size() == 3 ? parse_disposition(args[2]) : std::optional<uint32_t>(SCARD_LEAVE_CARD);
      if (!d) return bad("disposition: leave, reset, unpower or eject");
      s.disposition = *d;
      s.op = Op::kReconnect;
    } else if (w == "status" || w == "begin") {
      take('h', s.handle);
      if (!need(0)) return bad(w + " [hN]");
      s.op = w == "status" ? Op::kStatus : Op::kBegin;
    } else if (w == "end" || w == "disconnect") {
      take('h', s.handle);
      if (args.size() > 1) return bad(w + " [hN] [DISP]");
      s.op = w == "end" ? Op::kEnd : Op::kDisconnect;
      auto d = args.empty() ? std::optional<uint32_t>(SCARD_LEAVE_CARD) : parse_disposition(args[0]);
      if (!d) return bad("disposition: leave, reset, unpower or eject");
      s.disposition = *d;
    } else if (w == "control") {
      take('h', s.handle);
      // A recorded control with input data says "<N bytes not recorded>": sent without it.
      if (args.empty() || !number(args[0], s.number)) return bad("control [hN] CODE");
      s.op = Op::kControl;
    } else if (w == "getattrib") {
      take('h', s.handle);
      if (args.empty() || args.size() > 2 || !number(args[0], s.number)) return bad("getattrib [hN] ATTR [size]");
      s.size_only = args.size() == 2 && args[1] == "size";
      s.op = Op::kGetAttrib;
    } else if (w == "apdu") {
      take('h', s.handle);
      if (args.empty()) return bad("apdu [hN] HEX -> SW");
      s.op = Op::kApdu;
      for (const auto& a : args) s.hex += a;
      if (s.expect.empty() && !s.rv) return bad("expected status words missing ('-> 9000')");
    } else if (w == "getresponse") {
      take('h', s.handle);
      if (!need(0)) return bad("getresponse [hN] -> SW");
      s.op = Op::kGetResponse;
      if (s.expect.empty() && !s.rv) return bad("expected status words missing");
    } else if (w == "readfile" && need(1)) {
      s.op = Op::kReadFile;
      if (!number(args[0], s.number) || s.number == 0 || s.number > 256) return bad("chunk size 1..256 expected");
      if (s.expect.empty()) s.expect = {"9000"};
    } else if (w == "sleep" && need(1)) {
      s.op = Op::kSleep;
      if (!number(args[0], s.number)) return bad("ms expected");
    } else if (w == "mark" && !args.empty()) {
      s.op = Op::kMark;
      for (const auto& a : args) s.label += (s.label.empty() ? "" : " ") + a;
    } else {
      return bad("unknown step or wrong arguments");
    }
    steps.push_back(std::move(s));
  }
  return {};
}

// The shim's control socket: {"cmd":"status"} -> JSON.
std::optional<json> control_status(const std::string& path) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return std::nullopt;
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  std::snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path.c_str());
  if (::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0) {
    ::close(fd);
    return std::nullopt;
  }
  const char req[] = "{\"cmd\":\"status\"}\n";
  if (::send(fd, req, sizeof req - 1, MSG_NOSIGNAL) != static_cast<ssize_t>(sizeof req - 1)) {
    ::close(fd);
    return std::nullopt;
  }
  std::string text;
  char buf[4096];
  for (;;) {
    ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) break;
    text.append(buf, static_cast<std::size_t>(n));
  }
  ::close(fd);
  auto j = json::parse(text, nullptr, false);
  if (j.is_discarded()) return std::nullopt;
  return j;
}

std::optional<int64_t> round_trips(const std::string& control) {
  if (control.empty()) return std::nullopt;
  auto j = control_status(control);
  if (!j || !j->contains("stats")) return std::nullopt;
  return (*j)["stats"].value("round_trips", int64_t{-1});
}

class Runner {
 public:
  Runner(const std::vector<Step>& steps, std::string reader, std::string pin, std::string control, bool breakdown)
      : steps_(steps), reader_filter_(std::move(reader)), pin_(std::move(pin)), control_(std::move(control)),
        breakdown_(breakdown) {}

  // Runs the trace once; on failure returns the reason.
  std::optional<std::string> run(double& wall_ms) {
    digest_ = 0xCBF29CE484222325ull;  // FNV-1a 64
    calls_.clear();
    pcsc_calls_ = 0;
    apdus_ = 0;
    label_.clear();
    double sum_ms = 0;
    auto t0 = Clock::now();
    for (const auto& s : steps_) {
      if (auto err = step(s, sum_ms)) {
        cleanup();
        return "line " + std::to_string(s.line) + " (" + s.source + "): " + *err;
      }
    }
    wall_ms = breakdown_ ? sum_ms : std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    cleanup();
    return std::nullopt;
  }

  const std::vector<Call>& calls() const { return calls_; }
  int pcsc_calls() const { return pcsc_calls_; }
  int apdus() const { return apdus_; }
  const std::string& reader() const { return reader_; }
  std::string digest() const {
    char b[20];
    std::snprintf(b, sizeof b, "%016llx", static_cast<unsigned long long>(digest_));
    return b;
  }

 private:
  struct Card {
    SCARDHANDLE handle = 0;
    DWORD protocol = 0;
    uint16_t last_sw = 0;
  };

  // Times one PC/SC call and, with --breakdown, attributes the round trips it cost.
  template <typename F>
  LONG timed(const std::string& what, int line, double& sum_ms, F&& f) {
    std::optional<int64_t> before;
    if (breakdown_) before = round_trips(control_);
    auto t0 = Clock::now();
    LONG rv = f();
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    sum_ms += ms;
    ++pcsc_calls_;
    if (breakdown_) {
      Call c{line, label_, what, ms, std::nullopt};
      if (auto after = round_trips(control_); after && before) c.round_trips = *after - *before;
      calls_.push_back(std::move(c));
    }
    return rv;
  }

  // The call's return code against the trace's (default: success).
  static std::optional<std::string> check(const char* call, LONG rv, const Step& s) {
    const uint32_t want = s.rv.value_or(SCARD_S_SUCCESS);
    if (static_cast<uint32_t>(rv) == want) return std::nullopt;
    char b[16];
    std::snprintf(b, sizeof b, "0x%08X", want);
    return std::string(call) + ": " + rv_text(rv) + ", expected " + b;
  }

  std::optional<std::string> context(const Step& s, SCARDCONTEXT& out) {
    auto it = ctxs_.find(s.ctx);
    if (it == ctxs_.end()) return "no context " + s.ctx;
    out = it->second;
    return std::nullopt;
  }

  std::optional<std::string> card(const Step& s, Card*& out) {
    auto it = cards_.find(s.handle);
    if (it == cards_.end()) return "no card handle " + s.handle;
    out = &it->second;
    return std::nullopt;
  }

  std::optional<std::string> reader_for(const std::string& ref, std::string& out) {
    if (ref.empty()) {
      out = reader_;
    } else if (ref == "pnp") {
      out = "\\\\?PnP?\\Notification";
    } else {
      const std::size_t k = std::stoul(ref.substr(1));
      if (k >= readers_.size()) return "reader " + ref + ": only " + std::to_string(readers_.size()) + " listed";
      out = readers_[k];
    }
    return std::nullopt;
  }

  std::optional<std::string> transmit(Card& c, const Bytes& cmd, const Step& s, double& sum_ms, Bytes* data_out) {
    BYTE resp[MAX_BUFFER_SIZE_EXTENDED];
    DWORD len = sizeof resp;
    const SCARD_IO_REQUEST* pci = c.protocol == SCARD_PROTOCOL_T1 ? SCARD_PCI_T1 : c.protocol == SCARD_PROTOCOL_T0 ? SCARD_PCI_T0 : SCARD_PCI_RAW;
    std::string what = "SCardTransmit " + ins_name(cmd.size() > 1 ? cmd[1] : 0) + " " + hex(cmd.data(), std::min<std::size_t>(cmd.size(), 5));
    LONG rv = timed(what, s.line, sum_ms, [&] { return SCardTransmit(c.handle, pci, cmd.data(), static_cast<DWORD>(cmd.size()), nullptr, resp, &len); });
    ++apdus_;
    if (s.rv) return check("SCardTransmit", rv, s);  // a transmit the trace expects to fail
    if (rv != SCARD_S_SUCCESS) return "SCardTransmit: " + rv_text(rv);
    if (len < 2) return "response shorter than a status word";
    const uint16_t sw = static_cast<uint16_t>((resp[len - 2] << 8) | resp[len - 1]);
    c.last_sw = sw;
    bool ok = false;
    for (const auto& p : s.expect) ok = ok || sw_matches(p, sw);
    if (!ok) {
      char b[64];
      std::snprintf(b, sizeof b, "status word %04X, expected ", sw);
      std::string msg = b;
      for (std::size_t i = 0; i < s.expect.size(); ++i) msg += (i ? "|" : "") + s.expect[i];
      return msg;
    }
    if (s.expect.size() <= 1) {
      // Answers that do not depend on the card's earlier state (a PIN status may): their
      // digest compares a redirector's answers with the desk's. Signatures (PSO, INTERNAL
      // AUTHENTICATE, and the GET RESPONSE after them) and GET CHALLENGE count by their status
      // word only: RSA-PSS and challenges are random.
      const uint8_t ins = cmd.size() > 1 ? cmd[1] : 0;
      if (ins == 0x2A || ins == 0x88) signature_pending_ = true;
      const bool signature = ins == 0x84 || (signature_pending_ && (ins == 0x2A || ins == 0x88 || ins == 0xC0));
      if (ins != 0x2A && ins != 0x88 && ins != 0xC0) signature_pending_ = false;
      for (DWORD i = signature ? len - 2 : 0; i < len; ++i) digest_ = (digest_ ^ resp[i]) * 0x100000001B3ull;
    }
    if (dump_) std::fprintf(stderr, "%d %s -> %s\n", s.line, hex(cmd.data(), cmd.size()).c_str(), hex(resp, len).c_str());
    Bytes data(resp, resp + len - 2);
    // Remember a file size announced by a SELECT (or the GET RESPONSE that follows one).
    const uint8_t ins = cmd.size() > 1 ? cmd[1] : 0;
    if (ins == 0xA4) {
      file_size_.reset();
      after_select_ = true;
      if (auto sz = fcp_size(data)) file_size_ = sz;
    } else if (ins == 0xC0 && after_select_) {
      if (auto sz = fcp_size(data)) file_size_ = sz;
      after_select_ = false;
    } else {
      after_select_ = false;
    }
    if (data_out) *data_out = std::move(data);
    return std::nullopt;
  }

  std::optional<std::string> expand(const std::string& tmpl, uint16_t last_sw, Bytes& out) {
    std::string t = tmpl;
    auto replace = [&](const std::string& key, const std::string& value) {
      for (auto p = t.find(key); p != std::string::npos; p = t.find(key)) t.replace(p, key.size(), value);
    };
    auto pin_hex = [&](uint8_t pad) {
      Bytes b(pin_.begin(), pin_.end());
      b.resize(8, pad);
      return hex(b.data(), b.size());
    };
    replace("{PIN}", pin_hex(0xFF));
    replace("{PIN00}", pin_hex(0x00));
    const uint8_t sw2 = static_cast<uint8_t>(last_sw & 0xFF);
    replace("{SW2}", hex(&sw2, 1));
    auto b = unhex(t);
    if (!b) return "bad hex in APDU";
    out = std::move(*b);
    return std::nullopt;
  }

  std::optional<std::string> step(const Step& s, double& sum_ms) {
    SCARDCONTEXT ctx = 0;
    Card* c = nullptr;
    switch (s.op) {
      case Op::kMark:
        label_ = s.label;
        return std::nullopt;
      case Op::kSleep:
        std::this_thread::sleep_for(std::chrono::milliseconds(s.number));
        return std::nullopt;
      case Op::kEstablish: {
        SCARDCONTEXT h = 0;
        LONG rv = timed("SCardEstablishContext", s.line, sum_ms, [&] { return SCardEstablishContext(SCARD_SCOPE_SYSTEM, nullptr, nullptr, &h); });
        if (rv == SCARD_S_SUCCESS) ctxs_[s.ctx] = h;
        return check("SCardEstablishContext", rv, s);
      }
      case Op::kRelease: {
        if (auto e = context(s, ctx)) return e;
        LONG rv = timed("SCardReleaseContext", s.line, sum_ms, [&] { return SCardReleaseContext(ctx); });
        ctxs_.erase(s.ctx);
        return check("SCardReleaseContext", rv, s);
      }
      case Op::kIsValid: {
        if (auto e = context(s, ctx)) return e;
        return check("SCardIsValidContext", timed("SCardIsValidContext", s.line, sum_ms, [&] { return SCardIsValidContext(ctx); }), s);
      }
      case Op::kGroups: {
        if (auto e = context(s, ctx)) return e;
        char buf[256];
        DWORD len = sizeof buf;
        return check("SCardListReaderGroups", timed("SCardListReaderGroups", s.line, sum_ms, [&] { return SCardListReaderGroups(ctx, buf, &len); }), s);
      }
      case Op::kCancel: {
        if (auto e = context(s, ctx)) return e;
        return check("SCardCancel", timed("SCardCancel", s.line, sum_ms, [&] { return SCardCancel(ctx); }), s);
      }
      case Op::kList: {
        if (auto e = context(s, ctx)) return e;
        // Hand-written traces: the size, then the list (OpenSC's pcsc_detect_readers).
        DWORD len = 0;
        if (s.list != ListMode::kNames) {
          LONG rv = timed("SCardListReaders (size)", s.line, sum_ms, [&] { return SCardListReaders(ctx, nullptr, nullptr, &len); });
          if (auto e = check("SCardListReaders", rv, s)) return e;
          if (s.list == ListMode::kSize) return std::nullopt;
        }
        std::string buf(s.list == ListMode::kNames ? 65536 : len, '\0');
        len = static_cast<DWORD>(buf.size());
        LONG rv = timed("SCardListReaders", s.line, sum_ms, [&] { return SCardListReaders(ctx, nullptr, buf.data(), &len); });
        if (auto e = check("SCardListReaders", rv, s)) return e;
        reader_.clear();
        readers_.clear();
        std::string all;
        for (const char* p = buf.c_str(); rv == SCARD_S_SUCCESS && *p; p += std::strlen(p) + 1) {
          readers_.emplace_back(p);
          all += std::string(all.empty() ? "" : ", ") + p;
          if (reader_.empty() && std::string(p).find(reader_filter_) != std::string::npos) reader_ = p;
        }
        if (reader_.empty() && rv == SCARD_S_SUCCESS) return "no reader matches '" + reader_filter_ + "' (readers: " + all + ")";
        return std::nullopt;
      }
      case Op::kWait: {
        if (auto e = context(s, ctx)) return e;
        SCARD_READERSTATE rs{};
        rs.szReader = reader_.c_str();
        rs.dwCurrentState = SCARD_STATE_UNAWARE;
        LONG rv = timed("SCardGetStatusChange", s.line, sum_ms, [&] { return SCardGetStatusChange(ctx, s.number, &rs, 1); });
        if (rv != SCARD_S_SUCCESS && rv != static_cast<LONG>(SCARD_E_TIMEOUT)) return "SCardGetStatusChange: " + rv_text(rv);
        if (!(rs.dwEventState & SCARD_STATE_PRESENT)) return "no card in the reader";
        return std::nullopt;
      }
      case Op::kGsc: {
        // A recorded status-change call: the same readers and current states (without the
        // recording's event counters, which another pcscd does not share). The answer may
        // come sooner: success or timeout are both accepted.
        if (auto e = context(s, ctx)) return e;
        std::vector<std::string> names(s.states.size());
        std::vector<SCARD_READERSTATE> rs(s.states.size());
        for (std::size_t i = 0; i < s.states.size(); ++i) {
          if (auto e = reader_for(s.states[i].first, names[i])) return e;
          rs[i].szReader = names[i].c_str();
          rs[i].dwCurrentState = s.states[i].second & 0xFFFF;
        }
        const DWORD timeout = s.timeout_ms < 0 ? INFINITE : static_cast<DWORD>(s.timeout_ms);
        LONG rv = timed("SCardGetStatusChange", s.line, sum_ms, [&] { return SCardGetStatusChange(ctx, timeout, rs.data(), static_cast<DWORD>(rs.size())); });
        if (rv == SCARD_S_SUCCESS || rv == static_cast<LONG>(SCARD_E_TIMEOUT)) return std::nullopt;
        return check("SCardGetStatusChange", rv, s);
      }
      case Op::kConnect: {
        if (auto e = context(s, ctx)) return e;
        std::string name;
        if (auto e = reader_for(s.reader, name)) return e;
        Card nc;
        LONG rv = timed("SCardConnect", s.line, sum_ms, [&] { return SCardConnect(ctx, name.c_str(), s.number, s.protocols, &nc.handle, &nc.protocol); });
        if (rv == SCARD_S_SUCCESS) cards_[s.new_handle] = nc;
        return check("SCardConnect", rv, s);
      }
      case Op::kReconnect: {
        if (auto e = card(s, c)) return e;
        return check("SCardReconnect", timed("SCardReconnect", s.line, sum_ms, [&] { return SCardReconnect(c->handle, s.number, s.protocols, s.disposition, &c->protocol); }), s);
      }
      case Op::kStatus: {
        if (auto e = card(s, c)) return e;
        char name[MAX_READERNAME];
        DWORD name_len = sizeof name, state = 0, proto = 0;
        BYTE atr[MAX_ATR_SIZE];
        DWORD atr_len = sizeof atr;
        return check("SCardStatus", timed("SCardStatus", s.line, sum_ms, [&] { return SCardStatus(c->handle, name, &name_len, &state, &proto, atr, &atr_len); }), s);
      }
      case Op::kBegin: {
        if (auto e = card(s, c)) return e;
        return check("SCardBeginTransaction", timed("SCardBeginTransaction", s.line, sum_ms, [&] { return SCardBeginTransaction(c->handle); }), s);
      }
      case Op::kEnd: {
        if (auto e = card(s, c)) return e;
        return check("SCardEndTransaction", timed("SCardEndTransaction", s.line, sum_ms, [&] { return SCardEndTransaction(c->handle, s.disposition); }), s);
      }
      case Op::kControl: {
        if (auto e = card(s, c)) return e;
        BYTE out[1024];
        DWORD got = 0;
        return check("SCardControl", timed("SCardControl", s.line, sum_ms, [&] { return SCardControl(c->handle, s.number, nullptr, 0, out, sizeof out, &got); }), s);
      }
      case Op::kGetAttrib: {
        if (auto e = card(s, c)) return e;
        BYTE buf[1024];
        DWORD len = sizeof buf;
        return check("SCardGetAttrib", timed("SCardGetAttrib", s.line, sum_ms, [&] { return SCardGetAttrib(c->handle, s.number, s.size_only ? nullptr : buf, &len); }), s);
      }
      case Op::kApdu: {
        if (auto e = card(s, c)) return e;
        Bytes cmd;
        if (auto e = expand(s.hex, c->last_sw, cmd)) return e;
        return transmit(*c, cmd, s, sum_ms, nullptr);
      }
      case Op::kGetResponse: {
        if (auto e = card(s, c)) return e;
        if ((c->last_sw >> 8) != 0x61) return "getresponse without a preceding 61xx";
        Bytes cmd = {0x00, 0xC0, 0x00, 0x00, static_cast<uint8_t>(c->last_sw & 0xFF)};
        return transmit(*c, cmd, s, sum_ms, nullptr);
      }
      case Op::kReadFile: {
        if (auto e = card(s, c)) return e;
        // As OpenSC's sc_read_binary: the file size from the FCP, min(chunk, left) per READ BINARY.
        if (!file_size_) return "readfile: the last SELECT gave no file size";
        const uint32_t size = *file_size_;
        for (uint32_t off = 0; off < size;) {
          const uint32_t n = std::min<uint32_t>(s.number, size - off);
          Bytes cmd = {0x00, 0xB0, static_cast<uint8_t>(off >> 8), static_cast<uint8_t>(off & 0xFF),
                       static_cast<uint8_t>(n == 256 ? 0 : n)};
          Bytes data;
          if (auto e = transmit(*c, cmd, s, sum_ms, &data)) return e;
          if (data.size() != n) return "READ BINARY returned " + std::to_string(data.size()) + " bytes, asked " + std::to_string(n);
          off += n;
        }
        return std::nullopt;
      }
      case Op::kDisconnect: {
        if (auto e = card(s, c)) return e;
        LONG rv = timed("SCardDisconnect", s.line, sum_ms, [&] { return SCardDisconnect(c->handle, s.disposition); });
        cards_.erase(s.handle);
        return check("SCardDisconnect", rv, s);
      }
    }
    return "internal: unknown step";
  }

  void cleanup() {
    for (auto& [name, c] : cards_) SCardDisconnect(c.handle, SCARD_LEAVE_CARD);
    for (auto& [name, h] : ctxs_) SCardReleaseContext(h);
    cards_.clear();
    ctxs_.clear();
  }

  const std::vector<Step>& steps_;
  std::string reader_filter_;
  std::string pin_;
  std::string control_;
  bool breakdown_;
  std::map<std::string, SCARDCONTEXT> ctxs_;
  std::map<std::string, Card> cards_;
  std::string reader_;
  std::vector<std::string> readers_;
  std::optional<uint32_t> file_size_;
  bool after_select_ = false;
  std::string label_;
  std::vector<Call> calls_;
  int pcsc_calls_ = 0;
  int apdus_ = 0;
  uint64_t digest_ = 0;
  bool signature_pending_ = false;

 public:
  bool dump_ = false;
};

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const auto n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"cb-replay: replays a PC/SC trace (PCSCLITE_CSOCK_NAME) and reports wall time and desk round trips"};
  std::string trace, reader = "Virtual PCD", pin = "1234", control;
  int repeat = 1;
  bool as_json = false, breakdown = false;
  app.add_option("--trace", trace, "trace file (format: top of tests/bench/traces/*.trace)")->required();
  app.add_option("--reader", reader, "use the first reader whose name contains this")->capture_default_str();
  app.add_option("--pin", pin, "PIN for {PIN} (ASCII, padded to 8 bytes with FF; {PIN00}: with 00)")->capture_default_str();
  app.add_option("--control", control, "CardBridge shim control socket (<socket>.ctl): count desk round trips");
  app.add_option("--repeat", repeat, "run the trace N times")->check(CLI::Range(1, 1000))->capture_default_str();
  app.add_flag("--json", as_json, "print one JSON object");
  bool dump = false;
  app.add_flag("--dump", dump, "print every command and response on stderr (debugging a trace)");
  app.add_flag("--breakdown", breakdown,
               "per-call timing and (with --control) round trips; the wall time is then the sum of the calls");
  CLI11_PARSE(app, argc, argv);
  if (pin.size() > 8) {
    std::fprintf(stderr, "cb-replay: --pin: at most 8 characters\n");
    return 2;
  }

  std::vector<Step> steps;
  if (auto err = parse_trace(trace, steps); !err.empty()) {
    std::fprintf(stderr, "cb-replay: %s\n", err.c_str());
    return 2;
  }
  Runner runner(steps, reader, pin, control, breakdown);
  runner.dump_ = dump;
  json out;
  out["trace"] = trace;
  out["runs"] = json::array();
  std::vector<double> walls, rts;
  std::optional<std::string> failure;  // the first one; later runs still run (a flaky
  int failed_runs = 0;                 // redirector shows as N of M runs failed)
  int pcsc_calls = 0, apdus = 0;       // of a complete run
  for (int i = 0; i < repeat; ++i) {
    auto before = round_trips(control);
    double wall = 0;
    auto err = runner.run(wall);
    auto after = round_trips(control);
    if (err) {
      ++failed_runs;
      if (!failure) failure = err;
      out["runs"].push_back({{"ok", false}, {"error", *err}});
      if (!as_json) std::printf("run %d: FAILED: %s\n", i + 1, err->c_str());
      continue;
    }
    json r{{"ok", true}, {"wall_ms", wall}, {"responses_digest", runner.digest()}};
    out["responses_digest"] = runner.digest();
    pcsc_calls = runner.pcsc_calls();
    apdus = runner.apdus();
    if (before && after) {
      r["round_trips"] = *after - *before;
      rts.push_back(static_cast<double>(*after - *before));
    } else {
      r["round_trips"] = nullptr;
    }
    walls.push_back(wall);
    out["runs"].push_back(r);
    if (!as_json) {
      std::printf("run %d: wall_ms=%.1f", i + 1, wall);
      if (before && after) std::printf(" round_trips=%lld", static_cast<long long>(*after - *before));
      std::printf("\n");
    }
  }
  out["reader"] = runner.reader();
  out["pcsc_calls"] = pcsc_calls;
  out["apdus"] = apdus;
  out["ok"] = !failure.has_value();
  out["failed_runs"] = failed_runs;
  if (failure) out["error"] = *failure;
  out["wall_ms"] = walls.empty() ? json(nullptr) : json(median(walls));
  out["round_trips"] = rts.empty() ? json(nullptr) : json(median(rts));
  if (breakdown) {
    out["calls"] = json::array();
    for (const auto& c : runner.calls()) {
      out["calls"].push_back({{"line", c.line}, {"label", c.label}, {"call", c.what}, {"ms", c.ms},
                              {"round_trips", c.round_trips ? json(*c.round_trips) : json(nullptr)}});
    }
  }
  if (as_json) {
    std::printf("%s\n", out.dump().c_str());
  } else {
    if (breakdown) {
      for (const auto& c : runner.calls()) {
        std::printf("%5d  %-28s %-44s %8.1f ms", c.line, c.label.substr(0, 28).c_str(), c.what.c_str(), c.ms);
        if (c.round_trips) std::printf("  rt=%lld", static_cast<long long>(*c.round_trips));
        std::printf("\n");
      }
    }
    if (!walls.empty()) {
      std::printf("trace=%s reader=\"%s\" pcsc_calls=%d apdus=%d wall_ms=%.1f", trace.c_str(), runner.reader().c_str(),
                  pcsc_calls, apdus, median(walls));
      if (!rts.empty()) std::printf(" round_trips=%.0f", median(rts));
      std::printf("\n");
    }
    if (failure) std::printf("FAILED (%d of %d runs): %s\n", failed_runs, repeat, failure->c_str());
  }
  if (failure && as_json) std::fprintf(stderr, "cb-replay: %s\n", failure->c_str());
  return failure ? 1 : 0;
}
