// cb-desk-storm: many threads, each with its own PC/SC context, connecting, transmitting,
// taking transactions and disconnecting at once on the real libpcsclite, the way the desk
// engine's per-context workers do. By default the calls go through the desk's CardApi
// (client-plugin/pcsc, with its LibraryGate); --raw calls libpcsclite directly, which
// shows the library's own race (library_gate.hpp): the process may crash.
// Prints one JSON object: calls made, SHARING_VIOLATIONs seen while another thread held
// the transaction ("busy", as pcscd answers with PCSCLITE_NO_BLOCKING) and failures by
// call and return code. Exit 0 when there was no failure.
#include <PCSC/winscard.h>

#include <array>
#include <atomic>
#include <cstdio>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "cardbridge/desk_pcsc/pcsc_card_api.hpp"

namespace cb = cardbridge::client;

namespace {

// The same slice of the API, straight onto libpcsclite (no gate). The storm does not use
// the calls answered kUnused.
constexpr auto kUnused = static_cast<uint32_t>(SCARD_E_UNSUPPORTED_FEATURE);

class RawApi final : public cb::CardApi {
 public:
  uint32_t establish(uint32_t scope, cb::ScardContext* ctx) override {
    SCARDCONTEXT c = 0;
    auto rv = SCardEstablishContext(scope, nullptr, nullptr, &c);
    *ctx = static_cast<cb::ScardContext>(c);
    return static_cast<uint32_t>(rv);
  }
  uint32_t release(cb::ScardContext ctx) override { return static_cast<uint32_t>(SCardReleaseContext(ctx)); }
  uint32_t list_readers(cb::ScardContext, std::vector<std::string>*) override { return kUnused; }
  uint32_t get_status_change(cb::ScardContext, uint32_t, std::vector<cb::ReaderStateIo>&) override { return kUnused; }
  uint32_t cancel(cb::ScardContext) override { return kUnused; }
  uint32_t connect(cb::ScardContext ctx, const std::string& reader, uint32_t share, uint32_t protocols,
                   cb::ScardHandle* card, uint32_t* active) override {
    SCARDHANDLE h = 0;
    DWORD p = 0;
    auto rv = SCardConnect(ctx, reader.c_str(), share, protocols, &h, &p);
    *card = static_cast<cb::ScardHandle>(h);
    *active = static_cast<uint32_t>(p);
    return static_cast<uint32_t>(rv);
  }
  uint32_t reconnect(cb::ScardHandle, uint32_t, uint32_t, uint32_t, uint32_t*) override { return kUnused; }
  uint32_t disconnect(cb::ScardHandle card, uint32_t disposition) override {
    return static_cast<uint32_t>(SCardDisconnect(card, disposition));
  }
  uint32_t begin_transaction(cb::ScardHandle card) override { return static_cast<uint32_t>(SCardBeginTransaction(card)); }
  uint32_t end_transaction(cb::ScardHandle card, uint32_t d) override {
    return static_cast<uint32_t>(SCardEndTransaction(card, d));
  }
  uint32_t transmit(cb::ScardHandle card, uint32_t send_protocol, std::span<const uint8_t> command, uint32_t*,
                    uint32_t cap, cb::Buffer* response) override {
    SCARD_IO_REQUEST pci{send_protocol, sizeof(SCARD_IO_REQUEST)};
    response->data.resize(cap);
    DWORD len = cap;
    auto rv = SCardTransmit(card, &pci, command.data(), static_cast<DWORD>(command.size()), nullptr,
                            response->data.data(), &len);
    response->data.resize(rv == SCARD_S_SUCCESS ? len : 0);
    return static_cast<uint32_t>(rv);
  }
  uint32_t control(cb::ScardHandle, uint32_t, std::span<const uint8_t>, uint32_t, cb::Buffer*) override { return kUnused; }
  uint32_t get_attrib(cb::ScardHandle, uint32_t, uint32_t, cb::Buffer*) override { return kUnused; }
  uint32_t set_attrib(cb::ScardHandle, uint32_t, std::span<const uint8_t>) override { return kUnused; }
  uint32_t status(cb::ScardHandle card, std::string*, uint32_t* state, uint32_t* protocol,
                  std::vector<uint8_t>*) override {
    char name[256];
    DWORD nl = sizeof name, st = 0, pr = 0, al = 33;
    BYTE atr[33];
    auto rv = SCardStatus(card, name, &nl, &st, &pr, atr, &al);
    *state = static_cast<uint32_t>(st);
    *protocol = static_cast<uint32_t>(pr);
    return static_cast<uint32_t>(rv);
  }
};

struct Tally {
  std::mutex m;
  std::map<std::string, int> failures;  // "call rv" -> count
  std::atomic<long> calls{0};
  std::atomic<long> busy{0};
  void check(const char* call, uint32_t rv) {
    ++calls;
    if (rv == SCARD_S_SUCCESS) return;
    if (rv == static_cast<uint32_t>(SCARD_E_SHARING_VIOLATION) && call[0] != 'c' && call[0] != 'b') {
      ++busy;  // another thread's transaction (PCSCLITE_NO_BLOCKING): what pcscd answers
      return;
    }
    char b[64];
    std::snprintf(b, sizeof b, "%s 0x%08X", call, rv);
    std::lock_guard lock(m);
    ++failures[b];
  }
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"cb-desk-storm: concurrent contexts on the real libpcsclite, as the desk engine uses it"};
  std::string reader;
  int threads = 8, rounds = 200, churn = 2;
  bool raw = false;
  app.add_option("--reader", reader, "reader name")->required();
  app.add_option("--threads", threads, "threads, each with its own context");
  app.add_option("--rounds", rounds, "connect..disconnect rounds per thread");
  app.add_option("--churn", churn, "a new context every CHURN rounds (odd rounds leave the handle to it)");
  app.add_flag("--raw", raw, "call libpcsclite directly, without the desk's gate");
  CLI11_PARSE(app, argc, argv);

  ::setenv("PCSCLITE_NO_BLOCKING", "1", 1);  // as the desk runs (make_pcsc_card_api sets it too)
  std::unique_ptr<cb::CardApi> api = raw ? std::unique_ptr<cb::CardApi>(new RawApi) : cb::make_pcsc_card_api();
  Tally tally;
  const std::array<uint8_t, 5> challenge{0x00, 0x84, 0x00, 0x00, 0x08};
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t) {
    ts.emplace_back([&, t] {
      cb::ScardContext ctx = 0;
      tally.check("establish", api->establish(SCARD_SCOPE_USER, &ctx));
      for (int i = 0; i < rounds; ++i) {
        cb::ScardHandle h = 0;
        uint32_t proto = 0;
        const uint32_t rv = api->connect(ctx, reader, SCARD_SHARE_SHARED, SCARD_PROTOCOL_T0 | SCARD_PROTOCOL_T1, &h,
                                         &proto);
        tally.check("connect", rv);
        if (rv != SCARD_S_SUCCESS) continue;
        const bool txn = (i + t) % 3 == 0;
        if (txn) tally.check("begin", api->begin_transaction(h));
        cb::Buffer resp;
        uint32_t recv = proto;
        tally.check("transmit", api->transmit(h, proto, challenge, &recv, 258, &resp));
        std::string name;
        uint32_t state = 0, p = 0;
        std::vector<uint8_t> atr;
        tally.check("status", api->status(h, &name, &state, &p, &atr));
        if (txn) tally.check("end", api->end_transaction(h, SCARD_LEAVE_CARD));
        if (i % 2 == 0) tally.check("disconnect", api->disconnect(h, SCARD_LEAVE_CARD));
        if (i % churn == churn - 1) {  // programs come and go
          tally.check("release", api->release(ctx));
          tally.check("establish", api->establish(SCARD_SCOPE_USER, &ctx));
        }
      }
      tally.check("release", api->release(ctx));
    });
  }
  for (auto& th : ts) th.join();
  nlohmann::json out;
  out["gate"] = !raw;
  out["calls"] = tally.calls.load();
  out["busy"] = tally.busy.load();
  out["failures"] = tally.failures;
  std::puts(out.dump().c_str());
  return tally.failures.empty() ? 0 : 1;
}
