// CardApi: the slice of the PC/SC API the desk engine uses, in plain C++ types. The real
// implementation (pcsc/pcsc_card_api.cpp) is a thin veneer over libpcsclite; unit tests
// use a fake. Implementations must be callable from several threads at once, with the
// same guarantees as libpcsclite (calls on one context are serialised by the library).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace cardbridge::client {

using ScardContext = int64_t;
using ScardHandle = int64_t;

struct ReaderStateIo {
  std::string name;
  uint32_t current_state = 0;  // in
  uint32_t event_state = 0;    // out
  std::vector<uint8_t> atr;    // out
};

struct Buffer {
  std::vector<uint8_t> data;  // result bytes when rv == 0
  uint32_t length = 0;        // the returned (or needed) length, as the API reports it
};

class CardApi {
 public:
  virtual ~CardApi() = default;
  virtual uint32_t establish(uint32_t scope, ScardContext* ctx) = 0;
  virtual uint32_t release(ScardContext ctx) = 0;
  // SCARD_E_NO_READERS_AVAILABLE leaves |readers| empty.
  virtual uint32_t list_readers(ScardContext ctx, std::vector<std::string>* readers) = 0;
  virtual uint32_t get_status_change(ScardContext ctx, uint32_t timeout_ms,
                                     std::vector<ReaderStateIo>& states) = 0;
  virtual uint32_t cancel(ScardContext ctx) = 0;
  virtual uint32_t connect(ScardContext ctx, const std::string& reader, uint32_t share_mode,
                           uint32_t protocols, ScardHandle* card, uint32_t* active_protocol) = 0;
  virtual uint32_t reconnect(ScardHandle card, uint32_t share_mode, uint32_t protocols,
                             uint32_t initialization, uint32_t* active_protocol) = 0;
  virtual uint32_t disconnect(ScardHandle card, uint32_t disposition) = 0;
  virtual uint32_t begin_transaction(ScardHandle card) = 0;
  virtual uint32_t end_transaction(ScardHandle card, uint32_t disposition) = 0;
  // |recv_protocol| in: the caller's receive PCI protocol; out: as the API set it.
  virtual uint32_t transmit(ScardHandle card, uint32_t send_protocol,
                            std::span<const uint8_t> command, uint32_t* recv_protocol,
                            uint32_t recv_capacity, Buffer* response) = 0;
  virtual uint32_t control(ScardHandle card, uint32_t code, std::span<const uint8_t> in,
                           uint32_t recv_capacity, Buffer* out) = 0;
  virtual uint32_t get_attrib(ScardHandle card, uint32_t attr, uint32_t capacity, Buffer* out) = 0;
  virtual uint32_t set_attrib(ScardHandle card, uint32_t attr, std::span<const uint8_t> value) = 0;
  // |state| is pcsc-lite's dwState: event counter << 16 | daemon reader state.
  virtual uint32_t status(ScardHandle card, std::string* reader, uint32_t* state,
                          uint32_t* protocol, std::vector<uint8_t>* atr) = 0;
};

}  // namespace cardbridge::client
