#include "cardbridge/desk_pcsc/pcsc_card_api.hpp"
#include "cardbridge/desk_pcsc/library_gate.hpp"

#include <PCSC/winscard.h>
#include <PCSC/wintypes.h>
#include <PCSC/reader.h>
#include <dlfcn.h>

#include <cstdlib>
#include <cstring>

#include "cardbridge/support/log.hpp"
#include "cardbridge/support/scard.hpp"

namespace cardbridge::client {

namespace sc = cardbridge::scard;

// Our constants must be pcsc-lite's.
static_assert(sc::kECancelled == static_cast<uint32_t>(SCARD_E_CANCELLED));
static_assert(sc::kEInsufficientBuffer == static_cast<uint32_t>(SCARD_E_INSUFFICIENT_BUFFER));
static_assert(sc::kENoReadersAvailable == static_cast<uint32_t>(SCARD_E_NO_READERS_AVAILABLE));
static_assert(sc::kWRemovedCard == static_cast<uint32_t>(SCARD_W_REMOVED_CARD));
static_assert(sc::kStatePresent == SCARD_STATE_PRESENT);
static_assert(sc::kStateMute == SCARD_STATE_MUTE);
static_assert(sc::kMaxBufferSizeExtended == MAX_BUFFER_SIZE_EXTENDED);
static_assert(sc::kMaxAtrSize == MAX_ATR_SIZE);
static_assert(sc::kAttrAtrString == SCARD_ATTR_ATR_STRING);
static_assert(sc::ctl_code(3400) == SCARD_CTL_CODE(3400));

namespace {

log::Channel logger{"cardbridge.pcsc"};

uint32_t rv32(LONG rv) { return static_cast<uint32_t>(rv); }

// libpcsclite, bound explicitly. Inside a FreeRDP client (the add-in's home), libwinpr2 is in
// the process's global scope and exports its own SCard* functions: a Windows-ABI smart-card
// API (32-bit DWORDs, Windows structure layouts) over its own copy of libpcsclite. The dynamic
// linker resolves our undefined SCard* references to the first definition in the global
// scope, i.e. WinPR's, so SCardTransmit fails with SCARD_E_INVALID_VALUE and reader states
// are read with the wrong layout. dlsym() on libpcsclite's own handle finds libpcsclite's.
struct Pcsc {
  decltype(&::SCardEstablishContext) EstablishContext = &::SCardEstablishContext;
  decltype(&::SCardReleaseContext) ReleaseContext = &::SCardReleaseContext;
  decltype(&::SCardListReaders) ListReaders = &::SCardListReaders;
  decltype(&::SCardGetStatusChange) GetStatusChange = &::SCardGetStatusChange;
  decltype(&::SCardCancel) Cancel = &::SCardCancel;
  decltype(&::SCardConnect) Connect = &::SCardConnect;
  decltype(&::SCardReconnect) Reconnect = &::SCardReconnect;
  decltype(&::SCardDisconnect) Disconnect = &::SCardDisconnect;
  decltype(&::SCardBeginTransaction) BeginTransaction = &::SCardBeginTransaction;
  decltype(&::SCardEndTransaction) EndTransaction = &::SCardEndTransaction;
  decltype(&::SCardTransmit) Transmit = &::SCardTransmit;
  decltype(&::SCardControl) Control = &::SCardControl;
  decltype(&::SCardGetAttrib) GetAttrib = &::SCardGetAttrib;
  decltype(&::SCardSetAttrib) SetAttrib = &::SCardSetAttrib;
  decltype(&::SCardStatus) Status = &::SCardStatus;
};

template <typename F>
void bind(void* lib, const char* name, F* fn, bool* ok) {
  void* sym = ::dlsym(lib, name);
  if (!sym) {
    *ok = false;
    return;
  }
  std::memcpy(fn, &sym, sizeof sym);  // object pointer -> function pointer (POSIX guarantees it works)
}

const Pcsc& pcsc() {
  static const Pcsc lib = [] {
    Pcsc p;
    void* h = ::dlopen("libpcsclite.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!h) {
      logger->error("cannot load libpcsclite.so.1 ({}); using the linked SCard* symbols",
                                         ::dlerror());
      return p;
    }
    bool ok = true;
    Pcsc b;
    bind(h, "SCardEstablishContext", &b.EstablishContext, &ok);
    bind(h, "SCardReleaseContext", &b.ReleaseContext, &ok);
    bind(h, "SCardListReaders", &b.ListReaders, &ok);
    bind(h, "SCardGetStatusChange", &b.GetStatusChange, &ok);
    bind(h, "SCardCancel", &b.Cancel, &ok);
    bind(h, "SCardConnect", &b.Connect, &ok);
    bind(h, "SCardReconnect", &b.Reconnect, &ok);
    bind(h, "SCardDisconnect", &b.Disconnect, &ok);
    bind(h, "SCardBeginTransaction", &b.BeginTransaction, &ok);
    bind(h, "SCardEndTransaction", &b.EndTransaction, &ok);
    bind(h, "SCardTransmit", &b.Transmit, &ok);
    bind(h, "SCardControl", &b.Control, &ok);
    bind(h, "SCardGetAttrib", &b.GetAttrib, &ok);
    bind(h, "SCardSetAttrib", &b.SetAttrib, &ok);
    bind(h, "SCardStatus", &b.Status, &ok);
    if (!ok) {
      logger->error("libpcsclite.so.1 lacks SCard* functions; using the linked symbols");
      return p;
    }
    return b;  // the library stays loaded for the life of the process
  }();
  return lib;
}

// libpcsclite's handle table is one per process and not safe for concurrent Connect or
// Disconnect (library_gate.hpp): one gate for every PcscCardApi in the process.
LibraryGate& gate() {
  static LibraryGate g;
  return g;
}

class PcscCardApi final : public CardApi {
 public:
  uint32_t establish(uint32_t scope, ScardContext* ctx) override {
    return gate().establish([&] {
      SCARDCONTEXT c = 0;
      LONG rv = pcsc().EstablishContext(scope, nullptr, nullptr, &c);
      *ctx = static_cast<ScardContext>(c);
      return rv32(rv);
    });
  }
  uint32_t release(ScardContext ctx) override {
    return gate().release(ctx, [&] { return rv32(pcsc().ReleaseContext(static_cast<SCARDCONTEXT>(ctx))); });
  }

  uint32_t list_readers(ScardContext ctx, std::vector<std::string>* readers) override {
    readers->clear();
    DWORD len = 0;
    LONG rv = pcsc().ListReaders(static_cast<SCARDCONTEXT>(ctx), nullptr, nullptr, &len);
    if (rv == SCARD_E_NO_READERS_AVAILABLE) return sc::kSuccess;
    if (rv != SCARD_S_SUCCESS) return rv32(rv);
    std::string buf(len, '\0');
    rv = pcsc().ListReaders(static_cast<SCARDCONTEXT>(ctx), nullptr, buf.data(), &len);
    if (rv == SCARD_E_NO_READERS_AVAILABLE) return sc::kSuccess;
    if (rv != SCARD_S_SUCCESS) return rv32(rv);
    for (std::size_t i = 0; i < len && buf[i] != '\0';) {
      std::string name(buf.c_str() + i);
      i += name.size() + 1;
      readers->push_back(std::move(name));
    }
    return sc::kSuccess;
  }

  uint32_t get_status_change(ScardContext ctx, uint32_t timeout_ms, std::vector<ReaderStateIo>& states) override {
    std::vector<SCARD_READERSTATE> rs(states.size());
    for (std::size_t i = 0; i < states.size(); ++i) {
      std::memset(&rs[i], 0, sizeof rs[i]);
      rs[i].szReader = states[i].name.c_str();
      rs[i].dwCurrentState = states[i].current_state;
    }
    LONG rv = pcsc().GetStatusChange(static_cast<SCARDCONTEXT>(ctx), timeout_ms, rs.data(),
                                   static_cast<DWORD>(rs.size()));
    for (std::size_t i = 0; i < states.size(); ++i) {
      states[i].event_state = static_cast<uint32_t>(rs[i].dwEventState);
      if (rv == SCARD_S_SUCCESS && !(rs[i].dwEventState & (SCARD_STATE_UNKNOWN | SCARD_STATE_UNAVAILABLE))) {
        gate().observe(states[i].name, static_cast<uint32_t>(rs[i].dwEventState >> 16));
      }
      const auto n = std::min<std::size_t>(rs[i].cbAtr, sizeof rs[i].rgbAtr);
      states[i].atr.assign(rs[i].rgbAtr, rs[i].rgbAtr + n);
    }
    return rv32(rv);
  }

  uint32_t cancel(ScardContext ctx) override { return rv32(pcsc().Cancel(static_cast<SCARDCONTEXT>(ctx))); }

  uint32_t connect(ScardContext ctx, const std::string& reader, uint32_t share_mode, uint32_t protocols,
                   ScardHandle* card, uint32_t* active_protocol) override {
    return gate().connect(ctx, reader, [&](LibraryGate::Handle* made) {
      SCARDHANDLE h = 0;
      DWORD proto = 0;
      LONG rv = pcsc().Connect(static_cast<SCARDCONTEXT>(ctx), reader.c_str(), share_mode, protocols, &h, &proto);
      *card = *made = static_cast<ScardHandle>(h);
      *active_protocol = static_cast<uint32_t>(proto);
      return rv32(rv);
    });
  }

  uint32_t reconnect(ScardHandle card, uint32_t share_mode, uint32_t protocols, uint32_t initialization,
                     uint32_t* active_protocol) override {
    return gate().lookup(card, [&] {
      DWORD proto = *active_protocol;
      LONG rv = pcsc().Reconnect(static_cast<SCARDHANDLE>(card), share_mode, protocols, initialization, &proto);
      *active_protocol = static_cast<uint32_t>(proto);
      return rv32(rv);
    });
  }

  uint32_t disconnect(ScardHandle card, uint32_t disposition) override {
    return gate().disconnect(card, disposition == SCARD_LEAVE_CARD,
                            [&] { return rv32(pcsc().Disconnect(static_cast<SCARDHANDLE>(card), disposition)); });
  }
  uint32_t begin_transaction(ScardHandle card) override {
    return gate().begin_transaction(
        card, [&] { return rv32(pcsc().BeginTransaction(static_cast<SCARDHANDLE>(card))); },
        [&]() -> int64_t {
          // The reader's event counter now, to tell this transaction from one a card
          // removal has ended (LibraryGate::observe). A desk-local call, not a round trip.
          std::string name;
          uint32_t st = 0, proto = 0;
          std::vector<uint8_t> atr;
          const uint32_t rv = status_call(card, &name, &st, &proto, &atr);
          if (rv == sc::kSuccess) return static_cast<int64_t>(st >> 16);
          if (rv == sc::kWRemovedCard || rv == sc::kWResetCard || rv == sc::kENoSmartcard) return LibraryGate::kGone;
          return LibraryGate::kUnknown;
        });
  }
  uint32_t end_transaction(ScardHandle card, uint32_t disposition) override {
    return gate().end_transaction(
        card, [&] { return rv32(pcsc().EndTransaction(static_cast<SCARDHANDLE>(card), disposition)); });
  }

  uint32_t transmit(ScardHandle card, uint32_t send_protocol, std::span<const uint8_t> command,
                    uint32_t* recv_protocol, uint32_t recv_capacity, Buffer* response) override {
    SCARD_IO_REQUEST send_pci{send_protocol, sizeof(SCARD_IO_REQUEST)};
    SCARD_IO_REQUEST recv_pci{*recv_protocol, sizeof(SCARD_IO_REQUEST)};
    // Programs pass buffers of up to 64 KiB for answers of a few bytes: receive into this
    // thread's scratch buffer (never cleared) and copy out only what came back.
    uint8_t* buf = scratch(recv_capacity);
    DWORD len = recv_capacity;
    const LONG rv = gate().lookup(card, [&] {
      return rv32(pcsc().Transmit(static_cast<SCARDHANDLE>(card), &send_pci, command.data(),
                                  static_cast<DWORD>(command.size()), &recv_pci, buf, &len));
    });
    *recv_protocol = static_cast<uint32_t>(recv_pci.dwProtocol);
    response->length = static_cast<uint32_t>(len);
    if (rv == SCARD_S_SUCCESS) {
      response->data.assign(buf, buf + std::min<std::size_t>(len, recv_capacity));
    } else {
      response->data.clear();
    }
    return rv32(rv);
  }

  uint32_t control(ScardHandle card, uint32_t code, std::span<const uint8_t> in, uint32_t recv_capacity,
                   Buffer* out) override {
    uint8_t* buf = scratch(recv_capacity);
    DWORD returned = 0;
    const LONG rv = gate().lookup(card, [&] {
      return rv32(pcsc().Control(static_cast<SCARDHANDLE>(card), code, in.data(), static_cast<DWORD>(in.size()), buf,
                                 recv_capacity, &returned));
    });
    out->length = static_cast<uint32_t>(returned);
    if (rv == SCARD_S_SUCCESS) {
      out->data.assign(buf, buf + std::min<std::size_t>(returned, recv_capacity));
    } else {
      out->data.clear();
    }
    return rv32(rv);
  }

  uint32_t get_attrib(ScardHandle card, uint32_t attr, uint32_t capacity, Buffer* out) override {
    out->data.resize(std::max<uint32_t>(capacity, 1));
    DWORD len = capacity;
    const LONG rv = gate().lookup(
        card, [&] { return rv32(pcsc().GetAttrib(static_cast<SCARDHANDLE>(card), attr, out->data.data(), &len)); });
    out->length = static_cast<uint32_t>(len);
    if (rv == SCARD_S_SUCCESS) {
      out->data.resize(std::min<std::size_t>(len, out->data.size()));
    } else {
      out->data.clear();
    }
    return rv32(rv);
  }

  uint32_t set_attrib(ScardHandle card, uint32_t attr, std::span<const uint8_t> value) override {
    return gate().lookup(card, [&] {
      return rv32(
          pcsc().SetAttrib(static_cast<SCARDHANDLE>(card), attr, value.data(), static_cast<DWORD>(value.size())));
    });
  }

  uint32_t status(ScardHandle card, std::string* reader, uint32_t* state, uint32_t* protocol,
                  std::vector<uint8_t>* atr) override {
    return gate().lookup(card, [&] { return status_call(card, reader, state, protocol, atr); });
  }

 private:
  // This thread's receive buffer, at least |n| bytes (and never empty: libpcsclite wants a pointer).
  static uint8_t* scratch(uint32_t n) {
    thread_local std::vector<uint8_t> buf;
    if (buf.size() < std::max<uint32_t>(n, 1)) buf.resize(std::max<uint32_t>(n, 1));
    return buf.data();
  }
  // SCardStatus itself; the caller is inside a gate section.
  static uint32_t status_call(ScardHandle card, std::string* reader, uint32_t* state, uint32_t* protocol,
                              std::vector<uint8_t>* atr) {
    char name[MAX_READERNAME + 1] = {};
    DWORD name_len = sizeof name;
    BYTE atr_buf[MAX_ATR_SIZE] = {};
    DWORD atr_len = sizeof atr_buf;
    DWORD st = 0, proto = 0;
    const LONG rv = pcsc().Status(static_cast<SCARDHANDLE>(card), name, &name_len, &st, &proto, atr_buf, &atr_len);
    if (rv == SCARD_S_SUCCESS) {
      *reader = std::string(name, strnlen(name, sizeof name));
      *state = static_cast<uint32_t>(st);
      *protocol = static_cast<uint32_t>(proto);
      atr->assign(atr_buf, atr_buf + std::min<DWORD>(atr_len, sizeof atr_buf));
    }
    return rv32(rv);
  }
};

}  // namespace

std::unique_ptr<CardApi> make_pcsc_card_api() {
  // With PCSCLITE_NO_BLOCKING, libpcsclite hands SCARD_E_SHARING_VIOLATION back instead of
  // retrying every 100 ms inside Transmit/Status/Reconnect. We pass it on: the program on
  // the server, whose own libpcsclite retries (or not, per its own setting), then behaves
  // exactly as with a local pcscd, and a desk worker is never stuck in a retry loop.
  ::setenv("PCSCLITE_NO_BLOCKING", "1", 1);
  return std::make_unique<PcscCardApi>();
}

CardApi& process_pcsc_card_api() {
  static CardApi* api = make_pcsc_card_api().release();
  return *api;
}

}  // namespace cardbridge::client
