// cb-pcsc: a PC/SC client on the system libpcsclite for integration tests and benchmarks.
// It talks to whatever PCSCLITE_CSOCK_NAME points at (the desk's pcscd or a shim), so the
// same scenario can be run against both and compared. Every subcommand prints one JSON
// object on stdout and exits 0 when the PC/SC calls behaved as the scenario expects to be
// able to observe (the result values themselves are for the caller to judge).
#include <PCSC/winscard.h>
#include <PCSC/wintypes.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <iostream>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

std::string hex(const BYTE* p, DWORD n) {
  static const char* d = "0123456789ABCDEF";
  std::string s;
  for (DWORD i = 0; i < n; ++i) {
    s += d[p[i] >> 4];
    s += d[p[i] & 15];
  }
  return s;
}

std::vector<BYTE> unhex(const std::string& t) {
  std::vector<BYTE> out;
  int hi = -1;
  for (char c : t) {
    int v = (c >= '0' && c <= '9') ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : -1;
    if (v < 0) continue;
    if (hi < 0) {
      hi = v;
    } else {
      out.push_back(static_cast<BYTE>(hi * 16 + v));
      hi = -1;
    }
  }
  return out;
}

std::string rvs(LONG rv) {
  char b[16];
  std::snprintf(b, sizeof b, "0x%08X", static_cast<unsigned>(rv));
  return b;
}

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

struct Ctx {
  SCARDCONTEXT h = 0;
  LONG rv;
  Ctx() { rv = SCardEstablishContext(SCARD_SCOPE_SYSTEM, nullptr, nullptr, &h); }
  ~Ctx() {
    if (rv == SCARD_S_SUCCESS) SCardReleaseContext(h);
  }
};

std::vector<std::string> list_readers(SCARDCONTEXT ctx, LONG* rv_out) {
  DWORD len = SCARD_AUTOALLOCATE;
  LPSTR buf = nullptr;
  LONG rv = SCardListReaders(ctx, nullptr, reinterpret_cast<LPSTR>(&buf), &len);
  *rv_out = rv;
  std::vector<std::string> out;
  if (rv != SCARD_S_SUCCESS) return out;
  for (char* p = buf; *p; p += std::strlen(p) + 1) out.emplace_back(p);
  SCardFreeMemory(ctx, buf);
  return out;
}

const SCARD_IO_REQUEST* pci_for(DWORD proto) {
  return proto == SCARD_PROTOCOL_T0 ? SCARD_PCI_T0 : proto == SCARD_PROTOCOL_T1 ? SCARD_PCI_T1 : SCARD_PCI_RAW;
}

// CPU time of this process (all threads), nanoseconds.
int64_t process_cpu_ns() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

int64_t monotonic_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

// One benchmarked PC/SC call (cb-pcsc bench / serve). Returns the call's result; |ok| says
// whether the answer is what the call must give (GET CHALLENGE: 8 bytes + 90 00).
struct BenchCall {
  std::string op;
  SCARDCONTEXT ctx = 0;
  SCARDHANDLE h = 0;
  DWORD proto = 0;
  std::string reader;
  std::vector<BYTE> cmd;
  bool check_challenge = false;

  LONG operator()(bool* ok) const {
    LONG rv;
    *ok = true;
    if (op == "transmit") {
      BYTE resp[MAX_BUFFER_SIZE_EXTENDED];
      DWORD len = sizeof resp;
      rv = SCardTransmit(h, pci_for(proto), cmd.data(), static_cast<DWORD>(cmd.size()), nullptr, resp, &len);
      if (check_challenge) *ok = rv == SCARD_S_SUCCESS && len == 10 && resp[8] == 0x90 && resp[9] == 0x00;
    } else if (op == "status") {
      char name[256];
      DWORD name_len = sizeof name, s = 0, p = 0;
      BYTE atr[MAX_ATR_SIZE];
      DWORD atr_len = sizeof atr;
      rv = SCardStatus(h, name, &name_len, &s, &p, atr, &atr_len);
      *ok = rv == SCARD_S_SUCCESS && reader == name && (s & SCARD_PRESENT) != 0;
    } else if (op == "list") {
      char buf[4096];
      DWORD len = sizeof buf;
      rv = SCardListReaders(ctx, nullptr, buf, &len);
    } else if (op == "getstatuschange") {
      SCARD_READERSTATE rs{};
      rs.szReader = reader.c_str();
      rs.dwCurrentState = SCARD_STATE_UNAWARE;
      rv = SCardGetStatusChange(ctx, 0, &rs, 1);
      *ok = rv == SCARD_S_SUCCESS && (rs.dwEventState & SCARD_STATE_PRESENT) != 0;
    } else {
      SCARDCONTEXT c2;
      rv = SCardEstablishContext(SCARD_SCOPE_SYSTEM, nullptr, nullptr, &c2);
      if (rv == SCARD_S_SUCCESS) rv = SCardReleaseContext(c2);
    }
    if (rv != SCARD_S_SUCCESS) *ok = false;
    return rv;
  }
};

struct Stats {
  std::vector<double> us;
  json to_json() {
    json j;
    if (us.empty()) return j;
    std::sort(us.begin(), us.end());
    auto pct = [&](double p) { return us[std::min(us.size() - 1, static_cast<size_t>(p * static_cast<double>(us.size())))]; };
    double sum = 0;
    for (double v : us) sum += v;
    j["n"] = us.size();
    j["median_us"] = pct(0.5);
    j["p99_us"] = pct(0.99);
    j["mean_us"] = sum / static_cast<double>(us.size());
    j["min_us"] = us.front();
    return j;
  }
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"cb-pcsc: PC/SC test client (uses PCSCLITE_CSOCK_NAME)"};
  app.require_subcommand(1);
  std::string reader;
  std::string apdu = "0084000008";
  std::string share = "shared";
  int count = 1, threads = 4, iterations = 1000, timeout_ms = 0, hold_ms = 1000, cancel_after_ms = 50;
  std::string op = "transmit";
  unsigned current = SCARD_STATE_UNAWARE;

  auto* list = app.add_subcommand("list", "list readers and their state");
  auto* transmit = app.add_subcommand("transmit", "connect and transmit an APDU COUNT times");
  transmit->add_option("--reader", reader);
  transmit->add_option("--apdu", apdu);
  transmit->add_option("--count", count);
  transmit->add_option("--share", share)->check(CLI::IsMember({"shared", "exclusive", "direct"}));
  auto* status = app.add_subcommand("status", "connect and SCardStatus");
  status->add_option("--reader", reader);
  auto* wait = app.add_subcommand("wait", "SCardGetStatusChange on a reader (or the PnP reader)");
  wait->add_option("--reader", reader);
  wait->add_option("--timeout-ms", timeout_ms, "-1 = INFINITE");
  wait->add_option("--current", current, "dwCurrentState (number; 0x.. accepted)");
  auto* cancel = app.add_subcommand("cancel", "INFINITE wait cancelled from another thread");
  cancel->add_option("--reader", reader);
  cancel->add_option("--after-ms", cancel_after_ms,
                     "SCardCancel every AFTER_MS until the wait returns (libpcsclite ignores a cancel that comes "
                     "before the wait is in place)");
  auto* hold = app.add_subcommand("hold", "connect, begin a transaction, hold it, end it");
  hold->add_option("--reader", reader);
  hold->add_option("--ms", hold_ms, "hold this long; -1: until stdin has a line or is closed");
  hold->add_option("--share", share)->check(CLI::IsMember({"shared", "exclusive"}));
  bool hold_transmit = false;
  hold->add_flag("--transmit", hold_transmit, "send --apdu once inside the transaction (so it reaches the card)");
  hold->add_option("--apdu", apdu);
  auto* begin = app.add_subcommand("begin", "time how long SCardBeginTransaction takes");
  begin->add_option("--reader", reader);
  auto* stress = app.add_subcommand("threads", "THREADS threads, each its own context, COUNT GET CHALLENGEs");
  stress->add_option("--reader", reader);
  stress->add_option("--threads", threads);
  stress->add_option("--count", count);
  stress->add_option("--shared-context", op, "unused")->default_val("");
  auto* bench = app.add_subcommand("bench", "latency of one PC/SC call, ITERATIONS times");
  bench->add_option("--op", op)->check(CLI::IsMember({"transmit", "status", "list", "getstatuschange", "establish"}));
  bench->add_option("--iterations", iterations);
  bench->add_option("--reader", reader);
  bench->add_option("--apdu", apdu);
  // serve: the benchmark driver's client (tests/bench/core_bench.py). Sets up (context, card
  // handle), warms up, prints {"ready":...}, then answers stdin commands one JSON line each:
  //   run N  -> N calls; per call its start (ns after the block's first start) and its duration
  //             (ns), the block's first start (t0_ns, absolute CLOCK_MONOTONIC, comparable across
  //             processes), failures (wrong answers) and this process's CPU time over the block;
  //   until START END -> calls from START until END (absolute CLOCK_MONOTONIC ns), same answer;
  //   quit (or end of input) -> tears down and exits.
  // The driver samples other processes' counters between blocks, so a block is exactly the
  // measured window, and several clients can be run alternately or all at once.
  int warmup = 200;
  auto* serve = app.add_subcommand("serve", "benchmark client driven by stdin commands (run N / until START END / quit)");
  serve->add_option("--op", op)->check(CLI::IsMember({"transmit", "status", "list", "getstatuschange", "establish"}));
  serve->add_option("--reader", reader);
  serve->add_option("--apdu", apdu);
  serve->add_option("--warmup", warmup, "calls made and discarded before ready");
  CLI11_PARSE(app, argc, argv);

  json out;
  Ctx ctx;
  out["establish"] = rvs(ctx.rv);
  if (ctx.rv != SCARD_S_SUCCESS) {
    std::puts(out.dump().c_str());
    return 1;
  }
  LONG lrv = 0;
  auto readers = list_readers(ctx.h, &lrv);
  if (reader.empty() && !readers.empty()) reader = readers.front();
  const DWORD share_mode = share == "exclusive" ? SCARD_SHARE_EXCLUSIVE : share == "direct" ? SCARD_SHARE_DIRECT : SCARD_SHARE_SHARED;

  auto connect = [&](SCARDCONTEXT c, SCARDHANDLE* h, DWORD* proto, DWORD mode) {
    return SCardConnect(c, reader.c_str(), mode, SCARD_PROTOCOL_T0 | SCARD_PROTOCOL_T1, h, proto);
  };

  if (*list) {
    out["list"] = rvs(lrv);
    out["readers"] = json::array();
    for (const auto& r : readers) {
      SCARD_READERSTATE rs{};
      rs.szReader = r.c_str();
      rs.dwCurrentState = SCARD_STATE_UNAWARE;
      LONG rv = SCardGetStatusChange(ctx.h, 0, &rs, 1);
      out["readers"].push_back({{"name", r}, {"rv", rvs(rv)}, {"state", rs.dwEventState}, {"atr", hex(rs.rgbAtr, rs.cbAtr)}});
    }
  } else if (*transmit) {
    SCARDHANDLE h = 0;
    DWORD proto = 0;
    LONG rv = connect(ctx.h, &h, &proto, share_mode);
    out["connect"] = rvs(rv);
    out["protocol"] = proto;
    if (rv == SCARD_S_SUCCESS) {
      auto cmd = unhex(apdu);
      out["responses"] = json::array();
      out["rvs"] = json::array();
      for (int i = 0; i < count; ++i) {
        BYTE resp[MAX_BUFFER_SIZE_EXTENDED];
        DWORD len = sizeof resp;
        rv = SCardTransmit(h, pci_for(proto), cmd.data(), static_cast<DWORD>(cmd.size()), nullptr, resp, &len);
        out["rvs"].push_back(rvs(rv));
        out["responses"].push_back(rv == SCARD_S_SUCCESS ? hex(resp, len) : "");
      }
      out["disconnect"] = rvs(SCardDisconnect(h, SCARD_LEAVE_CARD));
    }
  } else if (*status) {
    SCARDHANDLE h = 0;
    DWORD proto = 0;
    LONG rv = connect(ctx.h, &h, &proto, share_mode);
    out["connect"] = rvs(rv);
    if (rv == SCARD_S_SUCCESS) {
      char name[256];
      DWORD name_len = sizeof name, st = 0, pr = 0;
      BYTE atr[MAX_ATR_SIZE];
      DWORD atr_len = sizeof atr;
      rv = SCardStatus(h, name, &name_len, &st, &pr, atr, &atr_len);
      out["status"] = rvs(rv);
      out["reader"] = std::string(name);
      out["state"] = st;
      out["protocol"] = pr;
      out["atr"] = hex(atr, atr_len);
      out["disconnect"] = rvs(SCardDisconnect(h, SCARD_LEAVE_CARD));
    }
  } else if (*wait) {
    std::string name = reader.empty() || reader == "pnp" ? "\\\\?PnP?\\Notification" : reader;
    SCARD_READERSTATE rs{};
    rs.szReader = name.c_str();
    rs.dwCurrentState = current;
    auto t0 = Clock::now();
    LONG rv = SCardGetStatusChange(ctx.h, timeout_ms < 0 ? INFINITE : static_cast<DWORD>(timeout_ms), &rs, 1);
    out["elapsed_ms"] = ms_since(t0);
    out["rv"] = rvs(rv);
    out["event_state"] = rs.dwEventState;
    out["atr"] = hex(rs.rgbAtr, rs.cbAtr);
  } else if (*cancel) {
    std::string name = reader.empty() ? "\\\\?PnP?\\Notification" : reader;
    SCARD_READERSTATE rs{};
    rs.szReader = name.c_str();
    // Ask for the current state so that the wait really waits.
    SCARD_READERSTATE probe{};
    probe.szReader = name.c_str();
    SCardGetStatusChange(ctx.h, 0, &probe, 1);
    rs.dwCurrentState = probe.dwEventState & ~SCARD_STATE_CHANGED;
    LONG cancel_rv = 0;
    int cancels = 0;
    std::atomic<bool> returned{false};
    Clock::time_point cancelled_at;
    std::mutex m;
    std::thread t([&] {
      // A cancel before the wait is armed returns success and does nothing (libpcsclite 1.9.9:
      // the context is not yet cancellable): ask again until the wait has returned.
      while (!returned) {
        std::this_thread::sleep_for(std::chrono::milliseconds(cancel_after_ms));
        if (returned) break;
        std::lock_guard lock(m);
        cancelled_at = Clock::now();
        cancel_rv = SCardCancel(ctx.h);
        ++cancels;
      }
    });
    LONG rv = SCardGetStatusChange(ctx.h, INFINITE, &rs, 1);
    auto woke = Clock::now();
    returned = true;
    t.join();
    out["rv"] = rvs(rv);
    out["cancel_rv"] = rvs(cancel_rv);
    out["cancels"] = cancels;
    out["wake_after_cancel_ms"] = std::chrono::duration<double, std::milli>(woke - cancelled_at).count();
  } else if (*hold) {
    SCARDHANDLE h = 0;
    DWORD proto = 0;
    LONG rv = connect(ctx.h, &h, &proto, share_mode);
    out["connect"] = rvs(rv);
    if (rv == SCARD_S_SUCCESS) {
      const LONG begin_rv = SCardBeginTransaction(h);
      out["begin"] = rvs(begin_rv);
      LONG transmit_rv = SCARD_S_SUCCESS;
      if (begin_rv == SCARD_S_SUCCESS && hold_transmit) {
        auto cmd = unhex(apdu);
        BYTE resp[300];
        DWORD len = sizeof resp;
        transmit_rv = SCardTransmit(h, pci_for(proto), cmd.data(), static_cast<DWORD>(cmd.size()), nullptr, resp, &len);
        out["transmit"] = rvs(transmit_rv);
      }
      // "holding" only when the transaction is really held (and its card command went through).
      if (begin_rv == SCARD_S_SUCCESS && transmit_rv == SCARD_S_SUCCESS) {
        std::printf("%s\n", json{{"holding", true}}.dump().c_str());
        std::fflush(stdout);
        if (hold_ms < 0) {
          char line[64];
          (void)std::fgets(line, sizeof line, stdin);
        } else {
          std::this_thread::sleep_for(std::chrono::milliseconds(hold_ms));
        }
        out["end"] = rvs(SCardEndTransaction(h, SCARD_LEAVE_CARD));
      }
      out["disconnect"] = rvs(SCardDisconnect(h, SCARD_LEAVE_CARD));
    }
  } else if (*begin) {
    SCARDHANDLE h = 0;
    DWORD proto = 0;
    LONG rv = connect(ctx.h, &h, &proto, SCARD_SHARE_SHARED);
    out["connect"] = rvs(rv);
    if (rv == SCARD_S_SUCCESS) {
      auto t0 = Clock::now();
      out["begin"] = rvs(SCardBeginTransaction(h));
      out["begin_ms"] = ms_since(t0);
      out["end"] = rvs(SCardEndTransaction(h, SCARD_LEAVE_CARD));
      out["disconnect"] = rvs(SCardDisconnect(h, SCARD_LEAVE_CARD));
    }
  } else if (*stress) {
    std::atomic<int> failures{0}, ok{0};
    std::mutex m;
    std::set<std::string> seen;
    std::atomic<int> duplicates{0};
    std::vector<std::thread> ts;
    // libpcsclite's handle table is not thread-safe (client-plugin/pcsc/include/cardbridge/desk_pcsc/library_gate.hpp):
    // threads set up and tear down one at a time, while no other thread transmits.
    std::mutex setup;
    std::barrier started(threads), finished(threads);
    for (int t = 0; t < threads; ++t) {
      ts.emplace_back([&] {
        std::unique_lock one(setup);
        Ctx c;
        SCARDHANDLE h = 0;
        DWORD proto = 0;
        const bool up = c.rv == SCARD_S_SUCCESS && connect(c.h, &h, &proto, SCARD_SHARE_SHARED) == SCARD_S_SUCCESS;
        one.unlock();
        started.arrive_and_wait();
        if (!up) {
          ++failures;
          finished.arrive_and_wait();
          one.lock();
          return;  // ~Ctx releases the context under |setup|
        }
        auto cmd = unhex(apdu);
        for (int i = 0; i < count; ++i) {
          BYTE resp[300];
          DWORD len = sizeof resp;
          LONG rv = SCardTransmit(h, pci_for(proto), cmd.data(), static_cast<DWORD>(cmd.size()), nullptr, resp, &len);
          // GET CHALLENGE: 8 random bytes + 90 00, never seen twice.
          if (rv != SCARD_S_SUCCESS || len != 10 || resp[8] != 0x90 || resp[9] != 0x00) {
            ++failures;
            continue;
          }
          std::lock_guard lock(m);
          if (!seen.insert(hex(resp, 8)).second) ++duplicates;
          ++ok;
        }
        finished.arrive_and_wait();
        one.lock();
        SCardDisconnect(h, SCARD_LEAVE_CARD);
      });
    }
    for (auto& t : ts) t.join();
    out["ok"] = ok.load();
    out["failures"] = failures.load();
    out["duplicates"] = duplicates.load();
  } else if (*serve) {
    BenchCall call;
    call.op = op;
    call.ctx = ctx.h;
    call.reader = reader;
    call.cmd = unhex(apdu);
    call.check_challenge = apdu == "0084000008";
    if (op == "transmit" || op == "status") {
      LONG rv = connect(ctx.h, &call.h, &call.proto, SCARD_SHARE_SHARED);
      if (rv != SCARD_S_SUCCESS) {
        out["connect"] = rvs(rv);
        std::puts(out.dump().c_str());
        return 1;
      }
    }
    int bad = 0;
    LONG last = SCARD_S_SUCCESS;
    for (int i = 0; i < warmup; ++i) {
      bool ok;
      last = call(&ok);
      bad += ok ? 0 : 1;
    }
    std::printf("%s\n", json{{"ready", bad == 0}, {"op", op}, {"rv", rvs(last)}, {"warmup_failures", bad}}.dump().c_str());
    std::fflush(stdout);
    std::string line;
    std::vector<int64_t> starts, ends;
    while (bad == 0 && std::getline(std::cin, line)) {
      // "run N", or "until START END": from START until END (absolute CLOCK_MONOTONIC ns), so
      // that clients started one after the other all run over the same stretch of time.
      long long n = 0, from = 0, until = 0;
      if (std::sscanf(line.c_str(), "run %lld", &n) == 1 && n > 0) {
      } else if (std::sscanf(line.c_str(), "until %lld %lld", &from, &until) == 2 && until > from) {
        n = -1;
      } else {
        break;
      }
      if (from > 0) {
        timespec ts{static_cast<time_t>(from / 1000000000), static_cast<long>(from % 1000000000)};
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, nullptr) == EINTR) {
        }
      }
      starts.clear();
      ends.clear();
      int failures = 0;
      const int64_t cpu0 = process_cpu_ns();
      for (long long i = 0; n < 0 ? monotonic_ns() < until : i < n; ++i) {
        bool ok;
        starts.push_back(monotonic_ns());
        last = call(&ok);
        ends.push_back(monotonic_ns());
        failures += ok ? 0 : 1;
      }
      const int64_t cpu = process_cpu_ns() - cpu0;
      json r;
      r["n"] = starts.size();
      r["rv"] = rvs(last);
      r["failures"] = failures;
      r["cpu_ns"] = cpu;
      r["t0_ns"] = starts.empty() ? monotonic_ns() : starts.front();  // empty: START came after END
      auto& st = r["start_ns"] = json::array();
      auto& du = r["ns"] = json::array();
      for (size_t i = 0; i < starts.size(); ++i) {
        st.push_back(starts[i] - starts.front());
        du.push_back(ends[i] - starts[i]);
      }
      std::printf("%s\n", r.dump().c_str());
      std::fflush(stdout);
    }
    if (call.h) out["disconnect"] = rvs(SCardDisconnect(call.h, SCARD_LEAVE_CARD));
    out["done"] = true;
  } else if (*bench) {
    Stats st;
    SCARDHANDLE h = 0;
    DWORD proto = 0;
    if (op == "transmit" || op == "status") {
      LONG rv = connect(ctx.h, &h, &proto, SCARD_SHARE_SHARED);
      if (rv != SCARD_S_SUCCESS) {
        out["connect"] = rvs(rv);
        std::puts(out.dump().c_str());
        return 1;
      }
    }
    auto cmd = unhex(apdu);
    LONG last = 0;
    for (int i = 0; i < iterations + iterations / 10; ++i) {
      auto t0 = Clock::now();
      if (op == "transmit") {
        BYTE resp[MAX_BUFFER_SIZE_EXTENDED];
        DWORD len = sizeof resp;
        last = SCardTransmit(h, pci_for(proto), cmd.data(), static_cast<DWORD>(cmd.size()), nullptr, resp, &len);
      } else if (op == "status") {
        char name[256];
        DWORD name_len = sizeof name, s = 0, p = 0;
        BYTE atr[MAX_ATR_SIZE];
        DWORD atr_len = sizeof atr;
        last = SCardStatus(h, name, &name_len, &s, &p, atr, &atr_len);
      } else if (op == "list") {
        char buf[4096];
        DWORD len = sizeof buf;
        last = SCardListReaders(ctx.h, nullptr, buf, &len);
      } else if (op == "getstatuschange") {
        SCARD_READERSTATE rs{};
        rs.szReader = reader.c_str();
        rs.dwCurrentState = SCARD_STATE_UNAWARE;
        last = SCardGetStatusChange(ctx.h, 0, &rs, 1);
      } else {
        SCARDCONTEXT c2;
        last = SCardEstablishContext(SCARD_SCOPE_SYSTEM, nullptr, nullptr, &c2);
        if (last == SCARD_S_SUCCESS) SCardReleaseContext(c2);
      }
      double us = std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
      if (i >= iterations / 10) st.us.push_back(us);  // the first 10% warm up
      if (last != SCARD_S_SUCCESS) break;
    }
    out["op"] = op;
    out["rv"] = rvs(last);
    out["latency"] = st.to_json();
    if (h) SCardDisconnect(h, SCARD_LEAVE_CARD);
  }
  std::puts(out.dump().c_str());
  return 0;
}
